"""DETR augmentations move boxes exactly with the pixels; the recipe is the paper's and deterministic under a seed."""
import itertools

import numpy as np
import PIL.Image
import pytest
from transformers.image_transforms import get_size_with_aspect_ratio

from modeling_detr_custom import DetrCustomImageProcessor
from modeling_detr_custom.image_processing_detr_custom import get_resize_output_size
from training.data import DetrCollator
from training.transforms import (
    PAPER_SCALES, BatchTransforms, Compose, Mosaic, PhotometricDistort, RandomHorizontalFlip, RandomIoUCrop,
    RandomResize, RandomRotate90, RandomSizeCrop, RandomVerticalFlip, RandomZoomOut, ScaleJitter, crop, hflip,
    make_detr_transforms, objects_to_target, resize, rotate90, target_to_annotations, vflip, with_augmentations,
)


def rectangle_image(width, height, boxes_xyxy):
    """Black image with each box filled white over the pixels [x0, x1) x [y0, y1)."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    for x0, y0, x1, y1 in boxes_xyxy:
        pixels[y0:y1, x0:x1] = 255
    return PIL.Image.fromarray(pixels)


def make_target(boxes_xyxy):
    boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    n = len(boxes)
    return {"boxes_xyxy": boxes, "category_id": np.arange(n, dtype=np.int64) + 3,
            "area": ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(np.float32),
            "iscrowd": np.array([1] + [0] * (n - 1), dtype=np.int64)[:n], "id": np.arange(n, dtype=np.int64) + 100}


def foreground_box(image, threshold=128):
    """[x0, y0, x1, y1) of the pixels brighter than threshold."""
    mask = np.asarray(image.convert("L")) > threshold
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_objects_round_trip_to_processor_annotations():
    objects = {"id": [7, 8], "bbox": [[10, 20, 30, 40], [0, 0, 5, 6]], "category_id": [3, 12], "area": [900, 25],
               "iscrowd": [0, 1]}
    target = objects_to_target(objects)
    assert target["boxes_xyxy"].tolist() == [[10, 20, 40, 60], [0, 0, 5, 6]]
    annotations = target_to_annotations(5, target)
    assert annotations == {"image_id": 5, "annotations": [
        {"bbox": [10.0, 20.0, 30.0, 40.0], "category_id": 3, "area": 900.0, "iscrowd": 0},
        {"bbox": [0.0, 0.0, 5.0, 6.0], "category_id": 12, "area": 25.0, "iscrowd": 1}]}


def test_hflip_moves_box_with_pixels():
    image = rectangle_image(100, 60, [(10, 5, 30, 25)])
    flipped, target = hflip(image, make_target([(10, 5, 30, 25)]))
    assert target["boxes_xyxy"].tolist() == [[70, 5, 90, 25]]
    assert foreground_box(flipped) == [70, 5, 90, 25]
    assert target["area"].tolist() == [400]


def test_resize_scales_boxes_and_area_with_pixels():
    image = rectangle_image(100, 50, [(20, 10, 60, 30)])
    resized, target = resize(image, make_target([(20, 10, 60, 30)]), shortest_edge=100)
    assert resized.size == (200, 100)
    assert target["boxes_xyxy"].tolist() == [[40, 20, 120, 60]]
    assert target["area"].tolist() == [800 * 4]
    assert np.allclose(foreground_box(resized), [40, 20, 120, 60], atol=1)


def detr_size_with_aspect_ratio(image_size, size, max_size=None):
    """facebookresearch/detr datasets/transforms.py get_size_with_aspect_ratio, verbatim: (w, h) -> (h, w)."""
    w, h = image_size
    if max_size is not None:
        min_original_size = float(min((w, h)))
        max_original_size = float(max((w, h)))
        if max_original_size / min_original_size * size > max_size:
            size = int(round(max_size * min_original_size / max_original_size))
    if (w <= h and w == size) or (h <= w and h == size):
        return (h, w)
    if w < h:
        ow = size
        oh = int(size * h / w)
    else:
        oh = size
        ow = int(size * w / h)
    return (oh, ow)


def is_capped(width, height, shortest, max_size):
    return max_size is not None and max(width, height) / min(width, height) * shortest > max_size


@pytest.mark.parametrize("size,shortest,max_size,expected", [
    ((640, 480), 800, 1333, (1066, 800)),       # matches facebookresearch/detr get_size_with_aspect_ratio
    ((480, 640), 800, 1333, (800, 1066)),
    ((2000, 500), 800, 1333, (1333, 333)),      # the longest edge caps the shortest (the original: 1332)
    ((800, 600), 600, None, (800, 600)),        # already the right size
    ((90, 30), 96, 224, (224, 75)),             # capped: the long side stays <= max_size (the original: 225)
])
def test_resize_matches_original_rounding(size, shortest, max_size, expected):
    resized, _ = resize(rectangle_image(*size, []), make_target([]), shortest, max_size)
    assert resized.size == expected


# odd sizes, elongated ones (capped by max_size), and the demo's (train_scales 112/128/144 and eval 128, max 224)
SIDES = (1, 2, 3, 7, 30, 33, 90, 97, 143, 144, 150, 161, 187, 192, 225, 301, 399, 1333, 2001)
SHORTEST = (1, 64, 96, 112, 128, 144, 800)
MAX_SIZES = (None, 96, 160, 224, 1333)


def test_training_resize_and_processor_share_one_rule():
    """Training and the processor size every image alike (transformers' rounding); both equal facebookresearch/detr's
    sizes unless max_size caps, where only the long side may differ (the original's can exceed max_size)."""
    capped = differ_from_original = 0
    for width, height, shortest, max_size in itertools.product(SIDES, SIDES, SHORTEST, MAX_SIZES):
        size = {"shortest_edge": shortest, "longest_edge": max_size} if max_size else {"shortest_edge": shortest}
        rule = get_resize_output_size(height, width, size)
        assert rule == get_size_with_aspect_ratio((height, width), shortest, max_size) or 0 in (
            get_size_with_aspect_ratio((height, width), shortest, max_size))   # transformers gives 0 px; we give 1
        original = detr_size_with_aspect_ratio((width, height), shortest, max_size)
        if 0 in original:
            # so elongated that the short side rounds to 0 (both references fail there): one pixel, long side capped
            assert rule == ((1, max_size) if height < width else (max_size, 1))
            continue
        if not is_capped(width, height, shortest, max_size):
            assert rule == original, (width, height, shortest, max_size)
            continue
        capped += 1
        short_axis = 0 if height <= width else 1
        # the long side stays within max_size, unless the image already has the capped short side (kept as is)
        assert rule[short_axis] == original[short_axis]
        assert max(rule) <= max_size or rule == (height, width)
        differ_from_original += rule != original
    assert capped > 1000 and differ_from_original > 500


@pytest.mark.parametrize("width, height, shortest, max_size", [
    (144, 192, 112, 224), (192, 144, 144, 224), (161, 187, 128, 224), (150, 150, 128, 224),  # the demo's sizes
    (33, 7, 96, 1333), (97, 301, 64, None), (1, 3, 2, None), (2001, 1333, 800, 1333), (301, 90, 128, 1333),
])
def test_training_resize_gives_the_processors_image_size(width, height, shortest, max_size):
    """The PIL image that training's resize makes has the size the processor resizes the same image to."""
    image = rectangle_image(width, height, [])
    resized, _ = resize(image, make_target([]), shortest, max_size)
    processor = DetrCustomImageProcessor(size={"shortest_edge": shortest, "longest_edge": max_size})
    assert tuple(processor(image)["pixel_values"].shape[-2:]) == (resized.height, resized.width)


def test_training_resize_and_processor_agree_where_max_size_caps():
    image = rectangle_image(90, 30, [])   # capped: 90 / 30 * 96 > 224
    resized, _ = resize(image, make_target([]), 96, 224)
    processor = DetrCustomImageProcessor(size={"shortest_edge": 96, "longest_edge": 224})
    assert resized.size == (224, 75)                                      # 74.67 * 90 / 30, not the original's 225
    assert tuple(processor(image)["pixel_values"].shape[-2:]) == (75, 224)


def test_crop_clips_and_drops_boxes_consistently_with_pixels():
    boxes = [(10, 10, 40, 30), (50, 35, 90, 55), (0, 0, 5, 5)]   # inside, cut by the crop, outside the crop
    image = rectangle_image(100, 60, boxes)
    cropped, target = crop(image, make_target(boxes), top=8, left=8, height=40, width=60)
    assert cropped.size == (60, 40)
    # box 2 leaves the crop; box 1 is clipped to the crop's right/bottom edges; categories/crowd/ids follow
    assert target["boxes_xyxy"].tolist() == [[2, 2, 32, 22], [42, 27, 60, 40]]
    assert target["category_id"].tolist() == [3, 4]
    assert target["iscrowd"].tolist() == [1, 0]
    assert target["id"].tolist() == [100, 101]
    assert target["area"].tolist() == [30 * 20, 18 * 13]   # recomputed from the clipped box, as the original does
    pixels = np.asarray(cropped.convert("L")) > 128
    for x0, y0, x1, y1 in target["boxes_xyxy"].astype(int):
        assert pixels[y0:y1, x0:x1].all()
    covered = np.zeros_like(pixels)
    for x0, y0, x1, y1 in target["boxes_xyxy"].astype(int):
        covered[y0:y1, x0:x1] = True
    assert (pixels == covered).all()


def test_random_pipeline_keeps_boxes_on_their_pixels():
    transforms = make_detr_transforms("train", scales=range(96, 161, 16), max_size=256,
                                      crop_resize_scales=(96, 128), crop_size=(64, 120))
    rng = np.random.default_rng(0)
    kept = 0
    for _ in range(30):
        box = (30, 20, 70, 60)
        image, target = transforms(rectangle_image(120, 90, [box]), make_target([box]), rng)
        assert min(image.size) >= 64 and max(image.size) <= 256
        if len(target["boxes_xyxy"]) == 0:   # the crop missed the box: no foreground may be left
            assert (np.asarray(image.convert("L")) > 128).sum() == 0
            continue
        # bilinear resizing blurs edges by up to a pixel or two
        assert np.allclose(foreground_box(image), target["boxes_xyxy"][0], atol=2.5)
        kept += 1
    assert kept >= 15   # most draws keep the box, so the check above ran


def test_pipeline_is_deterministic_under_a_seed_and_varies_without():
    transforms = make_detr_transforms("train", scales=range(64, 129, 16), max_size=200,
                                      crop_resize_scales=(64, 96), crop_size=(48, 96))
    box = (30, 20, 70, 60)

    def run(seed):
        rng = np.random.default_rng(seed)
        return [transforms(rectangle_image(120, 90, [box]), make_target([box]), rng) for _ in range(10)]

    first, again, other = run(1), run(1), run(2)
    assert all(a[0].size == b[0].size and np.array_equal(a[1]["boxes_xyxy"], b[1]["boxes_xyxy"])
               for a, b in zip(first, again))
    assert any(a[0].size != b[0].size or not np.array_equal(a[1]["boxes_xyxy"], b[1]["boxes_xyxy"])
               for a, b in zip(first, other))


def test_paper_recipe_and_validation_resize():
    assert PAPER_SCALES == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    train = make_detr_transforms("train")
    assert isinstance(train.transforms[0], RandomHorizontalFlip)
    val = make_detr_transforms("val")
    image, target = val(rectangle_image(640, 480, [(0, 0, 10, 10)]), make_target([(0, 0, 10, 10)]),
                        np.random.default_rng(0))
    assert image.size == (1066, 800)
    with pytest.raises(ValueError, match="split"):
        make_detr_transforms("tain")


def test_flip_probability_and_crop_bounds():
    rng = np.random.default_rng(0)
    flips = sum(RandomHorizontalFlip()(rectangle_image(10, 10, [(0, 0, 2, 2)]), make_target([(0, 0, 2, 2)]),
                                       rng)[1]["boxes_xyxy"][0, 0] == 8 for _ in range(400))
    assert 150 < flips < 250
    cropper = RandomSizeCrop(20, 40)
    for _ in range(20):
        image, _ = cropper(rectangle_image(60, 30, []), make_target([]), rng)
        assert 20 <= image.width <= 40 and 20 <= image.height <= 30
    with pytest.raises(ValueError):
        RandomSizeCrop(50, 40)


# --- RT-DETR / YOLO augmentations ----------------------------------------------------------------------------------

def boxes_cover_bright_pixels(image, boxes, threshold=128, complete=True):
    """Every box (rounded inward by a pixel) lies on bright pixels, and (complete) every bright pixel in some box."""
    pixels = np.asarray(image.convert("L")) > threshold
    covered = np.zeros_like(pixels)
    for x0, y0, x1, y1 in np.asarray(boxes):
        x0, y0, x1, y1 = int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1))
        assert pixels[y0 + 1:y1 - 1, x0 + 1:x1 - 1].all(), (x0, y0, x1, y1)
        covered[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = True
    assert not complete or not (pixels & ~covered).any()


def test_vflip_and_quarter_turn_move_boxes_with_pixels():
    image = rectangle_image(100, 60, [(10, 5, 30, 25)])
    flipped, target = vflip(image, make_target([(10, 5, 30, 25)]))
    assert target["boxes_xyxy"].tolist() == [[10, 35, 30, 55]] == [foreground_box(flipped)]
    turned, target = rotate90(image, make_target([(10, 5, 30, 25)]))
    assert turned.size == (60, 100)
    assert target["boxes_xyxy"].tolist() == [[5, 70, 25, 90]] == [foreground_box(turned)]
    for _ in range(3):
        turned, target = rotate90(turned, target)
    assert target["boxes_xyxy"].tolist() == [[10, 5, 30, 25]] and turned.size == image.size


def test_random_rotate90_and_vertical_flip_keep_boxes_on_pixels():
    boxes = [(10, 5, 30, 25), (50, 30, 90, 55)]
    for seed in range(8):
        rng = np.random.default_rng(seed)
        image, target = RandomRotate90()(rectangle_image(100, 60, boxes), make_target(boxes), rng)
        image, target = RandomVerticalFlip()(image, target, rng)
        boxes_cover_bright_pixels(image, target["boxes_xyxy"])
        assert target["category_id"].tolist() == [3, 4] and target["iscrowd"].tolist() == [1, 0]


def test_zoom_out_places_image_and_boxes_together():
    rng = np.random.default_rng(0)
    image, target = RandomZoomOut(p=1.0, max_ratio=3.0)(rectangle_image(60, 40, [(10, 5, 30, 25)]),
                                                        make_target([(10, 5, 30, 25)]), rng)
    assert image.width > 60 and image.height > 40
    assert [foreground_box(image)] == target["boxes_xyxy"].tolist()
    with pytest.raises(ValueError, match="max_ratio"):
        RandomZoomOut(max_ratio=0.5)


def test_photometric_distort_changes_colours_not_boxes():
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    target = make_target([(10, 5, 30, 25)])
    distorted, out = PhotometricDistort(p=1.0)(image, target, np.random.default_rng(1))
    assert distorted.size == image.size and out is target
    assert not np.array_equal(np.asarray(distorted), np.asarray(image))
    again, _ = PhotometricDistort(p=1.0)(image, target, np.random.default_rng(1))
    assert np.array_equal(np.asarray(again), np.asarray(distorted))   # deterministic under the generator


def test_iou_crop_clips_drops_and_counts_keeping_ids_and_flags():
    boxes = [(2, 2, 22, 22), (40, 10, 70, 40), (80, 50, 98, 78), (10, 60, 30, 75)]
    transform = RandomIoUCrop(p=1.0, sampler_options=(0.0, 0.3))
    cropped_any = False
    for seed in range(20):
        image, target = transform(rectangle_image(100, 80, boxes), make_target(boxes), np.random.default_rng(seed))
        # SSD's rule: a box whose centre left the crop is dropped though part of it may still show
        boxes_cover_bright_pixels(image, target["boxes_xyxy"], complete=False)
        by_id = {int(i): (int(c), int(k)) for i, c, k in zip(target["id"], target["category_id"], target["iscrowd"])}
        assert by_id == {i: (i - 97, 1 if i == 100 else 0) for i in by_id}   # ids keep their class and crowd flag
        cropped_any |= image.size != (100, 80)
        assert (target["boxes_xyxy"][:, 2:] <= [image.width, image.height]).all()
    assert cropped_any and transform.dropped > 0


def test_scale_jitter_scales_boxes_with_pixels_within_max_size():
    boxes = [(20, 10, 60, 30)]
    for seed in range(5):
        image, target = ScaleJitter(0.5, 2.0, max_size=150)(rectangle_image(100, 50, boxes), make_target(boxes),
                                                            np.random.default_rng(seed))
        assert max(image.size) <= 150
        assert np.allclose(foreground_box(image), target["boxes_xyxy"][0], atol=1.5)
    with pytest.raises(ValueError, match="low <= high"):
        ScaleJitter(2.0, 1.0)


def test_mosaic_keeps_boxes_on_pixels_class_ids_and_crowd_flags():
    images, targets = [], []
    for k in range(4):
        boxes = [(5 + 10 * k, 5, 25 + 10 * k, 30), (60, 40 + 5 * k, 90, 70)]
        target = make_target(boxes)
        target["id"] = target["id"] + 10 * k
        images.append(rectangle_image(100, 80, boxes))
        targets.append(target)
    total = sum(len(t["boxes_xyxy"]) for t in targets)
    mosaic = Mosaic(p=1.0, min_visible=0.0)
    out_images, out_targets = mosaic(images, targets, np.random.default_rng(0))
    originals = {int(i): (int(c), int(k)) for t in targets for i, c, k in zip(t["id"], t["category_id"], t["iscrowd"])}
    for image, target in zip(out_images, out_targets):
        assert image.size == (100, 80)
        for box in target["boxes_xyxy"]:   # each box on bright pixels (boxes may touch: no exclusivity check)
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            assert (np.asarray(image.convert("L"))[y0 + 1:y1 - 1, x0 + 1:x1 - 1] > 128).all()
        for i, c, k in zip(target["id"], target["category_id"], target["iscrowd"]):
            assert originals[int(i)] == (int(c), int(k))
    mosaic = Mosaic(p=1.0, min_visible=0.9)   # boxes cut by a quadrant edge are dropped, and counted
    image, target = mosaic.combine(images, targets, np.random.default_rng(1))
    assert len(target["boxes_xyxy"]) + mosaic.dropped == total and mosaic.dropped > 0


def test_collate_applies_mosaic_and_augmentations_to_the_batch():
    rows = []
    for k in range(4):
        pixels = np.zeros((80, 100, 3), dtype=np.uint8)
        pixels[20:60, 30 + 2 * k:70 + 2 * k] = 255   # in the middle: every quadrant of a mosaic shows part of it
        rows.append({"image_id": k + 1, "image": PIL.Image.fromarray(pixels),
                     "objects": {"id": [k], "bbox": [[30 + 2 * k, 20, 40, 40]], "category_id": [7], "area": [1600.0],
                                 "iscrowd": [0]}})
    base = Compose([RandomResize([64], 96)])
    transforms = with_augmentations(base, photometric_distort=0.5, zoom_out=0.5, zoom_out_max=2.0, iou_crop=0.8,
                                    scale_jitter=[0.8, 1.2], mosaic=1.0, vertical_flip=True, rotate90=True,
                                    max_size=96)
    assert isinstance(transforms, BatchTransforms)
    assert with_augmentations(base) is base   # all off: the pipeline as it was
    collate = DetrCollator(DetrCustomImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}), {7: 0},
                           transforms, seed=0)
    batch = collate(rows)
    assert batch["pixel_values"].shape[0] == 4 and max(batch["pixel_values"].shape[2:]) <= 96
    assert all(set(label["class_labels"].tolist()) <= {0} for label in batch["labels"])
    mosaic_only = DetrCollator(DetrCustomImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}), {7: 0},
                               with_augmentations(base, mosaic=1.0), seed=0)
    labels = mosaic_only(rows)["labels"]
    assert sum(len(label["boxes"]) for label in labels) > 4   # mosaics hold boxes of several images
    with pytest.raises(ValueError, match="scale_jitter"):
        with_augmentations(base, scale_jitter=[0.5])
