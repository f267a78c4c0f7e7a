"""DetrCustomImageProcessor vs transformers' DetrImageProcessor (torchvision backend) and DetrImageProcessorPil.

    .venv/bin/python -m benchmarks.bench_image_processing [--images 16] [--rounds 7] [--threads N]

Same COCO-sized images (640x480 and 480x640 mixed -> resized to 800x1066 and 1066x800, padded to 1066x1066) and the
same 5-20 boxes each, for all three processors in one run. Rounds are interleaved (ours, torch, PIL, ours, ...) so
load from other processes hits all three alike; we print the median time of a call, images/s, the ratios, and how
the outputs differ: pixel_mask and labels must be identical, pixel_values differ only by interpolation.

Labels are compared after undoing transformers' padded-size box normalization (transformers#28363): we normalize
by the visible image (docs/ARCHITECTURE.md), so ``boxes_transformers * padded_size / visible_size`` must equal ours,
and our ``size`` is the visible size where transformers reports the padded one.
"""
import argparse
import os
import time

import numpy as np
import PIL.Image
import torch
from transformers import DetrImageProcessor
from transformers.models.detr.image_processing_pil_detr import DetrImageProcessorPil

from modeling_detr_custom.image_processing_detr_custom import DetrCustomImageProcessor


def make_data(num_images: int, seed: int = 0):
    """Smooth-ish random photos (noise is the worst case for nothing, but photos are not noise) + COCO boxes."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(num_images):
        height, width = (480, 640) if i % 2 == 0 else (640, 480)
        coarse = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        image = PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BICUBIC)
        pixels = np.asarray(image).astype(np.int16) + rng.integers(-8, 9, (height, width, 3))
        images.append(PIL.Image.fromarray(pixels.clip(0, 255).astype(np.uint8)))
        objects = []
        for _ in range(rng.integers(5, 21)):
            x, y = rng.uniform(0, width - 10), rng.uniform(0, height - 10)
            w, h = rng.uniform(1, width - x), rng.uniform(1, height - y)
            objects.append({"bbox": [x, y, w, h], "category_id": int(rng.integers(1, 91)), "area": w * h,
                            "iscrowd": 0})
        annotations.append({"image_id": i, "annotations": objects})
    return images, annotations


def compare(ours, reference) -> dict:
    """Differences between our batch and a transformers batch (labels converted to the visible-image convention)."""
    assert torch.equal(ours["pixel_mask"], reference["pixel_mask"]), "pixel_mask differs"
    padded_h, padded_w = reference["pixel_values"].shape[-2:]
    for mine, theirs, mask in zip(ours["labels"], reference["labels"], ours["pixel_mask"]):
        for key in ("class_labels", "area", "iscrowd", "orig_size", "image_id"):
            assert torch.equal(mine[key], theirs[key]), f"labels[{key!r}] differ"
        visible_h, visible_w = int(mask[:, 0].sum()), int(mask[0].sum())
        assert mine["size"].tolist() == [visible_h, visible_w], "size is not the visible size"
        scale = torch.tensor([padded_w / visible_w, padded_h / visible_h] * 2)
        torch.testing.assert_close(mine["boxes"], theirs["boxes"] * scale, rtol=1e-6, atol=1e-6)
    diff = (ours["pixel_values"] - reference["pixel_values"]).abs()
    return {"max": diff.max().item(), "mean": diff.mean().item()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (DataLoader workers run with 1); default: torch's own")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    images, annotations = make_data(args.images)
    processors = {
        "ours (DetrCustomImageProcessor)": DetrCustomImageProcessor(),
        "transformers DetrImageProcessor (torch)": DetrImageProcessor(),
        "transformers DetrImageProcessorPil": DetrImageProcessorPil(),
    }
    outputs = {name: p(images, annotations=annotations, return_tensors="pt") for name, p in processors.items()}  # warm
    times = {name: [] for name in processors}
    for _ in range(args.rounds):
        for name, processor in processors.items():
            start = time.perf_counter()
            processor(images, annotations=annotations, return_tensors="pt")
            times[name].append(time.perf_counter() - start)

    print(f"{args.images} images (640x480 / 480x640, 5-20 boxes each), {args.rounds} interleaved rounds, "
          f"torch threads: {torch.get_num_threads()}, load average: {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs (other processes slow transformers' torch backend most)")
    medians = {name: float(np.median(t)) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    ours_name = next(iter(processors))
    for name, median in medians.items():
        line = (f"  {name:40s} median {median * 1e3:7.1f} ms ({args.images / median:6.1f} images/s), "
                f"best {best[name] * 1e3:7.1f} ms")
        if name != ours_name:
            line += (f"   ours is {median / medians[ours_name]:4.2f}x faster (median), "
                     f"{best[name] / best[ours_name]:4.2f}x (best)")
        print(line)
    for name in list(processors)[1:]:
        diff = compare(outputs[ours_name], outputs[name])
        print(f"  vs {name}: pixel_mask identical, labels identical (visible-image boxes); "
              f"pixel_values abs diff max {diff['max']:.3g} mean {diff['mean']:.3g}")


if __name__ == "__main__":
    main()
