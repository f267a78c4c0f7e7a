"""Model cards and Hub pushes for training output folders.

`render_model_card(output_dir, hub_model_id=None)` writes `output_dir/README.md` from its config.json and
metrics.json; `check_hub_token` fails fast before training when pushing cannot work; `push_output_dir` uploads
the folder. Only huggingface_hub, jinja2 and safetensors (with numpy) are needed, not torch.
"""
import importlib

__all__ = ["render_model_card", "check_hub_token", "push_output_dir"]
_MODULE_OF = {"render_model_card": "render", "check_hub_token": "push", "push_output_dir": "push"}


def __getattr__(name):
    # imported on first use, so that `python -m hub_cards.render` / `hub_cards.push` run their module only once
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
