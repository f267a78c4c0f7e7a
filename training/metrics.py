"""COCO box mAP for DETR detections, computed by pycocotools' COCOeval ("bbox").

Two ways in, the same numbers out:

* plain Python, for the training loop: `evaluator = CocoEvaluator(categories, label2category_id)`, then
  `evaluator.add(predictions, references)` per batch and `evaluator.compute()` on the main process;
* an `evaluate` metric: `evaluate.load("training/metrics.py")` (a local path, nothing is downloaded), then
  `metric.add_batch(predictions=..., references=...)` and `metric.compute(categories=..., label2category_id=...)`.
  evaluate copies this file alone into its modules cache, so it imports only libraries (no `training.*`).

Inputs, one dict per image:

* prediction: `{"image_id": int, "scores": [n], "labels": [n], "boxes": [n, 4]}`: what
  `post_process_object_detection` returns plus the image id. `labels` are the model's contiguous 0..K-1 labels,
  `boxes` are absolute (x0, y0, x1, y1) in the ORIGINAL image's pixels. Tensors, arrays or lists.
* reference: `{"image_id": int, "objects": {"bbox": [m, 4], "category_id": [m], "area": [m], "iscrowd": [m]}}`
  with COCO boxes (x, y, width, height) in pixels and the dataset's own category ids. `objects` may also be a
  list of per-object dicts, or be given as `"annotations"` (the COCO / image-processor layout). Optional:
  `width`, `height`; a missing `area` is taken as width * height of the box, a missing `iscrowd` as 0.
* `categories`: the COCO categories list, `[{"id": 1, "name": "person"}, ...]`.
* `label2category_id`: model label -> category id, e.g. `{0: 1, 1: 3, 2: 7}`; by default label i is `categories[i]`.

Output: the 12 COCOeval stats, in summarize()'s order and under these names
  AP (IoU .50:.95), AP50, AP75, AP_small, AP_medium, AP_large (all at 100 detections per image),
  AR1, AR10, AR100 (AR at 1 / 10 / 100 detections), AR_small, AR_medium, AR_large (at 100 detections),
and `AP_per_class`: `{category name: AP}` at IoU .50:.95, all areas, 100 detections, averaged exactly as
summarize() averages AP but over one category. pycocotools' conventions are kept: a figure is -1 when there is
no ground truth to measure it on (e.g. AP_small without small objects, or the AP of a class absent from the
ground truth), and 0 when there is ground truth but nothing was found (e.g. a class never predicted).

Behaviour worth knowing:

* Duplicates: gathering from several processes repeats the samples that pad the last batch, so predictions and
  references are deduplicated by image_id, the first one seen wins. Each image therefore counts once.
* A reference without a prediction is an image with no detections (its objects are all missed); a reference with
  no objects is an image without ground truth (its detections are false positives). A prediction whose image_id
  has no reference is an error.
* No detections at all: pycocotools' `loadRes` fails on an empty list, so we give COCOeval an empty result set
  directly; it then reports 0 for every figure that has ground truth and -1 for the others.
* pycocotools prints as it works; that output is captured, and `CocoEvaluator.summary` holds the text of the
  last compute() (the usual 12-line table).
"""
import contextlib
import io

import datasets
import evaluate  # never `from evaluate import Metric`: evaluate.load takes the first Metric class found in here
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


STAT_NAMES = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)  # the order of COCOeval.stats for iouType "bbox"


def _as_list(values):
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _normalize_prediction(prediction):
    missing = {"image_id", "scores", "labels", "boxes"} - set(prediction)
    if missing:
        raise ValueError(f"A prediction lacks {sorted(missing)}; got keys {sorted(prediction)}.")
    scores = [float(s) for s in _as_list(prediction["scores"])]
    labels = [int(label) for label in _as_list(prediction["labels"])]
    boxes = [[float(c) for c in box] for box in _as_list(prediction["boxes"])]  # [n, 4], xyxy
    image_id = int(_as_list([prediction["image_id"]])[0])  # a 0-d tensor, numpy or Python int
    if not len(scores) == len(labels) == len(boxes) or any(len(box) != 4 for box in boxes):
        raise ValueError(
            f"Prediction for image {image_id}: scores [n], labels [n] and boxes [n, 4] must agree; got "
            f"{len(scores)} scores, {len(labels)} labels and boxes of lengths {[len(box) for box in boxes]}."
        )
    return {"image_id": image_id, "scores": scores, "labels": labels, "boxes": boxes}


def _normalize_reference(reference):
    """Any accepted reference layout -> `{"image_id", "width", "height", "objects": dict of lists}`."""
    if "image_id" not in reference:
        raise ValueError(f"A reference lacks 'image_id'; got keys {sorted(reference)}.")
    objects = reference.get("objects", reference.get("annotations"))
    if objects is None:
        raise ValueError(f"Reference for image {reference['image_id']} has neither 'objects' nor 'annotations'.")
    if isinstance(objects, dict):  # dict of lists, as datasets stores Sequence({...})
        columns = {key: _as_list(value) for key, value in objects.items() if value is not None}
        objects = [{key: column[i] for key, column in columns.items()} for i in range(len(columns.get("bbox", [])))]
    for obj in objects:
        if "bbox" not in obj or "category_id" not in obj:
            raise ValueError(f"Objects of image {reference['image_id']} need 'bbox' and 'category_id': {list(obj)}")
    bboxes = [[float(c) for c in _as_list(obj["bbox"])] for obj in objects]  # [m, 4], xywh
    if any(len(box) != 4 for box in bboxes):
        raise ValueError(f"Reference for image {reference['image_id']}: every bbox needs 4 numbers (x, y, w, h).")
    return {
        "image_id": int(reference["image_id"]),
        "width": reference.get("width"),
        "height": reference.get("height"),
        "objects": {
            "bbox": bboxes,
            "category_id": [int(obj["category_id"]) for obj in objects],
            "area": [float(obj["area"]) if obj.get("area") is not None else box[2] * box[3]
                     for obj, box in zip(objects, bboxes)],
            "iscrowd": [int(obj.get("iscrowd") or 0) for obj in objects],
        },
    }


def _first_per_image(items):
    """Keeps the first item of each image_id: gathered duplicates must not count twice."""
    unique = {}
    for item in items:
        unique.setdefault(item["image_id"], item)
    return list(unique.values())


def _check_categories(categories, label2category_id):
    if not categories or any("id" not in category for category in categories):
        raise ValueError("`categories` must be a non-empty COCO categories list: [{'id': 1, 'name': ...}, ...].")
    names = [str(category.get("name", category["id"])) for category in categories]
    if len(set(names)) != len(names) or len({int(c["id"]) for c in categories}) != len(categories):
        raise ValueError(f"Category names and ids must be unique; got {categories}.")
    if label2category_id is None:
        return {label: int(category["id"]) for label, category in enumerate(categories)}
    label2category_id = {int(label): int(category_id) for label, category_id in label2category_id.items()}
    unknown = set(label2category_id.values()) - {int(c["id"]) for c in categories}
    if unknown:
        raise ValueError(f"label2category_id maps to category ids {sorted(unknown)} that are not in `categories`.")
    return label2category_id


def _coco_ground_truth(references, categories):
    category_ids = {int(category["id"]) for category in categories}
    images, annotations = [], []
    for reference in references:
        size = {key: int(reference[key]) for key in ("width", "height") if reference.get(key) is not None}
        images.append({"id": reference["image_id"], **size})
        objects = reference["objects"]
        for bbox, category_id, area, iscrowd in zip(
            objects["bbox"], objects["category_id"], objects["area"], objects["iscrowd"]
        ):
            if category_id not in category_ids:
                raise ValueError(f"Image {reference['image_id']} has category_id {category_id}, not in `categories`.")
            # ids start at 1: COCOeval marks an unmatched detection with gt id 0
            annotations.append({"id": len(annotations) + 1, "image_id": reference["image_id"], "bbox": bbox,
                                "category_id": category_id, "area": area, "iscrowd": iscrowd})
    coco_gt = COCO()
    categories = [dict(category, id=int(category["id"])) for category in categories]
    coco_gt.dataset = {"images": images, "annotations": annotations, "categories": categories}
    coco_gt.createIndex()
    return coco_gt


def _coco_results(predictions, label2category_id):
    results = []
    for prediction in predictions:
        for score, label, (x0, y0, x1, y1) in zip(prediction["scores"], prediction["labels"], prediction["boxes"]):
            if label not in label2category_id:
                raise ValueError(
                    f"Predicted label {label} (image {prediction['image_id']}) is not in label2category_id."
                )
            results.append({"image_id": prediction["image_id"], "category_id": label2category_id[label],
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})  # xyxy -> COCO xywh
    return results


def _load_results(coco_gt, results):
    if results:
        return coco_gt.loadRes(results)
    # loadRes indexes results[0]; an empty result set with the gt's images and categories is what it would build
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                       "categories": [dict(c) for c in coco_gt.dataset["categories"]]}
    coco_dt.createIndex()
    return coco_dt


def _per_class_ap(coco_eval, categories):
    """AP of each category, averaged as COCOeval.summarize averages AP (IoU .50:.95, area all, 100 dets)."""
    params = coco_eval.params
    area, max_dets = params.areaRngLbl.index("all"), params.maxDets.index(100)
    precision = coco_eval.eval["precision"]  # [iou_thresholds, recall_thresholds, categories, areas, max_dets]
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    per_class = {}
    for k, category_id in enumerate(params.catIds):
        s = precision[:, :, k, area, max_dets]  # [iou_thresholds, recall_thresholds]
        per_class[names[category_id]] = float(np.mean(s[s > -1])) if (s > -1).any() else -1.0
    return per_class


def evaluate_coco(predictions, references, categories, label2category_id=None):
    """COCO bbox metrics of `predictions` against `references` (see the module docstring for the formats).

    Returns `(metrics, printed)`: the metrics dict and the text pycocotools printed while computing it.
    """
    label2category_id = _check_categories(categories, label2category_id)
    predictions = _first_per_image(_normalize_prediction(p) for p in predictions)
    references = _first_per_image(_normalize_reference(r) for r in references)
    if not references:
        raise ValueError("No references were given: COCO mAP needs the ground truth of at least one image.")
    unknown = {p["image_id"] for p in predictions} - {r["image_id"] for r in references}
    if unknown:
        raise ValueError(f"Predictions for image ids {sorted(unknown)[:10]} have no reference (ground truth).")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        coco_gt = _coco_ground_truth(references, categories)
        coco_eval = COCOeval(coco_gt, _load_results(coco_gt, _coco_results(predictions, label2category_id)), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    metrics = {name: float(stat) for name, stat in zip(STAT_NAMES, coco_eval.stats)}
    metrics["AP_per_class"] = _per_class_ap(coco_eval, categories)
    return metrics, printed.getvalue()


class CocoEvaluator:
    """Collects per-image predictions and references batch by batch; compute() runs COCOeval once over all."""

    def __init__(self, categories, label2category_id=None):
        _check_categories(categories, label2category_id)  # fail at construction, not after a whole eval pass
        self.categories = categories
        self.label2category_id = label2category_id
        self.summary = ""  # pycocotools' printed output of the last compute()
        self.reset()

    def reset(self):
        self.predictions, self.references = [], []

    def add(self, predictions, references):
        """predictions, references: lists of per-image dicts (one reference per image seen, in any order)."""
        self.predictions.extend(_normalize_prediction(p) for p in predictions)
        self.references.extend(_normalize_reference(r) for r in references)

    def compute(self):
        metrics, self.summary = evaluate_coco(self.predictions, self.references, self.categories,
                                              self.label2category_id)
        return metrics


_INPUTS_DESCRIPTION = """
Args:
    predictions: per image {"image_id", "scores" [n], "labels" [n] (model labels 0..K-1), "boxes" [n, 4]
        (absolute x0, y0, x1, y1 in the original image)}.
    references: per image {"image_id", "objects": {"bbox" [m, 4] (x, y, w, h), "category_id" [m], "area" [m],
        "iscrowd" [m]}}, optionally "width" and "height".
    categories: the COCO categories list [{"id", "name"}, ...] (a compute() argument).
    label2category_id: model label -> category id; by default label i is categories[i] (a compute() argument).
Returns:
    AP, AP50, AP75, AP_small, AP_medium, AP_large, AR1, AR10, AR100, AR_small, AR_medium, AR_large and
    AP_per_class {category name: AP}, as pycocotools' COCOeval computes them (-1 where there is no ground truth).
"""


class CocoDetectionMetric(evaluate.Metric):
    """COCO bbox mAP by pycocotools, as an `evaluate` metric: `evaluate.load("training/metrics.py")`."""

    def _info(self):
        floats, ints = datasets.Sequence(datasets.Value("float64")), datasets.Sequence(datasets.Value("int64"))
        boxes = datasets.Sequence(datasets.Sequence(datasets.Value("float64"), length=4))
        return evaluate.MetricInfo(
            description="COCO box AP / AR (pycocotools COCOeval, iouType 'bbox') for object detection.",
            citation="Lin et al., Microsoft COCO: Common Objects in Context, ECCV 2014.",
            inputs_description=_INPUTS_DESCRIPTION,
            features=datasets.Features({
                "predictions": {"image_id": datasets.Value("int64"), "scores": floats, "labels": ints, "boxes": boxes},
                "references": {
                    "image_id": datasets.Value("int64"),
                    "width": datasets.Value("int64"),
                    "height": datasets.Value("int64"),
                    "objects": {"bbox": boxes, "category_id": ints, "area": floats, "iscrowd": ints},
                },
            }),
            reference_urls=["https://github.com/cocodataset/cocoapi"],
        )

    # both need a docstring: evaluate appends the inputs description to it
    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Adds a batch of per-image predictions and references."""
        # one stored layout (lists, objects as a dict of lists) whatever the caller passed: tensors, annotations...
        if predictions is not None:
            predictions = [_normalize_prediction(p) for p in predictions]
        if references is not None:
            references = [_normalize_reference(r) for r in references]
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Adds one image's prediction and reference."""
        self.add_batch(predictions=None if prediction is None else [prediction],
                       references=None if reference is None else [reference], **kwargs)

    def _compute(self, predictions, references, categories=None, label2category_id=None):
        if categories is None:
            raise ValueError("Pass the dataset's COCO categories: metric.compute(..., categories=[{'id', 'name'}]).")
        metrics, _ = evaluate_coco(predictions, references, categories, label2category_id)
        return metrics
