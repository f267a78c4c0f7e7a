"""Our presets against transformers' own DETRs, trained side by side from random weights on the demo data.

    .venv/bin/python -m benchmarks.bench_side_by_side [--steps 300] [--models ours-deformable,rt-detr-v2,...]
                                                      [--size 128] [--batch-size 8] [--learning-rate 1e-4]

Every model gets the same data, augmentation, batches (same seed), optimizer and number of steps, in one loop written
here, so that nothing but the model differs: AdamW (weight decay 1e-4) at one learning rate for every parameter,
linear warm-up over `--warmup-steps` then constant, gradient clipping 0.1. Images are resized to `--size` squares
(RT-DETR's way of feeding images: no padding, so the padded-box convention of each implementation cannot matter),
with a random horizontal flip at training; the pixel mask is all ones. Boxes are (cx, cy, w, h) normalized by the
image, which a square resize leaves unchanged. Each model is evaluated once at the end with pycocotools
(training/metrics.py) through its own implementation's post-processing, at threshold 0, boxes scaled to the original
image sizes.

Models (random weights, the sizes of the issue's reference run: width 128, 2 decoder layers, 30 queries):
- ours-detr, ours-deformable, ours-rtdetr: `DetrCustomConfig.from_preset(...)` with a from-scratch timm ResNet-18 and
  trainable BatchNorm (as training/configs/demo_scratch.yaml).
- detr: transformers' `DetrForObjectDetection` with timm's ResNet-18 (`use_timm_backbone`), BatchNorm frozen as
  transformers does for DETR.
- rt-detr-v2: transformers' `RTDetrV2ForObjectDetection` with its ResNet-18-vd (RT-DETR's own backbone, the closest it
  has to ours), BatchNorm trainable.
- d-fine: transformers' `DFineForObjectDetection` (Peng et al. 2024: fine-grained distribution refinement of the
  boxes, on RT-DETR's encoder and query selection) with the same ResNet-18-vd and sizes as rt-detr-v2.
- lw-detr: transformers' `LwDetrForObjectDetection` (Chen et al. 2024) with its own ViT backbone at the tiny size
  (its backbone is a ViT only), 13 query groups (its default), images of 128 pixels.

Prints one markdown table (model, AP, AP50, AR@100, s/step, wall time), also written to OUTPUT_DIR/side_by_side.md.
The timings are for the training steps only, on this machine (benchmarks/machine.py's header says which).
"""
import argparse
import math
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from benchmarks.machine import describe_machine, format_machine

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
WIDTH, DECODER_LAYERS, QUERIES, FFN = 128, 2, 30, 512
MODELS = ("ours-detr", "ours-deformable", "ours-rtdetr", "detr", "rt-detr-v2", "d-fine", "lw-detr")
SIZE_FOR_LW_DETR = 128   # its ViT's absolute position embeddings are built for one image size


def load_demo_data(data_dir: Path):
    """The embedded demo dataset (written if the folder has none): train and val rows, and the categories."""
    from training.data.coco import load_coco
    from training.data.schema import get_categories
    from training.sample_data import write_sample_dataset

    if not (data_dir / "annotations" / "instances_val2017.json").is_file():
        write_sample_dataset(data_dir)
    train, val = load_coco(data_dir, "train"), load_coco(data_dir, "val")
    return train, val, get_categories(train)


def to_example(row, size: int, flip: bool, category_to_label: dict) -> tuple[torch.Tensor, dict]:
    """One dataset row -> ([3, size, size] normalized pixels, labels dict); crowd regions left out of the targets."""
    image = row["image"].convert("RGB")
    width, height = image.size
    pixels = torch.from_numpy(np.asarray(image.resize((size, size), PIL.Image.BILINEAR), dtype=np.float32) / 255)
    pixels = (pixels.permute(2, 0, 1) - IMAGENET_MEAN) / IMAGENET_STD
    objects = row["objects"]
    keep = [i for i, crowd in enumerate(objects["iscrowd"]) if not crowd]
    boxes = torch.tensor([objects["bbox"][i] for i in keep], dtype=torch.float32).reshape(-1, 4)   # x, y, w, h
    boxes_cxcywh = torch.stack([(boxes[:, 0] + boxes[:, 2] / 2) / width, (boxes[:, 1] + boxes[:, 3] / 2) / height,
                                boxes[:, 2] / width, boxes[:, 3] / height], -1).clamp(0, 1)
    if flip:
        pixels = pixels.flip(-1)
        boxes_cxcywh[:, 0] = 1 - boxes_cxcywh[:, 0]
    classes = torch.tensor([category_to_label[objects["category_id"][i]] for i in keep], dtype=torch.int64)
    return pixels, {"class_labels": classes, "boxes": boxes_cxcywh}


def batches(dataset, steps: int, batch_size: int, size: int, seed: int, category_to_label: dict):
    """`steps` training batches: epochs of a seeded shuffle, a seeded flip per image; the same for every model."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.permutation(len(dataset)).tolist()
        rows, order = order[:batch_size], order[batch_size:]
        examples = [to_example(dataset[i], size, bool(rng.random() < 0.5), category_to_label) for i in rows]
        yield torch.stack([pixels for pixels, _ in examples]), [labels for _, labels in examples]


def build(name: str, num_labels: int, id2label: dict):
    """(model, post_process(outputs, target_sizes) -> per image {"scores", "labels", "boxes"} in xyxy pixels)."""
    if name.startswith("ours-"):
        from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection, DetrCustomImageProcessor

        preset = name.removeprefix("ours-")
        config = DetrCustomConfig.from_preset(
            preset, backbone="resnet18", use_pretrained_backbone=False, freeze_batch_norm=False,
            freeze_backbone_stem=False, d_model=WIDTH, encoder_layers=1 if preset != "detr" else 2,
            decoder_layers=DECODER_LAYERS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, num_queries=QUERIES,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, num_labels=num_labels, id2label=id2label,
            **({"num_denoising": 50} if preset == "rtdetr" else {}))
        processor = DetrCustomImageProcessor()
        return DetrCustomForObjectDetection(config), lambda outputs, sizes: processor.post_process_object_detection(
            outputs, threshold=0.0, target_sizes=sizes)
    if name == "detr":
        from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor

        config = DetrConfig(use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False, d_model=WIDTH,
                            encoder_layers=2, decoder_layers=DECODER_LAYERS, encoder_ffn_dim=FFN,
                            decoder_ffn_dim=FFN, encoder_attention_heads=8, decoder_attention_heads=8,
                            num_queries=QUERIES, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                            num_labels=num_labels, id2label=id2label)
        processor = DetrImageProcessor()
        return DetrForObjectDetection(config), lambda outputs, sizes: processor.post_process_object_detection(
            outputs, threshold=0.0, target_sizes=sizes)
    if name in ("rt-detr-v2", "d-fine"):
        from transformers import (DFineConfig, DFineForObjectDetection, RTDetrImageProcessor, RTDetrResNetConfig,
                                  RTDetrV2Config, RTDetrV2ForObjectDetection)

        # the same ResNet-18-vd, sizes and 50 denoising queries for both RT-DETR-family models
        backbone = RTDetrResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                                      downsample_in_bottleneck=False, out_features=["stage2", "stage3", "stage4"])
        config_class, model_class = ((RTDetrV2Config, RTDetrV2ForObjectDetection) if name == "rt-detr-v2"
                                     else (DFineConfig, DFineForObjectDetection))
        config = config_class(backbone_config=backbone, freeze_backbone_batch_norms=False,
                              encoder_in_channels=[128, 256, 512], encoder_hidden_dim=WIDTH, d_model=WIDTH,
                              encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, decoder_layers=DECODER_LAYERS,
                              num_queries=QUERIES, num_denoising=50, hidden_expansion=0.5,
                              decoder_in_channels=[WIDTH] * 3, num_labels=num_labels, id2label=id2label)
        processor = RTDetrImageProcessor()
        return model_class(config), lambda outputs, sizes: processor.post_process_object_detection(
            outputs, threshold=0.0, target_sizes=sizes, use_focal_loss=True)
    if name == "lw-detr":
        from transformers import DeformableDetrImageProcessor, LwDetrConfig, LwDetrForObjectDetection, LwDetrViTConfig

        # its ViT backbone, the tiny size (LW-DETR-tiny: 192 wide, 6 layers, windowed attention in some blocks)
        backbone = LwDetrViTConfig(image_size=SIZE_FOR_LW_DETR, hidden_size=192, num_hidden_layers=6,
                                   num_attention_heads=3, window_block_indices=[0, 2, 4], out_indices=[2, 4, 5, 6],
                                   num_windows=4)
        config = LwDetrConfig(backbone_config=backbone, d_model=WIDTH, decoder_layers=DECODER_LAYERS,
                              decoder_ffn_dim=FFN, num_queries=QUERIES, projector_scale_factors=[1.0],
                              num_labels=num_labels, id2label=id2label)
        processor = DeformableDetrImageProcessor()
        return LwDetrForObjectDetection(config), lambda outputs, sizes: processor.post_process_object_detection(
            outputs, threshold=0.0, target_sizes=sizes, top_k=100)
    raise ValueError(f"unknown model {name!r}: choose from {', '.join(MODELS)}.")


def train_and_evaluate(name: str, train, val, categories, args) -> dict:
    torch.manual_seed(args.seed)
    model, post_process = build(name, len(categories.names), categories.id2label)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / args.warmup_steps))
    category_to_label = categories.category_id_to_label
    started, step_seconds = time.perf_counter(), []
    torch.manual_seed(args.seed)   # again: the models' builds draw different amounts; training starts equal
    stream = batches(train, args.steps, args.batch_size, args.size, args.seed, category_to_label)
    for step, (pixel_values, labels) in enumerate(stream):
        tick = time.perf_counter()
        pixel_mask = torch.ones(pixel_values.shape[0], args.size, args.size, dtype=torch.int64)
        loss = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        scheduler.step()
        step_seconds.append(time.perf_counter() - tick)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{name}: the loss is {loss.item()} at step {step}")
    metrics = evaluate(model, post_process, val, categories, args)
    return {"model": name, "AP": metrics["AP"], "AP50": metrics["AP50"], "AR@100": metrics["AR100"],
            "s/step": float(np.median(step_seconds[len(step_seconds) // 10:])),
            "wall time": time.perf_counter() - started}


@torch.no_grad()
def evaluate(model, post_process, val, categories, args) -> dict:
    from training.metrics import evaluate_coco

    model.eval()
    predictions, references = [], []
    for start in range(0, len(val), 16):
        rows = [val[i] for i in range(start, min(start + 16, len(val)))]
        pixel_values = torch.stack([to_example(row, args.size, False, categories.category_id_to_label)[0]
                                    for row in rows])
        pixel_mask = torch.ones(len(rows), args.size, args.size, dtype=torch.int64)
        outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        sizes = [(row["image"].height, row["image"].width) for row in rows]
        for row, result in zip(rows, post_process(outputs, sizes)):
            predictions.append({"image_id": row["image_id"], **{k: v.tolist() for k, v in result.items()}})
            references.append({"image_id": row["image_id"], "objects": row["objects"]})
    categories_list = [{"id": i, "name": n} for i, n in zip(categories.ids, categories.names)]
    metrics, _ = evaluate_coco(predictions, references, categories_list)
    return metrics


def format_table(rows: list[dict]) -> str:
    lines = ["| model | AP | AP50 | AR@100 | s/step | wall time |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['AP']:.3f} | {row['AP50']:.3f} | {row['AR@100']:.3f} | "
                     f"{row['s/step']:.2f} | {row['wall time']:.0f} s |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--size", type=int, default=128, help="square side the images are resized to")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data-dir", default="data/demo")
    parser.add_argument("--output-dir", default="outputs/bench_side_by_side")
    args = parser.parse_args(argv)
    names = [name for name in args.models.split(",") if name]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}: choose from {', '.join(MODELS)}")
    if "lw-detr" in names and args.size != SIZE_FOR_LW_DETR:
        parser.error(f"lw-detr's ViT is built for --size {SIZE_FOR_LW_DETR} (absolute position embeddings); leave "
                     "lw-detr out of --models or use that size")
    print(format_machine(describe_machine(None)), flush=True)
    train, val, categories = load_demo_data(Path(args.data_dir))
    rows = []
    for name in names:
        print(f"== {name}: {args.steps} steps", flush=True)
        rows.append(train_and_evaluate(name, train, val, categories, args))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    table = format_table(rows)
    command = "python -m benchmarks.bench_side_by_side " + " ".join(argv if argv is not None else [])
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "side_by_side.md").write_text(f"{command}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
