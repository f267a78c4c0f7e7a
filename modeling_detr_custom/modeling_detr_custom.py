"""DETR (Carion et al. 2020) as a Hugging Face model.

backbone (timm, frozen BatchNorm) -> 1x1 input projection -> transformer encoder (post-norm) -> decoder with
learned object queries -> class head (num_labels + 1, last = "no object"; num_labels per-class sigmoid logits with a
focal or varifocal `classification_loss`) and 3-layer box MLP with sigmoid.

Conventions: `pixel_mask` is 1 on real pixels and 0 on padding (the HF polarity; the original DETR's
`NestedTensor.mask` is the reverse). Boxes are (center_x, center_y, width, height), normalized by the unpadded
(visible) image size. Sequences are batch-first: `[batch, sequence, d_model]`. In the paper's names the encoder
output is the `memory`, the learned object queries are `query_pos` and the decoder's input is zeros.

This file holds the outputs, the models and the box head; the parts are one concept per file, as in
facebookresearch/detr's models/: `backbone.py`, `position_encoding.py`, `attention_mha.py`, `encoder_detr.py`,
`decoder_detr.py`, `class_head.py`, shared blocks in `blocks.py`, the loss in `loss_detr_custom.py`, loading
transformers checkpoints in `checkpoint_conversion.py`, Group DETR's query groups (`config.num_query_groups`) in
`query_groups.py`. The query source, the heads and the criterion are built through `registry.py`
(`query_source_learned.py`: DETR's object queries; `heads.py`; `loss_detr_custom.py`). The CPU speed-ups are one
pass over the built model (`fast_paths.py`, applied in `post_init`).
"""
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.models.auto.modeling_auto import MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES
from transformers.utils import ModelOutput

from .backbone import LOADING_CHECKPOINT, DetrCustomBackbone
from .blocks import fp32_on_cpu, mask_if_padded
from .checkpoint_conversion import check_local_checkpoint, converted_transformers_folder
from .class_head import init_class_head_bias_, replace_class_head_for_a_new_loss
from .configuration_detr_custom import DetrCustomConfig, uses_sigmoid_classes
from .fast_paths import apply_fast_paths
from .heads import layer_predictions
from .inputs_detr_custom import check_pixel_inputs
from .model_deformable import DetrCustomDeformableDetector
from .position_encoding import build_position_embedding
from .query_groups import EXTRA_GROUP_KEYS_TO_IGNORE, group_attention_mask, init_missing_groups_
from .registry import (DECODERS, ENCODERS, build_criterion, build_decoder, build_encoder, build_heads,
                       build_query_source, decoder_class, encoder_class)

# the seam for variants (STYLE.md "Variants plug in at one seam"): config.encoder_type / config.decoder_type /
# config.query_source / config.criterion -> the class that builds the part, `registry.py` (register_* add one from
# outside). A decoder's `multi_scale` picks the assembly: DETR's (DetrCustomModel + the heads here) or the
# multi-scale one (model_deformable.DetrCustomDeformableDetector, heads per layer inside); both end in the one forward
# below
ENCODER_CLASSES, DECODER_CLASSES = ENCODERS, DECODERS
# config._attn_implementation: both run `attention_mha.DetrCustomAttention`, through SDPA or an explicit softmax
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass
class DetrCustomModelOutput(ModelOutput):
    """Output of [`DetrCustomModel`].

    Args:
        last_hidden_state: `[batch, num_queries, d_model]`, the decoder's output after its final LayerNorm.
            (Every `num_queries` here is `K * num_queries` in training with K query groups, see `query_groups.py`.)
        intermediate_hidden_states: `[decoder_layers, batch, num_queries, d_model]`, every decoder layer's output as
            given to the heads (layer-normed); the last entry equals `last_hidden_state`.
        encoder_last_hidden_state: `[batch, height * width, d_model]`, the `memory`.
        feature_mask: `[batch, height, width]` bool, True on real feature cells; its shape gives the feature map
            size needed to reshape cross-attention maps into images.
        encoder_hidden_states, decoder_hidden_states: with `output_hidden_states=True`, tuples of
            `[batch, sequence, d_model]`: the input to the first layer, then each layer's output.
        encoder_attentions, decoder_attentions, cross_attentions: with `output_attentions=True`, tuples (one per
            layer) of `[batch, heads, target, source]` attention weights. Cross-attention is
            `[batch, heads, num_queries, height * width]`.
    """

    last_hidden_state: torch.Tensor | None = None
    intermediate_hidden_states: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    feature_mask: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None
    decoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class DetrCustomObjectDetectionOutput(ModelOutput):
    """Output of [`DetrCustomForObjectDetection`].

    Args:
        loss: scalar, only when `labels` are given: the weighted sum of the set-prediction losses.
        loss_dict: unweighted terms for logging (`loss_ce`, `loss_bbox`, `loss_giou`, `cardinality_error`,
            `class_error`, and `<name>_<layer>` for auxiliary decoder layers; a sigmoid head's class term is
            `loss_focal` or `loss_vfl`, see `loss_detr_custom.CLASS_TERMS`).
        logits: `[batch, num_queries, num_labels + 1]`, the last class is "no object"; a sigmoid head's
            ([`DetrCustomSigmoidObjectDetectionOutput`]) `[batch, num_queries, num_labels]`, one logit per class.
            (Every `num_queries` here is `K * num_queries` in training with K query groups, see `query_groups.py`.)
        pred_boxes: `[batch, num_queries, 4]`, (center_x, center_y, width, height) in [0, 1] relative to each
            image's unpadded size.
        auxiliary_outputs: with `config.auxiliary_loss`, one `{"logits", "pred_boxes"}` dict per decoder layer
            before the last.
        The remaining fields are those of [`DetrCustomModelOutput`], in the order of transformers'
        `DetrObjectDetectionOutput` (`feature_mask`, ours only, last): with `return_dict=False` the model returns
        `to_tuple()` (fields that are None left out), so `loss, loss_dict, logits, pred_boxes, ...` with labels and
        `logits, pred_boxes, ...` without, as transformers' `DetrForObjectDetection` does (like it, the tuple has
        `auxiliary_outputs` only when labels are given).

    The class attribute `class_activation` ("softmax"; "sigmoid" in the subclass) tells the post-processing how to
    read `logits` (see `DetrCustomImageProcessor.post_process_object_detection`).
    """

    class_activation: ClassVar[str] = "softmax"

    loss: torch.Tensor | None = None
    loss_dict: dict | None = None
    logits: torch.Tensor | None = None
    pred_boxes: torch.Tensor | None = None
    auxiliary_outputs: list[dict] | None = None
    # in transformers' DetrObjectDetectionOutput order, so that `return_dict=False` tuples line up; ours last
    last_hidden_state: torch.Tensor | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None
    feature_mask: torch.Tensor | None = None


@dataclass
class DetrCustomSigmoidObjectDetectionOutput(DetrCustomObjectDetectionOutput):
    """[`DetrCustomObjectDetectionOutput`] of a sigmoid class head: `logits` `[batch, num_queries, num_labels]`."""

    class_activation: ClassVar[str] = "sigmoid"


def _return_dict(config: DetrCustomConfig, return_dict: bool | None) -> bool:
    return config.return_dict if return_dict is None else return_dict


def _output_class(config: DetrCustomConfig) -> type:
    return DetrCustomSigmoidObjectDetectionOutput if uses_sigmoid_classes(config) else DetrCustomObjectDetectionOutput


class DetrCustomPreTrainedModel(PreTrainedModel):
    config_class = DetrCustomConfig
    config: DetrCustomConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["DetrCustomBackbone", "DetrCustomEncoderLayer", "DetrCustomDecoderLayer",
                         "DetrCustomMultiScaleBackbone", "DetrCustomDeformableDecoderLayer",
                         "FastBackbone", "FastMultiScaleBackbone"]   # the backbones' fast classes (fast_paths.py)
    _keys_to_ignore_on_load_unexpected = [r"num_batches_tracked"] + EXTRA_GROUP_KEYS_TO_IGNORE

    def post_init(self):
        """transformers' post_init (weights, attention implementation), then the CPU speed-up pass
        (`fast_paths.apply_fast_paths`): the architecture files are plain PyTorch, every model as built or loaded
        runs the fast paths, which pick per call where they apply (and step aside while exporting)."""
        super().post_init()
        apply_fast_paths(self)

    def _initialize_weights(self, module, is_custom_code: bool = False):
        # transformers skips a custom-code module without parameters of its own (it takes it for initialized); the
        # deformable detector must be reached, since its reset_parameters re-applies the inits that the generic pass
        # over its children wipes, and with two_stage it has no parameter of its own (no learned reference boxes)
        if isinstance(module, DetrCustomDeformableDetector) and not getattr(module, "_is_hf_initialized", False):
            self._init_weights(module)
            module._is_hf_initialized = True
            return
        super()._initialize_weights(module, is_custom_code)

    @torch.no_grad()
    def _init_weights(self, module):
        # every Linear and Conv2d outside the backbone (transformer, input_proj and both heads): xavier-uniform with
        # gain init_xavier_std and zero bias (the original xavier-inits only the transformer's matrices; its heads,
        # input_proj and FFN biases keep PyTorch's default); LayerNorm 1 / 0; every Embedding N(0, 1): the object
        # queries, and the learned position tables too (the original draws those from U(0, 1)). The timm backbone is
        # marked initialized and skipped. A branch on a container such as DetrCustomLearnedPositionEmbedding would
        # never run: for custom code, transformers marks modules without parameters of their own initialized without
        # calling this.
        gain = self.config.init_xavier_std
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.xavier_uniform_(module.weight, gain=gain)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (nn.GroupNorm, nn.BatchNorm2d)):
            # torch's defaults, also where a checkpoint lacks them (from_pretrained leaves missing tensors empty):
            # the multi-scale projections' GroupNorm when a DETR checkpoint fine-tunes into the deformable decoder
            if module.weight is not None:
                init.ones_(module.weight)
                init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                module.weight[module.padding_idx].zero_()   # the denoising labels' padding slot
        if module is getattr(self, "class_embed", None) or getattr(module, "is_class_head", False):
            init_class_head_bias_(module, self.config)
        elif isinstance(module, DetrCustomDeformableDetector):   # after its children's generic init (post-order)
            module.reset_parameters()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Loads our folders and Hub ids, and also transformers' DETR, RT-DETR and RT-DETRv2 checkpoints (model_type
        "detr", "rt_detr", "rt_detr_v2"), whose config and weights are converted on the fly (see
        `checkpoint_conversion.py`). All of `PreTrainedModel.from_pretrained`'s options apply, e.g. `num_labels=K,
        ignore_mismatched_sizes=True` for a new class head, `attn_implementation="eager"`.

        The backbone is built without timm's ImageNet weights whatever `use_pretrained_backbone` says: the checkpoint
        holds every weight, so loading never reaches for the network. The loaded config keeps the saved flag (it
        says how the backbone was first initialized; a model built from that config fetches the weights again).
        Query groups the checkpoint lacks start from its first group's queries (`query_groups.py`)."""
        check_local_checkpoint(pretrained_model_name_or_path, kwargs)
        replace_class_head_for_a_new_loss(pretrained_model_name_or_path, kwargs)
        output_loading_info = kwargs.pop("output_loading_info", False)
        # converted to the keys of the class with heads, whichever class loads them
        heads = DetrCustomForObjectDetection
        loading = LOADING_CHECKPOINT.set(True)
        try:
            with converted_transformers_folder(pretrained_model_name_or_path, kwargs, heads) as folder:
                model, loading_info = super().from_pretrained(
                    folder or pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs)
        finally:
            LOADING_CHECKPOINT.reset(loading)
        init_missing_groups_(model, loading_info["missing_keys"])
        # loading replaces the parameters with trainable ones: freeze again what the config freezes
        for module in model.modules():
            if isinstance(module, DetrCustomBackbone) and model.config.freeze_backbone_stem:
                module._freeze_stem_and_first_stage()
        return (model, loading_info) if output_loading_info else model

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, **kwargs) -> str:
        # called by transformers at construction, in from_pretrained and in set_attn_implementation
        if attn_implementation is None:
            return "sdpa"
        if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation={attn_implementation!r} is not supported by {type(self).__name__}; use one of "
                f"{ATTENTION_IMPLEMENTATIONS}: 'sdpa' (default, torch's scaled_dot_product_attention kernels, which "
                "pick a flash or memory-efficient kernel where the device has one) or 'eager' (explicit softmax).")
        return attn_implementation


class DetrCustomModel(DetrCustomPreTrainedModel):
    """The DETR backbone and transformer, without heads. Returns a [`DetrCustomModelOutput`]."""

    def __init__(self, config: DetrCustomConfig):
        super().__init__(config)
        if decoder_class(config).multi_scale:
            raise ValueError(f"decoder_type={config.decoder_type!r} is a multi-scale decoder with its heads inside "
                             "(box refinement): use DetrCustomForObjectDetection (its `model` is a "
                             "DetrCustomDeformableDetector).")
        if encoder_class(config).multi_scale:
            raise ValueError(f"encoder_type={config.encoder_type!r} encodes several feature levels: it needs a "
                             "multi-scale decoder (e.g. decoder_type='deformable').")
        self.backbone = DetrCustomBackbone(config)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, config.d_model, kernel_size=1)
        self.position_embedding = build_position_embedding(config)
        # the registered query source (query_sources.py; DETR's learned object queries `query_embed`, with query
        # groups 1..K-1 `extra_query_embeds`, used in training only) as `self.query_source`, its parameters here
        build_query_source(config, self)
        self.encoder = build_encoder(config)
        self.decoder = build_decoder(config)
        self.post_init()

    def _check_inputs(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> torch.Tensor:
        """Clear errors for bad inputs at the entry (`inputs_detr_custom.py`). Returns the mask, all ones when None."""
        return check_pixel_inputs(pixel_values, pixel_mask, self.config.num_channels, self.dtype)

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        batch_independent: bool | None = None,
        labels: list[dict] | None = None,
    ) -> DetrCustomModelOutput | tuple:
        """
        Args:
            pixel_values: `[batch, num_channels, height, width]`, normalized images padded bottom-right.
            pixel_mask: `[batch, height, width]`, 1 on real pixels and 0 on padding (None = no padding).
            output_attentions / output_hidden_states: also return per-layer attention maps / hidden states.
            batch_independent: run the backbone on each image unpadded (same-size images together) and pad the
                feature maps instead of the pixels, so that an image's outputs equal its single-image outputs
                whatever else is in the batch. Padding otherwise changes the convolutions near the border of the
                visible region, as in the original DETR and transformers (a 600x799 image padded to 800x1066: up to
                0.24 on the logits of a random R50 in both). Costs one backbone call per distinct image size.
                Default: `config.batch_independent_inference` if set, else False.
            return_dict: False returns `output.to_tuple()` (None fields left out), as transformers' models do.
                Default: `config.return_dict` (True).
            labels: not used (DETR's queries do not depend on the targets); taken so that both assemblies are called
                alike (the multi-scale one builds denoising queries from them in training).
        """
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states)
        if batch_independent is None:
            batch_independent = getattr(self.config, "batch_independent_inference", False)
        pixel_mask = self._check_inputs(pixel_values, pixel_mask)
        if batch_independent:
            features, feature_mask = self.backbone.forward_per_size(pixel_values, pixel_mask)
        else:
            features, feature_mask = self.backbone(pixel_values, pixel_mask)
        with fp32_on_cpu(features) as features:
            # [batch, height * width]; None without padding (eager mode), see inputs_detr_custom.mask_if_padded
            key_mask = mask_if_padded(feature_mask.flatten(1))
            memory_pos = self.position_embedding(feature_mask, key_mask is not None).to(features.dtype)  # [b, h*w, d]
            source = self.input_proj(features).flatten(2).transpose(1, 2)      # [batch, height * width, d_model]
            memory, encoder_states, encoder_attentions = self.encoder(
                source, memory_pos, key_mask, output_attentions, output_hidden_states)
            # the query source's queries; in training with K query groups all K, kept apart by the mask
            num_groups = self.config.num_query_groups if self.training else 1
            query_pos = self.query_source(memory, key_mask, None, num_groups).position   # [batch, K * q, d_model]
            self_attn_mask = None
            if num_groups > 1:
                self_attn_mask = group_attention_mask(num_groups, self.config.num_queries, query_pos.device)
            intermediate, decoder_states, decoder_attentions, cross_attentions = self.decoder(
                query_pos, memory, memory_pos, key_mask, output_attentions, output_hidden_states, self_attn_mask)
        output = DetrCustomModelOutput(
            last_hidden_state=intermediate[-1],
            intermediate_hidden_states=intermediate,
            encoder_last_hidden_state=memory,
            feature_mask=feature_mask,
            encoder_hidden_states=encoder_states,
            decoder_hidden_states=decoder_states,
            encoder_attentions=encoder_attentions,
            decoder_attentions=decoder_attentions,
            cross_attentions=cross_attentions,
        )
        return output if _return_dict(self.config, return_dict) else output.to_tuple()


class DetrCustomForObjectDetection(DetrCustomPreTrainedModel):
    """DETR with its class and box heads and the set-prediction loss.

    `labels`: one dict per image with `class_labels` int64 `[num_objects]` in `[0, num_labels)` and `boxes` float
    `[num_objects, 4]`, (center_x, center_y, width, height) normalized by the image's unpadded size. The loss is
    computed whenever labels are given, in train or eval mode, by our own criterion ([`DetrCustomLoss`]). The class
    head follows `config.classification_loss` (`class_head.py`): softmax with "no object" (DETR) or per-class sigmoid.
    With `config.decoder_type="deformable"` its `model` is a `DetrCustomDeformableDetector` (`model_deformable.py`),
    which holds one class and box head per decoder layer; the outputs and the loss are the same fields.
    """

    def __init__(self, config: DetrCustomConfig):
        super().__init__(config)
        if decoder_class(config).multi_scale:   # multi-scale, with one class and box head per decoder layer inside
            self.model = DetrCustomDeformableDetector(config)
        else:
            self.model = DetrCustomModel(config)
            self.class_embed, self.bbox_embed = build_heads(config)   # shared by the layers (heads.py)
        self.criterion = build_criterion(config)   # the registered criterion (loss_detr_custom.py)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        labels: list[dict] | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        batch_independent: bool | None = None,
    ) -> DetrCustomObjectDetectionOutput | tuple:
        """See [`DetrCustomModel.forward`]; `labels` as in the class docstring."""
        if labels is not None and isinstance(pixel_values, torch.Tensor) and pixel_values.ndim == 4:
            labels = self.criterion.label_tensors(labels, pixel_values.device)   # Python lists work too
            self.criterion.check_labels(labels, batch=len(pixel_values))   # before any layer runs
        return_dict = _return_dict(self.config, return_dict)
        outputs = self.model(pixel_values, pixel_mask, output_attentions, output_hidden_states, return_dict=True,
                             batch_independent=batch_independent, labels=labels)
        all_logits, all_boxes = self._layer_predictions(outputs)      # [layers, batch, queries, classes / 4]
        auxiliary_outputs = None
        if self.config.auxiliary_loss:
            auxiliary_outputs = [{"logits": logits, "pred_boxes": boxes}
                                 for logits, boxes in zip(all_logits[:-1], all_boxes[:-1])]
        loss, loss_dict = None, None
        if labels is not None:
            encoder_outputs = None
            if getattr(outputs, "enc_logits", None) is not None:   # query selection: the set loss on its proposals
                encoder_outputs = {"logits": outputs.enc_logits, "pred_boxes": outputs.enc_pred_boxes}
            num_groups = all_logits.shape[2] // self.config.num_queries     # 1 = the criterion's own call
            loss, loss_dict = self.criterion(all_logits[-1], all_boxes[-1], labels, auxiliary_outputs,
                                             labels_checked=True, encoder_outputs=encoder_outputs,
                                             denoising_outputs=getattr(outputs, "denoising", None),
                                             num_query_groups=num_groups)
        if not return_dict and labels is None:
            auxiliary_outputs = None   # transformers' tuple has them only with labels: the same positions as there
        output = _output_class(self.config)(
            loss=loss,
            loss_dict=loss_dict,
            logits=all_logits[-1],
            pred_boxes=all_boxes[-1],
            auxiliary_outputs=auxiliary_outputs,
            last_hidden_state=outputs.last_hidden_state,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            feature_mask=outputs.feature_mask,
            encoder_hidden_states=outputs.encoder_hidden_states,
            decoder_hidden_states=outputs.decoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
            decoder_attentions=getattr(outputs, "decoder_attentions", None),
            cross_attentions=outputs.cross_attentions,
        )
        return output if return_dict else output.to_tuple()

    def _layer_predictions(self, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Every decoder layer's logits and boxes `[layers, batch, queries, classes / 4]` (only the last layer's
        without `auxiliary_loss`, single-scale): the multi-scale assembly's heads run inside it (box refinement),
        the single-scale one's here (`heads.py`: shared by the layers, or one per layer)."""
        if getattr(outputs, "logits", None) is not None:
            return outputs.logits, outputs.pred_boxes
        intermediate = outputs.intermediate_hidden_states               # [decoder_layers, batch, queries, d_model]
        if not self.config.auxiliary_loss:
            intermediate = intermediate[-1:]
        with fp32_on_cpu(intermediate) as intermediate:
            return layer_predictions(self.class_embed, self.bbox_embed, intermediate)


# pipeline("object-detection") checks the model's class name against a copy of MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES
# (the copy loses what AutoModelForObjectDetection.register adds) and logs every supported name otherwise: our class
# is listed under its model_type as transformers' own detectors are. Here, not in __init__.py: a folder loaded with
# trust_remote_code runs this file, not the package.
MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES.setdefault(DetrCustomConfig.model_type, DetrCustomForObjectDetection.__name__)
