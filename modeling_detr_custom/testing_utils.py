"""Shared test helpers: tiny configs, meaningful random weights, a padded batch with labels.

Used by tests/ and benchmarks/ (like `transformers.testing_utils`); no model file imports it, so it does not travel
with `save_pretrained` as remote code.
"""
import ast
import inspect
import math
import pathlib

import torch

PACKAGE = pathlib.Path(__file__).parent

TINY = dict(
    backbone="resnet18", use_pretrained_backbone=False, d_model=32, encoder_layers=2, decoder_layers=2,
    encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10,
    num_labels=3,
)


# embedding tables (ours, transformers' and the original's names) get N(0, 1); every other matrix is scaled by its
# fan-in, so that heads do not saturate (a saturated box sigmoid would make box comparisons vacuous)
EMBEDDING_TABLES = ("query_embed", "row_embed", "col_embed", "query_position_embeddings", "row_embeddings",
                    "column_embeddings")


def tiny_kwargs(**overrides) -> dict:
    return {**TINY, **overrides}


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights and BatchNorm statistics at scales that make outputs differ across queries and images.

    Default inits give nearly constant DETR outputs (zero-mean heads), which would make parity checks vacuous.
    """
    generator = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=generator)

    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point():
                continue
            if "running_var" in name:
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.ndim == 1 and name.endswith("weight"):
                tensor.copy_(1 + 0.2 * randn(tensor.shape))
            elif tensor.ndim == 1:
                tensor.copy_(0.2 * randn(tensor.shape))
            elif any(table in name for table in EMBEDDING_TABLES):
                tensor.copy_(randn(tensor.shape))
            else:
                tensor.copy_(randn(tensor.shape) * math.sqrt(2.0 / tensor[0].numel()))
            # sharper attention, so that queries read different cells and their outputs differ (~0.02 in boxes,
            # ~0.1 in logits across queries for the tiny config) instead of all averaging the same memory
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                tensor.mul_(3.0)
            elif name.endswith("in_proj_weight"):   # the original's packed [q; k; v]
                tensor[: 2 * tensor.shape[1]].mul_(3.0)
    return model


def padded_batch(seed: int = 0, height: int = 160, width: int = 128):
    """Two images of different sizes padded into one batch, with labels (one has 2 objects, the other 1)."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn((2, 3, height, width), generator=generator)
    pixel_mask = torch.ones((2, height, width), dtype=torch.long)
    pixel_mask[1, height - 40:] = 0
    pixel_mask[1, :, width - 32:] = 0
    pixel_values[1][:, pixel_mask[1] == 0] = 0
    labels = [
        {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]])},
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.6, 0.5, 0.2]])},
    ]
    return pixel_values, pixel_mask, labels


def gradients_with_and_without_checkpointing(model: torch.nn.Module, *inputs, **kwargs):
    """`model(*inputs, **kwargs).loss` and its backward twice, as the model is and with gradient checkpointing on:
    (loss, {name: gradient}) of each run, plain first. Use a train-mode model without dropout."""
    results = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            model.gradient_checkpointing_enable()
        loss = model(*inputs, **kwargs).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    return results


def train_on_a_fixed_batch(model: torch.nn.Module, steps: int = 50, lr: float = 1e-3) -> list[float]:
    """`steps` AdamW steps (clipping 0.1) of `model` on `padded_batch` at 64 x 64, the backbone frozen (its cost
    dominates on CPU); the training losses. The tests of each variant check that the loss drops."""
    model.train()
    model.model.backbone.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    pixel_values, pixel_mask, labels = padded_batch(height=64, width=64)
    losses = []
    for _ in range(steps):
        loss = model(pixel_values, pixel_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        losses.append(loss.item())
    return losses


def outputs_with_garbage_in_the_padding(model: torch.nn.Module, pixel_values, pixel_mask, value: float = 1e3):
    """(outputs, outputs with every padded cell of every level set to `value` after the deformable variant's level
    projections), in no_grad: equal when nothing reads the padded memory."""
    from .multiscale import level_masks

    def fill_padding(module, inputs, maps):
        return [level.masked_fill(~mask[:, None], value) for level, mask in zip(maps, level_masks(pixel_mask, maps))]

    with torch.no_grad():
        clean = model(pixel_values, pixel_mask)
        handle = model.model.input_proj.register_forward_hook(fill_padding)
        try:
            dirty = model(pixel_values, pixel_mask)
        finally:
            handle.remove()
    return clean, dirty


def package_import_graph(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
    """Module name -> the package modules it imports, read with `ast` from every file of the package, imports inside
    functions included. Each must be `from .module import name`: the only form transformers' remote-code copier
    (`get_relative_imports`, a regex) follows."""
    graph = {}
    for path in sorted(package.glob("*.py")):
        graph[path.stem] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                absolute = [alias.name for alias in node.names if alias.name.split(".")[0] == package.name]
                assert not absolute, f"{path.name}:{node.lineno} imports {absolute} absolutely; import relatively"
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    assert (node.module or "").split(".")[0] != package.name, \
                        f"{path.name}:{node.lineno} imports from {node.module} absolutely; import relatively"
                    continue
                assert node.level == 1 and node.module and "." not in node.module, \
                    f"{path.name}:{node.lineno}: write relative imports as `from .module import name`"
                graph[path.stem].add(node.module)
    return graph


def remote_code_files() -> set[str]:
    """The files that must travel: those defining the classes registered for auto class, and everything they import
    from the package, transitively (read from the sources, so a new file cannot be forgotten)."""
    from .configuration_detr_custom import DetrCustomConfig
    from .image_processing_detr_custom import DetrCustomImageProcessor
    from .modeling_detr_custom import DetrCustomForObjectDetection, DetrCustomModel

    graph = package_import_graph()
    roots = {pathlib.Path(inspect.getfile(cls)).stem
             for cls in (DetrCustomConfig, DetrCustomModel, DetrCustomForObjectDetection, DetrCustomImageProcessor)}
    needed, todo = set(), list(roots)
    while todo:
        module = todo.pop()
        if module not in needed:
            needed.add(module)
            todo.extend(graph[module])
    return {f"{module}.py" for module in needed}


def pipeline_detections_without_the_package(folder: pathlib.Path, digits: int = 5) -> list[tuple]:
    """Runs `pipeline("object-detection", model=folder, trust_remote_code=True)` on `folder/image.png` in a fresh
    process where this package cannot be imported (so the folder's own code files run), threshold 0; returns
    `(label, score rounded to digits, box)` per detection."""
    import json
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["modeling_detr_custom"] = None   # the package cannot be imported in this process
        import PIL.Image
        from transformers import pipeline
        folder = {str(folder)!r}
        detector = pipeline("object-detection", model=folder, trust_remote_code=True)
        assert type(detector.model).__module__.startswith("transformers_modules")
        found = detector(PIL.Image.open(folder + "/image.png"), threshold=0.0)
        print(json.dumps([(d["label"], round(d["score"], {digits}), d["box"]) for d in found]))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(pathlib.Path(folder).parent / "modules")}
    result = subprocess.run([sys.executable, "-c", script], cwd=pathlib.Path(folder).parent, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return [tuple(d) for d in json.loads(result.stdout.strip().splitlines()[-1])]
