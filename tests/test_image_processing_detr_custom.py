"""DetrCustomImageProcessor contracts, checked against transformers' DetrImageProcessor and against values by hand."""
import io
import json
import re

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import DetrImageProcessor

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection
from modeling_detr_custom.image_processing_detr_custom import DetrCustomImageProcessor
from modeling_detr_custom.testing_utils import randomize_, tiny_kwargs

SMALL = {"shortest_edge": 64, "longest_edge": 96}  # keeps tests fast; same code path as 800 / 1333


def random_image(height, width, mode="RGB", seed=0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    rgba[..., 3] = rng.choice([0, 128, 255], (height, width))  # some transparent, some half, some opaque
    image = PIL.Image.fromarray(rgba, "RGBA")
    if mode == "P":
        return image.convert("RGB").convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=64)
    return image.convert(mode) if mode != "RGBA" else image


def random_annotation(height, width, image_id=7, seed=0, num=6) -> dict:
    rng = np.random.default_rng(seed)
    objects = []
    for _ in range(num):
        x, y = rng.uniform(-0.2 * width, width), rng.uniform(-0.2 * height, height)  # some stick out
        w, h = rng.uniform(0, 0.6 * width), rng.uniform(0, 0.6 * height)
        objects.append({"bbox": [x, y, w, h], "category_id": int(rng.integers(1, 91)), "area": w * h, "iscrowd": 0})
    objects.append({"bbox": [width + 5, 0, 4, 4], "category_id": 3, "area": 16.0, "iscrowd": 0})  # fully outside
    return {"image_id": image_id, "annotations": objects}


def assert_same_labels(ours: dict, reference: dict):
    for key in ("class_labels", "area", "iscrowd", "orig_size", "size", "image_id"):
        assert torch.equal(ours[key], reference[key]), key
    torch.testing.assert_close(ours["boxes"], reference["boxes"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "height, width, mode",
    [(48, 64, "RGB"), (64, 48, "L"), (7, 5, "RGBA"), (12, 300, "P"), (200, 150, "CMYK"), (33, 47, "LA")],
)
def test_single_image_matches_transformers(height, width, mode):
    # a single image is not padded, so transformers' padded-size normalization and ours agree
    image = random_image(height, width, mode)
    annotation = random_annotation(height, width)
    ours = DetrCustomImageProcessor(size=SMALL)(image, annotations=annotation, return_tensors="pt")
    # transformers converts modes to RGB only when asked (a grayscale PIL image fails without it)
    reference = DetrImageProcessor(size=SMALL, do_convert_rgb=True)(image, annotations=annotation, return_tensors="pt")
    assert ours["pixel_values"].shape == reference["pixel_values"].shape
    # same uint8 resize kernel; only the fused normalize rounds differently
    torch.testing.assert_close(ours["pixel_values"], reference["pixel_values"], rtol=0, atol=1e-5)
    assert torch.equal(ours["pixel_mask"], reference["pixel_mask"])
    assert_same_labels(ours["labels"][0], reference["labels"][0])
    assert ours["labels"][0]["num_dropped_boxes"].item() >= 1  # the box outside the image


def test_size_variants_match_transformers():
    image, annotation = random_image(30, 70), random_annotation(30, 70)
    for size in ({"height": 40, "width": 50}, {"max_height": 64, "max_width": 64}, {"shortest_edge": 20}):
        if "shortest_edge" in size:  # transformers' DETR needs longest_edge with shortest_edge
            ours = DetrCustomImageProcessor(size=size)(image)
            assert tuple(ours["pixel_values"].shape[-2:]) == (20, 46)
            continue
        ours = DetrCustomImageProcessor(size=size)(image, annotations=annotation)
        reference = DetrImageProcessor(size=size)(image, annotations=annotation, return_tensors="pt")
        torch.testing.assert_close(ours["pixel_values"], reference["pixel_values"], rtol=0, atol=1e-5)
        assert_same_labels(ours["labels"][0], reference["labels"][0])
    # so elongated that the short side rounds to 0 (transformers fails there): one pixel, long side at the limit
    assert DetrCustomImageProcessor(size=SMALL)(np.zeros((1, 5000), np.uint8))["pixel_values"].shape == (1, 3, 1, 96)


def test_array_and_tensor_inputs_match_pil():
    image = random_image(40, 56)
    hwc = np.array(image)
    processor = DetrCustomImageProcessor(size=SMALL)
    expected = processor(image)["pixel_values"]
    for variant in (hwc, hwc.transpose(2, 0, 1).copy(), torch.from_numpy(hwc).permute(2, 0, 1).contiguous(),
                    torch.from_numpy(hwc)):
        assert torch.equal(processor(variant)["pixel_values"], expected)
    # float in [0, 1] is taken as already rescaled; it is resized in float, so only rounding differs
    as_float = processor(hwc.astype(np.float32) / 255)["pixel_values"]
    # the uint8 kernel rounds in fixed point: at most one level off
    torch.testing.assert_close(as_float, expected, rtol=0, atol=1.01 / 255 / 0.224)


def test_gray_16_bit_and_rgba_array_by_hand():
    processor_raw = DetrCustomImageProcessor(do_resize=False, do_rescale=False, do_normalize=False)
    values = np.array([[0, 257, 65535], [1000, 30000, 65000]], dtype=np.uint16)
    expected = torch.from_numpy(np.rint(values.astype(np.float64) * 255 / 65535)).float().expand(3, 2, 3)
    sixteen_bit = PIL.Image.fromarray(values)
    assert sixteen_bit.mode == "I;16"
    for image in (sixteen_bit, sixteen_bit.convert("I")):  # Pillow opens 16-bit PNGs as either
        assert torch.equal(processor_raw(image)["pixel_values"][0], expected)

    rgba = np.array([[[200, 100, 0, 255], [200, 100, 0, 0]], [[200, 100, 0, 51], [10, 20, 30, 128]]], np.uint8)
    alpha = rgba[..., 3:] / 255
    expected = np.rint(rgba[..., :3] * alpha + 255 * (1 - alpha)).transpose(2, 0, 1)
    assert torch.equal(processor_raw(rgba)["pixel_values"][0], torch.from_numpy(expected).float())


def test_boxes_are_normalized_by_the_visible_image_in_a_padded_batch():
    processor = DetrCustomImageProcessor(do_resize=False)
    images = [np.zeros((100, 200, 3), np.uint8), np.zeros((150, 100, 3), np.uint8)]
    annotations = [
        {"image_id": 1, "annotations": [{"bbox": [10, 20, 30, 40], "category_id": 4, "area": 1200.0}]},
        {"image_id": 2, "annotations": [{"bbox": [50, 0, 80, 150], "category_id": 5, "area": 12000.0}]},
    ]
    batch = processor(images, annotations=annotations)
    assert batch["pixel_values"].shape == (2, 3, 150, 200)
    # image 0: visible 100 x 200. cx = (10 + 40) / 2 / 200, cy = (20 + 60) / 2 / 100, w = 30 / 200, h = 40 / 100
    torch.testing.assert_close(batch["labels"][0]["boxes"], torch.tensor([[0.125, 0.4, 0.15, 0.4]]))
    # image 1: visible 150 x 100, box clipped at x = 100 -> [50, 0, 100, 150]
    torch.testing.assert_close(batch["labels"][1]["boxes"], torch.tensor([[0.75, 0.5, 0.5, 1.0]]))
    assert batch["labels"][1]["size"].tolist() == [150, 100]
    mask = batch["pixel_mask"]
    assert mask.dtype == torch.int64
    assert mask[0, :100, :200].all() and not mask[0, 100:].any()
    assert mask[1, :150, :100].all() and not mask[1, :, 100:].any()
    assert not batch["pixel_values"][1, :, :, 100:].any()


def test_resize_keeps_normalized_boxes_and_batch_equals_single():
    images = [random_image(30, 40, seed=1), random_image(50, 20, seed=2)]
    annotations = [random_annotation(30, 40, 1, seed=1), random_annotation(50, 20, 2, seed=2)]
    processor = DetrCustomImageProcessor(size=SMALL)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a batch runs its images on 2 threads, a single image inline
    try:
        batch = processor(images, annotations=annotations)
    finally:
        torch.set_num_threads(threads)
    for i, (image, annotation) in enumerate(zip(images, annotations)):
        single = processor(image, annotations=annotation)
        height, width = single["pixel_values"].shape[-2:]
        assert torch.equal(batch["pixel_values"][i, :, :height, :width], single["pixel_values"][0])
        for key, value in single["labels"][0].items():
            assert torch.equal(batch["labels"][i][key], value), key
        # normalized boxes do not depend on the resize: clipped COCO box / original size
        boxes = torch.tensor([o["bbox"] for o in annotation["annotations"]], dtype=torch.float64)
        x0, y0 = boxes[:, 0].clamp(0, image.width), boxes[:, 1].clamp(0, image.height)
        x1 = (boxes[:, 0] + boxes[:, 2]).clamp(0, image.width)
        y1 = (boxes[:, 1] + boxes[:, 3]).clamp(0, image.height)
        keep = (x1 > x0) & (y1 > y0)
        expected = torch.stack([(x0 + x1) / 2 / image.width, (y0 + y1) / 2 / image.height,
                                (x1 - x0) / image.width, (y1 - y0) / image.height], 1)[keep]
        torch.testing.assert_close(single["labels"][0]["boxes"].double(), expected, rtol=1e-5, atol=1e-6)
        assert single["labels"][0]["num_dropped_boxes"].item() == (~keep).sum().item()


def test_crowd_degenerate_boxes_and_category_mapping():
    annotation = {"image_id": 3, "annotations": [
        {"bbox": [0, 0, 10, 10], "category_id": 11, "area": 100.0, "iscrowd": 1},
        {"bbox": [5, 5, 0, 10], "category_id": 12, "area": 0.0, "iscrowd": 0},     # zero width: dropped
        {"bbox": [-20, 5, 10, 10], "category_id": 12, "area": 100.0, "iscrowd": 0},  # left of the image: dropped
        {"bbox": [10, 10, 20, 5], "category_id": 12, "iscrowd": 0},                  # no area: w * h
    ]}
    image = np.zeros((40, 40, 3), np.uint8)
    processor = DetrCustomImageProcessor(do_resize=False, category_id_to_label={11: 0, 12: 1})
    labels = processor(image, annotations=annotation)["labels"][0]   # crowd dropped by default, as transformers
    assert labels["class_labels"].tolist() == [1] and labels["iscrowd"].tolist() == [0]
    assert labels["area"].tolist() == [100.0]
    assert labels["num_dropped_boxes"].item() == 2 and labels["num_dropped_crowd"].item() == 1
    kept = processor(image, annotations=annotation, drop_crowd=False)["labels"][0]   # the explicit opt-in
    assert kept["class_labels"].tolist() == [0, 1] and kept["iscrowd"].tolist() == [1, 0]
    assert kept["area"].tolist() == [100.0, 100.0]
    assert kept["num_dropped_boxes"].item() == 2 and kept["num_dropped_crowd"].item() == 0
    annotation["annotations"][3]["area"] = 100.0   # transformers needs every area
    ours = DetrCustomImageProcessor(do_resize=False)(image, annotations=annotation)["labels"][0]
    reference = DetrImageProcessor(do_resize=False)(image, annotations=annotation, return_tensors="pt")["labels"][0]
    for key in ("class_labels", "area", "iscrowd", "image_id"):
        assert torch.equal(ours[key], reference[key]), key
    torch.testing.assert_close(ours["boxes"], reference["boxes"])


def test_ids_and_boxes_in_the_types_transformers_accepts():
    image = np.zeros((40, 40, 3), np.uint8)
    plain = {"image_id": 42, "annotations": [{"bbox": [1.0, 2.0, 10.0, 12.0], "category_id": 3, "iscrowd": 0}]}
    expected = DetrCustomImageProcessor(do_resize=False)(image, annotations=plain)["labels"][0]
    variants = [
        {"category_id": 3.0},                            # albumentations returns class ids as floats
        {"category_id": np.int64(3)}, {"category_id": np.float32(3.0)}, {"category_id": torch.tensor(3)},
        {"bbox": np.array([1, 2, 10, 12], np.float32)}, {"bbox": torch.tensor([1.0, 2.0, 10.0, 12.0])},
        {"bbox": (np.float64(1), 2, 10, 12), "iscrowd": np.int8(0)},
    ]
    for variant in variants:
        for image_id in (42, "42", np.int64(42), torch.tensor(42)):
            annotation = {"image_id": image_id, "annotations": [{**plain["annotations"][0], **variant}]}
            labels = DetrCustomImageProcessor(do_resize=False)(image, annotations=annotation)["labels"][0]
            for key, value in expected.items():
                assert torch.equal(labels[key], value), (variant, image_id, key)
    for bad, message in (({"category_id": 3.5}, r"\['category_id'\] must be an integer, got 3.5 \(image_id 42"),
                         ({"category_id": True}, "must be an integer, got True"),
                         ({"bbox": [1, float("nan"), 10, 12]}, r"\['bbox'\] value must be a finite number, got nan"),
                         ({"bbox": np.array([1, 2, 10])}, r"must be 4 finite numbers")):
        annotation = {"image_id": 42, "annotations": [{**plain["annotations"][0], **bad, "id": 7}]}
        with pytest.raises(ValueError, match=message) as error:
            DetrCustomImageProcessor(do_resize=False)(image, annotations=annotation)
        assert "image_id 42" in str(error.value) and "annotation id 7" in str(error.value)
    with pytest.raises(ValueError, match=r"annotations\[0\]\['image_id'\] must be an integer, got '4x'"):
        DetrCustomImageProcessor(do_resize=False)(image, annotations={**plain, "image_id": "4x"})


def test_annotation_shape_errors_say_what_is_expected():
    image = np.zeros((40, 40, 3), np.uint8)
    objects = [{"bbox": [1, 2, 10, 12], "category_id": 3}, {"bbox": [5, 5, 10, 10], "category_id": 3}]
    processor = DetrCustomImageProcessor(do_resize=False)
    expected = r'expected one dict per image, \{"image_id": int, "annotations": \[\{"bbox"'
    for bare in (objects, objects[:1], objects[0]):   # COCO's annotations without the per-image wrapper
        with pytest.raises(ValueError, match="bare list of") as error:
            processor(image, annotations=bare)
        assert "must be a dict" not in str(error.value)   # the old message said "must be a dict ..., got dict"
        assert re.search(expected, str(error.value))
    with pytest.raises(ValueError, match=r"annotations\[1\] is a single COCO object annotation"):
        processor([image, image], annotations=[{"image_id": 1, "annotations": []}, objects[0]])
    with pytest.raises(ValueError, match=r"annotations\[0\] has no 'image_id' \(keys: \['annotations'\]\)"):
        processor(image, annotations={"annotations": objects})   # required, as in transformers' DetrImageProcessor
    with pytest.raises(ValueError, match=r"annotations\[0\] has no 'annotations' key"):
        processor(image, annotations={"image_id": 1, "objects": objects})
    with pytest.raises(ValueError, match=r"annotations\[0\] is a str; expected one dict per image"):
        processor(image, annotations=["boxes.json"])


def test_exif_orientation_is_applied():
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:10, :20] = (255, 0, 0)  # red block top-left of the stored pixels
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    buffer = io.BytesIO()
    PIL.Image.fromarray(stored).save(buffer, format="PNG", exif=exif)
    photo = PIL.Image.open(io.BytesIO(buffer.getvalue()))
    # displayed image is 60 x 40 with the red block at the top-right: x in [30, 40), y in [0, 20)
    annotation = {"image_id": 0, "annotations": [{"bbox": [30, 0, 10, 20], "category_id": 1, "area": 200.0}]}
    processor = DetrCustomImageProcessor(do_resize=False, do_normalize=False)
    batch = processor(photo, annotations=annotation)
    displayed = torch.from_numpy(np.rot90(stored, k=-1).copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(batch["pixel_values"][0], displayed)
    assert batch["labels"][0]["orig_size"].tolist() == [60, 40]
    red = batch["pixel_values"][0, 0, 0:20, 30:40]
    assert red.min() == 1.0 and batch["pixel_values"][0, 1:, 0:20, 30:40].max() == 0.0
    torch.testing.assert_close(batch["labels"][0]["boxes"], torch.tensor([[35 / 40, 10 / 60, 10 / 40, 20 / 60]]))


def test_post_process_matches_transformers_and_clips():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn((2, 12, 5), generator=generator) * 3
    pred_boxes = torch.rand((2, 12, 4), generator=generator) * torch.tensor([1.0, 1.0, 0.9, 0.9])  # some stick out

    class Outputs:
        pass

    outputs = Outputs()
    outputs.logits, outputs.pred_boxes = logits, pred_boxes
    target_sizes = torch.tensor([[480, 640], [300, 200]])
    ours = DetrCustomImageProcessor().post_process_object_detection(outputs, 0.3, target_sizes)
    reference = DetrImageProcessor().post_process_object_detection(outputs, 0.3, target_sizes)
    assert sum(len(r["scores"]) for r in ours) > 4
    for mine, theirs, (height, width) in zip(ours, reference, target_sizes.tolist()):
        assert torch.equal(mine["scores"], theirs["scores"]) and torch.equal(mine["labels"], theirs["labels"])
        clipped = torch.stack([theirs["boxes"][:, 0].clamp(0, width), theirs["boxes"][:, 1].clamp(0, height),
                               theirs["boxes"][:, 2].clamp(0, width), theirs["boxes"][:, 3].clamp(0, height)], 1)
        torch.testing.assert_close(mine["boxes"], clipped)
    assert (reference[0]["boxes"] != ours[0]["boxes"]).any()  # the clipping did something

    as_list = DetrCustomImageProcessor().post_process_object_detection(
        {"logits": logits, "pred_boxes": pred_boxes}, 0.3, [(480, 640), (300, 200)], top_k=2)
    for top, full in zip(as_list, ours):
        best = full["scores"].argsort(descending=True)[:2]
        assert torch.equal(top["scores"], full["scores"][best])
        torch.testing.assert_close(top["boxes"], full["boxes"][best])
    unscaled = DetrCustomImageProcessor().post_process_object_detection(outputs, 0.0)
    assert all(r["boxes"].min() >= 0 and r["boxes"].max() <= 1 and len(r["scores"]) == 12 for r in unscaled)
    with pytest.raises(ValueError, match="target_sizes"):
        DetrCustomImageProcessor().post_process_object_detection(outputs, 0.3, [(480, 640)])
    for threshold in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match=r"threshold is a score in \[0, 1\]"):
            DetrCustomImageProcessor().post_process_object_detection(outputs, threshold, target_sizes)
    for sizes, bad in (([(480, 640), (0, 200)], r"image 1 has \(0.0, 200.0\)"),
                       (torch.tensor([[-480, 640], [300, 200]]), r"image 0 has \(-480.0, 640.0\)")):
        with pytest.raises(ValueError, match=r"target_sizes must be positive \(height, width\) pairs.*" + bad):
            DetrCustomImageProcessor().post_process_object_detection(outputs, 0.3, sizes)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        DetrCustomImageProcessor().post_process_object_detection(outputs, 0.3, target_sizes, top_k=0)


def test_save_pretrained_round_trip(tmp_path):
    processor = DetrCustomImageProcessor(size={"max_height": 64, "max_width": 80}, drop_crowd=True,
                                         category_id_to_label={11: 0, 12: 1}, pad_size={"height": 96, "width": 96})
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "DetrCustomImageProcessor"
    loaded = DetrCustomImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert loaded.category_id_to_label == {11: 0, 12: 1}
    image, annotation = random_image(30, 50), {"image_id": 1, "annotations": [
        {"bbox": [1, 2, 10, 10], "category_id": 12, "area": 100.0, "iscrowd": 0}]}
    a, b = processor(image, annotations=annotation), loaded(image, annotations=annotation)
    assert a["pixel_values"].shape == (1, 3, 96, 96)
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert torch.equal(a["labels"][0]["boxes"], b["labels"][0]["boxes"])


def test_reads_transformers_preprocessor_config(tmp_path):
    reference = DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 90}, image_mean=[0.5, 0.5, 0.5])
    reference.save_pretrained(tmp_path)
    loaded = DetrCustomImageProcessor.from_pretrained(tmp_path)
    assert loaded.size == {"shortest_edge": 64, "longest_edge": 90} and loaded.image_mean == [0.5, 0.5, 0.5]
    image = random_image(50, 120)
    torch.testing.assert_close(loaded(image)["pixel_values"], reference(image, return_tensors="pt")["pixel_values"],
                               rtol=0, atol=1e-5)
    # facebook/detr-resnet-50 style (DetrFeatureExtractor era) and a "Fast" processor config
    old = {"do_normalize": True, "do_resize": True, "feature_extractor_type": "DetrFeatureExtractor",
           "format": "coco_detection", "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
           "max_size": 1333, "size": 800}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(old))
    assert DetrCustomImageProcessor.from_pretrained(tmp_path).size == {"shortest_edge": 800, "longest_edge": 1333}
    fast = {**json.loads(DetrImageProcessor().to_json_string()), "image_processor_type": "DetrImageProcessorFast"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(fast))
    assert DetrCustomImageProcessor.from_pretrained(tmp_path).to_dict() == DetrCustomImageProcessor().to_dict()


@pytest.mark.parametrize("images, annotations, message", [
    ([], None, "images is empty"),
    ([np.zeros((8, 8, 3), np.uint8), np.zeros((0, 10, 3), np.uint8)], None, "image 1 has zero size"),
    ([np.zeros((8, 8, 3), np.uint8), "photo.jpg"], None, "image 1 is a str, not"),
    ([np.zeros((8, 8, 3), np.int32)], None, "image 0 has dtype"),
    ([np.full((8, 8, 3), 2.0, np.float32)], None, r"image 0 is float with values in \[2.0, 2.0\]"),
    ([np.zeros((8, 8, 3), np.uint8)], [{"image_id": 0, "annotations": []}] * 2, "2 annotation dicts for 1 images"),
    ([np.zeros((8, 8, 3), np.uint8)], {"image_id": 0, "annotations": [{"bbox": [1, 2, 3], "category_id": 1}]},
     r"annotations\[0\]\['annotations'\]\[0\]\['bbox'\] must be 4 finite numbers"),
    ([np.zeros((8, 8, 3), np.uint8)], {"image_id": 0, "annotations": [
        {"bbox": [1, 2, 3, 4], "category_id": 1}, {"bbox": [1, float("nan"), 3, 4], "category_id": 1}]},
     r"annotations\[0\]\['annotations'\]\[1\]\['bbox'\] value must be a finite number"),
    ([np.zeros((8, 8, 3), np.uint8)], {"image_id": 0, "annotations": [{"bbox": [1, 2, -3, 4], "category_id": 1}]},
     r"\['bbox'\] has a negative width or height"),
    ([np.zeros((8, 8, 3), np.uint8)], {"image_id": 0, "annotations": [{"bbox": [1, 2, 3, 4], "category_id": 99}]},
     r"annotations\[0\]\['annotations'\]\[0\]\['category_id'\] 99 is not in category_id_to_label"),
    ([np.zeros((8, 8, 3), np.uint8)], {"image_id": 0, "annotations": [{"bbox": [1, 2, 3, 4], "category_id": 1.5}]},
     r"annotations\[0\]\['annotations'\]\[0\]\['category_id'\] must be an integer, got 1.5 \(image_id 0\)"),
    ([PIL.Image.new("HSV", (8, 8))], None, "image 0 has PIL mode 'HSV', which has no defined conversion to RGB"),
])
def test_bad_input_raises_value_error(images, annotations, message):
    processor = DetrCustomImageProcessor(size=SMALL, category_id_to_label={1: 0})
    with pytest.raises(ValueError, match=message):
        processor(images, annotations=annotations)


def test_pipeline_object_detection_equals_model_and_post_process():
    from transformers import pipeline

    config = DetrCustomConfig(**tiny_kwargs(id2label={0: "circle", 1: "square", 2: "triangle"}))
    model = randomize_(DetrCustomForObjectDetection(config), seed=2).eval()   # queries differ, in class too
    processor = DetrCustomImageProcessor(size=SMALL)
    image = random_image(60, 90)
    with torch.no_grad():
        outputs = model(**processor(image))
    scores = processor.post_process_object_detection(outputs, 0.0, [(60, 90)])[0]["scores"]
    threshold = scores.median().item()   # keeps about half, so the threshold reaches the post-processing
    expected = processor.post_process_object_detection(outputs, threshold, [(60, 90)])[0]
    assert 0 < len(expected["scores"]) < config.num_queries
    expected_boxes = [dict(zip(("xmin", "ymin", "xmax", "ymax"), box)) for box in expected["boxes"].int().tolist()]
    assert len({tuple(box.values()) for box in expected_boxes}) > 1 and len(set(expected["labels"].tolist())) > 1

    detections = pipeline("object-detection", model=model, image_processor=processor)(image, threshold=threshold)
    assert [d["label"] for d in detections] == [config.id2label[label] for label in expected["labels"].tolist()]
    assert [d["score"] for d in detections] == expected["scores"].tolist()
    assert [d["box"] for d in detections] == expected_boxes
    assert all(0 <= d["box"]["xmin"] <= d["box"]["xmax"] <= 90 and 0 <= d["box"]["ymin"] <= d["box"]["ymax"] <= 60
               for d in detections)


def test_pad_options_and_bad_settings():
    images = [np.zeros((20, 30, 3), np.uint8), np.zeros((30, 20, 3), np.uint8)]
    unpadded = DetrCustomImageProcessor(do_resize=False, do_pad=False)(images[:1] * 2)
    assert "pixel_mask" not in unpadded and unpadded["pixel_values"].shape == (2, 3, 20, 30)
    padded = DetrCustomImageProcessor(do_resize=False, pad_size={"height": 40, "width": 50})(images)
    assert padded["pixel_mask"].shape == (2, 40, 50) and padded["pixel_mask"].sum() == 2 * 600
    with pytest.raises(ValueError, match="do_pad=False needs images of one size"):
        DetrCustomImageProcessor(do_resize=False, do_pad=False)(images)
    with pytest.raises(ValueError, match="image 1 is 30x20 after resizing, larger than pad_size"):
        DetrCustomImageProcessor(do_resize=False, pad_size={"height": 25, "width": 50})(images)
    with pytest.raises(ValueError, match="size must be"):
        DetrCustomImageProcessor(size={"longest_edge": 100})
    with pytest.raises(ValueError, match="resample must be one of"):
        DetrCustomImageProcessor(resample=4)
    with pytest.raises(TypeError, match="unexpected keyword arguments"):  # a per-call setting must be a setting
        DetrCustomImageProcessor()(images, crop_size={"height": 8, "width": 8})


def test_class_wise_nms_is_torchvisions():
    """Our pure-torch suppression (the Hub folder's code needs no torchvision) keeps what torchvision's batched_nms
    keeps, over random boxes, labels and thresholds."""
    from torchvision.ops import batched_nms

    from modeling_detr_custom.box_ops import class_wise_nms

    generator = torch.Generator().manual_seed(0)
    removed = 0
    for _ in range(100):
        count = int(torch.randint(0, 60, (1,), generator=generator))
        corner = torch.rand(count, 2, generator=generator) * 100
        boxes = torch.cat([corner, corner + torch.rand(count, 2, generator=generator) * 40 + 1], 1)
        scores, labels = torch.rand(count, generator=generator), torch.randint(0, 3, (count,), generator=generator)
        threshold = float(torch.rand(1, generator=generator)) * 0.9 + 0.05
        kept = class_wise_nms(boxes, scores, labels, threshold)
        assert torch.equal(kept, batched_nms(boxes, scores, labels, threshold).sort().values)
        removed += count - len(kept)
    assert removed > 100    # the draws overlap enough to test the suppression


def duplicate_outputs(activation: str):
    """Three queries on one 100 x 100 image: a box, a near-copy of it scored lower (IoU 0.81), and the same box
    again as another class."""
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.5, 0.5, 0.36, 0.36], [0.5, 0.5, 0.4, 0.4]]])
    probabilities = torch.tensor([[[0.9, 0.05], [0.8, 0.05], [0.05, 0.7]]])
    if activation == "sigmoid":
        return {"logits": torch.logit(probabilities), "pred_boxes": boxes}
    no_object = 1 - probabilities.sum(-1, keepdim=True)
    return {"logits": torch.cat([probabilities, no_object], -1).log(), "pred_boxes": boxes}


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_nms_iou_threshold_removes_duplicates_of_a_class(activation, tmp_path):
    outputs = duplicate_outputs(activation)

    def detections(processor, **kwargs):
        result = processor.post_process_object_detection(outputs, 0.1, [(100, 100)], class_activation=activation,
                                                         **kwargs)[0]
        return sorted(zip(result["labels"].tolist(), [round(s, 3) for s in result["scores"].tolist()]))

    everything = [(0, 0.8), (0, 0.9), (1, 0.7)]
    assert detections(DetrCustomImageProcessor()) == everything                       # off by default
    assert detections(DetrCustomImageProcessor(), nms_iou_threshold=0.7) == [(0, 0.9), (1, 0.7)]
    assert detections(DetrCustomImageProcessor(), nms_iou_threshold=0.85) == everything    # IoU 0.81: kept
    processor = DetrCustomImageProcessor(nms_iou_threshold=0.7)
    assert detections(processor) == [(0, 0.9), (1, 0.7)]
    assert detections(processor, nms_iou_threshold=1.0) == everything                 # 1 turns it off for a call
    # the setting travels with the folder, to from_pretrained and to AutoImageProcessor (what pipeline loads)
    from transformers import AutoImageProcessor

    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["nms_iou_threshold"] == 0.7
    assert detections(DetrCustomImageProcessor.from_pretrained(tmp_path)) == [(0, 0.9), (1, 0.7)]
    assert AutoImageProcessor.from_pretrained(tmp_path).nms_iou_threshold == 0.7


def test_bad_nms_iou_threshold_is_a_clear_error():
    outputs = duplicate_outputs("softmax")
    for bad in (0, -0.5, 1.5, True, "0.7", float("nan")):
        with pytest.raises(ValueError, match=r"nms_iou_threshold is an IoU in \(0, 1\]"):
            DetrCustomImageProcessor(nms_iou_threshold=bad)
        with pytest.raises(ValueError, match=r"nms_iou_threshold is an IoU in \(0, 1\]"):
            DetrCustomImageProcessor().post_process_object_detection(outputs, 0.1, nms_iou_threshold=bad)
