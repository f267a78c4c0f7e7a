"""Load time of a COCO-sized annotation file: first build vs cached reload (``training.data.load_coco``).

Writes a synthetic ``instances_train2017.json`` with full COCO train's counts (118,287 images, 860,001 boxes,
80 categories with COCO's ids) and a polygon per box, so the file is of the same order of size as the real one
(448 MB with its longer polygons). No image files: loading never opens them.

    python -m benchmarks.bench_load_coco [--num-images 118287 --num-boxes 860001 --workdir /tmp/coco_bench]
"""
import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from training.data import load_coco

COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def write_annotations(path: Path, num_images: int, num_boxes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    widths, heights = rng.integers(300, 641, num_images), rng.integers(300, 641, num_images)
    image_ids = rng.choice(600_000, num_images, replace=False)                 # COCO ids are sparse, unsorted
    images = [{"id": int(i), "file_name": f"{i:012d}.jpg", "width": int(w), "height": int(h), "license": 1}
              for i, w, h in zip(image_ids, widths, heights)]
    owner = rng.integers(0, num_images, num_boxes)                             # some images get no box
    x, y = rng.uniform(0, 0.7, num_boxes), rng.uniform(0, 0.7, num_boxes)
    w, h = rng.uniform(0.02, 0.3, num_boxes), rng.uniform(0.02, 0.3, num_boxes)
    categories = rng.choice(COCO_CATEGORY_IDS, num_boxes)
    crowd = rng.random(num_boxes) < 0.01
    annotations = []
    for k in range(num_boxes):
        iw, ih = widths[owner[k]], heights[owner[k]]
        bx, by, bw, bh = (round(float(v), 2) for v in (x[k] * iw, y[k] * ih, w[k] * iw, h[k] * ih))
        angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
        polygon = np.stack([bx + bw / 2 * (1 + np.cos(angles)), by + bh / 2 * (1 + np.sin(angles))], 1)
        annotations.append({"id": k + 1, "image_id": int(image_ids[owner[k]]), "category_id": int(categories[k]),
                            "bbox": [bx, by, bw, bh], "area": round(bw * bh * 0.7, 2), "iscrowd": int(crowd[k]),
                            "segmentation": [np.round(polygon.ravel(), 2).tolist()]})
    coco = {"info": {"description": "synthetic COCO-sized benchmark file"}, "licenses": [], "images": images,
            "annotations": annotations, "categories": [{"id": c, "name": f"class_{c}"} for c in COCO_CATEGORY_IDS]}
    with open(path, "w") as f:
        json.dump(coco, f)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=118_287)
    parser.add_argument("--num-boxes", type=int, default=860_001)
    parser.add_argument("--workdir", default=None, help="kept when given; a temporary folder otherwise")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="coco_bench_"))
    root, cache = workdir / "coco", workdir / "cache"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(cache, ignore_errors=True)
    path = root / "annotations" / "instances_train2017.json"
    params = workdir / "params.json"
    wanted = json.dumps({"num_images": args.num_images, "num_boxes": args.num_boxes})
    if not (path.is_file() and params.is_file() and params.read_text() == wanted):
        start = time.perf_counter()
        write_annotations(path, args.num_images, args.num_boxes)
        params.write_text(wanted)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    with open(path) as f:
        json.load(f)
    print(f"json.load alone ({path.stat().st_size / 2**20:.0f} MiB): {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    dataset = load_coco(root, "train", cache_dir=cache)
    first = time.perf_counter() - start
    start = time.perf_counter()
    dataset = load_coco(root, "train", cache_dir=cache)
    reload = time.perf_counter() - start
    start = time.perf_counter()
    num_boxes = 0
    for batch in dataset.select_columns(["objects"]).iter(batch_size=10_000):
        num_boxes += sum(len(objects["id"]) for objects in batch["objects"])
    scan = time.perf_counter() - start
    assert len(dataset) == args.num_images and num_boxes == args.num_boxes, (len(dataset), num_boxes)
    print(f"{len(dataset)} images, {num_boxes} boxes")
    print(f"first load (parse json + build + write arrow): {first:.1f} s")
    print(f"cached reload (memory-mapped, json not opened): {reload * 1000:.1f} ms")
    print(f"one pass over all objects (batches of 10k rows):  {scan:.1f} s")
    if args.workdir is None:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
