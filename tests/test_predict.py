"""detr-custom-predict on a folder of the embedded images and on a generated video: COCO results, pictures, a
corrupt file skipped; its predictions.json scores eval's AP."""
import contextlib
import io
import json

import numpy as np
import PIL.Image
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from test_evaluate import centred_boxes_data

from deploy import predict as predict_cli
from deploy.drawing import draw_detections
from deploy.evaluate import evaluate_detector
from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection, DetrCustomImageProcessor
from modeling_detr_custom.testing_utils import randomize_, tiny_kwargs
from training.sample_data import CATEGORIES

NAMES = [name for _, name, _ in CATEGORIES]


def centred_model(folder):
    """A tiny DETR with random weights whose boxes sit around the centre, where test_evaluate's centred boxes are:
    its AP there is above 0 and depends on every score and box."""
    config = DetrCustomConfig(**tiny_kwargs(num_labels=len(NAMES), id2label=dict(enumerate(NAMES)),
                                            label2id={name: i for i, name in enumerate(NAMES)}))
    model = randomize_(DetrCustomForObjectDetection(config)).eval()
    with torch.no_grad():
        last = model.bbox_embed.layers[-1]
        last.weight.mul_(0.1)
        last.bias.copy_(torch.logit(torch.tensor([0.34, 0.49, 0.32, 0.42])))
    model.save_pretrained(folder)
    DetrCustomImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    return centred_model(root / "model"), centred_boxes_data(root / "data")


def coco_ap(annotation_file, predictions_file) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(annotation_file))
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(str(predictions_file)), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0])


def test_predict_a_folder_writes_coco_results_pictures_and_scores_evals_ap(setting, tmp_path, capsys):
    model, data = setting
    inputs = tmp_path / "images"
    inputs.mkdir()
    for path in sorted((data / "val2017").iterdir()):
        (inputs / path.name).write_bytes(path.read_bytes())
    (inputs / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    annotation_file = data / "annotations" / "instances_val2017.json"
    output = tmp_path / "out"
    assert predict_cli.main([str(model), str(inputs), "--output", str(output), "--threshold", "0",
                             "--annotation_file", str(annotation_file), "--batch_size", "3"]) == 0
    printed = capsys.readouterr().out
    assert "8 images" in printed and "ms per image" in printed and "1 files skipped" in printed
    assert "corrupt.jpg: skipped" in printed

    results = json.loads((output / "predictions.json").read_text())
    coco = json.loads(annotation_file.read_text())
    ids = {image["file_name"]: image["id"] for image in coco["images"]}
    assert {r["image_id"] for r in results} == set(ids.values())
    assert {r["category_id"] for r in results} <= {c["id"] for c in coco["categories"]}
    assert all(set(r) == {"image_id", "category_id", "bbox", "score"} and len(r["bbox"]) == 4 for r in results)
    # the file is what pycocotools reads, and it scores what detr-custom-eval measures on the same images
    assert coco_ap(annotation_file, output / "predictions.json") == pytest.approx(
        evaluate_detector(str(model), data_dir=str(data), progress=False)["AP"], abs=1e-6)
    assert coco_ap(annotation_file, output / "predictions.json") > 0
    for name, image_id in ids.items():
        with PIL.Image.open(output / name) as picture, PIL.Image.open(inputs / name) as source:
            assert picture.size == source.size
    images = json.loads((output / "images.json").read_text())
    assert sorted(image["id"] for image in images["images"]) == sorted(ids.values())


def test_predict_numbers_images_without_an_annotation_file(setting, tmp_path):
    model, data = setting
    first = sorted((data / "val2017").iterdir())[:2]
    summary = predict_cli.predict(str(model), [str(p) for p in first] + [str(data / "val2017" / "*.jpg")],
                                  str(tmp_path / "out"), threshold=0.0, progress=False)
    assert summary["images"] == 8 and summary["pictures"] == 8   # a file named twice runs once
    results = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert {r["image_id"] for r in results} == set(range(1, 9))
    assert {r["category_id"] for r in results} <= set(range(len(NAMES)))
    images = json.loads((tmp_path / "out" / "images.json").read_text())
    assert images["categories"] == [{"id": i, "name": name} for i, name in enumerate(NAMES)]


def write_video(path, frames: int = 6):
    """An mp4 of a demo image sliding by 4 pixels a frame; odd width and height."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 162, 150, "yuv420p"
        background = np.full((150, 400, 3), 90, np.uint8)
        background[40:100, 60:140] = (225, 45, 45)
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(background[:, 4 * k:4 * k + 162]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_predict_a_video_writes_an_annotated_video(setting, tmp_path):
    import av

    model, _ = setting
    video = tmp_path / "clip.mp4"
    write_video(video)
    summary = predict_cli.predict(str(model), [str(video)], str(tmp_path / "out"), threshold=0.0, batch_size=4,
                                  progress=False)
    assert summary["images"] == 6 and summary["detections"] == 6 * 10 and not summary["skipped"]
    images = json.loads((tmp_path / "out" / "images.json").read_text())["images"]
    assert [(image["video"], image["frame_index"]) for image in images] == [("clip.mp4", k) for k in range(6)]
    assert all((image["width"], image["height"]) == (162, 150) for image in images)
    with av.open(str(tmp_path / "out" / "clip.mp4")) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 6 and frames[0].shape == (150, 162, 3)


def test_bad_inputs_are_clear_errors(setting, tmp_path):
    model, data = setting
    with pytest.raises(ValueError, match="no such file or folder"):
        predict_cli.predict(str(model), [str(tmp_path / "missing.jpg")], str(tmp_path / "out"))
    with pytest.raises(ValueError, match="threshold"):
        predict_cli.predict(str(model), [str(data / "val2017")], str(tmp_path / "out"), threshold=2.0)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": "zebra"}]}))
    with pytest.raises(ValueError, match="none of its categories"):
        predict_cli.predict(str(model), [str(data / "val2017")], str(tmp_path / "out"), annotation_file=str(other))
    assert predict_cli.main([str(model), str(tmp_path / "missing.jpg"), "--output", str(tmp_path / "o")]) == 2
    with pytest.raises(ValueError, match=r"nms_iou_threshold is an IoU in \(0, 1\]"):
        predict_cli.predict(str(model), [str(data / "val2017")], str(tmp_path / "out"), nms_iou_threshold=1.5)


def test_labels_are_drawn_inside_small_and_large_pictures():
    detection = {"scores": torch.tensor([0.9, 0.4]), "labels": torch.tensor([0, 3]),
                 "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 30.0, 20.0]])}
    for size in ((32, 24), (1600, 1200)):
        blank = PIL.Image.new("RGB", size, (128, 128, 128))
        drawn = np.asarray(draw_detections(blank, detection, dict(enumerate(NAMES))))
        assert drawn.shape == (size[1], size[0], 3) and (drawn != 128).any()


def test_supervision_reads_our_post_processed_results(setting):
    """supervision's Detections.from_transformers takes post_process_object_detection's output as it is."""
    import supervision as sv

    model_dir, data = setting
    model = DetrCustomForObjectDetection.from_pretrained(model_dir).eval()
    processor = DetrCustomImageProcessor.from_pretrained(model_dir)
    image = PIL.Image.open(sorted((data / "val2017").iterdir())[0])
    with torch.no_grad():
        outputs = model(**processor(image, return_tensors="pt"))
    result = processor.post_process_object_detection(outputs, threshold=0.0,
                                                     target_sizes=[(image.height, image.width)])[0]
    detections = sv.Detections.from_transformers(result, id2label=model.config.id2label)
    assert len(detections) == len(result["scores"])
    np.testing.assert_allclose(detections.xyxy, result["boxes"].numpy(), rtol=0, atol=1e-4)
    assert list(detections.data["class_name"]) == [NAMES[int(i)] for i in result["labels"]]
    annotated = sv.BoxAnnotator().annotate(np.asarray(image).copy(), detections)
    assert annotated.shape == (image.height, image.width, 3)
