"""Folders saved before the parts moved (the hybrid fusion and the level embeddings into their encoders, the
multi-scale MLPs from nn.Sequential to blocks.MLP) load through checkpoint_conversion.LEGACY_KEY_RULES with the
same outputs."""
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection
from modeling_detr_custom.checkpoint_conversion import convert_legacy_state_dict
from modeling_detr_custom.testing_utils import padded_batch, randomize_, tiny_kwargs

MULTI_SCALE = dict(decoder_type="deformable", num_feature_levels=3, decoder_n_points=2, classification_loss="focal")


def _earlier_name(key: str) -> str:
    """Today's key -> the name an earlier version saved it under."""
    key = re.sub(r"^model\.encoder\.fusion\.", "model.fusion.", key)
    key = re.sub(r"^model\.encoder\.level_embed$", "model.level_embed", key)
    return re.sub(r"^(model\.(?:bbox_embed\.\d+|query_pos_head|(?:query_selection|extra_query_selections\.\d+)"
                  r"\.enc_bbox_head)\.)layers\.(\d+)\.", lambda m: f"{m.group(1)}{2 * int(m.group(2))}.", key)


@pytest.mark.parametrize("kwargs", [
    dict(encoder_type="hybrid", two_stage=True, num_query_groups=2, classification_loss="varifocal"),
    dict(encoder_type="deformable"),
])
def test_a_folder_in_the_earlier_layout_loads_with_the_same_outputs(kwargs, tmp_path):
    config = DetrCustomConfig(**tiny_kwargs(**{**MULTI_SCALE, **kwargs}))
    model = randomize_(DetrCustomForObjectDetection(config)).eval()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    earlier = {_earlier_name(key): value for key, value in weights.items()}
    assert set(earlier) != set(weights) and convert_legacy_state_dict(earlier).keys() == weights.keys()
    save_file(earlier, tmp_path / "model.safetensors", metadata={"format": "pt"})

    loaded, info = DetrCustomForObjectDetection.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pixel_values, pixel_mask, _ = padded_batch()
    with torch.no_grad():
        expected, got = model(pixel_values, pixel_mask), loaded.eval()(pixel_values, pixel_mask)
    assert torch.equal(got.logits, expected.logits) and torch.equal(got.pred_boxes, expected.pred_boxes)
