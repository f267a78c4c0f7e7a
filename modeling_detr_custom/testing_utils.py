"""Shared test helpers: tiny configs, meaningful random weights, a padded batch with labels.

Used by tests/ and benchmarks/ (like `transformers.testing_utils`); no model file imports it, so it does not travel
with `save_pretrained` as remote code.
"""
import math

import torch

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
