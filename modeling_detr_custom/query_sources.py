"""Query sources: where the decoder's queries come from. One file per source, each a `QuerySource` built as
`cls(config)` through `registry.QUERY_SOURCES`, chosen by `config.query_source` (None, the default, names the source
the other fields describe: "two_stage" with `two_stage=True`, "learned_boxes" with a multi-scale decoder, "learned"
otherwise):

- "learned" (`query_source_learned.py`, DETR): learned object queries, the single-scale decoder's query positions;
- "learned_boxes" (`query_source_learned_boxes.py`, Deformable DETR's decoder with DAB-DETR's anchors): learned
  content queries and learned reference boxes, for a multi-scale decoder;
- "two_stage" (`query_selection.py`, two-stage Deformable DETR, RT-DETR): the encoder's best proposals give the
  reference boxes and, unless `learn_initial_query`, the content queries; their scores and boxes get the set loss.

The contract of every source: a class attribute `multi_scale` (False: it gives `position` for a single-scale decoder,
`decoder_detr.py`'s interface; True: `content` and `reference` for a multi-scale one), `forward(memory, memory_mask,
spatial_shapes, num_groups) -> Queries` and, optionally, `reset_parameters()` for inits that the model's generic
Linear / Embedding init would undo. `memory` is `[batch, sequence, d_model]`, `memory_mask` `[batch, sequence]`
(True = real; None for a single-scale model without padding), `spatial_shapes` the levels' (height, width) (None for
a single-scale model). `num_groups` is the number of query groups to give (Group DETR, `query_groups.py`:
`config.num_query_groups` in training, 1 in eval mode), group after group; the assembly builds their self-attention
mask. Denoising groups (`denoising.py`) are the assembly's training-time addition to whichever source: they need the
labels, not the memory.

A source's parameters keep the names every checkpoint has (`model.query_embed.weight`, `model.reference_boxes`,
`model.query_selection.*`, `model.extra_query_embeds.<i>.weight`, ...): `QuerySource.mount(owner)` registers them on
the assembly under their own names; the source itself is a plain attribute (`owner.query_source`) and reads them back
through the assembly, so `from_pretrained` (which replaces the assembly's parameters with the loaded ones), `.to()`,
deepcopy and pickling see one copy of each.
"""
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Queries:
    """What a query source gives the decoder (and the loss): `num_groups` groups of `num_queries`, group after
    group."""

    content: torch.Tensor | None = None     # [batch, K * queries, d_model], content queries (multi-scale decoders)
    position: torch.Tensor | None = None    # [batch, K * queries, d_model], query positions (DETR's object queries)
    reference: torch.Tensor | None = None   # [batch, K * queries, 4] cxcywh in [0, 1], the reference boxes
    proposals: object | None = None         # two-stage: the selected proposals (`logits`, `pred_boxes`), for the loss


def concat_groups(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """The groups' tensors concatenated; one group (eval mode) as it is: no copy on the inference path."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def group_embeddings(first: nn.Embedding, extras: nn.ModuleList, num_groups: int, batch: int) -> torch.Tensor:
    """The learned tables of the first `num_groups` query groups (`first`, then `extras`), group after group, for
    each of `batch` images: `[batch, K * queries, d_model]`."""
    tables = [first, *extras][:num_groups]
    return concat_groups([table.weight for table in tables])[None].expand(batch, -1, -1)


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
