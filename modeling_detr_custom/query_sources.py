"""Query sources: where the decoder's queries come from, one class per kind, each built as `cls(config)` through
`registry.QUERY_SOURCES` (chosen by `config.query_source`; None, the default, names the kind the other fields
describe: "two_stage" with `two_stage=True`, "learned_boxes" with a multi-scale decoder, "learned" otherwise).

- "learned" (DETR, Carion et al. 2020): `num_queries` learned object queries, the single-scale decoder's query
  positions (its content starts at zero).
- "learned_boxes" (Deformable DETR's decoder with DAB-DETR's anchors): learned content queries and learned
  reference boxes (inverse-sigmoid space), for a multi-scale decoder.
- "two_stage" (two-stage Deformable DETR, RT-DETR): the encoder's best proposals (`query_selection.py`) give the
  reference boxes and, unless `learn_initial_query`, the content queries; their scores and boxes get the set loss
  (`loss_*_enc`).

The contract of every source: a class attribute `multi_scale` (False: it gives `position` for a single-scale decoder,
`decoder_detr.py`'s interface; True: `content` and `reference` for a multi-scale one), `forward(memory, memory_mask,
spatial_shapes, num_groups) -> Queries` and, optionally, `reset_parameters()` for inits that the model's generic
Linear / Embedding init would undo. `num_groups` is the number of query groups to give (Group DETR,
`query_groups.py`: `config.num_query_groups` in training, 1 in eval mode), group after group; the assembly builds
their self-attention mask. Denoising groups (`denoising.py`) are the assembly's training-time addition to whichever
source: they need the labels, not the memory.

A source's parameters keep the names every checkpoint has (`model.query_embed.weight`, `model.reference_boxes`,
`model.query_selection.*`, `model.extra_query_embeds.<i>.weight`, ...): `QuerySource.mount(owner)` registers them on
the assembly under their own names, the source itself is a plain attribute (`owner.query_source`) and reads them back
through the assembly. So `from_pretrained`, which replaces the assembly's parameters with the loaded ones, `.to()`,
deepcopy and pickling see one copy of each.
"""
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init

from .blocks import inverse_sigmoid
from .query_groups import build_extra_query_embeds
from .query_selection import DetrCustomQuerySelection, SelectedQueries

# the learned reference boxes start with random centres over the image and this width and height
INITIAL_BOX_SIZE = 0.1


@dataclass
class Queries:
    """What a query source gives the decoder (and the loss): `num_groups` groups of `num_queries`, group after
    group."""

    content: torch.Tensor | None = None     # [batch, K * queries, d_model], content queries (multi-scale decoders)
    position: torch.Tensor | None = None    # [batch, K * queries, d_model], query positions (DETR's object queries)
    reference: torch.Tensor | None = None   # [batch, K * queries, 4] cxcywh in [0, 1], the reference boxes
    proposals: SelectedQueries | None = None   # two-stage: the selected proposals, whose logits and boxes get the loss


def _concat(tensors, dim=0):
    """One group (eval mode) as it is: no copy on the inference path."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


class QuerySource(nn.Module):
    """The base of the query sources (see the module docstring): builds like any module, then `mount(owner)` moves
    its parameters and submodules onto the assembly under their own names; after that the source holds none itself
    and finds them, and its train / eval mode, on the assembly."""

    multi_scale: bool = False

    def mount(self, owner: nn.Module) -> None:
        """Registers this source's parameters and submodules on `owner` (in their order; a None entry as a plain None
        attribute, as the assembly had it), and the source as the plain attribute `owner.query_source`."""
        names = []
        for table in (self._parameters, self._modules):
            for name, value in table.items():
                if value is None:
                    setattr(owner, name, None)
                elif isinstance(value, nn.Parameter):
                    owner.register_parameter(name, value)
                else:
                    owner.add_module(name, value)
                names.append(name)
        self._parameters.clear()
        self._modules.clear()
        self.__dict__["_mounted_names"] = frozenset(names)
        self.__dict__["_owner"] = owner
        owner.__dict__["query_source"] = self   # not a submodule: its parameters are the owner's

    def __getattr__(self, name: str):
        owner = self.__dict__.get("_owner")
        if owner is not None and name in self.__dict__["_mounted_names"]:
            return getattr(owner, name)
        return super().__getattr__(name)

    @property
    def training(self) -> bool:   # the assembly's mode once mounted (train() / eval() never reach a plain attribute)
        owner = self.__dict__.get("_owner")
        return owner.training if owner is not None else self.__dict__.get("_training", True)

    @training.setter
    def training(self, mode: bool) -> None:
        self.__dict__["_training"] = mode


class LearnedQueries(QuerySource):
    """DETR's object queries: `query_embed` `[num_queries, d_model]` (and one table per extra query group,
    `extra_query_embeds`), the decoder's query positions."""

    multi_scale = False

    def __init__(self, config):
        super().__init__()
        self.query_embed = nn.Embedding(config.num_queries, config.d_model)   # the learned object queries
        self.extra_query_embeds = build_extra_query_embeds(config)   # query groups 1..K-1, used in training only

    def forward(self, memory, memory_mask, spatial_shapes, num_groups: int) -> Queries:
        embeds = [self.query_embed, *self.extra_query_embeds][:num_groups]
        position = _concat([embed.weight for embed in embeds])                 # [K * queries, d_model]
        return Queries(position=position[None].expand(memory.shape[0], -1, -1))


class LearnedBoxQueries(QuerySource):
    """Learned content queries (`query_embed`) with learned reference boxes (`reference_boxes`, cxcywh in
    inverse-sigmoid space, DAB-DETR's anchors), each extra query group with its own of both."""

    multi_scale = True

    def __init__(self, config):
        super().__init__()
        self.query_embed = nn.Embedding(config.num_queries, config.d_model)
        self.reference_boxes = nn.Parameter(torch.empty(config.num_queries, 4))
        self.extra_query_embeds = build_extra_query_embeds(config)
        self.extra_reference_boxes = nn.ParameterList(
            nn.Parameter(torch.empty(config.num_queries, 4)) for _ in range(config.num_query_groups - 1))
        self.register_module("query_selection", None)   # the two-stage source's, None here (model.query_selection)

    @torch.no_grad()
    def reset_parameters(self):
        """Random centres over the image, `INITIAL_BOX_SIZE` wide and high."""
        for boxes in [self.reference_boxes, *self.extra_reference_boxes]:
            centres = torch.rand(boxes.shape[0], 2)
            sizes = torch.full_like(centres, INITIAL_BOX_SIZE)
            init.copy_(boxes, inverse_sigmoid(torch.cat([centres, sizes], -1)))

    def forward(self, memory, memory_mask, spatial_shapes, num_groups: int) -> Queries:
        batch = memory.shape[0]
        boxes = _concat([self.reference_boxes, *self.extra_reference_boxes][:num_groups])   # [K * queries, 4]
        content = _concat([embed.weight for embed in [self.query_embed, *self.extra_query_embeds][:num_groups]])
        return Queries(content=content[None].expand(batch, -1, -1),                          # [batch, K * q, d]
                       reference=boxes.sigmoid()[None].expand(batch, -1, -1))


class TwoStageQueries(QuerySource):
    """Query selection (`query_selection.py`): the encoder's top proposals give the reference boxes and the content
    queries (or, with `learn_initial_query`, learned content queries `query_embed`); each extra query group has its
    own selection heads (`extra_query_selections`, LW-DETR's: shared heads would select the same proposals)."""

    multi_scale = True

    def __init__(self, config):
        super().__init__()
        self.register_module("query_embed", nn.Embedding(config.num_queries, config.d_model)
                             if config.learn_initial_query else None)   # None: model.query_embed is None
        self.register_parameter("reference_boxes", None)   # the boxes come from the proposals: None
        self.query_selection = DetrCustomQuerySelection(config)
        self.extra_query_embeds = build_extra_query_embeds(config) if config.learn_initial_query else nn.ModuleList()
        self.extra_query_selections = nn.ModuleList(
            DetrCustomQuerySelection(config) for _ in range(config.num_query_groups - 1))

    @torch.no_grad()
    def reset_parameters(self):
        for selection in [self.query_selection, *self.extra_query_selections]:
            selection.reset_parameters()

    def forward(self, memory, memory_mask, spatial_shapes, num_groups: int) -> Queries:
        selections = [self.query_selection, *self.extra_query_selections][:num_groups]
        per_group = [selection(memory, memory_mask, spatial_shapes) for selection in selections]
        selected = SelectedQueries(*(_concat(fields, 1) for fields in zip(*(
            (group.content, group.reference, group.logits, group.pred_boxes) for group in per_group))))
        content = selected.content                                             # [batch, K * queries, d_model]
        if self.query_embed is not None:
            embeds = [self.query_embed, *self.extra_query_embeds][:num_groups]
            content = _concat([embed.weight for embed in embeds])[None].expand(memory.shape[0], -1, -1)
        return Queries(content=content, reference=selected.reference, proposals=selected)   # reference detached
