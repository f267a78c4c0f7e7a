"""DETR, Hugging Face-compatible: `DetrCustomConfig`, `DetrCustomModel`, `DetrCustomForObjectDetection`,
`DetrCustomImageProcessor`.

Importing the package registers the classes with transformers' Auto classes (model_type "detr_custom"), and for
auto class, so that `save_pretrained` writes the code files and `auto_map` next to the weights: the folder then
loads anywhere with `trust_remote_code=True`.

One concept per file, as in facebookresearch/detr's models/: `configuration_detr_custom.py`; `modeling_detr_custom.py`
(outputs, models, box head, the one detection forward); `registry.py`, the seam choosing the encoder / decoder by
`config.encoder_type` / `decoder_type`, the query source, the heads and the criterion (`register_encoder`,
`register_decoder`, `register_query_source`, `register_heads`, `register_criterion` add parts from outside);
its parts `backbone.py`, `position_encoding.py`, `attention_mha.py`, `encoder_detr.py`, `decoder_detr.py`,
`blocks.py` (shared blocks); the CPU speed-ups as one pass in `fast_paths.py` (`apply_fast_paths`, applied to every
model built, and `remove_fast_paths`); `loss_detr_custom.py` and `box_ops.py`; the image processor;
`checkpoint_conversion.py` (key rules, transformers checkpoints in `from_pretrained`). Those travel as remote code.
`convert.py` (original checkpoints and the CLI) sits above the model: it imports the model, nothing in the model
imports it.
"""
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForObjectDetection

from .configuration_detr_custom import DetrCustomConfig
from .fast_paths import apply_fast_paths, remove_fast_paths
from .image_processing_detr_custom import DetrCustomImageProcessor
from .loss_detr_custom import DetrCustomLoss, HungarianMatcher
from .modeling_detr_custom import (
    DetrCustomForObjectDetection,
    DetrCustomModel,
    DetrCustomModelOutput,
    DetrCustomObjectDetectionOutput,
    DetrCustomPreTrainedModel,
    DetrCustomSigmoidObjectDetectionOutput,
)
from .query_sources import Queries, QuerySource
from .registry import (decoder_types, encoder_types, register_criterion, register_decoder, register_encoder,
                       register_heads, register_query_source)

__all__ = [
    "DetrCustomConfig",
    "DetrCustomModel",
    "DetrCustomForObjectDetection",
    "DetrCustomImageProcessor",
    "DetrCustomPreTrainedModel",
    "DetrCustomModelOutput",
    "DetrCustomObjectDetectionOutput",
    "DetrCustomSigmoidObjectDetectionOutput",
    "DetrCustomLoss",
    "HungarianMatcher",
    "apply_fast_paths",
    "remove_fast_paths",
    "register_encoder",
    "register_decoder",
    "register_query_source",
    "QuerySource",
    "Queries",
    "register_heads",
    "register_criterion",
    "encoder_types",
    "decoder_types",
]

AutoConfig.register(DetrCustomConfig.model_type, DetrCustomConfig, exist_ok=True)
AutoModel.register(DetrCustomConfig, DetrCustomModel, exist_ok=True)
AutoModelForObjectDetection.register(DetrCustomConfig, DetrCustomForObjectDetection, exist_ok=True)
AutoImageProcessor.register(DetrCustomConfig, image_processor_classes={"torchvision": DetrCustomImageProcessor},
                            exist_ok=True)
DetrCustomConfig.register_for_auto_class()
DetrCustomModel.register_for_auto_class("AutoModel")
DetrCustomForObjectDetection.register_for_auto_class("AutoModelForObjectDetection")
DetrCustomImageProcessor.register_for_auto_class("AutoImageProcessor")
