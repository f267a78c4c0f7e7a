"""transformers' fine-tuning example for detection (examples/pytorch/object-detection/run_object_detection.py:
`Trainer`, an albumentations transform, torchmetrics' MeanAveragePrecision) works on one of our saved folders.

The example's code path, written here for the embedded dataset: rows in the Hub's detection layout (image, image_id,
objects{id, area, bbox, category}), an albumentations pipeline on each image (which hands class ids back as floats),
COCO-formatted annotations into the processor, a collate_fn stacking pixel_values / pixel_mask with a list of labels,
`AutoModelForObjectDetection` / `AutoImageProcessor` with `trust_remote_code=True` and new classes
(`ignore_mismatched_sizes`), `Trainer` with `eval_do_concat_batches=False` and a compute_metrics that reads
`predictions[1]` / `[2]` as logits / boxes, `evaluate`, `save_model` and a reload.

It runs in a subprocess where this package cannot be imported, as the example's users run it: the folder's code is
what runs. That is why the package is imported inside the test functions only: the subprocess imports this file for
its functions.
"""
import json
import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import albumentations as A
import datasets
import numpy as np
import pytest
import torch
from torchmetrics.detection.mean_ap import MeanAveragePrecision
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForObjectDetection,
    EvalPrediction,
    Trainer,
    TrainingArguments,
)

SIDE = 96             # the example's --image_square_size: images fit in SIDE x SIDE and are padded to it
CLASS_NAMES = ["circle", "square", "triangle", "diamond", "cross"]   # training/sample_data.py's categories


def hub_layout_dataset(data_dir: Path, split: str) -> datasets.Dataset:
    """A COCO folder -> rows as the Hub's detection sets (cppe-5) have them: `category` is a ClassLabel index."""
    coco = json.loads((data_dir / "annotations" / f"instances_{split}2017.json").read_text())
    index_of = {category["id"]: CLASS_NAMES.index(category["name"]) for category in coco["categories"]}
    rows = {image["id"]: {"image_id": image["id"], "image": str(data_dir / f"{split}2017" / image["file_name"]),
                          "width": image["width"], "height": image["height"],
                          "objects": {"id": [], "area": [], "bbox": [], "category": []}}
            for image in coco["images"]}
    for annotation in coco["annotations"]:
        if annotation["iscrowd"]:   # the Hub's detection sets have no crowd regions
            continue
        objects = rows[annotation["image_id"]]["objects"]
        objects["id"].append(annotation["id"])
        objects["area"].append(annotation["area"])
        objects["bbox"].append(annotation["bbox"])
        objects["category"].append(index_of[annotation["category_id"]])
    features = datasets.Features({
        "image_id": datasets.Value("int64"), "image": datasets.Image(),
        "width": datasets.Value("int32"), "height": datasets.Value("int32"),
        "objects": datasets.Sequence({
            "id": datasets.Value("int64"), "area": datasets.Value("float32"),
            "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
            "category": datasets.ClassLabel(names=CLASS_NAMES),
        }),
    })
    return datasets.Dataset.from_list(list(rows.values()), features=features)


def train_augmentation() -> A.Compose:
    """Some of the example's augmentations, with its box settings (COCO boxes, clipped, tiny ones dropped)."""
    return A.Compose(
        [A.Compose([A.SmallestMaxSize(max_size=SIDE), A.RandomSizedBBoxSafeCrop(height=SIDE, width=SIDE)], p=0.5),
         A.HorizontalFlip(p=0.5), A.RandomBrightnessContrast(p=0.5)],
        bbox_params=A.BboxParams(format="coco", label_fields=["category"], clip=True, min_area=25))


def eval_augmentation() -> A.Compose:
    return A.Compose([A.NoOp()], bbox_params=A.BboxParams(format="coco", label_fields=["category"], clip=True))


def augment_and_process(examples, augmentation, processor, keep_pixel_mask: bool):
    """A batch of rows -> the processor's output, as the example's `with_transform` function does."""
    images, annotations = [], []
    for image_id, image, objects in zip(examples["image_id"], examples["image"], examples["objects"]):
        out = augmentation(image=np.array(image.convert("RGB")), bboxes=objects["bbox"], category=objects["category"])
        images.append(out["image"])
        # the example zips the areas of the input rows with the augmented boxes, class ids as albumentations gives
        # them back: floats (3.0)
        annotations.append({"image_id": image_id, "annotations": [
            {"image_id": image_id, "category_id": category, "iscrowd": 0, "area": area, "bbox": list(bbox)}
            for category, area, bbox in zip(out["category"], objects["area"], out["bboxes"])]})
    batch = processor(images=images, annotations=annotations, return_tensors="pt")
    if not keep_pixel_mask:   # the example's default: no pixel_mask
        batch.pop("pixel_mask", None)
    return batch


def collate(items):
    batch = {"pixel_values": torch.stack([item["pixel_values"] for item in items]),
             "labels": [item["labels"] for item in items]}
    if "pixel_mask" in items[0]:
        batch["pixel_mask"] = torch.stack([item["pixel_mask"] for item in items])
    return batch


@torch.no_grad()
def compute_metrics(evaluation: EvalPrediction, processor, id2label) -> dict:
    """torchmetrics' mAP as the example computes it: one entry of `predictions` / `label_ids` per eval batch."""
    targets, predictions = [], []
    for batch_predictions, batch_labels in zip(evaluation.predictions, evaluation.label_ids):
        sizes = torch.tensor(np.stack([label["orig_size"] for label in batch_labels]))   # [batch, 2] (h, w)
        for label, (height, width) in zip(batch_labels, sizes.tolist()):
            cx, cy, w, h = torch.tensor(label["boxes"]).reshape(-1, 4).unbind(-1)   # normalized by the image
            boxes_xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
            targets.append({"boxes": boxes_xyxy * torch.tensor([width, height, width, height]),
                            "labels": torch.tensor(label["class_labels"])})
        # the model's tuple without the loss: [0] loss_dict, [1] logits, [2] pred_boxes (transformers' DETR order)
        assert isinstance(batch_predictions[0], dict) and "loss_ce" in batch_predictions[0], batch_predictions[0]
        assert batch_predictions[1].shape[-1] == len(id2label) + 1 and batch_predictions[2].shape[-1] == 4
        outputs = {"logits": torch.tensor(batch_predictions[1]), "pred_boxes": torch.tensor(batch_predictions[2])}
        predictions += processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)
    metric = MeanAveragePrecision(box_format="xyxy", class_metrics=True)
    metric.update(predictions, targets)
    values = metric.compute()
    classes = values.pop("classes").reshape(-1).tolist()
    for name in ("map_per_class", "mar_100_per_class"):
        for class_id, value in zip(classes, values.pop(name).reshape(-1)):
            values[f"{name.removesuffix('_per_class')}_{id2label[class_id]}"] = value
    return {key: round(float(value), 4) for key, value in values.items()}


def run_example(folder: Path, data_dir: Path, output_dir: Path) -> dict:
    """The example's main() on the embedded data: load, train a few steps, evaluate, save, reload."""
    id2label = dict(enumerate(CLASS_NAMES))
    remote = {"trust_remote_code": True}
    config = AutoConfig.from_pretrained(folder, id2label=id2label, label2id={v: k for k, v in id2label.items()},
                                        **remote)
    model = AutoModelForObjectDetection.from_pretrained(folder, config=config, ignore_mismatched_sizes=True, **remote)
    processor = AutoImageProcessor.from_pretrained(
        folder, do_resize=True, size={"max_height": SIDE, "max_width": SIDE}, do_pad=True,
        pad_size={"height": SIDE, "width": SIDE}, use_fast=True, **remote)
    # training with the pixel mask (what DETR wants), evaluation without it (the example's default)
    train_set = hub_layout_dataset(data_dir, "train").with_transform(
        partial(augment_and_process, augmentation=train_augmentation(), processor=processor, keep_pixel_mask=True))
    eval_set = hub_layout_dataset(data_dir, "val").with_transform(
        partial(augment_and_process, augmentation=eval_augmentation(), processor=processor, keep_pixel_mask=False))
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=2, per_device_eval_batch_size=4,
        learning_rate=1e-4, weight_decay=1e-4, logging_steps=1, save_strategy="no", eval_strategy="no",
        remove_unused_columns=False, eval_do_concat_batches=False, report_to="none", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                      processing_class=processor, data_collator=collate,
                      compute_metrics=partial(compute_metrics, processor=processor, id2label=id2label))

    # Trainer.compute_loss is the model's own criterion on the model's outputs
    batch = collate([eval_set[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        outputs = model(batch["pixel_values"], labels=batch["labels"])
        criterion_loss, _ = model.criterion(outputs.logits, outputs.pred_boxes, batch["labels"],
                                            outputs.auxiliary_outputs)
        trainer_loss = trainer.compute_loss(model, dict(batch))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()

    trained = trainer.model.eval()
    reloaded = AutoModelForObjectDetection.from_pretrained(output_dir, **remote).eval()
    reloaded_processor = AutoImageProcessor.from_pretrained(output_dir, **remote)
    with torch.no_grad():
        logits = trained(batch["pixel_values"]).logits
        reloaded_logits = reloaded(batch["pixel_values"]).logits
    torch.save({"pixel_values": batch["pixel_values"], "logits": logits}, output_dir / "expected.pt")
    after = trained.state_dict()
    return {
        "model_module": type(model).__module__, "processor_module": type(processor).__module__,
        "label_names": trainer.label_names,
        "criterion_loss": criterion_loss.item(), "trainer_loss": trainer_loss.item(), "loss": outputs.loss.item(),
        "train_losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "changed": sorted(name for name in before if not torch.equal(before[name], after[name])),
        "metrics": metrics,
        "reloaded_module": type(reloaded).__module__,
        "reloaded_num_labels": reloaded.config.num_labels,
        "reloaded_size": dict(reloaded_processor.size), "reloaded_pad_size": reloaded_processor.pad_size,
        "reloaded_logits_equal": bool(torch.equal(logits, reloaded_logits)),
    }


def _run_in_a_process_without_the_package(folder: Path, data_dir: Path, output_dir: Path, tmp_path: Path) -> dict:
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        sys.modules["modeling_detr_custom"] = None   # the package cannot be imported in this process
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_trainer_example as example
        result = example.run_example(Path({str(folder)!r}), Path({str(data_dir)!r}), Path({str(output_dir)!r}))
        print("RESULT " + json.dumps(result))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    line = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")][-1]
    return json.loads(line.removeprefix("RESULT "))


def test_transformers_example_trains_evaluates_saves_and_reloads_our_folder(tmp_path, data_dir):
    from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection, DetrCustomImageProcessor
    from modeling_detr_custom.testing_utils import tiny_kwargs

    # a folder with 3 classes; the example fine-tunes it on the dataset's 5 (a new class head)
    folder = tmp_path / "folder"
    config = DetrCustomConfig(**tiny_kwargs(id2label={0: "circle", 1: "square", 2: "triangle"}))
    DetrCustomForObjectDetection(config).save_pretrained(folder)
    DetrCustomImageProcessor(size={"shortest_edge": 96, "longest_edge": 160}).save_pretrained(folder)
    output_dir = tmp_path / "finetuned"

    result = _run_in_a_process_without_the_package(folder, data_dir, output_dir, tmp_path)

    for module in ("model_module", "processor_module", "reloaded_module"):
        assert result[module].startswith("transformers_modules"), result[module]   # the folder's code ran
    assert result["label_names"] == ["labels"]   # found in the forward's signature, as for transformers' DETR
    assert result["trainer_loss"] == result["loss"] == result["criterion_loss"] > 0
    losses = result["train_losses"]
    assert len(losses) == 4 and all(np.isfinite(losses)) and min(losses) > 0
    changed = result["changed"]
    assert {"class_embed.weight", "bbox_embed.layers.0.weight", "model.query_embed.weight"} <= set(changed)
    frozen_batch_norm = [name for name in changed if ".bn" in name or "downsample.1." in name]
    assert not frozen_batch_norm and any(name.startswith("model.backbone.") for name in changed)

    metrics = result["metrics"]
    assert np.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0
    summary = ["map", "map_50", "map_75", "mar_1", "mar_10", "mar_100"]
    per_class = [f"{kind}_{name}" for kind in ("map", "mar_100") for name in CLASS_NAMES]
    for key in summary + per_class + ["map_small", "map_medium", "map_large"]:
        value = metrics[f"eval_{key}"]
        # -1: nothing of that size / class in the 8 validation images (torchmetrics' convention)
        assert 0 <= value <= 1 or (value == -1 and key not in summary), (key, value)

    # the saved folder: 5 classes, the example's processor settings, the trained weights
    assert result["reloaded_num_labels"] == 5 and result["reloaded_logits_equal"]
    assert result["reloaded_size"] == {"max_height": SIDE, "max_width": SIDE}
    assert result["reloaded_pad_size"] == {"height": SIDE, "width": SIDE}
    # and it loads with the package too (no remote code): same logits as the trained model
    model = DetrCustomForObjectDetection.from_pretrained(output_dir).eval()
    expected = torch.load(output_dir / "expected.pt")
    with torch.no_grad():
        assert torch.equal(model(expected["pixel_values"]).logits, expected["logits"])


def test_annotations_in_the_types_the_example_and_transformers_hand_over():
    """What albumentations, `datasets` and transformers' processor hand over is read as transformers reads it;
    what is wrong (3.5 as a class, NaN / inf in a box) is an error naming the field."""
    from transformers import DetrImageProcessor

    from modeling_detr_custom import DetrCustomImageProcessor

    image = np.zeros((40, 50, 3), np.uint8)
    plain = {"bbox": [1.0, 2.0, 10.0, 12.0], "category_id": 3, "iscrowd": 0, "area": 120.0}
    # (as handed over, what it means in python numbers): transformers reads the latter (it refuses float tensors,
    # and numeric strings since transformers 5; its earlier processors and the example's docs use "0007")
    variants = [
        ({"category_id": 3.0}, {}), ({"category_id": np.float64(3.0)}, {}), ({"category_id": torch.tensor(3.0)}, {}),
        ({"category_id": np.int32(3)}, {}), ({"area": np.float32(120.0)}, {}),
        ({"bbox": np.array([1, 2, 10, 12], np.float32)}, {}), ({"bbox": torch.tensor([1.0, 2.0, 10.0, 12.0])}, {}),
        ({"bbox": [torch.tensor(1.0), np.float32(2), 10, 12]}, {}),
        ({"iscrowd": False}, {}), ({"iscrowd": True}, {"iscrowd": 1}), ({"iscrowd": np.bool_(True)}, {"iscrowd": 1}),
        ({"iscrowd": torch.tensor(True)}, {"iscrowd": 1}),
    ]
    other = {**plain, "bbox": [20.0, 5.0, 8.0, 30.0], "category_id": 1}
    for variant, meaning in variants:
        expected = DetrImageProcessor(do_resize=False)(
            image, annotations={"image_id": 7, "annotations": [{**plain, **meaning}, other]},
            return_tensors="pt")["labels"][0]
        for image_id in (7, 7.0, np.int64(7), "0007"):
            labels = DetrCustomImageProcessor(do_resize=False)(
                image, annotations={"image_id": image_id, "annotations": [{**plain, **variant}, other]})["labels"][0]
            for key in ("image_id", "class_labels", "boxes", "area", "iscrowd", "orig_size"):
                assert torch.equal(labels[key], expected[key].to(labels[key].dtype)), (variant, image_id, key)
    bad = [({"category_id": 3.5}, r"\['category_id'\] must be an integer, got 3.5 \(image_id 7, annotation id 9\)"),
           ({"category_id": float("nan")}, r"\['category_id'\] must be an integer, got nan"),
           ({"bbox": [1, 2, float("inf"), 12]}, r"\['bbox'\] value must be a finite number, got inf"),
           ({"bbox": np.array([1, np.nan, 10, 12])}, r"\['bbox'\] value must be a finite number, got nan"),
           ({"area": float("nan")}, r"\['area'\] must be a finite number, got nan"),
           ({"iscrowd": 0.5}, r"\['iscrowd'\] must be an integer, got 0.5")]
    for variant, message in bad:
        with pytest.raises(ValueError, match=message):
            DetrCustomImageProcessor(do_resize=False)(
                image, annotations={"image_id": 7, "annotations": [{**plain, **variant, "id": 9}]})
    with pytest.raises(ValueError, match=r"annotations\[0\]\['image_id'\] must be an integer, got 7.5"):
        DetrCustomImageProcessor(do_resize=False)(image, annotations={"image_id": 7.5, "annotations": [plain]})
