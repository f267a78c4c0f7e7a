"""The demo dataset: real COCO layout, deterministic, idempotent, and boxes that match the drawn pixels."""
import json
import os

import numpy as np
import PIL.Image
import pytest

from training.sample_data import CATEGORIES, main, write_sample_dataset


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    assert write_sample_dataset(root, num_train=60, num_val=12, seed=0)
    return root


def load(root, split):
    with open(root / "annotations" / f"instances_{split}2017.json") as f:
        return json.load(f)


def test_coco_layout_and_contents(demo):
    for split, folder, n in (("train", "train2017", 60), ("val", "val2017", 12)):
        coco = load(demo, split)
        assert len(coco["images"]) == n
        assert sorted(os.listdir(demo / folder)) == sorted(im["file_name"] for im in coco["images"])
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    train = load(demo, "train")
    category_ids = [c["id"] for c in train["categories"]]
    assert category_ids == [1, 3, 7, 12, 18]   # not contiguous, as in COCO
    assert {a["category_id"] for a in train["annotations"]} == set(category_ids)
    annotated = {a["image_id"] for a in train["annotations"]}
    assert any(im["id"] not in annotated for im in train["images"])      # images with no object
    assert any(a["iscrowd"] for a in train["annotations"])               # crowd boxes
    sizes = {im["id"]: (im["width"], im["height"]) for im in train["images"]}
    per_image = {}
    for a in train["annotations"]:
        x, y, w, h = a["bbox"]
        width, height = sizes[a["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
        assert 0 < a["area"] <= w * h
        if not a["iscrowd"]:
            assert 20 <= w <= 80 and 20 <= h <= 80
            per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
    assert set(per_image.values()) <= {1, 2, 3, 4}
    with PIL.Image.open(demo / "train2017" / train["images"][0]["file_name"]) as image:
        assert image.size == sizes[train["images"][0]["id"]] and image.mode == "RGB"


def test_boxes_match_the_drawn_shapes(demo):
    """For images holding one object, its coloured pixels span the annotated box (up to JPEG blur).

    Pointed shapes (circle, triangle, diamond) end in tips a pixel or two wide that JPEG's chroma subsampling
    washes out, so their extent gets a wider tolerance than the square's and cross's flat edges.
    """
    coco = load(demo, "train")
    colours = {cid: np.array(colour) for cid, _, colour in CATEGORIES}
    by_image = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    singles = [im for im in coco["images"] if len(by_image.get(im["id"], [])) == 1]
    assert len(singles) >= 5
    for im in singles:
        (a,) = by_image[im["id"]]
        pixels = np.asarray(PIL.Image.open(demo / "train2017" / im["file_name"]), dtype=np.int32)
        close = np.abs(pixels - colours[a["category_id"]]).max(-1) < 45            # [height, width]
        ys, xs = np.nonzero(close)
        x, y, w, h = a["bbox"]
        tolerance = 2 if a["category_id"] in (3, 18) else 5
        extent = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert np.allclose(extent, [x, y, x + w, y + h], atol=tolerance), (im["file_name"], a)


def test_deterministic_from_seed_and_idempotent(demo, tmp_path):
    assert not write_sample_dataset(demo, num_train=60, num_val=12, seed=0)   # same content: nothing written
    other = tmp_path / "again"
    write_sample_dataset(other, num_train=60, num_val=12, seed=0)
    assert load(other, "train") == load(demo, "train")
    name = load(demo, "val")["images"][3]["file_name"]
    assert (other / "val2017" / name).read_bytes() == (demo / "val2017" / name).read_bytes()
    reseeded = tmp_path / "seed1"
    write_sample_dataset(reseeded, num_train=60, num_val=12, seed=1)
    assert load(reseeded, "train")["annotations"] != load(demo, "train")["annotations"]
    # a different size rewrites the folder
    assert write_sample_dataset(other, num_train=10, num_val=12, seed=0)
    assert len(load(other, "train")["images"]) == 10


def test_never_written_over_a_users_coco_folder(tmp_path):
    """The demo config with another --data_dir: the user's annotations are not replaced by the demo's."""
    user = tmp_path / "mine"
    (user / "annotations").mkdir(parents=True)
    mine = json.dumps({"info": {"description": "my boxes"}, "images": [], "annotations": [], "categories": []})
    (user / "annotations" / "instances_val2017.json").write_text(mine)
    with pytest.raises(ValueError, match=r"instances_val2017.json is not the demo's dataset: writing the demo data "
                                         r"into .*mine would replace it. To train on that folder pass "
                                         "--write_demo_data false"):
        write_sample_dataset(user, num_train=2, num_val=2)
    assert (user / "annotations" / "instances_val2017.json").read_text() == mine
    assert not (user / "train2017").exists() and not (user / "annotations" / "instances_train2017.json").exists()


def test_cli(tmp_path, capsys):
    main(["--output-dir", str(tmp_path / "cli"), "--num-train", "5", "--num-val", "2", "--seed", "3"])
    assert "wrote" in capsys.readouterr().out
    assert len(load(tmp_path / "cli", "val")["images"]) == 2
    main(["--output-dir", str(tmp_path / "cli"), "--num-train", "5", "--num-val", "2", "--seed", "3"])
    assert "already up to date" in capsys.readouterr().out


def test_demo_passes_the_full_decode_check(demo, tmp_path):
    from training.data import check_dataset, load_coco

    dataset = load_coco(demo, "train", use_cache=False)
    clean, report = check_dataset(dataset, check_images="decode")
    assert report.ok and len(clean) == 60 and report.image_check.startswith("decoded 60 images in ")
    assert "no problems found" in str(report) and report.image_check in str(report)
