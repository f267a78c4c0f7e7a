"""DETR, Hugging Face-compatible: `DetrCustomConfig`, `DetrCustomModel`, `DetrCustomForObjectDetection`,
`DetrCustomImageProcessor`.

Importing the package registers the classes with transformers' Auto classes (model_type "detr_custom"), and for
auto class, so that `save_pretrained` writes the code files and `auto_map` next to the weights: the folder then
loads anywhere with `trust_remote_code=True`.
"""
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForObjectDetection

from .configuration_detr_custom import DetrCustomConfig
from .image_processing_detr_custom import DetrCustomImageProcessor
from .loss_detr_custom import DetrCustomLoss, HungarianMatcher
from .modeling_detr_custom import (
    DetrCustomForObjectDetection,
    DetrCustomModel,
    DetrCustomModelOutput,
    DetrCustomObjectDetectionOutput,
    DetrCustomPreTrainedModel,
)

__all__ = [
    "DetrCustomConfig",
    "DetrCustomModel",
    "DetrCustomForObjectDetection",
    "DetrCustomImageProcessor",
    "DetrCustomPreTrainedModel",
    "DetrCustomModelOutput",
    "DetrCustomObjectDetectionOutput",
    "DetrCustomLoss",
    "HungarianMatcher",
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
