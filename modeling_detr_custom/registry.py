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
docs/ARCHITECTURE.md walks through adding a decoder.
"""
import sys

from .configuration_detr_custom import DetrCustomConfig
from .decoder_deformable import DetrCustomDeformableDecoder
from .decoder_detr import DetrCustomDecoder
from .encoder_deformable import DetrCustomDeformableLevelEncoder
from .encoder_detr import DetrCustomEncoder
from .encoder_hybrid import DetrCustomHybridEncoder

ENCODERS: dict[str, type] = {}
DECODERS: dict[str, type] = {}


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


def register_encoder(name: str, cls: type) -> type:
    """Makes `config.encoder_type=name` build `cls(config, backbone_levels=n)`. Returns `cls`."""
    return _register(ENCODERS, "encoder", name, cls)


def register_decoder(name: str, cls: type) -> type:
    """Makes `config.decoder_type=name` build `cls(config)`. Returns `cls`."""
    return _register(DECODERS, "decoder", name, cls)


def encoder_types() -> tuple[str, ...]:
    return tuple(ENCODERS)


def decoder_types() -> tuple[str, ...]:
    return tuple(DECODERS)


def _lookup(table: dict, kind: str, name: str) -> type:
    if name not in table:
        raise ValueError(f"config.{kind}_type={name!r} is not registered; registered: {tuple(table)}. Register a "
                         f"{kind} from outside the package with modeling_detr_custom.register_{kind}(name, cls) "
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


# the built-in parts: one line each
register_encoder("detr", DetrCustomEncoder)
register_encoder("hybrid", DetrCustomHybridEncoder)
register_encoder("deformable", DetrCustomDeformableLevelEncoder)
register_decoder("detr", DetrCustomDecoder)
register_decoder("deformable", DetrCustomDeformableDecoder)
