"""training/metrics.py against pycocotools' own COCOeval run, written out here on the same ground truth."""
import contextlib
import copy
import io

import evaluate
import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from training import metrics as metrics_module
from training.metrics import STAT_NAMES, CocoEvaluator, evaluate_coco


CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "bird"}]
LABEL2CATEGORY_ID = {0: 1, 1: 3, 2: 7}  # the model's contiguous labels -> the dataset's non-contiguous ids
CATEGORY_ID2LABEL = {category_id: label for label, category_id in LABEL2CATEGORY_ID.items()}

# (image_id, category_id, [x, y, w, h], iscrowd): small (< 32^2), medium and large (> 96^2) objects,
# a crowd region on image 2, no object on image 4
OBJECTS = [
    (1, 1, [10.0, 10.0, 20.0, 20.0], 0), (1, 3, [100.0, 100.0, 60.0, 50.0], 0),
    (1, 7, [200.0, 150.0, 200.0, 180.0], 0),
    (2, 1, [50.0, 60.0, 70.0, 40.0], 0), (2, 1, [300.0, 200.0, 100.0, 95.0], 0),  # medium by area, large by box
    (2, 3, [0.0, 0.0, 300.0, 300.0], 1),
    (3, 3, [400.0, 300.0, 25.0, 30.0], 0), (3, 7, [20.0, 300.0, 80.0, 60.0], 0),
    (5, 1, [10.0, 10.0, 300.0, 200.0], 0), (5, 3, [350.0, 50.0, 50.0, 60.0], 0),
]
IMAGE_IDS = [1, 2, 3, 4, 5]


def coco_dataset(objects=OBJECTS, categories=CATEGORIES):
    """The ground truth as a COCO annotation file would hold it (area ≠ box area on purpose, as with masks)."""
    return {
        "images": [{"id": i, "width": 640, "height": 480} for i in IMAGE_IDS],
        "annotations": [
            {"id": n + 1, "image_id": image_id, "category_id": category_id, "bbox": bbox,
             "area": 0.9 * bbox[2] * bbox[3], "iscrowd": iscrowd}
            for n, (image_id, category_id, bbox, iscrowd) in enumerate(objects)
        ],
        "categories": categories,
    }


def references_from(dataset):
    """The same ground truth in the datasets layout our metric takes: one dict per image, objects as lists."""
    references = []
    for image in dataset["images"]:
        anns = [a for a in dataset["annotations"] if a["image_id"] == image["id"]]
        references.append({
            "image_id": image["id"], "width": image["width"], "height": image["height"],
            "objects": {key: [a[key] for a in anns] for key in ("bbox", "category_id", "area", "iscrowd")},
        })
    return references


def pycocotools_run(dataset, results, category_ids=None):
    """pycocotools' documented flow: COCO() + createIndex, loadRes, evaluate, accumulate, summarize -> stats."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(dataset)
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), "bbox")
        if category_ids is not None:
            coco_eval.params.catIds = category_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats


def as_results(predictions):
    """Our predictions (model labels, xyxy) as a COCO results list (category ids, xywh), for pycocotools."""
    results = []
    for prediction in predictions:
        for score, label, (x0, y0, x1, y1) in zip(
            prediction["scores"].tolist(), prediction["labels"].tolist(), prediction["boxes"].tolist()
        ):
            results.append({"image_id": int(prediction["image_id"]), "category_id": LABEL2CATEGORY_ID[label],
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    return results


def make_predictions(objects=OBJECTS, shift=0.0, seed=0):
    """One detection per non-crowd object (boxes moved by up to `shift` px), plus false positives when shifting."""
    rng = np.random.RandomState(seed)
    predictions = []
    for image_id in IMAGE_IDS:
        scores, labels, boxes = [], [], []
        for obj_image, category_id, (x, y, w, h), iscrowd in objects:
            if obj_image != image_id or iscrowd:
                continue
            dx0, dy0, dx1, dy1 = rng.uniform(-shift, shift, size=4)
            boxes.append([x + dx0, y + dy0, x + w + dx1, y + h + dy1])
            labels.append(CATEGORY_ID2LABEL[category_id])
            scores.append(rng.uniform(0.3, 1.0) if shift else 1.0)
        if shift:  # a wrong-class duplicate, a box inside the crowd region (ignored), a detection on image 4
            boxes.append([20.0 + image_id, 30.0, 90.0, 120.0 + image_id])
            labels.append(image_id % 3)
            scores.append(rng.uniform(0.0, 0.6))
        predictions.append({
            "image_id": torch.tensor(image_id),
            "scores": torch.tensor(scores, dtype=torch.float32),  # [n]
            "labels": torch.tensor(labels, dtype=torch.int64),  # [n]
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),  # [n, 4], absolute xyxy
        })
    return predictions


def our_metrics(predictions, dataset=None, categories=CATEGORIES):
    evaluator = CocoEvaluator(categories, LABEL2CATEGORY_ID)
    evaluator.add(predictions[:2], references_from(dataset or coco_dataset())[:2])
    evaluator.add(predictions[2:], references_from(dataset or coco_dataset())[2:])
    return evaluator.compute()


def assert_equals_pycocotools(ours, dataset, results):
    assert [ours[name] for name in STAT_NAMES] == pycocotools_run(dataset, results).tolist()
    for category in dataset["categories"]:
        stats = pycocotools_run(dataset, results, category_ids=[category["id"]])
        assert ours["AP_per_class"][category["name"]] == stats[0], category


def test_perfect_predictions_give_ap_one():
    ours = our_metrics(make_predictions())
    for name in STAT_NAMES:
        if name != "AR1":
            assert ours[name] == pytest.approx(1.0, abs=1e-12), name
    # AR1 keeps one detection per image and class: image 2 has two cats, so cat recall is 3 / 4
    assert ours["AR1"] == pytest.approx((3 / 4 + 1 + 1) / 3, abs=1e-12)
    assert all(ap == pytest.approx(1.0, abs=1e-12) for ap in ours["AP_per_class"].values())


def test_shifted_boxes_equal_pycocotools_exactly():
    predictions = make_predictions(shift=6.0)
    ours = our_metrics(predictions)
    assert_equals_pycocotools(ours, coco_dataset(), as_results(predictions))
    assert 0.0 < ours["AP"] < ours["AP50"] <= 1.0  # the shifts are felt at IoU .95, not at .5


def test_a_class_never_predicted_and_a_class_without_ground_truth():
    categories = CATEGORIES + [{"id": 9, "name": "fish"}]  # in the categories list, in no image
    predictions = make_predictions([o for o in OBJECTS if o[1] != 7], shift=4.0)  # "bird" is never predicted
    ours = our_metrics(predictions, categories=categories)
    dataset = coco_dataset(categories=categories)
    assert_equals_pycocotools(ours, dataset, as_results(predictions))
    assert ours["AP_per_class"]["bird"] == 0.0  # ground truth, no detection: pycocotools says 0
    assert ours["AP_per_class"]["fish"] == -1.0  # no ground truth: pycocotools says -1 (nothing to measure)


def test_no_predictions_at_all():
    # pycocotools' loadRes fails on an empty list; we report what COCOeval gives for no detections
    empty = [{"image_id": i, "scores": [], "labels": [], "boxes": torch.zeros(0, 4)} for i in IMAGE_IDS[:2]]
    ours = our_metrics(empty)
    assert all(ours[name] == 0.0 for name in STAT_NAMES)  # every area range has ground truth: all 0
    assert ours["AP_per_class"] == {"cat": 0.0, "dog": 0.0, "bird": 0.0}
    small_only, _ = evaluate_coco([], [references_from(coco_dataset())[0] | {"objects": {
        "bbox": [[10.0, 10.0, 20.0, 20.0]], "category_id": [1], "area": [400.0], "iscrowd": [0]}}], CATEGORIES)
    assert small_only["AP_small"] == 0.0 and small_only["AP_medium"] == -1.0 and small_only["AR_large"] == -1.0
    assert small_only["AP_per_class"] == {"cat": 0.0, "dog": -1.0, "bird": -1.0}


def test_label_mapping_to_non_contiguous_category_ids():
    predictions = make_predictions(shift=3.0, seed=1)
    ours = our_metrics(predictions)
    assert_equals_pycocotools(ours, coco_dataset(), as_results(predictions))  # results there carry ids 1, 3, 7
    # default mapping: label i is categories[i], here the same as LABEL2CATEGORY_ID
    default, _ = evaluate_coco(predictions, references_from(coco_dataset()), CATEGORIES)
    assert default == ours
    # a mapping that swaps two classes is visibly worse, and an unmapped label is refused
    swapped, _ = evaluate_coco(predictions, references_from(coco_dataset()), CATEGORIES, {0: 3, 1: 1, 2: 7})
    assert swapped["AP"] < ours["AP"]
    with pytest.raises(ValueError, match="label 2"):
        evaluate_coco(predictions, references_from(coco_dataset()), CATEGORIES, {"0": 1, "1": 3})


def test_evaluate_load_of_the_local_script_equals_the_plain_api(tmp_path):
    predictions = make_predictions(shift=5.0, seed=2)
    references = references_from(coco_dataset())
    metric = evaluate.load(metrics_module.__file__, cache_dir=str(tmp_path))  # a local path: no download
    metric.add_batch(predictions=predictions[:3], references=references[:3])
    metric.add_batch(predictions=predictions[3:], references=references[3:])
    from_evaluate = metric.compute(categories=CATEGORIES, label2category_id=LABEL2CATEGORY_ID)
    assert from_evaluate == our_metrics(predictions)
    assert_equals_pycocotools(from_evaluate, coco_dataset(), as_results(predictions))
    with pytest.raises(ValueError, match="categories"):
        metric.compute(predictions=predictions, references=references)


def test_duplicate_image_ids_count_once():
    # gather_for_metrics may repeat the first samples to fill the last batch: they must not count twice
    predictions = make_predictions(shift=5.0, seed=3)
    references = references_from(coco_dataset())
    evaluator = CocoEvaluator(CATEGORIES, LABEL2CATEGORY_ID)
    evaluator.add(predictions, references)
    evaluator.add(predictions[:2], references[:2])
    assert evaluator.compute() == our_metrics(predictions)
    metric = evaluate.load(metrics_module.__file__, keep_in_memory=True)
    from_evaluate = metric.compute(predictions=predictions + predictions[:2], references=references + references[:2],
                                   categories=CATEGORIES, label2category_id=LABEL2CATEGORY_ID)
    assert from_evaluate == our_metrics(predictions)


def test_reference_layouts_and_silence(capsys):
    predictions = make_predictions(shift=5.0, seed=4)
    dataset = coco_dataset()
    expected = our_metrics(predictions)
    as_annotations = [{"image_id": r["image_id"], "annotations": [a for a in dataset["annotations"]
                                                                  if a["image_id"] == r["image_id"]]}
                      for r in references_from(dataset)]  # the COCO / image-processor layout
    evaluator = CocoEvaluator(CATEGORIES, LABEL2CATEGORY_ID)
    evaluator.add(predictions, as_annotations)
    assert evaluator.compute() == expected
    as_object_list = [r | {"objects": r["annotations"]} for r in as_annotations]  # objects as a list of dicts
    assert evaluate_coco(predictions, as_object_list, CATEGORIES)[0] == expected
    assert capsys.readouterr().out == ""  # pycocotools' prints are captured ...
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in evaluator.summary  # ... here


def test_bad_inputs_are_refused_with_a_message():
    predictions = make_predictions()
    references = references_from(coco_dataset())
    with pytest.raises(ValueError, match=r"image ids \[5\] have no reference"):
        evaluate_coco(predictions, references[:4], CATEGORIES)
    with pytest.raises(ValueError, match="must agree"):
        evaluate_coco([{"image_id": 1, "scores": [0.5], "labels": [0], "boxes": [[1.0, 2.0, 3.0]]}], references,
                      CATEGORIES)
    with pytest.raises(ValueError, match="category_id 3, not in `categories`"):
        evaluate_coco(predictions, references, CATEGORIES[:1], {0: 1})
    with pytest.raises(ValueError, match="need 'bbox' and 'category_id'"):
        evaluate_coco([], [{"image_id": 1, "objects": {"bbox": [[1.0, 2.0, 3.0, 4.0]], "category": [0]}}], CATEGORIES)
    with pytest.raises(ValueError, match="non-empty COCO categories"):
        CocoEvaluator([], None)
    with pytest.raises(ValueError, match="not in `categories`"):
        CocoEvaluator(CATEGORIES, {0: 2})
    with pytest.raises(ValueError, match="No references"):
        CocoEvaluator(CATEGORIES).compute()


def test_a_detection_on_a_crowd_region_is_not_a_false_positive():
    """Crowd boxes reach COCOeval as iscrowd=1 (evaluation reads them from the dataset rows, not from the training
    labels, which leave them out): a detection on one is ignored, not counted as a false positive."""
    reference = {"image_id": 1, "width": 640, "height": 480, "objects": {
        "bbox": [[10.0, 10.0, 100.0, 80.0], [300.0, 200.0, 200.0, 150.0]], "category_id": [1, 1],
        "area": [8000.0, 30000.0], "iscrowd": [0, 1]}}
    prediction = {"image_id": 1, "scores": [0.6, 0.9], "labels": [0, 0],
                  "boxes": [[10.0, 10.0, 110.0, 90.0], [320.0, 220.0, 400.0, 300.0]]}   # the second: inside the crowd
    with_crowd, _ = evaluate_coco([prediction], [reference], CATEGORIES[:1])
    assert with_crowd["AP"] == pytest.approx(1.0) and with_crowd["AP50"] == pytest.approx(1.0)
    # the same region given as an ordinary object is missed at high score ... and without it, a false positive
    as_object = {**reference, "objects": {**reference["objects"], "iscrowd": [0, 0]}}
    assert evaluate_coco([prediction], [as_object], CATEGORIES[:1])[0]["AP50"] < 1.0
    without = {**reference, "objects": {key: values[:1] for key, values in reference["objects"].items()}}
    assert evaluate_coco([prediction], [without], CATEGORIES[:1])[0]["AP50"] < 1.0
