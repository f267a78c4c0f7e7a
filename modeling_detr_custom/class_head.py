"""The class head's shape and init, which follow `config.classification_loss`, and loading a checkpoint whose head
was trained for the other kind.

Softmax (`"cross_entropy"`, DETR): num_labels + 1 logits, the last "no object", zero bias. Sigmoid (`"focal"`,
`"varifocal"`, Deformable DETR / RT-DETR): num_labels independent logits, no "no object" column (every class can be
off), bias at the prior -log((1 - p) / p), p = SIGMOID_CLASS_PRIOR.
"""
import json
import math

from transformers import initialization as init
from transformers.utils import logging

from .configuration_detr_custom import SIGMOID_CLASSIFICATION_LOSSES, uses_sigmoid_classes

# the probability every class starts at with a sigmoid head (RetinaNet's and Deformable DETR's prior)
SIGMOID_CLASS_PRIOR = 0.01
# from_pretrained options that say where config.json is
_HUB_KWARGS = ("cache_dir", "revision", "subfolder", "token", "local_files_only")

logger = logging.get_logger(__name__)


def class_head_outputs(config) -> int:
    """num_labels + 1 for a softmax head (+ "no object"), num_labels for a sigmoid head."""
    return config.num_labels + (0 if uses_sigmoid_classes(config) else 1)


def init_class_head_bias_(class_embed, config) -> None:
    """Called by `_init_weights` after the generic Linear init (zero bias): a sigmoid head's classes start at
    probability SIGMOID_CLASS_PRIOR, so that the focal loss of the many easy negatives does not swamp the first steps
    (Lin et al. 2017, section 4.1; Deformable DETR). A softmax head keeps its zero bias."""
    if uses_sigmoid_classes(config):
        init.constant_(class_embed.bias, -math.log((1 - SIGMOID_CLASS_PRIOR) / SIGMOID_CLASS_PRIOR))


def replace_class_head_for_a_new_loss(name_or_path, from_pretrained_kwargs: dict) -> None:
    """`from_pretrained(softmax checkpoint, classification_loss="focal")`, or the reverse: the class head changes shape
    (num_labels + 1 <-> num_labels outputs), so it is newly initialized (`ignore_mismatched_sizes=True`, as for a new
    num_labels) and a log line says so, instead of transformers' size-mismatch error. Checkpoints without the field
    (ours before it, transformers' DETR) are softmax."""
    new = from_pretrained_kwargs.get("classification_loss")
    if new is None or from_pretrained_kwargs.get("config") is not None:
        return
    from transformers.utils import cached_file

    hub_kwargs = {k: from_pretrained_kwargs[k] for k in _HUB_KWARGS if k in from_pretrained_kwargs}
    config_file = cached_file(name_or_path, "config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if config_file is None:
        return
    with open(config_file) as f:
        saved = json.load(f).get("classification_loss", "cross_entropy")
    saved_sigmoid, new_sigmoid = saved in SIGMOID_CLASSIFICATION_LOSSES, new in SIGMOID_CLASSIFICATION_LOSSES
    if saved_sigmoid == new_sigmoid:
        return
    from_pretrained_kwargs["ignore_mismatched_sizes"] = True
    kinds = {False: "softmax", True: "sigmoid"}
    logger.warning(
        "%s has a %s class head (classification_loss=%r); classification_loss=%r needs a %s head, so class_embed is "
        "newly initialized%s and must be trained. The rest of the model is loaded.", name_or_path,
        kinds[saved_sigmoid], saved, new, kinds[new_sigmoid], " at the class prior" if new_sigmoid else "")
