"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", 2021) in pure PyTorch, through `F.grid_sample`.

Each query looks at a few points around its reference point on every feature level instead of at every position:
it predicts per head and per point an offset and a weight (softmax over all the points of all levels of a head),
samples the projected value bilinearly there and sums. No compiled extension: the same code runs on CPU and GPU,
in fp32 and under bf16 autocast. The sampling matches Deformable DETR's pytorch reference
(`ms_deform_attn_core_pytorch`: locations in [0, 1] mapped to grid_sample's [-1, 1], bilinear, zero padding,
`align_corners=False`); the number of points may differ per level as in RT-DETRv2 (`num_points=[4, 4, 2]`).

Used by deformable decoder layers (cross-attention from queries to the flattened multi-scale memory); the layer that
uses it adds the query position embedding to `query` before the call.
"""
import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init


def _shapes_as_list(spatial_shapes) -> list[tuple[int, int]]:
    if isinstance(spatial_shapes, torch.Tensor):
        return [(int(height), int(width)) for height, width in spatial_shapes.tolist()]
    return [(height, width) for height, width in spatial_shapes]   # ints, or symbolic sizes while exporting


def multi_scale_deformable_attention(
    value: torch.Tensor,                  # [batch, sequence, heads, head_dim], the levels flattened and concatenated
    spatial_shapes,                       # [levels] of (height, width): list of ints or a LongTensor [levels, 2]
    sampling_locations: torch.Tensor,     # [batch, queries, heads, points, 2], (x, y) in [0, 1]; the points of level
                                          # 0 first, then level 1, ...
    attention_weights: torch.Tensor,      # [batch, queries, heads, points]
    num_points: Sequence[int],            # points per level, summing to `points`
    level_start_index=None,               # [levels] where each level starts in `sequence`; only checked
) -> torch.Tensor:                        # [batch, queries, heads * head_dim]
    """Bilinear samples of each level's value at the given locations, weighted and summed over points and levels.

    One `grid_sample` per level with the heads folded into the batch, as the reference; a location outside [0, 1]
    reads zeros, as does the half pixel beyond the outermost centres. Faster on CPU than the reference's layout
    (benchmarks/bench_attention_deformable.py): each level's value is handed over channels-last (one cache-friendly
    copy per level instead of a transpose of the whole value), the points are the rows of the sampled grid so the
    weighted sum runs over a middle dimension with the queries innermost, and the value is split rather than sliced
    (its gradient is one concatenation, not a zero-filled full-size tensor per level).
    """
    batch, _, heads, head_dim = value.shape
    queries = sampling_locations.shape[1]
    shapes = _shapes_as_list(spatial_shapes)
    sizes = [height * width for height, width in shapes]
    if level_start_index is not None:
        starts = level_start_index.tolist() if isinstance(level_start_index, torch.Tensor) else level_start_index
        if [int(start) for start in starts] != [0, *itertools.accumulate(sizes[:-1])]:
            raise ValueError(f"level_start_index {list(starts)} does not match spatial_shapes {shapes}: the levels "
                             f"are concatenated in order, so level l starts at the sum of the earlier h * w.")
    # sampled in the wider of the two dtypes (fp32 locations with a bf16 value: fp32, as autocast does), returned in
    # the value's dtype
    dtype, out_dtype = torch.promote_types(value.dtype, sampling_locations.dtype), value.dtype
    grids = (2 * sampling_locations - 1).permute(0, 2, 3, 1, 4).flatten(0, 1)   # [batch * heads, points, queries, 2]
    weights = attention_weights.permute(0, 2, 3, 1).flatten(0, 1)              # [batch * heads, points, queries]
    grids, weights = grids.split(list(num_points), dim=1), weights.split(list(num_points), dim=1)
    output = None
    for (height, width), value_level, grid, weight in zip(shapes, value.split(sizes, dim=1), grids, weights):
        # [batch * heads, head_dim, height, width], channels-last in memory
        value_level = value_level.transpose(1, 2).reshape(batch * heads, height, width, head_dim).to(dtype)
        # [batch * heads, head_dim, points, queries]
        sampled = F.grid_sample(value_level.permute(0, 3, 1, 2), grid.to(dtype), mode="bilinear",
                                padding_mode="zeros", align_corners=False)
        level_output = (sampled * weight[:, None]).sum(2)               # [batch * heads, head_dim, queries]
        output = level_output if output is None else output + level_output
    return output.view(batch, heads * head_dim, queries).transpose(1, 2).to(out_dtype)


class DetrCustomDeformableAttention(nn.Module):
    """Multi-scale deformable attention with Deformable DETR's parameters and their initialization.

    Submodule names follow Deformable DETR (and transformers' `DeformableDetrMultiscaleDeformableAttention`):
    `sampling_offsets`, `attention_weights`, `value_proj`, `output_proj`, so checkpoints map one to one.

    Reference points are points `(x, y)` or boxes `(cx, cy, w, h)` per level, in [0, 1] of each level's visible
    region. With points, an offset is in pixels of its level; with boxes, it is scaled by the box's width and height
    times `offset_scale / points of that level` (Deformable DETR: 0.5 / n_points; RT-DETRv2's `offset_scale`).
    `value_mask` is 1 / True on real pixels and 0 on padding (the `pixel_mask` polarity): padded positions of the
    value are zeroed before sampling.
    """

    def __init__(self, d_model: int, num_heads: int, num_levels: int, num_points: int | Sequence[int] = 4,
                 offset_scale: float = 0.5):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads}); choose num_heads "
                             f"among the divisors of d_model.")
        if isinstance(num_points, int):
            num_points = [num_points] * num_levels
        num_points = [int(n) for n in num_points]
        if len(num_points) != num_levels or min(num_points) < 1:
            raise ValueError(f"num_points must be a positive int or one positive int per level ({num_levels} "
                             f"levels), got {num_points}.")
        self.d_model, self.num_heads, self.num_levels = d_model, num_heads, num_levels
        self.num_points = num_points              # per level
        self.offset_scale = offset_scale
        total_points = sum(num_points)
        self.sampling_offsets = nn.Linear(d_model, num_heads * total_points * 2)
        self.attention_weights = nn.Linear(d_model, num_heads * total_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Deformable DETR's init: offsets start on a ring of directions, one per head (cos, sin of 2 pi h / heads,
        scaled so the larger coordinate is 1), the k-th point of each level k times as far out; uniform attention
        weights; xavier-uniform projections with zero bias. Written with transformers' `initialization` functions,
        which leave alone a parameter that `from_pretrained` has already loaded, so a model's `_init_weights` may
        call this."""
        init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)                 # [heads, 2]
        directions = directions / directions.abs().max(-1, keepdim=True).values
        # point k of a level (counted from 1 within its level) goes k steps along its head's direction
        steps = torch.cat([torch.arange(1, n + 1, dtype=torch.float32) for n in self.num_points])   # [points]
        init.copy_(self.sampling_offsets.bias, (directions[:, None, :] * steps[None, :, None]).flatten())
        init.zeros_(self.attention_weights.weight)
        init.zeros_(self.attention_weights.bias)
        for projection in (self.value_proj, self.output_proj):
            init.xavier_uniform_(projection.weight)
            init.zeros_(projection.bias)

    def _sampling_locations(self, reference_points, offsets, shapes):
        # per level: the reference's points (x, y) plus the offsets in that level's units
        locations = []
        for level, (points, (height, width), level_offsets) in enumerate(
                zip(self.num_points, shapes, offsets.split(self.num_points, dim=3))):
            reference = reference_points[:, :, None, level, None, :]     # [batch, queries, 1, 1, 2 or 4]
            if reference_points.shape[-1] == 2:
                scaled = torch.stack([level_offsets[..., 0] / width, level_offsets[..., 1] / height], -1)
            else:
                scaled = level_offsets / points * reference[..., 2:] * self.offset_scale   # Deformable DETR's order
            locations.append(reference[..., :2] + scaled)   # [batch, queries, heads, points of this level, 2]
        return torch.cat(locations, dim=3)

    def _check_inputs(self, query, reference_points, value, shapes, value_mask):
        if len(shapes) != self.num_levels:
            raise ValueError(f"spatial_shapes has {len(shapes)} levels but the attention was built for "
                             f"num_levels={self.num_levels}; pass one (height, width) per level.")
        if sum(h * w for h, w in shapes) != value.shape[1]:
            raise ValueError(f"spatial_shapes {shapes} cover {sum(h * w for h, w in shapes)} positions but value has "
                             f"{value.shape[1]}; value must be the levels flattened (row-major) and concatenated.")
        if reference_points.shape[-1] not in (2, 4) or tuple(reference_points.shape[:3]) != (
                query.shape[0], query.shape[1], self.num_levels):
            raise ValueError(f"reference_points must be [batch, queries, levels, 2] (x, y) or [.., 4] (cx, cy, w, "
                             f"h) = [{query.shape[0]}, {query.shape[1]}, {self.num_levels}, 2 or 4], got "
                             f"{list(reference_points.shape)}.")
        if value_mask is not None and tuple(value_mask.shape) != tuple(value.shape[:2]):
            raise ValueError(f"value_mask must be [batch, sequence] = {list(value.shape[:2])} (1 = real pixel, 0 = "
                             f"padding), got {list(value_mask.shape)}.")

    def forward(
        self,
        query: torch.Tensor,                     # [batch, queries, d_model], position embedding already added
        reference_points: torch.Tensor,          # [batch, queries, levels, 2] (x, y) or [.., 4] (cx, cy, w, h)
        value: torch.Tensor,                     # [batch, sequence, d_model], levels flattened and concatenated
        spatial_shapes,                          # [levels] of (height, width), list or LongTensor [levels, 2]
        level_start_index=None,                  # [levels]; computed from spatial_shapes when None
        value_mask: torch.Tensor | None = None,  # [batch, sequence], 1 / True = real pixel, 0 = padding
    ) -> tuple[torch.Tensor, torch.Tensor]:      # [batch, queries, d_model], [batch, queries, heads, points]
        """Returns the attention output and the attention weights (softmax over all points of all levels per
        head; the points of level 0 first)."""
        shapes = _shapes_as_list(spatial_shapes)
        self._check_inputs(query, reference_points, value, shapes, value_mask)
        batch, queries, _ = query.shape
        total_points = sum(self.num_points)
        value = self.value_proj(value)
        if value_mask is not None:
            value = value.masked_fill(~value_mask.bool()[..., None], 0.0)
        value = value.unflatten(-1, (self.num_heads, self.d_model // self.num_heads))  # [batch, seq, heads, dim]
        offsets = self.sampling_offsets(query).view(batch, queries, self.num_heads, total_points, 2)
        weights = self.attention_weights(query).view(batch, queries, self.num_heads, total_points).softmax(-1)
        # locations in fp32 even under bf16 autocast: bf16's 8 bits would move a point by ~1/256 of the image
        # (a third of a pixel at 80 x 80)
        locations = self._sampling_locations(reference_points.float(), offsets.float(), shapes)
        output = multi_scale_deformable_attention(value, shapes, locations, weights, self.num_points,
                                                  level_start_index)
        return self.output_proj(output), weights
