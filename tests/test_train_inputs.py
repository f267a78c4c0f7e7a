"""Bad input to the training script, where it enters: the arguments, the datasets against each other, the output
folder, the checkpoint a run starts or resumes from. Each test runs the script (tiny_run.py's tiny run) and checks the
message names the problem and the fix, before any training where the input allows it."""
import json
import shutil

import pytest
from tiny_run import run as _run
from tiny_run import write_config as _config


def _val_with(tmp_path, data_dir, edit) -> dict:
    """The tiny dataset's files, with the validation json's categories edited: the config's data arguments."""
    root = tmp_path / "data"
    shutil.copytree(data_dir, root)
    path = root / "annotations" / "instances_val2017.json"
    coco = json.loads(path.read_text())
    edit(coco)
    path.write_text(json.dumps(coco))
    return {"train_annotation_file": str(root / "annotations" / "instances_train2017.json"),
            "train_image_dir": str(root / "train2017"), "val_annotation_file": str(path),
            "val_image_dir": str(root / "val2017")}


def _permute_names(coco):
    names = [c["name"] for c in coco["categories"]]
    for category, name in zip(coco["categories"], names[1:] + names[:1]):
        category["name"] = name


def _renumber(coco):
    new_ids = {c["id"]: k for k, c in enumerate(coco["categories"])}
    for category in coco["categories"]:
        category["id"] = new_ids[category["id"]]
    for annotation in coco["annotations"]:
        annotation["category_id"] = new_ids[annotation["category_id"]]


@pytest.mark.parametrize("edit, expected", [(_permute_names, r"in training, '\w+' in validation"),
                                            (_renumber, "only in validation")])
def test_validation_categories_must_be_the_training_ones(tmp_path, data_dir, edit, expected):
    data = _val_with(tmp_path, data_dir, edit)
    with pytest.raises(ValueError, match=f"instances_val2017.json\\) differ from the training categories.*{expected}"):
        _run(_config(tmp_path, None, max_steps=1, **data))   # data_dir None: the files below
    assert not list((tmp_path / "run").glob("checkpoint-*"))   # refused before training


def test_flags_that_differ_from_a_starting_checkpoint_are_applied_or_refused(tmp_path, data_dir, caplog):
    """--model_name_or_path FOLDER: head sizes and loss weights given as flags are applied, architecture flags that
    differ from the folder's are refused by name; nothing is ignored silently."""
    import logging

    from modeling_detr_custom import DetrCustomForObjectDetection

    _run(_config(tmp_path / "first", data_dir, max_steps=1, eval_steps=1))
    folder = tmp_path / "first" / "run" / "last"
    with pytest.raises(ValueError, match=r"fixes the architecture, but d_model=64 \(the checkpoint's d_model: 32\), "
                                         r"decoder_layers=3 \(the checkpoint's decoder_layers: 2\) differ"):
        _run(_config(tmp_path, data_dir, max_steps=1, model_name_or_path=str(folder), num_queries=12, d_model=64,
                     decoder_layers=3))
    with caplog.at_level(logging.INFO, logger="training.train"):
        _run(_config(tmp_path, data_dir, max_steps=1, eval_steps=1, model_name_or_path=str(folder), num_queries=12,
                     eos_coefficient=0.3))
    tuned = DetrCustomForObjectDetection.from_pretrained(tmp_path / "run" / "last")
    assert (tuned.config.num_queries, tuned.config.eos_coefficient, tuned.config.d_model) == (12, 0.3, 32)
    assert any("applied to the checkpoint's config: num_queries=12, eos_coefficient=0.3" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="training.train"):   # another decoder: its weights start anew
        _run(_config(tmp_path, data_dir, max_steps=1, eval_steps=1, model_name_or_path=str(folder),
                     decoder_type="deformable", num_feature_levels=2, overwrite_output_dir=True))
    warned = [r.getMessage() for r in caplog.records if "start from random values" in r.getMessage()]
    assert len(warned) == 1 and "decoder_type='deformable'" in warned[0] and "num_feature_levels=2" in warned[0]
    with pytest.raises(ValueError, match=r"\['backbone_weights'\] apply to new models only"):
        _run(_config(tmp_path, data_dir, max_steps=1, model_name_or_path=str(folder), backbone_weights="w.pth",
                     overwrite_output_dir=True))
    with pytest.raises(ValueError, match=r"\['preset'\] apply to new models only"):
        _run(_config(tmp_path, data_dir, max_steps=1, model_name_or_path=str(folder), preset="deformable",
                     overwrite_output_dir=True))
    # a given option that the checkpoint's variant (DETR's decoder) does not read: refused, naming the fix
    with pytest.raises(ValueError, match=r"hidden_expansion=2.0 has no effect here: .* set encoder_type='hybrid'"):
        _run(_config(tmp_path, data_dir, max_steps=1, model_name_or_path=str(folder), hidden_expansion=2.0,
                     overwrite_output_dir=True))
