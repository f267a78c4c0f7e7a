"""The training loop's evaluation against the folder it saves, re-scored the way a user would (the processor, one
image at a time), and detr-custom-eval against both."""
import json

import PIL.Image
import pytest
import torch
from accelerate.state import AcceleratorState
from tiny_run import run as _run
from tiny_run import write_config as _config

from deploy import evaluate as eval_cli
from modeling_detr_custom import DetrCustomForObjectDetection, DetrCustomImageProcessor
from modeling_detr_custom.fast_paths import cpu_bf16_support
from training.data import get_categories, load_coco
from training.evaluation import detect_batch, unpadded_sizes
from training.metrics import CocoEvaluator
from training.sample_data import write_sample_dataset

METRICS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100", "AR_small",
           "AR_medium", "AR_large")


def centred_boxes_data(root):
    """The embedded dataset (16 train, 8 val images of several sizes), its val split re-annotated with one centred
    box per category, where a model of a few steps puts its boxes: its AP is then well above 0 and moves with any
    change of its scores or boxes, so equal APs mean equal detections."""
    write_sample_dataset(root, num_train=16, num_val=8, seed=0)
    path = root / "annotations" / "instances_val2017.json"
    coco = json.loads(path.read_text())
    coco["annotations"] = []
    for image in coco["images"]:
        width, height = image["width"], image["height"]
        for k, category in enumerate(coco["categories"]):
            box = [width * (0.18 + 0.03 * k), height * (0.28 + 0.02 * k), width * 0.32, height * 0.42]
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image["id"], "bbox": box,
                                        "category_id": category["id"], "area": box[2] * box[3], "iscrowd": 0})
    path.write_text(json.dumps(coco))
    return root


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run that evaluates at its last step: the weights' average (EMA) is what it evaluates and saves, in
    bf16 autocast where the CPU has native bf16 (the saved folder then runs in fp32)."""
    tmp_path = tmp_path_factory.mktemp("evaluate")
    data_dir = centred_boxes_data(tmp_path / "data")
    precision = "bf16" if cpu_bf16_support()[0] else "no"
    # Accelerate keeps one AcceleratorState per process: the tests before this one ran in fp32
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        _run(_config(tmp_path, data_dir, max_steps=6, eval_steps=6, per_device_eval_batch_size=8, ema_decay=0.9,
                     ema_warmup_steps=0, mixed_precision=precision))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["eval_history"][-1]
    return tmp_path / "run", data_dir, recorded


def rescore_one_image_at_a_time(folder, data_dir) -> dict:
    """What a user does with a saved folder: from_pretrained, the processor on each image, post-processing."""
    model = DetrCustomForObjectDetection.from_pretrained(folder).eval()
    processor = DetrCustomImageProcessor.from_pretrained(folder)
    dataset = load_coco(data_dir, "val")
    categories = get_categories(dataset)
    predictions = []
    for row in dataset:
        image = row["image"]
        with torch.no_grad():
            outputs = model(**processor(image, return_tensors="pt"))
        result = processor.post_process_object_detection(outputs, threshold=0.0,
                                                         target_sizes=[(image.height, image.width)])[0]
        predictions.append({"image_id": row["image_id"], **result})
    evaluator = CocoEvaluator([{"id": i, "name": n} for i, n in zip(categories.ids, categories.names)],
                              categories.label_to_category_id)
    evaluator.add(predictions, [{"image_id": row["image_id"], "objects": row["objects"]} for row in dataset])
    return evaluator.compute()


def test_the_loops_recorded_ap_is_the_saved_folders_ap(trained_run):
    """The loop's evaluation batched 8 images of different sizes (padded) under autocast; the number it recorded is
    the saved folder's, re-scored through the processor one image at a time in fp32."""
    folder, data_dir, recorded = trained_run
    assert len({PIL.Image.open(p).size for p in (data_dir / "val2017").iterdir()}) > 1   # mixed sizes: padding
    rescored = rescore_one_image_at_a_time(folder / "last", data_dir)
    assert recorded["AP"] > 0.005   # detections that score, so equal APs are not vacuous
    for name in METRICS:
        assert recorded[name] == pytest.approx(rescored[name], abs=1e-6), name
    assert recorded["AP_per_class"] == pytest.approx(rescored["AP_per_class"], abs=1e-6)


def test_eval_command_gives_the_loops_number(trained_run, tmp_path, capsys):
    folder, data_dir, recorded = trained_run
    output = tmp_path / "metrics.json"
    assert eval_cli.main([str(folder / "last"), "--data_dir", str(data_dir), "--batch_size", "3",
                          "--output_json", str(output)]) == 0
    metrics = json.loads(output.read_text())
    for name in METRICS:
        assert metrics[name] == pytest.approx(recorded[name], abs=1e-6), name
    assert metrics["AP_per_class"] == pytest.approx(recorded["AP_per_class"], abs=1e-6)
    assert metrics["images"] == 8 and metrics["ms_per_image"] > 0
    printed = capsys.readouterr().out
    assert f"AP {recorded['AP']:.4f}" in printed and "ms per image" in printed


def test_the_loop_evaluates_with_the_duplicate_removal_it_saves(tmp_path):
    """nms_iou_threshold reaches the loop's evaluation, the saved processor and the card: the loop's number is the
    folder's through detr-custom-eval, and without the removal (--nms_iou_threshold 1) the folder scores otherwise."""
    data_dir = centred_boxes_data(tmp_path / "data")
    _run(_config(tmp_path, data_dir, max_steps=4, eval_steps=4, per_device_eval_batch_size=8,
                 nms_iou_threshold=0.9))
    folder = tmp_path / "run" / "last"
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["eval_history"][-1]
    assert json.loads((folder / "preprocessor_config.json").read_text())["nms_iou_threshold"] == 0.9
    assert "non-maximum suppression at IoU 0.9" in (folder / "README.md").read_text()
    scores = {}
    for nms in (None, "1"):
        output = tmp_path / f"metrics-{nms}.json"
        assert eval_cli.main([str(folder), "--data_dir", str(data_dir), "--output_json", str(output)]
                             + (["--nms_iou_threshold", nms] if nms else [])) == 0
        scores[nms] = json.loads(output.read_text())
    for name in METRICS:
        assert scores[None][name] == pytest.approx(recorded[name], abs=1e-6), name
    assert scores["1"]["AR100"] > recorded["AR100"]      # the boxes it removed had found objects
    with pytest.raises(ValueError, match=r"nms_iou_threshold=0: must be an IoU in \(0, 1\]"):
        _run(_config(tmp_path, data_dir, max_steps=1, nms_iou_threshold=0))


def test_annotation_file_form_and_bad_sources(trained_run, tmp_path):
    folder, data_dir, recorded = trained_run
    metrics = eval_cli.evaluate_detector(
        str(folder / "last"), progress=False, val_annotation_file=str(data_dir / "annotations" /
                                                                      "instances_val2017.json"),
        val_image_dir=str(data_dir / "val2017"))
    assert metrics["AP"] == pytest.approx(recorded["AP"], abs=1e-6)
    with pytest.raises(ValueError, match="exactly one source"):
        eval_cli.evaluate_detector(str(folder / "last"), data_dir=str(data_dir), dataset_name="x")
    with pytest.raises(ValueError, match="holds no config.json"):
        eval_cli.evaluate_detector(str(tmp_path), data_dir=str(data_dir))
    renamed = json.loads((data_dir / "annotations" / "instances_val2017.json").read_text())
    renamed["categories"][0]["name"] = "hexagon"
    (tmp_path / "val.json").write_text(json.dumps(renamed))
    with pytest.raises(ValueError, match=r"\['hexagon'\] are not classes of the model"):
        eval_cli.evaluate_detector(str(folder / "last"), val_annotation_file=str(tmp_path / "val.json"),
                                   val_image_dir=str(data_dir / "val2017"))


def test_each_image_is_detected_without_the_batchs_padding():
    """detect_batch on a padded batch of two sizes equals each image alone."""
    from modeling_detr_custom import DetrCustomConfig
    from modeling_detr_custom.testing_utils import randomize_, tiny_kwargs

    model = randomize_(DetrCustomForObjectDetection(DetrCustomConfig(**tiny_kwargs()))).eval()
    processor = DetrCustomImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 255, (3, h, w), generator=generator, dtype=torch.uint8) for h, w in
              ((80, 60), (50, 90), (80, 60))]
    batch = processor(images, return_tensors="pt")
    assert unpadded_sizes(batch["pixel_mask"]) == [(85, 64), (53, 96), (85, 64)]
    sizes = [tuple(image.shape[1:]) for image in images]
    batched = detect_batch(model.forward, processor, batch["pixel_values"], batch["pixel_mask"], sizes)
    for image, size, result in zip(images, sizes, batched):
        alone = processor(image, return_tensors="pt")
        with torch.no_grad():
            expected = processor.post_process_object_detection(model(**alone), threshold=0.0, target_sizes=[size])[0]
        torch.testing.assert_close(result["scores"], expected["scores"], atol=1e-5, rtol=0)
        torch.testing.assert_close(result["boxes"], expected["boxes"], atol=1e-3, rtol=0)
