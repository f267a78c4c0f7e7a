"""Pushing a training output folder (model, processor, card, pictures, code files) to the Hub.

- `check_hub_token(token=None)`: call it before training starts; it fails at once, with what to do, when no token
  is available (argument, `HF_TOKEN`, or `hf auth login`), when `HF_HUB_OFFLINE` is set, or (with `verify=True`)
  when the Hub rejects the token or it is read-only.
- `push_output_dir(output_dir, repo_id)`: creates the repository if needed, re-renders the card for the resolved
  `repo_id` (when metrics.json is there; `eval_step` as in `render_model_card`; `render_card=False` keeps the
  README.md as it is) and uploads the folder in one commit. Optimizer / accelerate states and checkpoint
  sub-folders stay local.

CLI: `python -m hub_cards.push OUTPUT_DIR REPO_ID [--private] [--token TOKEN] [--eval-step N] [--keep-card]`.
"""
import argparse
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, get_token
from huggingface_hub.constants import ENDPOINT, is_offline_mode
from huggingface_hub.errors import HfHubHTTPError

from .render import render_model_card

# what a training run may leave in its output folder that a Hub user does not need
IGNORE_PATTERNS = [
    "checkpoint*/**", "checkpoints/**", "step_*/**", "epoch_*/**", "optimizer.bin", "optimizer.pt", "scheduler.bin",
    "scheduler.pt", "scaler.pt", "random_states_*.pkl", "*.tmp",
]
NO_TOKEN_MESSAGE = (
    "Pushing to the Hugging Face Hub needs a token with write access, and none was found. Pass it (--hub_token to the "
    "training script, --token to python -m hub_cards.push), set "
    "the HF_TOKEN environment variable, or run `hf auth login` once (see https://huggingface.co/settings/tokens). "
    "This is checked before training starts so that a long run does not fail at the end."
)


def check_hub_token(token: str | None = None, *, verify: bool = False) -> str:
    """Return the token to push with: `token`, else `HF_TOKEN`, else the one saved by `hf auth login`.

    Raises ValueError when there is none or when Hub access is switched off (`HF_HUB_OFFLINE=1`). With
    `verify=True` it also asks the Hub (`whoami`): ValueError for a rejected or read-only token, RuntimeError when
    the Hub cannot be reached.
    """
    token = token or get_token()
    if not token:
        raise ValueError(NO_TOKEN_MESSAGE)
    if is_offline_mode():
        raise ValueError("HF_HUB_OFFLINE is set: the Hub cannot be reached, so nothing can be pushed. Unset it (or "
                         "drop --push_to_hub) before training.")
    if verify:
        try:
            info = HfApi(token=token).whoami()
        except HfHubHTTPError as error:
            raise ValueError(f"The Hub at {ENDPOINT} rejected the token: {error}") from error
        except Exception as error:  # connection refused, DNS, timeouts: the HTTP client's own error types
            raise RuntimeError(f"Could not reach the Hub at {ENDPOINT} to check the token ({error}): pushing at "
                               "the end of training would fail the same way.") from error
        role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise ValueError(f"The token of {info.get('name')!r} is read-only: pushing needs a write token.")
    return token


def push_output_dir(output_dir, repo_id: str, *, private: bool = False, token: str | None = None,
                    commit_message: str = "Upload DETR model, processor, model card and code",
                    eval_step: int | None = None, render_card: bool = True) -> CommitInfo:
    """Create `repo_id` if needed and upload `output_dir` (README.md re-rendered for `repo_id`) in one commit."""
    if not repo_id:
        raise ValueError("Pushing needs a repository name: pass --hub_model_id owner/name (or just name, for "
                         "your own namespace).")
    output_dir = Path(output_dir)
    api = HfApi(token=check_hub_token(token))
    if not (output_dir / "config.json").is_file():
        raise ValueError(f"{output_dir} has no config.json: save the model there before pushing it.")
    # create_repo resolves "name" to "user/name": the card's examples then name the real repository
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if render_card and (output_dir / "metrics.json").is_file():
        render_model_card(output_dir, hub_model_id=repo_id, eval_step=eval_step)
    return api.upload_folder(repo_id=repo_id, folder_path=output_dir, commit_message=commit_message,
                             ignore_patterns=IGNORE_PATTERNS)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Push a training output folder to the Hugging Face Hub.")
    parser.add_argument("output_dir", help="folder written by training/train.py")
    parser.add_argument("repo_id", help="owner/name (or name, for your own namespace)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", default=None, help="default: HF_TOKEN, else the token of `hf auth login`")
    parser.add_argument("--commit-message", default="Upload DETR model, processor, model card and code")
    parser.add_argument("--eval-step", type=int, default=None,
                        help="step of the evaluation of the weights in OUTPUT_DIR (default: the run's best)")
    parser.add_argument("--keep-card", action="store_true", help="upload README.md as it is, do not re-render it")
    args = parser.parse_args(argv)
    commit = push_output_dir(args.output_dir, args.repo_id, private=args.private, token=args.token,
                             commit_message=args.commit_message, eval_step=args.eval_step,
                             render_card=not args.keep_card)
    print(f"pushed {args.output_dir} to {commit.commit_url}")


if __name__ == "__main__":
    main()
