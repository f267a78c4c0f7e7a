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
