"""COCO folders and Hub datasets -> one schema, cached; the dataset check; the collate in a 2-worker DataLoader."""
import io
import json
import logging
import os

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from pycocotools.coco import COCO

from modeling_detr_custom.image_processing_detr_custom import DetrCustomImageProcessor
from training.data import (
    DETECTION_FEATURES,
    DetrCollator,
    check_dataset,
    get_categories,
    load_coco,
    load_hub_detection,
    normalize_hub_dataset,
)
from training.sample_data import write_sample_dataset
from training.transforms import Compose, RandomHorizontalFlip, make_detr_transforms

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 1, "name": "person"}, {"id": 12, "name": "stop sign"}]


def write_coco(root, images, annotations):
    """A COCO 2017 train folder: images are (id, width, height) drawn as JPEGs; the json lists them as given."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "train2017").mkdir(exist_ok=True)
    entries = []
    for image_id, width, height in images:
        name = f"{image_id:012d}.jpg"
        PIL.Image.new("RGB", (width, height), (image_id * 40 % 255, 90, 30)).save(root / "train2017" / name)
        entries.append({"id": image_id, "file_name": name, "width": width, "height": height})
    path = root / "annotations" / "instances_train2017.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": CATEGORIES}))
    return path


def ann(ann_id, image_id, bbox, category_id=1, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "bbox": bbox, "category_id": category_id, "iscrowd": iscrowd,
            "area": bbox[2] * bbox[3]}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_sample_dataset(root, num_train=40, num_val=8, seed=0)
    return root


def test_load_coco_matches_pycocotools(demo, tmp_path):
    dataset = load_coco(demo, "train", cache_dir=tmp_path)
    reference = COCO(str(demo / "annotations" / "instances_train2017.json"))
    assert dataset.features == DETECTION_FEATURES
    assert dataset["image_id"] == reference.getImgIds()   # every image, empty ones included, in the json's order
    for row in dataset:
        info = reference.imgs[row["image_id"]]
        assert (row["width"], row["height"]) == (info["width"], info["height"]) == row["image"].size
        anns = reference.loadAnns(reference.getAnnIds(imgIds=row["image_id"]))
        assert row["objects"]["id"] == [a["id"] for a in anns]
        assert row["objects"]["bbox"] == [[float(v) for v in a["bbox"]] for a in anns]
        assert row["objects"]["category_id"] == [a["category_id"] for a in anns]
        assert row["objects"]["iscrowd"] == [a["iscrowd"] for a in anns]
        assert np.allclose(row["objects"]["area"], [a["area"] for a in anns])
    splits = load_coco(demo, cache_dir=tmp_path)
    assert list(splits) == ["train", "validation"] and splits["train"][:] == dataset[:]
    validation = COCO(str(demo / "annotations" / "instances_val2017.json"))
    assert splits["validation"]["image_id"] == validation.getImgIds() and len(validation.getImgIds()) == 8
    assert get_categories(splits) == get_categories(dataset)   # a DatasetDict: its first split's categories


def test_crowd_empty_images_and_noncontiguous_categories(tmp_path):
    images = [(5, 64, 48), (9, 40, 40), (2, 50, 30)]
    annotations = [ann(101, 9, [1, 2, 10, 12], 12), ann(100, 5, [0, 0, 20, 20], 3, iscrowd=1),
                   ann(102, 5, [30.5, 10, 8, 8], 1), ann(103, 777, [0, 0, 1, 1], 1)]   # 103: an unknown image
    write_coco(tmp_path / "coco", images, annotations)
    dataset = load_coco(tmp_path / "coco", "train", cache_dir=tmp_path / "cache")
    assert dataset["image_id"] == [5, 9, 2]
    assert dataset[0]["objects"] == {"id": [100, 102], "bbox": [[0, 0, 20, 20], [30.5, 10, 8, 8]],
                                     "category_id": [3, 1], "area": [400, 64], "iscrowd": [1, 0]}
    assert dataset[1]["objects"]["id"] == [101]
    assert dataset[2]["objects"]["id"] == []                  # kept: DETR learns "no object" from such images
    categories = get_categories(dataset)
    assert categories.ids == (1, 3, 12)                       # labels follow increasing category id
    assert categories.id2label == {0: "person", 1: "cat", 2: "stop sign"}
    assert categories.label2id == {"person": 0, "cat": 1, "stop sign": 2}
    assert categories.category_id_to_label == {1: 0, 3: 1, 12: 2}
    assert {categories.label_to_category_id[categories.category_id_to_label[i]] for i in (1, 3, 12)} == {1, 3, 12}
    # a COCO-format folder that is not the 2017 layout
    other = load_coco(annotation_file=tmp_path / "coco/annotations/instances_train2017.json",
                      image_dir=tmp_path / "coco/train2017", use_cache=False)
    assert other["image_id"] == [5, 9, 2] and get_categories(other) == categories
    with pytest.raises(ValueError, match="COCO 2017 layout"):
        load_coco(tmp_path / "coco", "val")
    with pytest.raises(ValueError, match="either root"):
        load_coco(tmp_path / "coco", "train", image_dir=tmp_path)


def test_second_load_reads_the_cache_not_the_json(tmp_path, monkeypatch):
    path = write_coco(tmp_path / "coco", [(1, 32, 32), (2, 32, 32)], [ann(1, 1, [0, 0, 4, 4])])
    first = load_coco(tmp_path / "coco", "train", cache_dir=tmp_path / "cache")

    real_load = json.load

    def no_parsing(file, *args, **kwargs):   # datasets itself reads small json files: let those through
        if os.path.samefile(file.name, path):
            raise AssertionError("the annotation json was parsed again")
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(json, "load", no_parsing)
    second = load_coco(tmp_path / "coco", "train", cache_dir=tmp_path / "cache")
    assert second[:] == first[:] and get_categories(second) == get_categories(first)
    # the cache holds paths, not copies of the images
    raw = second.cast_column("image", datasets.Image(decode=False))
    assert [image["bytes"] for image in raw["image"]] == [None, None]
    assert raw[0]["image"]["path"] == os.path.abspath(tmp_path / "coco/train2017/000000000001.jpg")
    # editing the json (new size and mtime) invalidates the cache
    monkeypatch.undo()
    coco = json.loads(path.read_text())
    coco["annotations"].append(ann(2, 2, [1, 1, 5, 5]))
    path.write_text(json.dumps(coco))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert load_coco(tmp_path / "coco", "train", cache_dir=tmp_path / "cache")[1]["objects"]["id"] == [2]


def hub_dataset(tmp_path):
    """cppe-5 style rows with renamed columns and xyxy boxes normalized by the image size."""
    def jpeg(width, height):
        buffer = io.BytesIO()
        PIL.Image.new("RGB", (width, height), (10, 200, 10)).save(buffer, format="JPEG")
        return {"bytes": buffer.getvalue(), "path": None}

    features = datasets.Features({
        "picture": datasets.Image(),
        "objs": datasets.Sequence({"boxes": datasets.Sequence(datasets.Value("float32"), length=4),
                                   "label": datasets.ClassLabel(names=["mask", "glove", "goggles"])}),
    })
    rows = {"picture": [jpeg(100, 50), jpeg(40, 80)],
            "objs": [{"boxes": [[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]], "label": [2, 0]},
                     {"boxes": [], "label": []}]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_hub_schema_dataset_through_explicit_mapping(tmp_path):
    path = hub_dataset(tmp_path)
    mapping = {"image": "picture", "objects": "objs", "bbox": "boxes", "category": "label"}
    dataset = load_hub_detection(str(path), bbox_format="xyxy", bbox_normalized=True, column_mapping=mapping)
    assert dataset.features == DETECTION_FEATURES
    first = dataset[0]
    assert first["image"].size == (100, 50) and (first["width"], first["height"]) == (100, 50)
    assert np.allclose(first["objects"]["bbox"], [[10, 10, 40, 20], [0, 0, 100, 50]])
    assert first["objects"]["category_id"] == [2, 0]
    assert np.allclose(first["objects"]["area"], [800, 5000])
    assert first["objects"]["iscrowd"] == [0, 0] and first["objects"]["id"] == [-1, -1]
    assert dataset[1]["objects"]["id"] == [] and dataset["image_id"] == [0, 1]
    assert get_categories(dataset).id2label == {0: "mask", 1: "glove", 2: "goggles"}
    # the format is an explicit option, and boxes that contradict it are refused with the format they look like
    with pytest.raises(ValueError, match=r"hub.*every box coordinate is in \[0, 1\].*--bbox_normalized true"):
        load_hub_detection(str(path), bbox_format="xywh", bbox_normalized=False, column_mapping=mapping)
    with pytest.raises(TypeError):
        load_hub_detection(str(path), column_mapping=mapping)                     # no silent default format
    with pytest.raises(ValueError, match="bbox_format"):
        load_hub_detection(str(path), bbox_format="cxcywh", bbox_normalized=True, column_mapping=mapping)
    with pytest.raises(ValueError, match="column_mapping"):
        load_hub_detection(str(path), bbox_format="xyxy", bbox_normalized=True)


def _pixel_boxes_dataset(boxes: list) -> datasets.Dataset:
    """One 200x100 image per box list, the boxes stored as given (absolute pixels)."""
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (200, 100)).save(buffer, format="PNG")
    objects = {"bbox": datasets.Sequence(datasets.Value("float32"), length=4),
               "category": datasets.ClassLabel(names=["a"])}
    features = datasets.Features({"image": datasets.Image(), "objects": datasets.Sequence(objects)})
    rows = {"image": [{"bytes": buffer.getvalue(), "path": None}] * len(boxes),
            "objects": [{"bbox": b, "category": [0] * len(b)} for b in boxes]}
    return datasets.Dataset.from_dict(rows, features=features)


def test_hub_boxes_that_contradict_the_declared_format_are_refused():
    xyxy = [[[10, 10, 150, 90], [120, 20, 190, 60]], [[5, 40, 60, 95], [100, 5, 130, 30]]]   # x1 > x0 everywhere
    with pytest.raises(ValueError, match=r"boxes of the first 2 images leave the image.*look like xyxy.*"
                                         "--bbox_format xyxy"):
        normalize_hub_dataset(_pixel_boxes_dataset(xyxy), bbox_format="xywh", bbox_normalized=False, source="src")
    as_xyxy = normalize_hub_dataset(_pixel_boxes_dataset(xyxy), bbox_format="xyxy", bbox_normalized=False)
    assert np.allclose(as_xyxy[0]["objects"]["bbox"][0], [10, 10, 140, 80])
    xywh = [[[120, 10, 30, 50], [60, 50, 20, 40]]]   # x + w inside, but x1 = w < x0
    with pytest.raises(ValueError, match="src: read as xyxy, 2 of 2 boxes .*look like xywh"):
        normalize_hub_dataset(_pixel_boxes_dataset(xywh), bbox_format="xyxy", bbox_normalized=False, source="src")
    normalized = [[[0.1, 0.2, 0.3, 0.4]]]
    with pytest.raises(ValueError, match="images up to 200x100 pixels.*look normalized"):
        normalize_hub_dataset(_pixel_boxes_dataset(normalized), bbox_format="xywh", bbox_normalized=False)
    with pytest.raises(ValueError, match="look like pixels"):
        normalize_hub_dataset(_pixel_boxes_dataset(xywh), bbox_format="xywh", bbox_normalized=True)
    assert len(normalize_hub_dataset(_pixel_boxes_dataset(xywh), bbox_format="xywh", bbox_normalized=False)) == 1


def test_hub_missing_split_names_the_splits(tmp_path):
    datasets.DatasetDict({"train": _pixel_boxes_dataset([[[1, 1, 5, 5]]])}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"saved has no validation split \(looked for 'validation', 'val', 'valid', "
                                         r"'test'\): its splits are \['train'\]. Pass --val_split"):
        load_hub_detection(str(tmp_path / "saved"), "val", bbox_format="xywh", bbox_normalized=False)
    with pytest.raises(ValueError, match=r"saved has no split 'train2017': its splits are \['train'\]. Pass "
                                         "--train_split / --val_split"):
        load_hub_detection(str(tmp_path / "saved"), "train2017", bbox_format="xywh", bbox_normalized=False)


def _cppe5_layout() -> datasets.DatasetDict:
    """cppe-5's layout: train and test splits (no validation), image_id / image / width / height / objects{id, area,
    bbox (xywh pixels), category (ClassLabel)}; 3 train and 2 test images, told apart by their sizes."""
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (200, 100)).save(buffer, format="PNG")
    objects = {"id": datasets.Value("int64"), "area": datasets.Value("int64"),
               "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
               "category": datasets.ClassLabel(names=["Coverall", "Face_Shield", "Gloves", "Goggles", "Mask"])}
    features = datasets.Features({"image_id": datasets.Value("int64"), "image": datasets.Image(),
                                  "width": datasets.Value("int32"), "height": datasets.Value("int32"),
                                  "objects": datasets.Sequence(objects)})

    def split(num_images, first_id):
        return datasets.Dataset.from_dict({
            "image_id": list(range(first_id, first_id + num_images)),
            "image": [{"bytes": buffer.getvalue(), "path": None}] * num_images,
            "width": [200] * num_images, "height": [100] * num_images,
            "objects": [{"id": [first_id + i], "area": [600], "bbox": [[10, 10, 20, 30]], "category": [i % 5]}
                        for i in range(num_images)]}, features=features)

    return datasets.DatasetDict({"train": split(3, 1), "test": split(2, 1001)})


def test_the_validation_split_of_a_train_test_dataset_is_found(tmp_path, caplog):
    """cppe-5 as users have it, saved with save_to_disk and as a Hub repository's parquet files (read by
    datasets.load_dataset, as a Hub id is): "validation" reads its test split, logged and recorded."""
    from training.data import get_split

    layout = _cppe5_layout()
    layout.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "repo" / "data").mkdir(parents=True)
    for name, part in layout.items():
        part.to_parquet(str(tmp_path / "repo" / "data" / f"{name}-00000-of-00001.parquet"))
    for source in (tmp_path / "saved", tmp_path / "repo"):
        with caplog.at_level(logging.INFO, logger="training.data"):
            val = load_hub_detection(str(source), "validation", bbox_format="xywh", bbox_normalized=False)
        assert val["image_id"] == [1001, 1002] and get_split(val) == "test"
        assert f"{source} has no 'validation' split: validating on its 'test' split (its splits: train, test" in (
            caplog.text)
        train = load_hub_detection(str(source), "train", bbox_format="xywh", bbox_normalized=False)
        assert train["image_id"] == [1, 2, 3] and get_split(train) == "train"
        assert get_categories(train).names == ("Coverall", "Face_Shield", "Gloves", "Goggles", "Mask")
        with pytest.raises(ValueError, match=r"has no split 'dev': its splits are \['train', 'test'\]"):
            load_hub_detection(str(source), "dev", bbox_format="xywh", bbox_normalized=False)
        caplog.clear()
    # a validation split is preferred to test, and val / valid are found too
    for name in ("validation", "val", "valid"):
        datasets.DatasetDict({**layout, name: layout["train"]}).save_to_disk(str(tmp_path / name))
        assert get_split(load_hub_detection(str(tmp_path / name), "validation", bbox_format="xywh",
                                            bbox_normalized=False)) == name


def test_hub_sizes_ids_and_categories_from_the_source():
    """A list-of-structs objects column, the source's image ids and declared sizes, categories from the caller."""
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (30, 20)).save(buffer, format="PNG")
    features = datasets.Features({
        "image": datasets.Image(), "image_id": datasets.Value("int64"),
        "width": datasets.Value("int32"), "height": datasets.Value("int32"),
        "objects": datasets.List({"bbox": datasets.List(datasets.Value("float32"), length=4),
                                  "category": datasets.Value("int64"), "id": datasets.Value("int64")}),
    })
    rows = {"image": [{"bytes": buffer.getvalue(), "path": None}] * 2, "image_id": [70, 71], "width": [300, 300],
            "height": [200, 200], "objects": [[{"bbox": [0.1, 0.1, 0.5, 0.5], "category": 5, "id": 7}], []]}
    source = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)})
    splits = normalize_hub_dataset(source, bbox_format="xyxy", bbox_normalized=True,
                                   categories=[{"id": 5, "name": "five"}, {"id": 2, "name": "two"}])
    train = splits["train"]
    assert train["image_id"] == [70, 71] and (train[0]["width"], train[0]["height"]) == (300, 200)
    assert np.allclose(train[0]["objects"]["bbox"], [[30, 20, 120, 80]])   # scaled by the declared size
    assert train[0]["objects"]["id"] == [7] and np.allclose(train[0]["objects"]["area"], [120 * 80])
    assert train[0]["objects"]["iscrowd"] == [0] and train[1]["objects"]["id"] == []
    assert get_categories(splits).category_id_to_label == {2: 0, 5: 1}
    named = normalize_hub_dataset(source["train"], bbox_format="xyxy", bbox_normalized=True, categories=["a", "b"])
    assert get_categories(named).id2label == {0: "a", 1: "b"}
    with pytest.raises(ValueError, match="not a ClassLabel"):
        normalize_hub_dataset(source, bbox_format="xyxy", bbox_normalized=True)
    with pytest.raises(ValueError, match=r"(?s)size_mismatch: 2\n.*the dataset has no image left"):   # 300x200
        check_dataset(train)


@pytest.fixture()
def broken(tmp_path):  # loaded through the cache: a missing image must not break loading, only the check
    """One folder with one of each problem, on separate images; image 1 is clean."""
    images = [(1, 64, 48), (2, 64, 48), (3, 64, 48), (4, 64, 48), (5, 64, 48), (6, 64, 48), (7, 64, 48)]
    annotations = [
        ann(10, 1, [1, 1, 10, 10]),
        ann(11, 2, [1, 1, 10, 10]),                    # image 2 is deleted below: missing_image
        ann(12, 3, [1, 1, 10, 10]),                    # image 3 is overwritten with garbage: unreadable_image
        ann(13, 4, [50, 40, 30, 20]), ann(14, 4, [2, 2, 5, 5]),     # box_outside_image, then a good box
        ann(15, 5, [2, 2, 5, 5], category_id=99),      # unknown_category
        ann(10, 6, [2, 2, 5, 5]), ann(16, 6, [3, 3, 0, 4]),         # duplicate_annotation_id, non_positive_size
        ann(17, 7, [0, 0, 4, 4]), ann(18, 7, [4, 4, 4, 4]), ann(19, 7, [8, 8, 4, 4]),   # too many for 2 queries
    ]
    write_coco(tmp_path / "coco", images, annotations)
    os.remove(tmp_path / "coco/train2017/000000000002.jpg")
    (tmp_path / "coco/train2017/000000000003.jpg").write_bytes(b"this is not a jpeg")
    return load_coco(tmp_path / "coco", "train", cache_dir=tmp_path / "cache")


def test_check_skips_and_reports_each_problem(broken):
    clean, report = check_dataset(broken, num_queries=2, policy="skip")
    assert {k: v for k, v in report.counts.items() if v} == {
        "missing_image": 1, "unreadable_image": 1, "too_many_objects": 1, "box_outside_image": 1,
        "non_positive_size": 1, "unknown_category": 1, "duplicate_annotation_id": 1}
    assert report.num_images == 7 and report.num_boxes == 11
    # images 2, 3 and 7 with their 5 boxes; in the kept images, annotations 13, 15, the second 10, and 16
    assert report.skipped_images == 3 and report.skipped_boxes == 5 + 4
    assert "000000000002.jpg does not exist" in report.examples["missing_image"][0]
    assert "image_id 4, annotation 13" in report.examples["box_outside_image"][0]
    assert "category_id 99" in report.examples["unknown_category"][0]
    text = str(report)
    assert all(problem in text for problem, count in report.counts.items() if count)
    assert clean["image_id"] == [1, 4, 5, 6]
    assert [row["id"] for row in clean["objects"]] == [[10], [14], [], []]
    assert get_categories(clean) == get_categories(broken)
    assert clean[1]["image"].size == (64, 48)           # images still decode after the check


def test_check_error_policy_raises_with_the_report(broken):
    with pytest.raises(ValueError) as error:
        check_dataset(broken, num_queries=2, policy="error")
    for problem in ("missing_image", "unreadable_image", "box_outside_image", "unknown_category",
                    "duplicate_annotation_id", "non_positive_size", "too_many_objects"):
        assert problem in str(error.value)
    clean = broken.select([0])
    assert check_dataset(clean, policy="error")[1].ok
    with pytest.raises(ValueError, match="policy"):
        check_dataset(clean, policy="ignore")


def test_check_finds_size_mismatch(tmp_path):
    path = write_coco(tmp_path / "coco", [(1, 64, 48), (2, 64, 48)], [ann(1, 2, [1, 1, 5, 5])])
    coco = json.loads(path.read_text())
    coco["images"][0]["width"] = 65
    path.write_text(json.dumps(coco))
    dataset = load_coco(tmp_path / "coco", "train", use_cache=False)
    for check_images in ("header", "decode"):
        clean, report = check_dataset(dataset, check_images=check_images)
        assert report.counts["size_mismatch"] == 1 and clean["image_id"] == [2]


def test_collate_in_a_two_worker_dataloader(demo):
    dataset = load_coco(demo, "train", use_cache=False)
    categories = get_categories(dataset)
    processor = DetrCustomImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    transforms = make_detr_transforms("train", scales=(64, 80), max_size=96, crop_resize_scales=(64, 80),
                                      crop_size=(48, 64))
    collate = DetrCollator(processor, categories.category_id_to_label, transforms)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, persistent_workers=True,
                                         collate_fn=collate, generator=torch.Generator().manual_seed(0))
    epochs = []
    for _epoch in range(2):
        image_ids, pixels = [], []
        for batch in loader:
            pixel_values, pixel_mask, labels = batch["pixel_values"], batch["pixel_mask"], batch["labels"]
            assert pixel_values.shape[:2] == (len(labels), 3)
            assert pixel_mask.shape == (len(labels),) + pixel_values.shape[2:]
            assert max(pixel_values.shape[2:]) <= 96
            for i, target in enumerate(labels):
                height, width = target["size"].tolist()
                assert pixel_mask[i].sum() == height * width        # the visible image is the resized image
                assert ((target["class_labels"] >= 0) & (target["class_labels"] < len(categories.ids))).all()
                assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
                image_ids.append(target["image_id"].item())
            pixels.append(pixel_values)
        assert image_ids == dataset["image_id"]                      # every row once, in the loader's order
        epochs.append(pixels)
    # the workers' RNG moves on: the second epoch draws other augmentations
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(*epochs))


def assert_same_batch(a, b):
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["pixel_mask"], b["pixel_mask"])
    assert len(a["labels"]) == len(b["labels"])
    for x, y in zip(a["labels"], b["labels"]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_seeded_collate_resumes_mid_epoch(demo):
    """With a seed, batch k of epoch e is augmented from (seed, e, k) alone: a run resumed there draws the same."""
    dataset = load_coco(demo, "val", use_cache=False)
    rows = [dataset[i] for i in range(4)]

    def collator():
        transforms = make_detr_transforms("train", scales=(64, 80), max_size=96, crop_resize_scales=(64, 80),
                                          crop_size=(48, 64))
        return DetrCollator(DetrCustomImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
                            get_categories(dataset).category_id_to_label, transforms, seed=3)

    straight = collator()
    straight.set_epoch(1)
    batches = [straight(rows) for _ in range(3)]
    resumed = collator()
    resumed.set_epoch(1, batches_done=2)
    torch.manual_seed(123)                                           # the global RNG plays no part
    assert_same_batch(resumed(rows), batches[2])
    other_epoch = collator()
    other_epoch.set_epoch(2)
    first = other_epoch(rows)
    assert first["pixel_values"].shape != batches[0]["pixel_values"].shape or \
        not torch.equal(first["pixel_values"], batches[0]["pixel_values"])


def test_collate_labels_follow_the_json(demo):
    """Without augmentation, labels are the json's boxes in normalized cxcywh and contiguous class labels."""
    dataset = load_coco(demo, "val", use_cache=False)
    categories = get_categories(dataset)
    collate = DetrCollator(DetrCustomImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
                           categories.category_id_to_label)
    rows = [dataset[i] for i in range(len(dataset))]
    batch = collate(rows)
    for row, target in zip(rows, batch["labels"]):
        boxes = np.array(row["objects"]["bbox"], dtype=np.float32).reshape(-1, 4)
        size = np.array([row["width"], row["height"]] * 2, dtype=np.float32)
        expected = np.concatenate([boxes[:, :2] + boxes[:, 2:] / 2, boxes[:, 2:]], 1) / size
        assert np.allclose(target["boxes"].numpy(), expected, atol=1e-5)
        assert target["class_labels"].tolist() == [categories.category_id_to_label[c]
                                                   for c in row["objects"]["category_id"]]
        assert target["image_id"].item() == row["image_id"]


def _rotated_jpeg(path, upright: PIL.Image.Image) -> None:
    """A JPEG stored turned as a phone writes it: the pixels rotated, and EXIF orientation 6 to show them upright."""
    exif = PIL.Image.Exif()
    exif[0x0112] = 6   # Orientation: the viewer rotates the stored pixels 90 degrees clockwise
    upright.transpose(PIL.Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)


def test_collate_applies_the_exif_orientation_as_the_processor_does(tmp_path):
    """Boxes are drawn on the upright view (annotation tools and the processor at inference apply the tag): training
    must see the processor's pixels for the same file, at the upright size, and the check must not flag it."""
    write_coco(tmp_path / "coco", [(1, 64, 32)], [ann(1, 1, [0, 0, 16, 32], 3)])   # upright: 64 wide, 32 high
    path = tmp_path / "coco/train2017/000000000001.jpg"
    upright = PIL.Image.new("RGB", (64, 32), (20, 20, 20))
    upright.paste((230, 30, 30), (0, 0, 16, 32))   # the boxed object: the left quarter
    _rotated_jpeg(path, upright)
    assert PIL.Image.open(path).size == (32, 64)   # stored turned
    dataset = load_coco(tmp_path / "coco", "train", use_cache=False)
    for check_images in ("header", "decode"):
        assert check_dataset(dataset, check_images=check_images)[1].ok
    processor = DetrCustomImageProcessor(size={"shortest_edge": 32, "longest_edge": 64})
    collate = DetrCollator(processor, get_categories(dataset).category_id_to_label)
    undecoded = dataset.cast_column("image", datasets.Image(decode=False))
    batch = collate([undecoded[0]])
    target = batch["labels"][0]
    assert target["orig_size"].tolist() == [32, 64]
    assert np.allclose(target["boxes"].numpy(), [[0.125, 0.5, 0.25, 1.0]])
    inference = processor(images=PIL.Image.open(path), return_tensors="pt")["pixel_values"]
    assert torch.equal(batch["pixel_values"], inference)
    red = batch["pixel_values"][0, 0]   # [height, width]: the boxed quarter is the red one
    assert red[:, :16].mean() > red[:, 16:].mean() + 1


def test_check_names_exif_when_the_declared_size_is_the_stored_one(tmp_path):
    write_coco(tmp_path / "coco", [(1, 32, 64), (2, 32, 64)], [ann(1, 2, [1, 1, 5, 5])])   # declares the stored size
    _rotated_jpeg(tmp_path / "coco/train2017/000000000001.jpg", PIL.Image.new("RGB", (64, 32)))
    dataset = load_coco(tmp_path / "coco", "train", use_cache=False)
    clean, report = check_dataset(dataset, check_images="header")
    assert report.counts["size_mismatch"] == 1 and clean["image_id"] == [2]
    assert "EXIF orientation tag (6)" in report.examples["size_mismatch"][0]
    assert "000000000001.jpg" in report.examples["size_mismatch"][0]


def encoded(image: PIL.Image.Image, fmt: str, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def mode_image(mode: str) -> tuple[bytes, str]:
    """A 20x30 image in `mode`, as a file's bytes; the mode Pillow reopens it in."""
    rng = np.random.default_rng(1)
    rgba = PIL.Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA")
    if mode in ("I;16", "I"):
        values = rng.integers(0, 65536, (20, 30)).astype(np.uint16 if mode == "I;16" else np.int32)
        image = PIL.Image.fromarray(values)
        return encoded(image, "PNG" if mode == "I;16" else "TIFF"), mode
    if mode == "F":
        return encoded(PIL.Image.fromarray(rng.uniform(0, 255, (20, 30)).astype(np.float32), "F"), "TIFF"), "F"
    if mode == "P+transparency":
        palette = rgba.convert("RGB").convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=16)
        return encoded(palette, "PNG", transparency=3), "P"
    image = rgba if mode == "RGBA" else rgba.convert(mode)
    return encoded(image, "TIFF" if mode in ("CMYK", "YCbCr") else "PNG"), mode


def row(image_bytes: bytes, image_id: int = 1, path=None, boxes=((2.0, 3.0, 10.0, 8.0),), iscrowd=None):
    iscrowd = list(iscrowd or [0] * len(boxes))
    return {"image": {"bytes": image_bytes, "path": path}, "image_id": image_id, "objects": {
        "id": list(range(len(boxes))), "bbox": [list(b) for b in boxes], "category_id": [1] * len(boxes),
        "area": [b[2] * b[3] for b in boxes], "iscrowd": iscrowd}}


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "P+transparency", "RGB", "RGBA", "CMYK", "YCbCr", "I;16",
                                  "I", "F"])
def test_every_mode_reaches_the_model_as_the_processor_sends_it(mode):
    """collate and processor on the same file give the same pixels; 16-bit data is scaled, not saturated white."""
    data, reopened = mode_image(mode)
    assert PIL.Image.open(io.BytesIO(data)).mode == reopened
    processor = DetrCustomImageProcessor(size={"shortest_edge": 24, "longest_edge": 40})
    expected = processor(PIL.Image.open(io.BytesIO(data)))
    batch = DetrCollator(processor, {1: 0})([row(data)])
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    assert torch.equal(batch["pixel_mask"], expected["pixel_mask"])
    white = (1 - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)
    assert not torch.allclose(batch["pixel_values"][0], white[:, None, None].expand_as(batch["pixel_values"][0]))
    # through the augmentations too: a certain flip, no resize, equals the processor's pixels flipped
    flip = Compose([RandomHorizontalFlip(p=1.0)])
    flipped = DetrCollator(processor, {1: 0}, flip, seed=0)([row(data)])
    unresized = processor(PIL.Image.open(io.BytesIO(data)), do_resize=False)["pixel_values"]
    assert torch.equal(flipped["pixel_values"], unresized.flip(-1))


def test_collate_drops_crowd_regions_and_counts_them():
    data, _ = mode_image("RGB")
    rows = [row(data, boxes=((0, 0, 12, 10), (14, 2, 8, 8)), iscrowd=[1, 0])]
    labels = DetrCollator(DetrCustomImageProcessor(do_resize=False), {1: 0})(rows)["labels"][0]
    torch.testing.assert_close(labels["boxes"], torch.tensor([[18 / 30, 6 / 20, 8 / 30, 8 / 20]]))
    assert labels["iscrowd"].tolist() == [0] and labels["num_dropped_crowd"].item() == 1
    kept = DetrCollator(DetrCustomImageProcessor(do_resize=False, drop_crowd=False), {1: 0})(rows)["labels"][0]
    assert kept["iscrowd"].tolist() == [1, 0] and kept["num_dropped_crowd"].item() == 0


def test_seeded_streams_are_per_rank():
    """Batch k of epoch e on process `rank` draws from default_rng([seed, rank, e, k])."""
    drawn = []

    def record(image, target, rng):
        drawn.append(int(rng.integers(2**62)))
        return image, target

    data, _ = mode_image("RGB")
    for rank in (0, 1):
        collate = DetrCollator(DetrCustomImageProcessor(size={"shortest_edge": 24, "longest_edge": 40}), {1: 0},
                               record, seed=5, rank=rank)
        collate.set_epoch(2, batches_done=3)
        collate([row(data)])
        collate([row(data)])
    expected = [int(np.random.default_rng([5, rank, 2, k]).integers(2**62)) for rank in (0, 1) for k in (3, 4)]
    assert drawn == expected and len(set(drawn)) == 4


def truncated_jpeg() -> bytes:
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    data = encoded(image, "JPEG")
    return data[:len(data) // 2]   # the header survives, the pixels do not


def test_collator_skips_an_undecodable_image_and_reports_it(tmp_path, caplog):
    good, _ = mode_image("RGB")
    bad_path = tmp_path / "bad.jpg"
    bad_path.write_bytes(truncated_jpeg())
    rows = [row(good, image_id=1), row(None, image_id=2, path=str(bad_path)), row(b"not an image", image_id=3)]
    collate = DetrCollator(DetrCustomImageProcessor(size={"shortest_edge": 24, "longest_edge": 40}), {1: 0})
    with caplog.at_level("WARNING", logger="training.data"):
        batch = collate(rows)
        again = collate(rows)
    assert [int(label["image_id"]) for label in batch["labels"]] == [1] and len(batch["pixel_values"]) == 1
    assert torch.equal(again["pixel_values"], batch["pixel_values"])
    assert [(image_id, path) for image_id, path, _ in collate.skipped] == [(2, str(bad_path)), (3, None)] * 2
    assert "truncated" in collate.skipped[0][2]
    warnings = [r.getMessage() for r in caplog.records if "cannot be decoded" in r.getMessage()]
    assert len(warnings) == 2   # once per image, not once per batch
    assert "image_id 2" in warnings[0] and str(bad_path) in warnings[0] and "embedded bytes" in warnings[1]
    assert collate(rows[1:]) is None   # nothing decodes: the training loop skips None batches


def test_check_images_header_decode_auto(tmp_path, monkeypatch):
    boxes = [ann(1, 1, [1, 1, 5, 5]), ann(2, 2, [1, 1, 5, 5])]
    path = write_coco(tmp_path / "coco", [(1, 64, 48), (2, 64, 48)], boxes)
    jpeg = tmp_path / "coco/train2017/000000000002.jpg"
    jpeg.write_bytes(truncated_jpeg())
    dataset = load_coco(tmp_path / "coco", "train", use_cache=False)
    _, header = check_dataset(dataset, check_images="header")
    assert header.ok and header.image_check.startswith("read the headers of 2 images in")
    clean, decoded = check_dataset(dataset, check_images="decode")
    assert decoded.counts["unreadable_image"] == 1 and clean["image_id"] == [1]
    assert decoded.image_check.startswith("decoded 2 images in") and decoded.image_check in str(decoded)
    message = decoded.examples["unreadable_image"][0]
    assert message.startswith("image_id 2: ") and str(jpeg) in message and "truncated" in message
    assert check_dataset(dataset)[1].counts["unreadable_image"] == 1          # auto: 2 <= 20000 images, decoded
    monkeypatch.setattr("training.data.check.AUTO_DECODE_MAX_IMAGES", 1)
    assert check_dataset(dataset)[1].image_check.startswith("read the headers")   # auto on a larger set
    with pytest.raises(ValueError, match=r"unreadable_image: 1\n    e.g. image_id 2: .*000000000002.jpg"):
        check_dataset(dataset, check_images="decode", policy="error")
    with pytest.raises(ValueError, match="check_images must be one of"):
        check_dataset(dataset, check_images=True)
    assert path.is_file()


def test_check_reports_modes_the_training_path_cannot_convert(tmp_path):
    write_coco(tmp_path / "coco", [(1, 64, 48), (2, 64, 48)], [ann(1, 1, [1, 1, 5, 5]), ann(2, 2, [1, 1, 5, 5])])
    lab = tmp_path / "coco/train2017/000000000002.jpg"
    lab.write_bytes(encoded(PIL.Image.new("LAB", (64, 48)), "TIFF"))   # a LAB TIFF behind a .jpg name
    dataset = load_coco(tmp_path / "coco", "train", use_cache=False)
    for check_images in ("header", "decode"):
        clean, report = check_dataset(dataset, check_images=check_images)
        assert not report.ok and "no problems found" not in str(report)
        assert report.counts["unsupported_image_mode"] == 1 and clean["image_id"] == [1]
        assert "image_id 2" in report.examples["unsupported_image_mode"][0]
    # 32-bit values beyond 16 bits would be clipped: found when decoding
    lab.write_bytes(encoded(PIL.Image.fromarray(np.full((48, 64), 70000, np.int32)), "TIFF"))
    assert check_dataset(dataset, check_images="header")[1].ok
    clean, report = check_dataset(dataset, check_images="decode")
    assert report.counts["unsupported_image_mode"] == 1 and clean["image_id"] == [1]
    assert "values in [70000, 70000]" in report.examples["unsupported_image_mode"][0]


def coco_file(tmp_path, text: str):
    (tmp_path / "annotations").mkdir(parents=True, exist_ok=True)
    (tmp_path / "train2017").mkdir(exist_ok=True)
    path = tmp_path / "annotations" / "instances_train2017.json"
    path.write_text(text)
    return path


def test_coco_file_errors_name_the_file(tmp_path):
    good = json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
                       "annotations": [ann(1, 1, [1, 1, 2, 2])], "categories": CATEGORIES})
    path = coco_file(tmp_path, good[:40])
    with pytest.raises(ValueError, match=rf"{path} is not valid JSON: Unterminated string .*\(line 1, column 36\); "
                                         "the file ends before the JSON does: truncated"):
        load_coco(tmp_path, "train", use_cache=False)
    coco_file(tmp_path, '{"images": [],\n "annotations": [}')
    with pytest.raises(ValueError, match=r"not valid JSON: Expecting value \(line 2, column 18\)$"):
        load_coco(tmp_path, "train", use_cache=False)
    for missing in ("images", "annotations", "categories"):
        coco_file(tmp_path, json.dumps({k: v for k, v in json.loads(good).items() if k != missing}))
        with pytest.raises(ValueError, match=rf"{path} is not a COCO detection file: it lacks \['{missing}'\]"):
            load_coco(tmp_path, "train", use_cache=False)
    for bbox in ([1, 2, 3], "1 2 3 4", [1, "2", 3, 4], None):
        coco = json.loads(good)
        coco["annotations"][0]["bbox"] = bbox
        coco_file(tmp_path, json.dumps(coco))
        with pytest.raises(ValueError, match=rf"{path}: 1 annotations have a bbox that is not 4 numbers .*"
                                             rf"annotation 1 \(image_id 1\)"):
            load_coco(tmp_path, "train", use_cache=False)
    coco = json.loads(good)
    coco["annotations"][0]["category_id"] = 1.5
    coco_file(tmp_path, json.dumps(coco))
    with pytest.raises(ValueError, match=r"annotations\[0\] \(id 1, image_id 1\) has category_id 1.5; it must be an"):
        load_coco(tmp_path, "train", use_cache=False)


def test_check_reports_null_boxes_unknown_ids_and_empty_sets(tmp_path):
    annotations = [ann(1, 1, [1, 1, 5, 5]), ann(2, 1, [None, 1, 5, 5]), ann(3, 2, [1, float("nan"), 5, 5]),
                   ann(4, 9, [1, 1, 5, 5]), ann(5, 2, [1, 1, 5, 5], category_id=99)]
    path = write_coco(tmp_path / "coco", [(1, 64, 48), (2, 64, 48)], annotations)
    dataset = load_coco(tmp_path / "coco", "train", cache_dir=tmp_path / "cache")   # survives the cache
    clean, report = check_dataset(dataset)
    assert {k: v for k, v in report.counts.items() if v} == {"non_finite_box": 2, "unknown_image_id": 1,
                                                             "unknown_category": 1}
    assert report.examples["non_finite_box"][0].startswith("image_id 1, annotation 2, bbox [nan, 1.0, 5.0, 5.0]")
    assert "annotation 4 refers to image_id 9, which is not in 'images'" in report.examples["unknown_image_id"][0]
    assert str(path) in report.examples["unknown_image_id"][0]
    assert report.skipped_boxes == 4 and [row["id"] for row in clean["objects"]] == [[1], []]
    with pytest.raises(ValueError, match="non_finite_box: 2"):
        check_dataset(dataset, policy="error")
    # nothing to train on: no images, no boxes, or nothing left after the skips
    write_coco(tmp_path / "empty", [], [])
    with pytest.raises(ValueError, match="the dataset has no images: there is nothing to train on"):
        check_dataset(load_coco(tmp_path / "empty", "train", use_cache=False))
    write_coco(tmp_path / "boxless", [(1, 64, 48)], [])
    with pytest.raises(ValueError, match="the dataset has no boxes at all"):
        check_dataset(load_coco(tmp_path / "boxless", "train", use_cache=False))
    write_coco(tmp_path / "crowd", [(1, 64, 48)], [ann(1, 1, [1, 1, 5, 5], iscrowd=1)])
    with pytest.raises(ValueError, match=r"no box \(other than crowd regions\) left"):
        check_dataset(load_coco(tmp_path / "crowd", "train", use_cache=False))


def test_a_training_set_small_enough_to_memorize_is_warned_about_once(caplog):
    import logging

    from training.data.check import SMALL_DATASET_CONFIG, small_dataset_warning, warn_if_small

    assert small_dataset_warning(200) is None and SMALL_DATASET_CONFIG == "training/configs/finetune_small.yaml"
    with caplog.at_level(logging.WARNING, logger="training.data"):
        warn_if_small(40)
        warn_if_small(5000)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "40 images (fewer than 200)" in messages[0]
    assert "--config training/configs/finetune_small.yaml" in messages[0]


@pytest.mark.parametrize("edit, expected", [
    (lambda coco: coco["categories"].append({"id": 3, "name": "dog"}), r"'categories': duplicate category ids \[3\]"),
    (lambda coco: coco["categories"].append({"id": 7, "name": "cat"}),
     r"'categories': categories with the same name: 'cat' \(ids \[3, 7\]\)"),
    (lambda coco: coco["images"][0].update(id="1"), r"images\[0\] \(000000000001.jpg\) has id '1'; image ids must be "
                                                    "integers"),
    (lambda coco: coco["images"].append(dict(coco["images"][0])), r"duplicate image ids in 'images': \[1\]"),
])
def test_bad_ids_and_names_name_the_file(tmp_path, edit, expected):
    path = write_coco(tmp_path / "coco", [(1, 64, 48)], [ann(1, 1, [1, 1, 5, 5])])
    coco = json.loads(path.read_text())
    edit(coco)
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=f"instances_train2017.json: {expected}"):
        load_coco(tmp_path / "coco", "train", use_cache=False)


def test_an_empty_dataset_names_its_source(tmp_path):
    write_coco(tmp_path / "coco", [], [])
    dataset = load_coco(tmp_path / "coco", "train", use_cache=False)
    with pytest.raises(ValueError, match=r"(?s)^data/x.json: .*no images.*Check data/x.json"):
        check_dataset(dataset, source="data/x.json")
