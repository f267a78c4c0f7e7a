"""The heads on the decoder's outputs, built through `registry.HEADS` by the layout the decoder declares (its class
attribute `heads`; by default "per_layer" for a multi-scale decoder, "shared" otherwise):

- "shared" (DETR): one class head and one box MLP, applied to every decoder layer's output (`class_embed`,
  `bbox_embed`);
- "per_layer" (Deformable DETR's iterative box refinement, RT-DETR): one class head and one box MLP per decoder layer
  (`class_embed.<layer>`, `bbox_embed.<layer>`); the multi-scale decoder runs the box heads inside its layers.

A builder takes `(config)` and returns `(class_embed, bbox_embed)`, which the assembly holds under those names (the
names of every checkpoint). The class head's size and init follow the class term's head (`class_head.py`: softmax
with "no object", or per-class sigmoid at the class prior).
"""
import torch
from torch import nn

from .blocks import MLP
from .class_head import class_head_outputs


def class_head(config) -> nn.Linear:
    """`d_model -> class_head_outputs(config)`, marked so that the model's `_init_weights` gives it the class prior."""
    head = nn.Linear(config.d_model, class_head_outputs(config))
    head.is_class_head = True
    return head


def box_head(config) -> MLP:
    """The 3-layer box MLP `d_model -> 4` (cxcywh before the sigmoid, or a refinement delta)."""
    return MLP(config.d_model, config.d_model, 4, num_layers=3)


def shared_heads(config) -> tuple[nn.Module, nn.Module]:
    return class_head(config), box_head(config)


def per_layer_heads(config) -> tuple[nn.ModuleList, nn.ModuleList]:
    class_embed = nn.ModuleList(class_head(config) for _ in range(config.decoder_layers))
    return class_embed, nn.ModuleList(box_head(config) for _ in range(config.decoder_layers))


def layer_predictions(class_embed: nn.Module, bbox_embed: nn.Module, intermediate: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and boxes (sigmoid) of the layers in `intermediate` `[layers, batch, queries, d_model]`: the shared
    heads on all of them, or per-layer heads each on its layer (the last layers' heads when fewer layers are given)."""
    if not isinstance(class_embed, nn.ModuleList):
        return class_embed(intermediate), bbox_embed(intermediate).sigmoid()
    layers = range(len(class_embed) - len(intermediate), len(class_embed))
    logits = torch.stack([class_embed[i](states) for i, states in zip(layers, intermediate)])
    boxes = torch.stack([bbox_embed[i](states).sigmoid() for i, states in zip(layers, intermediate)])
    return logits, boxes
