"""Real data, few images: our DETR presets against torchvision's CNN detectors from the same ImageNet backbone file.

    .venv/bin/python -m benchmarks.bench_real [--data-dir data/real/stardist_nuclei] [--steps 300]
                                              [--detectors detr-demo,detr-small,detr-small-x2,fasterrcnn,...]
                                              [--fold right] [--output-dir outputs/bench_real]

The data: any COCO folder in the 2017 layout (`annotations/instances_{train,val}2017.json`, `{train,val}2017/`) whose
val split is held out; by default the stardist nuclei tiles (`benchmarks.real_data`, built on first use from the
installed stardist package: 35 training tiles, 4 held-out tiles of another region of the image; --fold picks which
region is held out).

Every detector starts from torchvision's ImageNet MobileNetV2 (`.weights/mobilenet_v2-b0353104.pth`, `make weights`)
with frozen BatchNorm and a frozen stem, sees the same images with the same augmentation (horizontal flip, the shortest
edge drawn from --scales; evaluation at the last scale given, --eval-size), the same batch size and the same number of
optimizer steps, and is evaluated by pycocotools on the held-out split (every steps / EVALS steps, for the curve
against time) and, at the end, on its own training split (the memorization gap: train AP50 - held-out AP50).

- Ours (`detr-*`, DETR_PRESETS): a config file (training/configs/...) plus overrides, trained by the training script
  in its own process (`python -m training.train`), its held-out curve from the script's evaluations (metrics.json);
  the training split is evaluated here on the saved model (last/).
- torchvision's (CNN_DETECTORS): Faster R-CNN, RetinaNet and FCOS on `mobilenet_backbone("mobilenet_v2", fpn=True)`
  with the stride 8, 16, 32 and 32 stages and a pooled level, anchors halved from the ResNet-FPN defaults (the
  objects are small), trained here with SGD (momentum 0.9, weight decay 1e-4, linear warm-up then cosine) at the
  learning rates of torchvision's detection references scaled to the batch (CNN_LR: 0.01 for Faster R-CNN, 0.005
  for RetinaNet and FCOS at batch 8).

Time: "train s" is the seconds from the start of the run (data, model) to its last optimizer step, evaluations
excluded for the CNNs and included for ours (a few images: seconds). The equal-time table compares each pair at the
shorter run's time, reading the longer run's held-out AP50 on its curve there (a schedule sized for more steps:
pessimistic for it). Results: OUTPUT_DIR/bench_real.md and .json, with the machine and the command.
"""
import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import yaml

from benchmarks.machine import describe_machine, format_machine

REPO = Path(__file__).parents[1]
WEIGHTS = REPO / ".weights" / "mobilenet_v2-b0353104.pth"
EVALS = 5   # held-out evaluations per run (the AP-against-time curve)
# name -> (config file, overrides): what a user runs
DETR_PRESETS = {
    "detr-demo": ("training/configs/demo.yaml", {}),
    # the deformable preset with RT-DETR's pieces: query selection, contrastive denoising, varifocal loss
    "detr-rtdetr": ("training/configs/demo.yaml",
                    {"two_stage": True, "num_denoising": 50, "classification_loss": "varifocal"}),
    "detr-small": ("training/configs/finetune_small.yaml", {}),
    # the same at twice the images' size: the 13-36 px nuclei as 26-72 px objects (finetune_small.yaml's sizes note)
    "detr-small-x2": ("training/configs/finetune_small.yaml",
                      {"train_scales": [224, 256, 288], "eval_size": 256, "max_size": 448}),
    # finetune_small.yaml before hybrid matching, the fusion encoder and duplicate removal (DETR's one-to-one matching,
    # the attention encoder alone, no NMS): the base the levers' tables of docs/benchmarks_real.md were measured on
    "detr-small-o2o": ("training/configs/finetune_small.yaml", {"num_query_groups": 1, "criterion": "hungarian",
                                                                "encoder_type": "detr", "nms_iou_threshold": None}),
}
CNN_DETECTORS = ("fasterrcnn", "retinanet", "fcos")
# torchvision's detection references: these learning rates for a batch of 16 (8 GPUs x 2), scaled linearly
CNN_LR = {"fasterrcnn": 0.02, "retinanet": 0.01, "fcos": 0.01}
DEFAULT_DETECTORS = ("detr-demo", "detr-small", "detr-small-x2", "fasterrcnn", "retinanet", "fcos")
COLUMNS = ("detector", "steps", "train s", "s/step", "AP", "AP50", "AR@100", "best AP50 (step)", "train AP50", "gap")


# --- data ---------------------------------------------------------------------------------------------------------

def split_files(data_dir: Path, split: str) -> tuple[Path, Path]:
    annotation_file = data_dir / "annotations" / f"instances_{split}2017.json"
    if not annotation_file.is_file():
        raise ValueError(f"{annotation_file} not found: --data-dir needs the COCO 2017 layout "
                         f"(annotations/instances_{{train,val}}2017.json, {{train,val}}2017/).")
    return annotation_file, data_dir / f"{split}2017"


def subset(data_dir: Path, output_dir: Path, num_train: int | None, num_val: int | None) -> dict:
    """{split: (annotation file, image dir)}: the folder's, or the first N images of each split written as new
    annotation files (the images stay where they are)."""
    files = {}
    for split, count in (("train", num_train), ("val", num_val)):
        annotation_file, image_dir = split_files(data_dir, split)
        if count:
            coco = json.loads(annotation_file.read_text())
            coco["images"] = coco["images"][:count]
            kept = {image["id"] for image in coco["images"]}
            coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in kept]
            output_dir.mkdir(parents=True, exist_ok=True)
            annotation_file = output_dir / f"subset_{split}.json"
            annotation_file.write_text(json.dumps(coco))
        files[split] = (annotation_file, image_dir)
    return files


def load_split(annotation_file: Path, image_dir: Path) -> tuple[list, dict]:
    """([(image_id, [height, width, 3] uint8, boxes_xyxy [n, 4], category_ids [n])], categories {id: name})."""
    coco = json.loads(annotation_file.read_text())
    by_image = {image["id"]: [] for image in coco["images"]}
    for annotation in coco["annotations"]:
        if not annotation.get("iscrowd", 0):
            by_image[annotation["image_id"]].append(annotation)
    examples = []
    for image in coco["images"]:
        pixels = np.asarray(PIL.Image.open(image_dir / image["file_name"]).convert("RGB"))
        annotations = by_image[image["id"]]
        boxes = np.asarray([a["bbox"] for a in annotations], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        examples.append((image["id"], pixels, boxes, np.asarray([a["category_id"] for a in annotations], np.int64)))
    return examples, {c["id"]: c["name"] for c in coco["categories"]}


def coco_metrics(annotation_file: Path, detections: list[dict]) -> dict:
    """pycocotools' bbox metrics; detections: {"image_id", "category_id", "bbox" [x, y, w, h], "score"}."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(annotation_file))
        if not detections:
            return {"AP": 0.0, "AP50": 0.0, "AR100": 0.0}
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = [max(0.0, float(s)) for s in evaluation.stats]
    return {"AP": stats[0], "AP50": stats[1], "AR100": stats[8]}


def as_detections(image_id: int, boxes, scores, category_ids) -> list[dict]:
    return [{"image_id": int(image_id), "category_id": int(c), "score": float(s),
             "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
            for b, s, c in zip(boxes.tolist(), scores.tolist(), category_ids)]


# --- torchvision's detectors ----------------------------------------------------------------------------------------

def build_cnn(name: str, num_categories: int, scales: list[int], eval_size: int, max_size: int):
    """A torchvision detector on MobileNetV2 + FPN from the ImageNet file (frozen BatchNorm and stem)."""
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import mobilenet_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    if not WEIGHTS.is_file():
        raise ValueError(f"{WEIGHTS} not found: `make weights` fetches it.")
    # stages 2..5: strides 8, 16, 32, 32 (+ a pooled level); trainable_layers 5 of 6 = all but the stem, as ours
    backbone = mobilenet_backbone(backbone_name="mobilenet_v2", weights=None, fpn=True, norm_layer=FrozenBatchNorm2d,
                                  trainable_layers=5, returned_layers=[2, 3, 4, 5])
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    body = {key.removeprefix("features."): value for key, value in state.items() if key.startswith("features.")}
    children = dict(backbone.body.named_children())   # all 19 feature blocks: the last returned stage is the last
    backbone.body.load_state_dict({k: v for k, v in body.items() if k.split(".")[0] in children}, strict=True)
    # training draws the shortest edge from min_size; evaluation uses its last entry
    sizes = {"min_size": tuple([s for s in scales if s != eval_size] + [eval_size]), "max_size": max_size}
    levels = (16, 32, 64, 128, 256)
    if name == "fasterrcnn":
        anchors = AnchorGenerator(tuple((s,) for s in levels), ((0.5, 1.0, 2.0),) * len(levels))
        return FasterRCNN(backbone, num_categories + 1, rpn_anchor_generator=anchors, box_score_thresh=0.001, **sizes)
    if name == "retinanet":
        anchors = AnchorGenerator(tuple((s, round(s * 2 ** (1 / 3)), round(s * 2 ** (2 / 3))) for s in levels),
                                  ((0.5, 1.0, 2.0),) * len(levels))
        return RetinaNet(backbone, num_categories, anchor_generator=anchors, score_thresh=0.01, **sizes)
    if name == "fcos":
        anchors = AnchorGenerator(tuple((s // 2,) for s in levels), ((1.0,),) * len(levels))
        return FCOS(backbone, num_categories, anchor_generator=anchors, score_thresh=0.01, **sizes)
    raise ValueError(f"unknown torchvision detector {name!r}: choose from {', '.join(CNN_DETECTORS)}.")


@torch.no_grad()
def cnn_detections(model, examples, label_to_category: dict, batch_size: int = 8) -> list[dict]:
    model.eval()
    detections = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        outputs = model([torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 for _, pixels, _, _ in chunk])
        for (image_id, _, _, _), output in zip(chunk, outputs):
            categories = [label_to_category[int(label)] for label in output["labels"]]
            detections += as_detections(image_id, output["boxes"], output["scores"], categories)
    model.train()
    return detections


def train_cnn(name: str, files: dict, *, steps: int, batch_size: int, scales: list[int], eval_size: int,
              max_size: int, seed: int) -> dict:
    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train, categories = load_split(*files["train"])
    val, _ = load_split(*files["val"])
    offset = 1 if name == "fasterrcnn" else 0   # Faster R-CNN's label 0 is the background
    category_to_label = {c: i + offset for i, c in enumerate(sorted(categories))}
    label_to_category = {label: c for c, label in category_to_label.items()}
    model = build_cnn(name, len(categories), scales, eval_size, max_size)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=CNN_LR[name] * batch_size / 16, momentum=0.9, weight_decay=1e-4)
    warmup = min(50, max(1, steps // 5))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    eval_every = max(1, steps // EVALS)
    curve, evaluating, order = [], 0.0, []
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order += rng.permutation(len(train)).tolist()
        batch, order = [train[i] for i in order[:batch_size]], order[batch_size:]
        images, targets = [], []
        for _, pixels, boxes, category_ids in batch:
            image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255   # [3, height, width]
            boxes = torch.from_numpy(boxes.copy())
            if rng.random() < 0.5:
                image = image.flip(-1)
                boxes = torch.stack([image.shape[-1] - boxes[:, 2], boxes[:, 1], image.shape[-1] - boxes[:, 0],
                                     boxes[:, 3]], dim=1)
            images.append(image)
            targets.append({"boxes": boxes.reshape(-1, 4),
                            "labels": torch.tensor([category_to_label[c] for c in category_ids], dtype=torch.int64)})
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % eval_every == 0 or step == steps:
            clock = time.perf_counter()
            metrics = coco_metrics(files["val"][0], cnn_detections(model, val, label_to_category))
            evaluating += time.perf_counter() - clock
            curve.append({"step": step, "seconds": time.perf_counter() - started - evaluating, **metrics})
            print(f"  step {step}: loss {loss.item():.3f}, held-out AP50 {metrics['AP50']:.3f}, "
                  f"{curve[-1]['seconds']:.0f} s", flush=True)
    train_metrics = coco_metrics(files["train"][0], cnn_detections(model, train, label_to_category))
    return {"curve": curve, "train": train_metrics, "loss": loss.item()}


# --- ours, through the training script ------------------------------------------------------------------------------

def detr_config(name: str, files: dict, folder: Path, *, steps: int, batch_size: int, scales: list[int],
                eval_size: int, max_size: int, seed: int, extra: dict | None = None) -> dict:
    config_file, overrides = DETR_PRESETS[name]
    base = yaml.safe_load((REPO / config_file).read_text()) or {}
    weights = base.get("backbone_weights")
    if weights and not Path(weights).is_absolute():
        base["backbone_weights"] = str(REPO / weights)
    (train_annotations, train_images), (val_annotations, val_images) = files["train"], files["val"]
    settings = {
        "data_dir": None, "write_demo_data": False, "dataset_name": None,
        "train_annotation_file": str(train_annotations), "train_image_dir": str(train_images),
        "val_annotation_file": str(val_annotations), "val_image_dir": str(val_images),
        "train_scales": list(scales), "eval_size": eval_size, "max_size": max_size,
        "per_device_train_batch_size": batch_size, "seed": seed, "num_workers": 0,
        "max_steps": steps, "max_train_minutes": 0, "warmup_steps": min(int(base.get("warmup_steps", 0)),
                                                                        max(1, steps // 5)),
        "eval_steps": max(1, steps // EVALS), "save_steps": steps, "save_total_limit": 1,
        "logging_steps": max(1, min(10, steps // 4)), "output_dir": str(folder / "run"),
        "overwrite_output_dir": True, "resume_from_checkpoint": None, "report_to": "none",
        "num_prediction_images": 0, "push_to_hub": False}
    # a preset's overrides and extra (a lever) after the benchmark's settings: they may set sizes, steps, warm-up
    return {**base, **settings, **overrides, **(extra or {})}


def run_training_script(config: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    with open(folder / "train.log", "w") as log:
        result = subprocess.run([sys.executable, "-m", "training.train", "--config", str(config_file)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if result.returncode != 0:
        tail = (folder / "train.log").read_text()[-3000:]
        raise RuntimeError(f"the training script failed (exit code {result.returncode}); its log: "
                           f"{folder / 'train.log'}\n{tail}")


@torch.no_grad()
def detr_detections(model_dir: Path, examples, categories: dict, batch_size: int = 8) -> list[dict]:
    from modeling_detr_custom import DetrCustomForObjectDetection, DetrCustomImageProcessor
    from training.evaluation import detect_batch

    model = DetrCustomForObjectDetection.from_pretrained(model_dir).eval()
    processor = DetrCustomImageProcessor.from_pretrained(model_dir)
    name_to_category = {name: c for c, name in categories.items()}
    detections = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        inputs = processor([pixels for _, pixels, _, _ in chunk], return_tensors="pt")
        sizes = torch.tensor([pixels.shape[:2] for _, pixels, _, _ in chunk])
        # each image on its own pixels, as the training loop's evaluation and detr-custom-eval (a padded batch's
        # outputs differ from each image's alone)
        for (image_id, _, _, _), result in zip(chunk, detect_batch(model, processor, inputs["pixel_values"],
                                                                   inputs["pixel_mask"], sizes)):
            category_ids = [name_to_category[model.config.id2label[int(label)]] for label in result["labels"]]
            detections += as_detections(image_id, result["boxes"], result["scores"], category_ids)
    return detections


def train_detr(name: str, files: dict, folder: Path, **settings) -> dict:
    run_training_script(detr_config(name, files, folder, **settings), folder)
    metrics = json.loads((folder / "run" / "metrics.json").read_text())
    logged = metrics["train_history"]
    steps_logged = [r["step"] for r in logged]
    seconds_logged = [r["elapsed_s"] for r in logged]
    curve = [{"step": r["step"], "seconds": float(np.interp(r["step"], steps_logged, seconds_logged)),
              "AP": r["AP"], "AP50": r["AP50"], "AR100": r["AR100"]} for r in metrics["eval_history"]]
    # the last point scored here, on every held-out image as the CNNs' (the training script's evaluations can leave
    # out the last images of the split when they fall at the end of a training epoch)
    val, categories = load_split(*files["val"])
    final = coco_metrics(files["val"][0], detr_detections(folder / "run" / "last", val, categories))
    curve[-1] = {**curve[-1], "script AP50": curve[-1]["AP50"], **final}
    train, _ = load_split(*files["train"])
    train_metrics = coco_metrics(files["train"][0], detr_detections(folder / "run" / "last", train, categories))
    return {"curve": curve, "train": train_metrics, "loss": logged[-1].get("loss")}


# --- the tables -----------------------------------------------------------------------------------------------------

def row(name: str, result: dict) -> dict:
    final, curve = result["curve"][-1], result["curve"]
    best = max(curve, key=lambda r: r["AP50"])
    return {"detector": name, "steps": final["step"], "train s": final["seconds"],
            "s/step": final["seconds"] / final["step"], "AP": final["AP"], "AP50": final["AP50"],
            "AR@100": final["AR100"], "best AP50 (step)": (best["AP50"], best["step"]),
            "train AP50": result["train"]["AP50"], "gap": result["train"]["AP50"] - final["AP50"]}


def ap50_at(curve: list[dict], seconds: float) -> float:
    """Held-out AP50 at a time, on the run's curve (0 before its first evaluation, its last after its end)."""
    times = [0.0] + [r["seconds"] for r in curve]
    return float(np.interp(seconds, times, [0.0] + [r["AP50"] for r in curve]))


def equal_time_rows(results: dict) -> list[dict]:
    """Each of ours against the best CNN (final AP50), at the shorter of the two runs' times."""
    cnns = {name: r for name, r in results.items() if name in CNN_DETECTORS}
    if not cnns:
        return []
    best_cnn = max(cnns, key=lambda name: cnns[name]["curve"][-1]["AP50"])
    rows = []
    for name, result in results.items():
        if name in CNN_DETECTORS:
            continue
        seconds = min(result["curve"][-1]["seconds"], cnns[best_cnn]["curve"][-1]["seconds"])
        ours, theirs = ap50_at(result["curve"], seconds), ap50_at(cnns[best_cnn]["curve"], seconds)
        rows.append({"detector": name, "against": best_cnn, "seconds": seconds, "AP50": ours, "their AP50": theirs,
                     "ratio": ours / theirs if theirs > 0 else float("nan")})
    return rows


def format_table(rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    """A markdown table; the first column is the row's name (a detector, a lever)."""
    def cell(column, value):
        if isinstance(value, (str, int)):
            return str(value)
        if column == "train s":
            return f"{value:.0f}"
        if column == "s/step":
            return f"{value:.2f}"
        if column == "best AP50 (step)":
            return f"{value[0]:.3f} ({value[1]})"
        return f"{value:+.3f}" if column == "gap" else f"{value:.3f}"

    lines = ["| " + " | ".join(columns) + " |", "|---" + "|---:" * (len(columns) - 1) + "|"]
    lines += ["| " + " | ".join(cell(c, r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def format_equal_time(rows: list[dict]) -> str:
    lines = ["| ours | against | at s | our AP50 | their AP50 | ratio |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['detector']} | {r['against']} | {r['seconds']:.0f} | {r['AP50']:.3f} | {r['their AP50']:.3f} | "
              f"{r['ratio']:.2f} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="a COCO 2017 layout folder (default: the stardist nuclei "
                        "tiles, built on first use under data/real/)")
    parser.add_argument("--fold", default="right", choices=("right", "left"), help="the stardist image's region "
                        "held out when --data-dir is not given (benchmarks.real_data.FOLDS)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps, every detector")
    parser.add_argument("--detectors", default=",".join(DEFAULT_DETECTORS),
                        help=f"comma-separated, of {', '.join([*DETR_PRESETS, *CNN_DETECTORS])}")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--scales", type=int, nargs="+", default=[112, 128, 144],
                        help="shortest edges drawn at training")
    parser.add_argument("--eval-size", type=int, default=128, help="shortest edge at evaluation")
    parser.add_argument("--max-size", type=int, default=224, help="longest edge")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-train-images", type=int, default=None, help="the first N training images only")
    parser.add_argument("--max-val-images", type=int, default=None, help="the first N held-out images only")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                        help="an override for our presets (repeatable), e.g. --set dropout=0.1")
    parser.add_argument("--label", default=None, help="a suffix for our presets' names in the table")
    parser.add_argument("--output-dir", default="outputs/bench_real")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.detectors.split(",") if name.strip()]
    unknown = [name for name in names if name not in DETR_PRESETS and name not in CNN_DETECTORS]
    if unknown:
        parser.error(f"unknown detector(s) {unknown}: choose from {', '.join([*DETR_PRESETS, *CNN_DETECTORS])}.")
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: give at least 1 optimizer step.")
    extra = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: write KEY=VALUE.")
        extra[key] = yaml.safe_load(value)
    output = Path(args.output_dir)
    if args.data_dir is None:
        from benchmarks.real_data import ensure

        data_dir = ensure(fold=args.fold)
    else:
        data_dir = Path(args.data_dir)
    files = subset(data_dir, output / "data", args.max_train_images, args.max_val_images)
    settings = {"steps": args.steps, "batch_size": args.batch_size, "scales": args.scales,
                "eval_size": args.eval_size, "max_size": args.max_size, "seed": args.seed}
    machine = format_machine(describe_machine())
    print(machine, flush=True)
    results, rows = {}, []
    for name in names:
        label = f"{name}{args.label}" if args.label and name in DETR_PRESETS else name
        print(f"== {label}: {args.steps} steps", flush=True)
        if name in DETR_PRESETS:
            result = train_detr(name, files, output / label, **settings, extra=extra)
        else:
            result = train_cnn(name, files, **settings)
        results[label] = result
        rows.append(row(label, result))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    table, equal = format_table(rows), format_equal_time(equal_time_rows(results))
    command = shlex.join(["python", "-m", "benchmarks.bench_real", *(sys.argv[1:] if argv is None else argv)])
    text = (f"{table}\n\nAt equal time (the best CNN's held-out AP50 on its curve):\n\n{equal}\n\n"
            f"data {data_dir}; {args.steps} optimizer steps of batch {args.batch_size}, scales {args.scales}, "
            f"evaluation at {args.eval_size}; AP, AP50, AR@100 on the held-out split at the last step; gap = "
            f"training-split AP50 - held-out AP50.\nCommand: `{command}`\n\n```\n{machine}\n```\n")
    output.mkdir(parents=True, exist_ok=True)
    (output / "bench_real.md").write_text(text)
    (output / "bench_real.json").write_text(json.dumps({"rows": rows, "results": results}, indent=1))
    print(f"\n{table}\n\n{equal}\n\nwritten: {output / 'bench_real.md'}", flush=True)
    return {"rows": rows, "results": results, "equal_time": equal_time_rows(results)}


if __name__ == "__main__":
    main()
