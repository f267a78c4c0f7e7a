"""DetrCustomConfig: one serializable description of a DETR model, its backbone and its loss.

The config is the one source of the model's options: `RULES` (what the values must satisfy, as data, each with its
error) and `IGNORED_FIELDS` (what each variant does not read) sit next to the fields, and the training script
generates its model flags from the fields and this docstring's Args (training/arguments.py)."""
import contextvars
from dataclasses import dataclass
from typing import Callable

from transformers import PreTrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)
# True while from_pretrained / from_dict builds a config from saved values (see DetrCustomConfig.from_dict)
_LOADING = contextvars.ContextVar("detr_custom_config_loading", default=False)

POSITION_EMBEDDING_TYPES = ("sine", "learned", "sine_absolute")
PROJECTION_NORMS = ("group", "batch")
# the names of the interchangeable transformer parts, and those that read (encoders) or build (decoders) several
# feature levels. Kept here as names so that the config never imports the model: registry.py rewrites the four
# tuples from its tables (also after register_encoder / register_decoder), and the rules below read them when they
# check a config
ENCODER_TYPES = ("detr", "hybrid", "deformable")
DECODER_TYPES = ("detr", "deformable")
MULTI_SCALE_ENCODER_TYPES = ("hybrid", "deformable")
MULTI_SCALE_DECODER_TYPES = ("deformable",)
# the same for the query sources (the multi-scale ones feed a multi-scale decoder) and the criteria
QUERY_SOURCES = ("learned", "learned_boxes", "two_stage")
MULTI_SCALE_QUERY_SOURCES = ("learned_boxes", "two_stage")
CRITERIA = ("hungarian", "hybrid")
# the fields that only some encoders / decoders read, by the part's name (each part class declares its own in
# `config_fields`; registry.py rewrites this table too): such a field set for a part that does not read it is refused
PART_FIELDS = {
    "encoder": {"detr": (), "hybrid": ("hidden_expansion",), "deformable": ("encoder_n_points",)},
    "decoder": {"detr": ("normalize_decoder_residual",), "deformable": ("decoder_n_points",)},
    "criterion": {"hungarian": (), "hybrid": ("one_to_many_repeats",)},
}
ACTIVATION_FUNCTIONS = ("relu", "gelu")
# config.classification_loss: the class term of the set loss; the two sigmoid ones give the class head num_labels
# outputs (no "no object" column) and the matcher the focal cost
CLASSIFICATION_LOSSES = ("cross_entropy", "focal", "varifocal")
SIGMOID_CLASSIFICATION_LOSSES = ("focal", "varifocal")
# the fields that take one of a few names (the training script's flags offer them as choices)
FIELD_CHOICES = {"position_embedding_type": POSITION_EMBEDDING_TYPES, "encoder_type": ENCODER_TYPES,
                 "decoder_type": DECODER_TYPES, "activation_function": ACTIVATION_FUNCTIONS,
                 "encoder_activation_function": ACTIVATION_FUNCTIONS, "projection_norm": PROJECTION_NORMS,
                 "classification_loss": CLASSIFICATION_LOSSES}


# `DetrCustomConfig.from_preset(name)` and the training script's `--preset`: a preset is only a set of config values
# (STYLE.md), written as literals (the training script reads them without importing the model); the figures are the
# papers' own (COCO val2017, ResNet-50), quoted, not reproduced here
PRESETS = {
    # Carion et al. 2020, "End-to-End Object Detection with Transformers": the defaults; 42.0 AP after 500 epochs
    # (facebookresearch/detr README)
    "detr": {},
    # Zhu et al. 2021, "Deformable DETR: Deformable Transformers for End-to-End Object Detection", with iterative
    # bounding box refinement: 46.2 AP after 50 epochs in its README (fundamentalvision/Deformable-DETR; 44.5
    # without refinement, 45.4 in the paper's table 1). Its decoder, levels, points, queries, FFN width and focal
    # loss; the encoder differs: one DETR encoder layer on the coarsest level (RT-DETR's AIFI, Zhao et al. 2024)
    # instead of six deformable encoder layers, and the queries carry learned anchor boxes (DAB-DETR).
    "deformable": {"decoder_type": "deformable", "num_feature_levels": 4, "decoder_n_points": 4, "num_queries": 300,
                   "encoder_layers": 1, "decoder_layers": 6, "encoder_ffn_dim": 1024, "decoder_ffn_dim": 1024,
                   "classification_loss": "focal", "class_cost": 2.0, "class_loss_coefficient": 2.0},
    # Zhao et al. 2024, "DETRs Beat YOLOs on Real-time Object Detection" (RT-DETR): 53.1 AP for RT-DETR-R50 after 72
    # epochs in its abstract. Its pieces: 3 levels (strides 8, 16, 32), the hybrid encoder (AIFI + cross-scale
    # fusion), IoU-aware query selection of 300 queries (varifocal loss, class cost 2), 6 refining deformable decoder
    # layers with 4 points, 100 denoising queries. Ours differs in details: GroupNorm (not BatchNorm) in the level
    # projections, ReLU in the AIFI layer, a plain timm ResNet (not ResNet-vd).
    "rtdetr": {"decoder_type": "deformable", "encoder_type": "hybrid", "num_feature_levels": 3, "decoder_n_points": 4,
               "num_queries": 300, "encoder_layers": 1, "decoder_layers": 6, "encoder_ffn_dim": 1024,
               "decoder_ffn_dim": 1024, "classification_loss": "varifocal", "class_cost": 2.0, "two_stage": True,
               "num_denoising": 100},
}


def uses_sigmoid_classes(config) -> bool:
    """True when the class head is per-class sigmoid (num_labels logits), False for softmax + "no object" (num_labels +
    1). Configs saved before `classification_loss` existed are softmax."""
    return getattr(config, "classification_loss", "cross_entropy") in SIGMOID_CLASSIFICATION_LOSSES


@dataclass(frozen=True)
class Rule:
    """What a config's values must satisfy: `holds(config)`, and the error otherwise: `message`, formatted with the
    values of `fields` (the fields it reads), names them with their values and says what to set."""

    name: str
    fields: tuple[str, ...]
    holds: Callable[["DetrCustomConfig"], bool]
    message: str

    def error_message(self, values: dict) -> str:
        """The message for these values of its fields (and the part names registered now)."""
        return self.message.format(**values, encoder_types=ENCODER_TYPES, decoder_types=DECODER_TYPES,
                                   query_sources=QUERY_SOURCES, criteria=CRITERIA)


def _positive(field: str) -> Rule:
    return Rule(f"{field}_positive", (field,), lambda c: getattr(c, field) >= 1,
                f"{field} must be >= 1, got {{{field}}}.")


def _heads_divide_d_model(field: str) -> Rule:
    return Rule(f"{field}_divides_d_model", ("d_model", field),
                lambda c: getattr(c, field) >= 1 and c.d_model % getattr(c, field) == 0,
                f"d_model={{d_model}} must be divisible by {field}={{{field}}}: each head gets d_model / heads "
                f"channels. Choose e.g. {field}=8 with d_model=256.")


def _one_of(field: str, hint: str = "") -> Rule:
    choices = FIELD_CHOICES[field]
    return Rule(f"{field}_choice", (field,), lambda c: getattr(c, field) in choices,
                f"{field}={{{field}!r}} is not supported; use one of {choices}{hint}.")


def _multi_scale_decoder(config) -> bool:
    return config.decoder_type in MULTI_SCALE_DECODER_TYPES


def _multi_scale_encoder(config) -> bool:
    return config.encoder_type in MULTI_SCALE_ENCODER_TYPES


def _is_whole_number(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# every check of the values, in the order they are made (the first broken one is the error). A new field with a
# constraint adds a line here; tests/test_config_rules.py holds a breaking example of each rule.
RULES = (
    _heads_divide_d_model("encoder_attention_heads"),
    _heads_divide_d_model("decoder_attention_heads"),
    Rule("d_model_even", ("d_model",), lambda c: c.d_model % 2 == 0,
         "d_model={d_model} must be even: half of it encodes x, half y positions."),
    *(_positive(field) for field in ("num_queries", "d_model", "encoder_layers", "decoder_layers", "encoder_ffn_dim",
                                     "decoder_ffn_dim", "num_channels")),
    Rule("num_query_groups_whole", ("num_query_groups",),
         lambda c: _is_whole_number(c.num_query_groups) and c.num_query_groups >= 1,
         "num_query_groups must be an integer >= 1 (1 = no query groups, Group DETR uses 13), got "
         "{num_query_groups!r}."),
    _one_of("position_embedding_type"),
    Rule("encoder_type_choice", ("encoder_type",), lambda c: c.encoder_type in ENCODER_TYPES,
         "encoder_type={encoder_type!r} is not supported; use one of {encoder_types} (or register your encoder with "
         "modeling_detr_custom.register_encoder)."),
    Rule("decoder_type_choice", ("decoder_type",), lambda c: c.decoder_type in DECODER_TYPES,
         "decoder_type={decoder_type!r} is not supported; use one of {decoder_types} (or register your decoder with "
         "modeling_detr_custom.register_decoder)."),
    Rule("activation_function_choice", ("activation_function",),
         lambda c: c.activation_function in ACTIVATION_FUNCTIONS,
         "activation_function={activation_function!r}: use 'relu' or 'gelu'."),
    Rule("encoder_activation_function_choice", ("encoder_activation_function",),
         lambda c: c.encoder_activation_function in (None,) + ACTIVATION_FUNCTIONS,
         "encoder_activation_function={encoder_activation_function!r}: use 'relu', 'gelu' or None (= "
         "activation_function)."),
    Rule("sine_absolute_d_model", ("position_embedding_type", "d_model"),
         lambda c: c.position_embedding_type != "sine_absolute" or c.d_model % 4 == 0,
         "position_embedding_type={position_embedding_type!r} needs d_model divisible by 4 (sine and cosine of rows "
         "and columns), got d_model={d_model}."),
    _one_of("projection_norm", " ('batch' is RT-DETR's)"),
    Rule("decoder_input_proj_needs_hybrid", ("decoder_input_proj", "encoder_type"),
         lambda c: not c.decoder_input_proj or c.encoder_type == "hybrid",
         "decoder_input_proj={decoder_input_proj} needs encoder_type='hybrid' (got {encoder_type!r}): it projects "
         "the hybrid encoder's fused levels for the decoder, as RT-DETR. Set encoder_type='hybrid' or drop it."),
    _one_of("classification_loss", " ('cross_entropy' is the published DETR's softmax)"),
    *(Rule(f"{field}_range", (field,), lambda c, field=field: 0 <= getattr(c, field) <= 1,
           f"{field}={{{field}}} must be in [0, 1]: it weighs positives against negatives (0.25 for focal_alpha, "
           "0.75 for varifocal_alpha are the papers').") for field in ("focal_alpha", "varifocal_alpha")),
    *(Rule(f"{field}_non_negative", (field,), lambda c, field=field: getattr(c, field) >= 0,
           f"{field}={{{field}}} must be >= 0 (focal_gamma 2 and class_loss_coefficient 1 are the defaults).")
      for field in ("focal_gamma", "class_loss_coefficient")),
    *(_positive(field) for field in ("num_feature_levels", "decoder_n_points", "encoder_n_points")),
    Rule("query_selection_needs_deformable", ("two_stage", "learn_initial_query", "decoder_type"),
         lambda c: not (c.two_stage or c.learn_initial_query) or _multi_scale_decoder(c),
         "two_stage and learn_initial_query need decoder_type='deformable': query selection gives the deformable "
         "decoder its reference boxes (DETR's decoder has none). Got two_stage={two_stage}, learn_initial_query="
         "{learn_initial_query}, decoder_type={decoder_type!r}."),
    Rule("multiscale_encoder_needs_deformable", ("encoder_type", "decoder_type"),
         lambda c: not _multi_scale_encoder(c) or _multi_scale_decoder(c),
         "encoder_type={encoder_type!r} needs decoder_type='deformable' (got {decoder_type!r}): it encodes several "
         "feature levels, which only the deformable decoder reads."),
    Rule("hidden_expansion_positive", ("hidden_expansion",), lambda c: c.hidden_expansion > 0,
         "hidden_expansion must be > 0 (1.0 is RT-DETR's), got {hidden_expansion}."),
    Rule("denoising_ranges", ("num_denoising", "label_noise_ratio", "box_noise_scale"),
         lambda c: c.num_denoising >= 0 and 0 <= c.label_noise_ratio <= 1 and c.box_noise_scale >= 0,
         "num_denoising >= 0, label_noise_ratio in [0, 1] and box_noise_scale >= 0 are needed, got num_denoising="
         "{num_denoising}, label_noise_ratio={label_noise_ratio}, box_noise_scale={box_noise_scale}."),
    Rule("denoising_needs_deformable_sigmoid", ("num_denoising", "decoder_type", "classification_loss"),
         lambda c: c.num_denoising == 0 or (_multi_scale_decoder(c) and uses_sigmoid_classes(c)),
         "num_denoising={num_denoising} needs decoder_type='deformable' and a sigmoid classification_loss ('focal' "
         "or 'varifocal'), got decoder_type={decoder_type!r} and classification_loss={classification_loss!r}: "
         "denoising queries start from boxes, and their negatives learn 'no object' as all-zero sigmoid targets."),
    Rule("learn_initial_query_needs_two_stage", ("learn_initial_query", "two_stage"),
         lambda c: not c.learn_initial_query or c.two_stage,
         "learn_initial_query={learn_initial_query} only means something with two_stage=True (got two_stage="
         "{two_stage}; without query selection the content queries are always learned)."),
    Rule("finest_level_stride_choice", ("finest_level_stride", "decoder_type"),
         lambda c: c.finest_level_stride == 8 or (c.finest_level_stride == 4 and _multi_scale_decoder(c)),
         "finest_level_stride={finest_level_stride} with decoder_type={decoder_type!r}: use 8 (the default), or 4 "
         "with decoder_type='deformable' and num_feature_levels >= 4 (levels at strides 4, 8, 16, 32), for small "
         "objects."),
    Rule("levels_need_deformable", ("num_feature_levels", "decoder_type"),
         lambda c: c.num_feature_levels == 1 or _multi_scale_decoder(c),
         "num_feature_levels={num_feature_levels} needs decoder_type='deformable': the {decoder_type!r} decoder "
         "attends to one feature map (use num_feature_levels=1)."),
    Rule("matcher_needs_a_cost", ("class_cost", "bbox_cost", "giou_cost"),
         lambda c: not (c.class_cost == 0 and c.bbox_cost == 0 and c.giou_cost == 0),
         "class_cost, bbox_cost and giou_cost cannot all be 0 (got {class_cost}, {bbox_cost}, {giou_cost}): the "
         "matcher needs a cost."),
    Rule("query_source_choice", ("query_source",), lambda c: c.query_source is None or c.query_source in QUERY_SOURCES,
         "query_source={query_source!r} is not supported; use one of {query_sources}, None (the kind the other "
         "fields describe), or register your source with modeling_detr_custom.register_query_source."),
    Rule("query_source_matches_two_stage", ("query_source", "two_stage"),
         lambda c: c.query_source is None or (c.query_source == "two_stage") == bool(c.two_stage),
         "query_source={query_source!r} and two_stage={two_stage} disagree: query selection is query_source="
         "'two_stage' with two_stage=True. Set both, or leave query_source None (then two_stage decides)."),
    Rule("query_source_matches_decoder", ("query_source", "decoder_type"),
         lambda c: c.query_source is None or (c.query_source in MULTI_SCALE_QUERY_SOURCES) == _multi_scale_decoder(c),
         "query_source={query_source!r} does not fit decoder_type={decoder_type!r}: a multi-scale decoder (e.g. "
         "'deformable') takes content queries with reference boxes ('learned_boxes', 'two_stage'), a single-scale "
         "one (e.g. 'detr') query positions ('learned'). Leave query_source None to get the decoder's default."),
    Rule("criterion_choice", ("criterion",), lambda c: c.criterion in CRITERIA,
         "criterion={criterion!r} is not supported; use one of {criteria} (or register yours with "
         "modeling_detr_custom.register_criterion)."),
    Rule("one_to_many_repeats_whole", ("one_to_many_repeats",),
         lambda c: _is_whole_number(c.one_to_many_repeats) and c.one_to_many_repeats >= 1,
         "one_to_many_repeats must be an integer >= 1 (how often criterion='hybrid' repeats each target for the "
         "one-to-many groups; H-DETR uses 6), got {one_to_many_repeats!r}."),
    Rule("hybrid_needs_query_groups", ("criterion", "num_query_groups"),
         lambda c: c.criterion != "hybrid" or c.num_query_groups >= 2,
         "criterion='hybrid' matches the query groups after the first one-to-many, and num_query_groups="
         "{num_query_groups} has none: set num_query_groups >= 2 (e.g. 3), or criterion='hungarian'."),
)


@dataclass(frozen=True)
class Ignored:
    """A field that a variant does not read: `when(config)` is true for that variant. A value other than the
    field's default, set by the user, is an error (`refuse`) or a warning given once; `why` says what the variant
    does instead, `fix` what to set for the value to matter. `part` ("encoder" / "decoder"): a field that only some
    parts read, by their `config_fields` (`PART_FIELDS`); `when`, `why` and `fix` then follow from the table."""

    field: str
    when: Callable[["DetrCustomConfig"], bool] | None = None
    why: str = ""
    fix: str = ""
    refuse: bool = True
    part: str | None = None

    def ignores(self, config: "DetrCustomConfig") -> bool:
        if self.part is None:
            return self.when(config)
        return self.field not in PART_FIELDS[self.part].get(_part_name(config, self.part), ())

    def reason(self, config: "DetrCustomConfig") -> tuple[str, str]:
        """(why, fix) for this config."""
        if self.part is None:
            return self.why, self.fix
        readers = [name for name, fields in PART_FIELDS[self.part].items() if self.field in fields]
        field, parts = PARTS[self.part]
        chosen = getattr(config, field)
        fix = f"set {field}={readers[0]!r}" if len(readers) == 1 else f"set {field} to one of {readers}"
        return f"only the {parts} {readers} read it, and {field}={chosen!r} does not.", fix


# the parts of PART_FIELDS: part -> (the config field that names the chosen one, the parts in words)
PARTS = {"encoder": ("encoder_type", "encoders"), "decoder": ("decoder_type", "decoders"),
         "criterion": ("criterion", "criteria")}


def _part_name(config, part: str) -> str:
    return getattr(config, PARTS[part][0])


_DEFORMABLE = "set decoder_type='deformable' (e.g. from_preset('deformable'))"
# refused: fields that only configure a part the config does not build, so setting one means expecting that part.
# warned: settings of a head or a training option that the config has switched off; keeping them while trying the
# other head (or denoising off) is a normal experiment, and they matter again when it is switched back.
IGNORED_FIELDS = (
    Ignored("hidden_expansion", part="encoder"),     # the hybrid encoder's fusion blocks
    Ignored("encoder_n_points", part="encoder"),     # the deformable encoder's sampling points
    Ignored("decoder_n_points", part="decoder"),     # the deformable decoder's sampling points
    Ignored("one_to_many_repeats", part="criterion"),   # the hybrid criterion's one-to-many matching
    Ignored("projection_norm", lambda c: not _multi_scale_decoder(c),
            "it is the norm of the multi-scale level projections, and decoder_type 'detr' reads one level through a "
            "plain 1x1 convolution.", _DEFORMABLE, refuse=True),
    Ignored("batch_independent_inference", _multi_scale_decoder,
            "the deformable decoder has no batch-independent inference, so every forward would fail.",
            "use decoder_type='detr'", refuse=True),
    Ignored("normalize_decoder_residual", part="decoder", refuse=False),   # DETR's decoder (transformers' layout)
    Ignored("eos_coefficient", uses_sigmoid_classes,
            "it weighs the softmax head's 'no object' class, and this classification_loss has a sigmoid head.",
            "use classification_loss='cross_entropy'", refuse=False),
    Ignored("focal_alpha", lambda c: not uses_sigmoid_classes(c),
            "it weighs the sigmoid head's focal loss and matching cost, and classification_loss is 'cross_entropy'.",
            "use classification_loss='focal' or 'varifocal'", refuse=False),
    Ignored("focal_gamma", lambda c: not uses_sigmoid_classes(c),
            "it is the sigmoid head's focusing exponent, and classification_loss is 'cross_entropy'.",
            "use classification_loss='focal' or 'varifocal'", refuse=False),
    Ignored("varifocal_alpha", lambda c: c.classification_loss != "varifocal",
            "it weighs the negatives of the varifocal loss only.", "use classification_loss='varifocal'",
            refuse=False),
    Ignored("label_noise_ratio", lambda c: c.num_denoising == 0,
            "it sets the denoising queries' label noise, and num_denoising is 0 (off).", "set num_denoising > 0",
            refuse=False),
    Ignored("box_noise_scale", lambda c: c.num_denoising == 0,
            "it sets the denoising queries' box noise, and num_denoising is 0 (off).", "set num_denoising > 0",
            refuse=False),
    Ignored("backbone_weights_sha256", lambda c: c.backbone_weights is None,
            "it checks the backbone_weights file, and backbone_weights is not set.", "set backbone_weights",
            refuse=True),
)


class DetrCustomConfig(PreTrainedConfig):
    r"""Configuration of [`DetrCustomModel`] and [`DetrCustomForObjectDetection`].

    Field names mirror transformers' `DetrConfig` where the concept is the same. Defaults are the original
    DETR's (facebookresearch/detr `main.py`): R50 backbone, 6 + 6 layers, 100 queries, auxiliary decoding
    losses on, dropout 0.1 inside attention and after the FFN activation as in `nn.MultiheadAttention`.

    Values are checked when a config is built (`RULES`: the first broken one is a ValueError naming the fields, their
    values and the fix). A field that the chosen variant does not read (`IGNORED_FIELDS`, e.g. `hidden_expansion`
    without the hybrid encoder) is refused, or for head and denoising settings warned about once, when it is set to
    a value other than its default; configs loaded with `from_pretrained` are never flagged for it.

    Conventions used everywhere in this package: `pixel_mask` is 1 on real pixels and 0 on padding (the
    Hugging Face polarity; the original DETR's `NestedTensor.mask` is the reverse), and boxes are
    `(center_x, center_y, width, height)` normalized by the unpadded (visible) image size.

    Args:
        backbone: any timm model name that supports `features_only=True` (default `"resnet50"`). The last
            feature stage feeds the transformer.
        use_pretrained_backbone: load timm's ImageNet weights when the model is built from a config (needs the
            Hub). `from_pretrained` never does: the checkpoint carries every weight, so a saved folder loads
            offline (also as remote code). The loaded config keeps the saved value, which records how the backbone
            was first initialized (the model card reads it); a model built anew from that config fetches them.
        num_channels: input image channels.
        dilation: DC5 — replace the stride of the last backbone stage by dilation (output stride 16).
        freeze_backbone_stem: freeze the stem and the first stage of the backbone, as the original does.
        freeze_batch_norm: replace the backbone's BatchNorm by frozen BatchNorm (statistics and affine fixed), as the
            original does with its ImageNet-pretrained backbone. Set False to train a backbone from scratch: a
            randomly initialized timm ResNet zero-initializes the last BatchNorm of each block, and frozen there it
            would keep every residual branch off forever.
        num_queries: number of object queries, the upper bound on detections per image.
        encoder_type, decoder_type: which transformer encoder and decoder to build, by name: encoder `"detr"`
            (DETR's), `"hybrid"` (RT-DETR's) or `"deformable"` (Deformable DETR's), the last two with the deformable
            decoder; decoder `"detr"` (DETR's) or `"deformable"` (Deformable DETR's: multi-scale, with iterative box
            refinement). In detail: `"detr"`: the original's
            post-norm layers (`encoder_detr.py` / `decoder_detr.py`). `decoder_type="deformable"`: Deformable DETR's
            decoder (`decoder_deformable.py`, wired in `model_deformable.py`): multi-scale deformable
            cross-attention, learned content queries with learned reference boxes (DAB-DETR's anchors) refined by
            every layer (iterative box refinement), one class and box head per layer; the `"detr"` encoder then runs
            on the coarsest backbone level only (RT-DETR's AIFI), the other levels pass through. It is best with a
            sigmoid `classification_loss` (`from_preset("deformable")`). `encoder_type="hybrid"` (deformable decoder
            only) is RT-DETR's hybrid encoder: AIFI, then cross-scale fusion of the backbone levels (CCFF, top-down
            and bottom-up convolutional paths; `encoder_hybrid.py`). `encoder_type="deformable"` (deformable decoder
            only) is Deformable DETR's encoder: `encoder_layers` layers of multi-scale deformable self-attention
            over every position of every level (`encoder_n_points` points per head and level), with a learned level
            embedding added to each level's positions (`encoder_deformable.py`). Alternative encoders and decoders
            plug in here, each in its own `encoder_*.py` / `decoder_*.py`.
        d_model: transformer width.
        encoder_layers, decoder_layers: transformer depth.
        encoder_attention_heads, decoder_attention_heads: heads per attention layer; must divide `d_model`.
        encoder_ffn_dim, decoder_ffn_dim: hidden size of the feed-forward blocks.
        activation_function: `"relu"` or `"gelu"` (the exact, erf-based GELU), from transformers' `ACT2FN`.
        encoder_activation_function: the encoder FFN's activation, if it differs from `activation_function` (None =
            the same; RT-DETR's AIFI uses `"gelu"`, its decoder `"relu"`).
        dropout: dropout on residual branches.
        attention_dropout: dropout on attention weights.
        activation_dropout: dropout after the feed-forward activation.
        position_embedding_type: `"sine"` (normalized over the unmasked region, as the original), `"learned"`
            (50 x 50 grid of row / column embeddings) or `"sine_absolute"` (RT-DETR's AIFI: the sine of each cell's
            row and column index, not normalized; d_model must be a multiple of 4).
        auxiliary_loss: compute the set loss on every decoder layer's output (the original's `aux_loss`).
        normalize_decoder_residual: `False` (default) follows the original DETR: the decoder's residual stream is
            never layer-normed between layers; only the copies given to the heads are. `True` reproduces
            transformers' `DetrDecoder` with `auxiliary_loss=True`, which feeds each layer-normed state into the
            next layer and layer-norms the last one twice. Set automatically when a transformers checkpoint saved
            with `auxiliary_loss=True` is loaded, because its weights were trained that way.
        batch_independent_inference: default of the forward argument `batch_independent`: run the backbone on
            each image unpadded (same-size images together) and pad the feature maps instead of the pixels, so an
            image's outputs do not depend on the other images of its batch (padding changes the convolutions near
            the visible border, in the original DETR and transformers too). Costs one backbone call per image size.
            `decoder_type="detr"` only.
        class_cost, bbox_cost, giou_cost: Hungarian matcher weights.
        bbox_loss_coefficient, giou_loss_coefficient: loss weights of L1 and GIoU (the class term's:
            `class_loss_coefficient`).
        eos_coefficient: cross-entropy weight of the "no object" class (`classification_loss="cross_entropy"` only).
        init_xavier_std: gain of the xavier-uniform init of linear and projection weights.
        classification_loss: the class term of the set loss and, with it, the class head and the matching cost:
            `"cross_entropy"` (DETR's softmax with "no object"), `"focal"` (Deformable DETR's per-class sigmoid focal
            loss) or `"varifocal"` (RT-DETR's, the matched box's IoU as the class target). Logged under its own
            name: `loss_ce`, `loss_focal` or `loss_vfl`. In detail:

            - `"cross_entropy"` (default): the published DETR. Softmax over num_labels + 1 logits (last = "no
              object", weighted by `eos_coefficient`), matching cost -p(class). Unchanged, bit for bit.
            - `"focal"`: per-class sigmoid focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection"),
              as Deformable DETR (Zhu et al. 2021) brought it to DETR: num_labels logits, no "no object" column,
              unmatched queries are all-zero targets; the sum over queries and classes is divided by `num_boxes`.
              The matching cost takes the same focal form, alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma
              (-log(1 - p)) at the target class, and the class bias starts at the prior -log((1 - 0.01) / 0.01), so
              that the first steps are not swamped by the easy negatives.
            - `"varifocal"`: IoU-aware classification as RT-DETR (Lv et al. 2023) uses VariFocal loss (Zhang et al.
              2021, "VarifocalNet"): the same sigmoid head and focal matching cost, but the target of a matched
              query's class is the IoU (detached) of its box with the target box, so scores rank boxes by quality;
              positives are weighted by that IoU, negatives by `varifocal_alpha` p^gamma. Chosen over the IoU-aware
              BCE of Stable-DINO / Align-DETR because it has a reference to test against (transformers'
              `RTDetrLoss.loss_labels_vfl`, the RT-DETR recipe) and needs no extra exponent to tune.
        focal_alpha, focal_gamma: the focal loss's positive weight alpha and focusing exponent gamma (0.25 and 2, as
            RetinaNet and Deformable DETR); the focal matching cost uses them for both sigmoid losses (RT-DETR's
            matcher_alpha / matcher_gamma).
        varifocal_alpha: weight of the negatives in the varifocal loss (0.75, as VarifocalNet and RT-DETR's
            focal_loss_alpha; its gamma is `focal_gamma`).
        class_loss_coefficient: weight of the class term in the total loss (1, as DETR and RT-DETR; Deformable DETR
            and DINO use 2 with focal loss, with class_cost 2).
        backbone_weights: path of a local weights file (`.pth` / `.safetensors`) loaded into the backbone when the
            model is built from a config: pretrained weights without the Hub. It replaces timm's download (whatever
            `use_pretrained_backbone` says) and is loaded strictly: timm's key format (a timm model's `state_dict()`;
            torchvision's ResNets have the same keys) or torchvision's MobileNetV2 (mapped onto timm's
            `mobilenetv2_100`), see `backbone_weights.py`; a missing, unexpected or mis-shaped tensor is an error that
            lists them, except the classifier / head tensors that `features_only` drops, which are ignored.
            `from_pretrained` never reads the file (the checkpoint holds every weight): a saved folder loads where
            the file does not exist. The loaded config keeps the path as a record; a model built anew from that
            config reads the file again.
        backbone_weights_sha256: the file's expected sha256 (64 hex digits), checked before loading; None skips the
            check.
        num_query_groups: Group DETR's one-to-many training (Chen et al. 2023; 13 in LW-DETR and RF-DETR), 1 = off.
            With K > 1, training runs K groups of `num_queries` queries, kept apart by a self-attention mask and each
            matched one-to-one to the targets, and averages their losses; eval mode runs the first group only, so
            inference outputs and cost are those of one group. With `decoder_type="deformable"` each group also has
            its own reference boxes or, with `two_stage`, its own query selection heads, and denoising queries see
            the first group only. See `query_groups.py`, also for how checkpoints with another number of groups load
            (the first group's parameters keep their 1-group names).
        num_feature_levels: feature maps the decoder reads (`multiscale.py`): 1 = the last backbone stage (DETR);
            L > 1 (`decoder_type="deformable"` only) = the last L backbone stages at stride >= `finest_level_stride`
            (8, or 4), finest first, each projected to d_model (1x1 conv + GroupNorm), plus extra stride-2 levels when
            L exceeds them (4 with a ResNet: strides 8, 16, 32 and 64, as Deformable DETR).
        finest_level_stride: the smallest stride a backbone level may have (`decoder_type="deformable"`): 8 (C3, as
            Deformable DETR and RT-DETR) or 4, which adds the stride-4 stage (C2) for small objects: the levels are
            then the last `num_feature_levels` stages at stride >= 4, so num_feature_levels=4 reads strides 4, 8, 16
            and 32 (5 adds a stride-64 level); a num_feature_levels too small to reach the stride-4 stage is an error
            when the model is built. The stride-4 level holds 4x the positions of the stride-8 one.
        decoder_n_points: sampling points per attention head and level of the deformable decoder (4, as Deformable
            DETR).
        encoder_n_points: the same for the deformable encoder (`encoder_type="deformable"`; 4, as Deformable DETR).
        two_stage: query selection (`decoder_type="deformable"` only; `query_selection.py`): every encoder position
            proposes a box, a class head scores it, and the `num_queries` best give the decoder's reference boxes
            and content queries, as two-stage Deformable DETR and RT-DETR; the selected proposals get the set loss
            too (`loss_*_enc`). False: learned reference boxes (DAB-DETR's anchors).
        learn_initial_query: with `two_stage`, the content queries are learned embeddings (`query_embed`) instead of
            the selected positions' features (RT-DETR's option of the same name; False is its default).
        num_denoising: contrastive denoising training (`decoder_type="deformable"` with a sigmoid
            `classification_loss`; `denoising.py`): about this many noised copies of the ground truth join the
            decoder's queries at training, in groups that the matching queries cannot see, and learn to reconstruct
            their targets (positives) or reject near misses (negatives); terms `loss_*_dn_<layer>`. 0 = off; RT-DETR
            uses 100. Inference never runs them.
        label_noise_ratio: denoising: a label is replaced by a random class with probability label_noise_ratio / 2
            (0.5, RT-DETR's).
        hidden_expansion: with `encoder_type="hybrid"`, the width of the fusion's CSP blocks as a multiple of
            d_model (1.0, RT-DETR's; 0.5 in its R18 variant).
        box_noise_scale: denoising: positives' corners move by up to box_noise_scale half box sizes, negatives' by
            between 1 and 2 times that (1.0, RT-DETR's).
        projection_norm: the norm after each level's projection to d_model (`decoder_type="deformable"`): `"group"`
            (1x1 conv + GroupNorm, Deformable DETR's) or `"batch"` (1x1 conv without bias + BatchNorm, RT-DETR's
            `encoder_input_proj`).
        decoder_input_proj: RT-DETR's second projection, a 1x1 conv (no bias) + BatchNorm per level between the
            encoder and the decoder (its `decoder_input_proj`); needs `encoder_type="hybrid"`.
        query_source: where the decoder's queries come from, a name of `registry.QUERY_SOURCES`
            (`query_sources.py`): `"learned"` (DETR's object queries), `"learned_boxes"` (learned content queries
            and reference boxes, for a multi-scale decoder) or `"two_stage"` (query selection, with
            `two_stage=True`), or one registered with `register_query_source`. None (default): the one the other
            fields describe (`two_stage`, then the decoder's kind).
        criterion: the loss, a name of `registry.CRITERIA`: `"hungarian"` (DETR's set-prediction loss: Hungarian
            matching, then the table of terms of `loss_detr_custom.py`), `"hybrid"` (H-DETR's hybrid matching,
            `loss_hybrid.py`: the first query group matched one-to-one, the other groups one-to-many; needs
            `num_query_groups >= 2`), or one registered with `register_criterion`.
        one_to_many_repeats: with `criterion="hybrid"`, how often each target is repeated for the one-to-many
            groups (H-DETR's k; as often as the groups' queries allow, at least once).
        backbone_first_block_shortcut: give the first block of a timm ResNet's first stage a 1x1 conv + BatchNorm
            shortcut, as RT-DETR's ResNet-vd with basic blocks (R18vd, R34vd) has; with `resnet18d` / `resnet34d`
            this is that backbone, so its checkpoints load. Only for ResNets with basic blocks.
    """

    model_type = "detr_custom"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "encoder_attention_heads"}

    backbone: str = "resnet50"               # any timm model that supports features_only
    use_pretrained_backbone: bool = True
    num_channels: int = 3
    dilation: bool = False                   # DC5
    freeze_backbone_stem: bool = True
    freeze_batch_norm: bool = True
    num_queries: int = 100                   # upper bound on detections per image
    d_model: int = 256
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 8
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_ffn_dim: int = 2048
    activation_function: str = "relu"
    dropout: float | int = 0.1
    attention_dropout: float | int = 0.1
    activation_dropout: float | int = 0.1
    position_embedding_type: str = "sine"
    auxiliary_loss: bool = True
    normalize_decoder_residual: bool = False
    batch_independent_inference: bool = False
    class_cost: float | int = 1.0
    bbox_cost: float | int = 5.0             # matcher weights; the loss weights mirror them
    giou_cost: float | int = 2.0
    bbox_loss_coefficient: float | int = 5.0
    giou_loss_coefficient: float | int = 2.0
    eos_coefficient: float | int = 0.1       # class weight of "no object"
    init_xavier_std: float | int = 1.0
    # last, so that the earlier fields keep their positions
    encoder_type: str = "detr"               # one of ENCODER_TYPES
    decoder_type: str = "detr"               # one of DECODER_TYPES
    classification_loss: str = "cross_entropy"   # one of CLASSIFICATION_LOSSES
    focal_alpha: float | int = 0.25
    focal_gamma: float | int = 2.0
    varifocal_alpha: float | int = 0.75
    class_loss_coefficient: float | int = 1.0
    backbone_weights: str | None = None      # a local .pth / .safetensors file for the backbone
    backbone_weights_sha256: str | None = None
    num_query_groups: int = 1                # Group DETR: query groups at training (1 = off)
    num_feature_levels: int = 1              # backbone levels (+ extra stride-2 levels) fed to the decoder
    decoder_n_points: int = 4                # deformable decoder: sampling points per head and level
    encoder_n_points: int = 4                # encoder_type="deformable": sampling points per head and level
    two_stage: bool = False                  # deformable decoder: queries from the top encoder proposals
    learn_initial_query: bool = False        # with two_stage: learned content queries instead of selected features
    num_denoising: int = 0                   # deformable decoder: denoising queries at training (0 = off)
    label_noise_ratio: float | int = 0.5     # denoising: twice the fraction of labels flipped
    box_noise_scale: float | int = 1.0       # denoising: box noise, in half box sizes
    hidden_expansion: float | int = 1.0      # encoder_type="hybrid": width of the fusion blocks, times d_model
    encoder_activation_function: str | None = None   # None = activation_function
    projection_norm: str = "group"           # one of PROJECTION_NORMS: after the levels' 1x1 projections
    decoder_input_proj: bool = False         # RT-DETR's conv + BatchNorm per level after the hybrid encoder
    backbone_first_block_shortcut: bool = False   # RT-DETR's ResNet-vd (basic blocks): layer1.0 gets a 1x1 shortcut
    query_source: str | None = None          # one of QUERY_SOURCES; None = from two_stage and the decoder
    criterion: str = "hungarian"             # one of CRITERIA: the set-prediction loss
    one_to_many_repeats: int = 6             # criterion="hybrid": each target repeated this often (H-DETR's k)
    finest_level_stride: int = 8             # deformable decoder: the finest backbone level's stride (8 or 4)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DetrCustomConfig":
        """A config from one of `PRESETS` (a preset is only a set of field values, see there for the papers they
        follow), with `overrides` on top: `DetrCustomConfig.from_preset("deformable", num_labels=3)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; use one of {tuple(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, config_dict, **kwargs) -> "DetrCustomConfig":
        """`from_pretrained` builds the config here. A saved config holds every field at its value, the ones its
        variant ignores included, so loading checks `RULES` but never flags `IGNORED_FIELDS`."""
        loading = _LOADING.set(True)
        try:
            return super().from_dict(config_dict, **kwargs)
        finally:
            _LOADING.reset(loading)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # built by the user (a non-default value was set explicitly), or loaded (see from_dict)
        self.check_values(user_set=() if _LOADING.get() else None)

    def check_values(self, user_set=None) -> None:
        """Raise the first of `RULES` that the values break; then flag the fields of `user_set` that this variant
        ignores (`IGNORED_FIELDS`): an error or a warning, per field. `user_set`: the field names the user set
        (e.g. the training script's given options applied to a checkpoint); None = every field whose value differs
        from its default (a config built directly: a non-default value was set)."""
        for rule in RULES:
            if not rule.holds(self):
                raise ValueError(rule.error_message({name: getattr(self, name) for name in rule.fields}))
        _check_timm_backbone(self.backbone)
        for ignored in IGNORED_FIELDS:
            value = getattr(self, ignored.field)
            if user_set is not None and ignored.field not in user_set:
                continue
            if value == getattr(type(self), ignored.field) or not ignored.ignores(self):
                continue
            why, fix = ignored.reason(self)
            message = (f"{ignored.field}={value!r} has no effect here: {why} Drop it (its default is "
                       f"{getattr(type(self), ignored.field)!r}), or {fix}.")
            if ignored.refuse:
                raise ValueError(message)
            logger.warning_once(message)


def _check_timm_backbone(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:8]}*")[:5]
        hint = f" Close names: {close}." if close else ""
        raise ValueError(f"backbone={name!r} is not a timm model name.{hint} See timm.list_models().")
