"""A small real detection dataset in the COCO layout, built from an image that ships inside a registry package.

    .venv/bin/python -m benchmarks.real_data [--output-dir data/real/stardist_nuclei]

The source is the fluorescence microscopy image of cell nuclei and its hand-made instance masks that the `stardist`
wheel carries (`stardist/data/images/img2d.tif`, `mask2d.tif`; 512 x 512, 125 nuclei): an image of the 2018 Data
Science Bowl (Caicedo et al. 2019, "Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl",
Nature Methods 16; the image set BBBC038 of the Broad Bioimage Benchmark Collection, released under CC0). stardist
itself is BSD-3-Clause. The files are read from the installed package (`pip install stardist`, or the `bench` extra);
nothing is downloaded, and the image is not imported as a module (stardist's own import pulls numba).

Each nucleus mask becomes its bounding box (one class, "nucleus"). The image is split by columns, two ways (FOLDS):
in fold "right" the left part (x < 304) gives the training tiles, 128 x 128 px with overlap (35 tiles), the right
part (x >= 320) the held-out tiles, 192 wide x 128 high without overlap (4 tiles); fold "left" is its mirror image
(held out x < 192, training x >= 208). The 16 px gap between the two parts of a fold keeps a nucleus from being seen
in both; the two folds' held-out regions do not overlap, so together they hold out 8 tiles (99 boxes) of different
nuclei. A nucleus cut by a tile's edge keeps its clipped box when at least MIN_VISIBLE of its box is inside, and is
left out otherwise. Pixels: 16-bit with values up to ~235, scaled to 8 bits by the image's 99.8th
percentile and stored as 8-bit grayscale PNGs.

The result, under the output folder, is the COCO 2017 layout `training.train --data_dir` reads:
`annotations/instances_{train,val}2017.json` and `{train,val}2017/*.png`. Building is deterministic and idempotent.
"""
import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import PIL.Image
from scipy import ndimage

DEFAULT_DIR = Path("data/real/stardist_nuclei")   # fold "right"; other folds: DEFAULT_DIR + "_" + fold
SOURCE = "stardist/data/images/img2d.tif + mask2d.tif (the stardist wheel); 2018 Data Science Bowl (BBBC038, CC0)"
TILE = 128                     # training tiles: TILE x TILE
WIDTH = 512
# fold -> (training columns [start, stop), held-out columns [start, stop)): 16 px between, no shared nucleus
FOLDS = {"right": ((0, 304), (320, 512)), "left": ((208, 512), (0, 192))}
TRAIN_COLUMNS, TRAIN_ROWS = 5, 7
MIN_VISIBLE = 0.4              # a cut nucleus is labelled when this fraction of its box lies in the tile
CATEGORIES = [{"id": 1, "name": "nucleus", "supercategory": "cell"}]


def stardist_files() -> tuple[Path, Path]:
    """The image and mask files inside the installed stardist package (found without importing it)."""
    spec = importlib.util.find_spec("stardist")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the real-data benchmark reads its images from the stardist package, which is not "
                         "installed: `pip install -e '.[bench]'` (or `pip install stardist`).")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "images"
    image, mask = folder / "img2d.tif", folder / "mask2d.tif"
    for path in (image, mask):
        if not path.is_file():
            raise ValueError(f"{path} is missing from the installed stardist package: reinstall stardist (>= 0.9).")
    return image, mask


def load_source() -> tuple[np.ndarray, np.ndarray]:
    """(image [512, 512] uint8, instance labels [512, 512] int: 0 background, 1..N nuclei)."""
    image_file, mask_file = stardist_files()
    raw = np.asarray(PIL.Image.open(image_file)).astype(np.float32)
    labels = np.asarray(PIL.Image.open(mask_file)).astype(np.int64)
    high = float(np.percentile(raw, 99.8))
    image = np.clip(raw * (255.0 / high), 0, 255).round().astype(np.uint8)
    return image, labels


def instance_boxes(labels: np.ndarray) -> np.ndarray:
    """[num_instances, 4] x0, y0, x1, y1 (pixel edges, exclusive end) of every label > 0."""
    boxes = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(labels) if s is not None]
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def tile_annotations(boxes: np.ndarray, left: int, top: int, width: int, height: int) -> list[list[float]]:
    """The COCO [x, y, w, h] boxes of the nuclei in a tile: clipped, those mostly outside left out."""
    clipped = np.clip(boxes - [left, top, left, top], 0, [width, height, width, height])
    visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    full = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = (visible >= MIN_VISIBLE * full) & (visible > 0)
    return [[float(x0), float(y0), float(x1 - x0), float(y1 - y0)] for x0, y0, x1, y1 in clipped[keep]]


def check_fold(fold: str) -> str:
    if fold not in FOLDS:
        raise ValueError(f"unknown fold {fold!r}: choose from {', '.join(FOLDS)}.")
    return fold


def fold_dir(fold: str = "right") -> Path:
    """The default folder of a fold: DEFAULT_DIR for "right", DEFAULT_DIR_<fold> for the others."""
    check_fold(fold)
    return DEFAULT_DIR if fold == "right" else DEFAULT_DIR.with_name(f"{DEFAULT_DIR.name}_{fold}")


def tile_grid(fold: str = "right") -> dict[str, list[tuple[int, int, int, int]]]:
    """(left, top, width, height) of each tile, per split."""
    (train_start, train_stop), (held_start, held_stop) = FOLDS[check_fold(fold)]
    lefts = np.linspace(train_start, train_stop - TILE, TRAIN_COLUMNS).round().astype(int)
    tops = np.linspace(0, WIDTH - TILE, TRAIN_ROWS).round().astype(int)
    train = [(int(x), int(y), TILE, TILE) for y in tops for x in lefts]
    val = [(held_start, top, held_stop - held_start, TILE) for top in range(0, WIDTH, TILE)]
    return {"train": train, "val": val}


def build(output_dir: str | Path | None = None, fold: str = "right") -> Path:
    """Writes the COCO folder of a fold (both splits) and returns it."""
    output_dir = Path(output_dir) if output_dir is not None else fold_dir(fold)
    image, labels = load_source()
    boxes = instance_boxes(labels)
    (output_dir / "annotations").mkdir(parents=True, exist_ok=True)
    for split, tiles in tile_grid(fold).items():
        folder = output_dir / f"{split}2017"
        folder.mkdir(exist_ok=True)
        images, annotations = [], []
        for index, (left, top, width, height) in enumerate(tiles):
            name = f"nuclei_{split}_{index:02d}_x{left}_y{top}.png"
            PIL.Image.fromarray(image[top:top + height, left:left + width]).save(folder / name)
            image_id = index + 1
            images.append({"id": image_id, "file_name": name, "width": width, "height": height})
            for box in tile_annotations(boxes, left, top, width, height):
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "bbox": box,
                                    "area": box[2] * box[3], "iscrowd": 0})
        coco = {"info": {"description": f"stardist nuclei tiles ({split}, fold {fold})", "source": SOURCE},
                "licenses": [{"id": 1, "name": "CC0 1.0 (BBBC038)"}],
                "images": images, "annotations": annotations, "categories": CATEGORIES}
        (output_dir / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco))
    return output_dir


def ensure(output_dir: str | Path | None = None, fold: str = "right") -> Path:
    """The folder of a fold, built first if its annotation files are missing."""
    output_dir = Path(output_dir) if output_dir is not None else fold_dir(fold)
    if not all((output_dir / "annotations" / f"instances_{s}2017.json").is_file() for s in ("train", "val")):
        build(output_dir, fold)
    return output_dir


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fold", default="right", choices=list(FOLDS), help="which region is held out")
    parser.add_argument("--output-dir", default=None, help=f"default: {DEFAULT_DIR} (fold right), "
                        f"{DEFAULT_DIR}_left (fold left)")
    args = parser.parse_args(argv)
    output_dir = build(args.output_dir, args.fold)
    for split in ("train", "val"):
        coco = json.loads((output_dir / "annotations" / f"instances_{split}2017.json").read_text())
        print(f"{split}: {len(coco['images'])} images, {len(coco['annotations'])} boxes -> {output_dir}")
    return output_dir


if __name__ == "__main__":
    main()
