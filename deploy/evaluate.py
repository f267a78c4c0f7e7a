"""detr-custom-eval: COCO mAP of a detector on a validation set, with the training loop's numbers.

    detr-custom-eval outputs/demo/best --data_dir data/demo
    detr-custom-eval MODEL --val_annotation_file val.json --val_image_dir images/ [--output_json metrics.json]
    detr-custom-eval MODEL --dataset_name cppe-5 --val_split test --bbox_format xywh

The data is read, checked and pre-processed as the training script reads its validation set (load_coco /
load_hub_detection, check_dataset with the model's num_queries, DetrCollator with the model's processor: the
sizes come from the folder's preprocessor_config.json), and the images go through training/evaluation.py, the
loop's own evaluation: the AP printed here is the AP the run recorded for the folder it saved.
Model classes are matched to the data's categories by name; data categories the model does not know are an error,
model classes absent from the data are not scored (their detections are dropped).
"""
import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
from torch.utils.data import DataLoader

from training.data import Categories, DetrCollator, check_dataset, get_categories, load_coco, load_hub_detection
from training.evaluation import predict_loader, score

from .runtimes import add_nms_argument, load_detector

logger = logging.getLogger("deploy.evaluate")


def load_validation(*, data_dir=None, val_annotation_file=None, val_image_dir=None, dataset_name=None,
                    val_split="validation", bbox_format=None, bbox_normalized=False) -> datasets.Dataset:
    """The validation split in our schema, as the training script loads it."""
    given = [bool(data_dir), bool(val_annotation_file or val_image_dir), bool(dataset_name)]
    if sum(given) != 1:
        raise ValueError("Give exactly one source of validation data: --data_dir (COCO layout, its val split), "
                         "--val_annotation_file with --val_image_dir, or --dataset_name (with --bbox_format).")
    if data_dir:
        return load_coco(data_dir, "val")
    if dataset_name:
        if bbox_format is None:
            raise ValueError("--bbox_format ('xywh' or 'xyxy') is required with --dataset_name.")
        return load_hub_detection(dataset_name, val_split, bbox_format=bbox_format, bbox_normalized=bbox_normalized)
    if not (val_annotation_file and val_image_dir):
        raise ValueError("--val_annotation_file and --val_image_dir go together: the COCO json and its image folder.")
    return load_coco(annotation_file=val_annotation_file, image_dir=val_image_dir)


def match_categories(id2label: dict, data_categories: Categories) -> tuple[Categories, dict[int, int]]:
    """(the data's categories, model label -> data category id) by class name."""
    by_name = dict(zip(data_categories.names, data_categories.ids))
    unknown = [name for name in data_categories.names if name not in set(id2label.values())]
    if unknown:
        raise ValueError(f"The data's categories {unknown} are not classes of the model (its classes: "
                         f"{sorted(set(id2label.values()))}). Evaluate on data annotated with the model's classes, "
                         "or fine-tune the model on these categories.")
    return data_categories, {int(label): by_name[name] for label, name in id2label.items() if name in by_name}


@dataclass
class ValidationSet:
    """Validation data ready to score a model on: the checked rows, their categories, model label -> category."""

    dataset: datasets.Dataset
    categories: Categories
    label_to_category_id: dict[int, int]


def validation_set(id2label: dict, num_queries: int | None, **data) -> ValidationSet:
    """The validation data given as `load_validation`'s arguments, checked as the training script checks it, its
    categories matched to the model's classes (id2label) by name."""
    dataset = load_validation(**data)
    categories, label_to_category_id = match_categories(id2label, get_categories(dataset))
    dataset, report = check_dataset(dataset, num_queries=num_queries)
    logger.info("data check: %s", report)
    dataset = dataset.cast_column("image", datasets.Image(decode=False))   # as training: pixels as stored
    return ValidationSet(dataset, categories, label_to_category_id)


def score_forward(forward, processor, validation: ValidationSet, *, indices: list[int] | None = None,
                  batch_size: int = 8, num_workers: int = 0, progress: bool = False) -> tuple[dict, dict]:
    """(metrics, timing) of `forward` (Detector.forward's contract) on the validation rows `indices` (all by
    default): the training loop's prediction and COCO scoring; model classes the data lacks are not scored."""
    dataset = validation.dataset if indices is None else validation.dataset.select(indices)
    category_id_to_label = {category_id: label for label, category_id in validation.label_to_category_id.items()}
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=DetrCollator(processor, category_id_to_label))
    predictions, timing = predict_loader(forward, processor, loader, progress=progress)
    for prediction in predictions:
        keep = [i for i, label in enumerate(prediction["labels"]) if label in validation.label_to_category_id]
        for key in ("scores", "labels", "boxes"):
            prediction[key] = [prediction[key][i] for i in keep]
    return score(predictions, dataset, validation.categories, validation.label_to_category_id), timing


def evaluate_detector(model: str, *, batch_size: int = 8, num_workers: int = 0, progress: bool = True,
                      precision: str | None = None, nms_iou_threshold: float | None = None, **data) -> dict:
    """The metrics of MODEL (a folder or an exported file) on the validation data given as `load_validation`'s
    arguments: training/metrics.py's figures plus images, ms_per_image (forward and post-processing) and
    ms_per_image_total (with decoding and pre-processing). precision: an OpenVINO file's, instead of its own.
    nms_iou_threshold: instead of the processor's duplicate removal (load_detector)."""
    detector = load_detector(model, precision=precision, nms_iou_threshold=nms_iou_threshold)
    if detector.postprocessed:
        raise ValueError(f"{model} was exported with --postprocess (scores, labels and pixel boxes out, top-k only): "
                         "evaluate the file exported without --postprocess, or the model folder.")
    validation = validation_set(detector.id2label, detector.num_queries, **data)
    metrics, timing = score_forward(detector.forward, detector.processor, validation, batch_size=batch_size,
                                    num_workers=num_workers, progress=progress)
    images = max(timing["images"], 1)
    return {**metrics, "images": timing["images"], "ms_per_image": 1000 * timing["model_seconds"] / images,
            "ms_per_image_total": 1000 * timing["seconds"] / images, "model": str(model),
            "runtime": detector.runtime}


def format_metrics(metrics: dict) -> str:
    lines = [f"{metrics['model']} ({metrics['runtime']}), {metrics['images']} images"]
    lines.append("  ".join(f"{name} {metrics[name]:.4f}" for name in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100")))
    lines.append("  ".join(f"{name} {metrics[name]:.4f}" for name in ("AP_small", "AP_medium", "AP_large")))
    lines.append("AP per class: " + ", ".join(f"{name} {ap:.4f}" for name, ap in metrics["AP_per_class"].items()))
    lines.append(f"{metrics['ms_per_image']:.1f} ms per image (forward + post-processing), "
                 f"{metrics['ms_per_image_total']:.1f} ms with decoding and pre-processing")
    return "\n".join(lines)


# the flags that give the validation data, `load_validation`'s arguments (detr-custom-eval; detr-custom-export's
# int8 accuracy control)
VALIDATION_ARGUMENTS = ("data_dir", "val_annotation_file", "val_image_dir", "dataset_name", "val_split",
                        "bbox_format", "bbox_normalized")


def add_validation_arguments(parser: argparse.ArgumentParser, purpose: str = "") -> None:
    """The validation data's flags (VALIDATION_ARGUMENTS); `purpose` starts the help of --data_dir."""
    parser.add_argument("--data_dir", help=f"{purpose}a COCO-layout folder: its annotations/instances_val2017.json "
                                           "and val2017/")
    parser.add_argument("--val_annotation_file", help="a COCO json (with --val_image_dir)")
    parser.add_argument("--val_image_dir")
    parser.add_argument("--dataset_name", help="a Hub dataset or save_to_disk folder (with --bbox_format)")
    parser.add_argument("--val_split", default="validation")
    parser.add_argument("--bbox_format", choices=("xywh", "xyxy"))
    parser.add_argument("--bbox_normalized", action="store_true")


def validation_arguments(args: argparse.Namespace) -> dict:
    """The parsed validation flags as `load_validation`'s keyword arguments."""
    return {name: getattr(args, name) for name in VALIDATION_ARGUMENTS}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="detr-custom-eval", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a saved folder (best/, last/), a transformers DETR / RT-DETR folder or Hub "
                                      "id, or an exported .onnx / .xml file")
    add_validation_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--output_json", help="write the metrics here as json")
    parser.add_argument("--precision", choices=("fp32", "bf16", "int8", "default"),
                        help="an OpenVINO file's arithmetic instead of the one it was exported for (bf16: CPUs with "
                             "AVX512_BF16 or AMX; default: the runtime's choice)")
    add_nms_argument(parser)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        metrics = evaluate_detector(
            args.model, batch_size=args.batch_size, num_workers=args.num_workers, progress=sys.stderr.isatty(),
            precision=args.precision, nms_iou_threshold=args.nms_iou_threshold, **validation_arguments(args))
    except ValueError as error:
        print(f"detr-custom-eval: {error}", file=sys.stderr)
        return 2
    print(format_metrics(metrics))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(metrics, indent=2))
        print(f"metrics written to {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
