"""The seam for variants (STYLE.md "Variants plug in at one seam"): `config.encoder_type` / `config.decoder_type` ->
the class that builds that part, one line per part below.

An encoder is built as `cls(config, backbone_levels=n)` (n: how many of the feature levels come from the backbone;
1 for a single-scale model), a decoder as `cls(config)`, and each declares how the assembly wires it:

- an encoder has `multi_scale` False (one feature map: `forward(source, position_embeddings, key_mask,
  output_attentions, output_hidden_states)`, see `encoder_detr.py`) or True (`encode_levels(...)` over the levels
  of `multiscale.py`, see `encoder_deformable.py`); the DETR encoder does both (on the coarsest level, RT-DETR's
  AIFI, with a multi-scale decoder);
- a decoder has `multi_scale` False (DETR's interface, `decoder_detr.py`: the model adds one class and one box head
  on top, shared by the layers) or True (the deformable interface, `decoder_deformable.py`: multi-scale memory,
  reference boxes refined by one box head per layer, `model_deformable.py` assembles it).

A part from outside the package registers itself with `register_encoder(name, cls)` / `register_decoder(name, cls)`
before a model is built or loaded; the config then accepts the name (the registry publishes the names to
`configuration_detr_custom.ENCODER_TYPES` / `DECODER_TYPES`, since the config never imports the parts).

The rest of the assembly goes through the same kind of table, each entry built as `cls(config)`:

- a query source (`QUERY_SOURCES`, `query_sources.py`; one file per source), by `config.query_source` (None:
  "two_stage" with `two_stage=True`, "learned_boxes" with a multi-scale decoder, "learned" otherwise), declares
  `multi_scale` as the decoder it feeds;
- the heads (`HEADS`, `heads.py`: "shared" or "per_layer"), by the decoder's class attribute `heads` (default
  "per_layer" for a multi-scale decoder, "shared" otherwise); an entry is a builder `(config) -> (class_embed,
  bbox_embed)`;
- the criterion (`CRITERIA`, `loss_detr_custom.py`: "hungarian", DETR's set-prediction loss with its table of terms
  and the matcher), by `config.criterion`.

`register_query_source`, `register_heads` and `register_criterion` add entries from outside. docs/ARCHITECTURE.md
walks through adding a decoder and a query source.
"""
import sys

from .configuration_detr_custom import DetrCustomConfig
from .decoder_deformable import DetrCustomDeformableDecoder
from .decoder_detr import DetrCustomDecoder
from .encoder_deformable import DetrCustomDeformableLevelEncoder
from .encoder_detr import DetrCustomEncoder
from .encoder_hybrid import DetrCustomHybridEncoder
from .heads import per_layer_heads, shared_heads
from .loss_detr_custom import DetrCustomLoss
from .loss_hybrid import HybridMatchingLoss
from .query_selection import TwoStageQueries
from .query_source_learned import LearnedQueries
from .query_source_learned_boxes import LearnedBoxQueries
from .query_sources import QuerySource

ENCODERS: dict[str, type] = {}
DECODERS: dict[str, type] = {}
QUERY_SOURCES: dict[str, type] = {}
HEADS: dict[str, object] = {}      # name -> builder (config) -> (class_embed, bbox_embed)
CRITERIA: dict[str, type] = {}


def _register(table: dict, kind: str, name: str, cls: type) -> type:
    if not isinstance(name, str) or not name:
        raise ValueError(f"a {kind} name must be a non-empty string, got {name!r}.")
    if not isinstance(getattr(cls, "multi_scale", None), bool):
        raise ValueError(f"{cls!r} has no boolean class attribute `multi_scale`: set it to False (one feature map, "
                         f"the DETR interface) or True (multi-scale levels, the deformable interface); see "
                         f"registry.py.")
    table[name] = cls
    publish_names()
    return cls


def publish_names() -> None:
    """The config validates encoder_type / decoder_type against its ENCODER_TYPES / DECODER_TYPES: these tables'
    names, and the multi-scale ones as MULTI_SCALE_ENCODER_TYPES / MULTI_SCALE_DECODER_TYPES (call again after
    removing an entry)."""
    configuration = sys.modules[DetrCustomConfig.__module__]   # also under remote code's module names
    configuration.ENCODER_TYPES = tuple(ENCODERS)
    configuration.DECODER_TYPES = tuple(DECODERS)
    # for the config's cross-field rules: the parts that need (encoders) or build (decoders) several feature levels
    configuration.MULTI_SCALE_ENCODER_TYPES = tuple(name for name, cls in ENCODERS.items() if cls.multi_scale)
    configuration.MULTI_SCALE_DECODER_TYPES = tuple(name for name, cls in DECODERS.items() if cls.multi_scale)
    configuration.QUERY_SOURCES = tuple(QUERY_SOURCES)
    configuration.MULTI_SCALE_QUERY_SOURCES = tuple(name for name, cls in QUERY_SOURCES.items() if cls.multi_scale)
    configuration.CRITERIA = tuple(CRITERIA)
    # the fields only some parts read (each part's `config_fields`): set for another part, the config refuses them
    configuration.PART_FIELDS = {
        part: {name: tuple(getattr(cls, "config_fields", ())) for name, cls in table.items()}
        for part, table in (("encoder", ENCODERS), ("decoder", DECODERS), ("criterion", CRITERIA))}


def register_encoder(name: str, cls: type) -> type:
    """Makes `config.encoder_type=name` build `cls(config, backbone_levels=n)`. Returns `cls`."""
    return _register(ENCODERS, "encoder", name, cls)


def register_decoder(name: str, cls: type) -> type:
    """Makes `config.decoder_type=name` build `cls(config)`. Returns `cls`."""
    return _register(DECODERS, "decoder", name, cls)


def register_query_source(name: str, cls: type) -> type:
    """Makes `config.query_source=name` build `cls(config)` (a `query_sources.QuerySource`). Returns `cls`."""
    if not (isinstance(cls, type) and issubclass(cls, QuerySource)):
        raise ValueError(f"{cls!r} is not a subclass of modeling_detr_custom.query_sources.QuerySource: derive your "
                         "query source from it (it keeps the source's parameter names in checkpoints, see "
                         "query_sources.py).")
    return _register(QUERY_SOURCES, "query source", name, cls)


def register_heads(name: str, builder) -> object:
    """Makes a decoder with `heads = name` get `builder(config) -> (class_embed, bbox_embed)`. Returns `builder`."""
    if not isinstance(name, str) or not name or not callable(builder):
        raise ValueError(f"register_heads needs a non-empty name and a builder (config) -> (class_embed, bbox_embed), "
                         f"got {name!r}, {builder!r}.")
    HEADS[name] = builder
    return builder


def register_criterion(name: str, cls: type) -> type:
    """Makes `config.criterion=name` build `cls(config)`: its forward takes what `DetrCustomLoss.forward` takes and
    returns (loss, loss_dict); it also has `label_tensors` and `check_labels` (subclass DetrCustomLoss to keep
    them). Returns `cls`."""
    if not isinstance(name, str) or not name or not isinstance(cls, type):
        raise ValueError(f"register_criterion needs a non-empty name and a class, got {name!r}, {cls!r}.")
    CRITERIA[name] = cls
    publish_names()
    return cls


def encoder_types() -> tuple[str, ...]:
    return tuple(ENCODERS)


def decoder_types() -> tuple[str, ...]:
    return tuple(DECODERS)


def _lookup(table: dict, kind: str, name: str, what: str | None = None) -> type:
    what = what or f"config.{kind}_type"
    if name not in table:
        function = kind.replace(" ", "_")
        raise ValueError(f"{what}={name!r} is not registered; registered: {tuple(table)}. Register a "
                         f"{kind} from outside the package with modeling_detr_custom.register_{function}(name, cls) "
                         f"before building or loading the model.")
    return table[name]


def encoder_class(config) -> type:
    return _lookup(ENCODERS, "encoder", config.encoder_type)


def decoder_class(config) -> type:
    return _lookup(DECODERS, "decoder", config.decoder_type)


def build_encoder(config, backbone_levels: int = 1):
    return encoder_class(config)(config, backbone_levels=backbone_levels)


def build_decoder(config):
    return decoder_class(config)(config)


def query_source_name(config) -> str:
    """`config.query_source`, or the kind the other fields describe when it is None (configs saved before it)."""
    name = getattr(config, "query_source", None)
    if name is not None:
        return name
    if getattr(config, "two_stage", False):
        return "two_stage"
    return "learned_boxes" if decoder_class(config).multi_scale else "learned"


def query_source_class(config) -> type:
    return _lookup(QUERY_SOURCES, "query source", query_source_name(config), what="config.query_source")


def build_query_source(config, owner) -> QuerySource:
    """The config's query source, mounted on the assembly `owner` (its parameters keep their checkpoint names, see
    query_sources.py); also `owner.query_source`."""
    source = query_source_class(config)(config)
    source.mount(owner)
    return source


def heads_name(config) -> str:
    decoder = decoder_class(config)
    return getattr(decoder, "heads", "per_layer" if decoder.multi_scale else "shared")


def build_heads(config) -> tuple:
    """`(class_embed, bbox_embed)` in the layout the decoder declares."""
    return _lookup(HEADS, "heads", heads_name(config), what=f"{decoder_class(config).__name__}.heads")(config)


def build_criterion(config):
    return _lookup(CRITERIA, "criterion", getattr(config, "criterion", "hungarian"), what="config.criterion")(config)


# the built-in parts: one line each
register_encoder("detr", DetrCustomEncoder)
register_encoder("hybrid", DetrCustomHybridEncoder)
register_encoder("deformable", DetrCustomDeformableLevelEncoder)
register_decoder("detr", DetrCustomDecoder)
register_decoder("deformable", DetrCustomDeformableDecoder)
register_query_source("learned", LearnedQueries)
register_query_source("learned_boxes", LearnedBoxQueries)
register_query_source("two_stage", TwoStageQueries)
register_heads("shared", shared_heads)
register_heads("per_layer", per_layer_heads)
register_criterion("hungarian", DetrCustomLoss)
register_criterion("hybrid", HybridMatchingLoss)
