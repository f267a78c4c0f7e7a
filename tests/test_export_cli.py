"""detr-custom-export: every preset, the RT-DETRv2 layout, and checkpoints saved by transformers' DETR and RT-DETRv2
(converted by from_pretrained) to ONNX and OpenVINO, each file against PyTorch on a padded batch of differently sized
images and on one image; exported files give the folder's detections and AP through detr-custom-predict and
detr-custom-eval."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_checkpoint_conversion_rt_detr import _rt_detr_v2
from test_evaluate import centred_boxes_data
from test_export import model_of
from test_predict import centred_model

from deploy import evaluate as eval_cli
from deploy import export as export_cli
from deploy import predict as predict_cli
from deploy.runtimes import load_detector, model_inputs
from modeling_detr_custom import DetrCustomForObjectDetection, DetrCustomImageProcessor
from modeling_detr_custom.testing_utils import randomize_, tiny_kwargs


LAYOUTS = ("detr", "deformable", "rtdetr", "rtdetr_v2")
CONVERTED = ("transformers_detr", "transformers_rtdetr_v2")   # folders saved by transformers, converted on loading


def transformers_folder(name: str, folder):
    """A folder as transformers saves it (model and image processor), with random weights; returns the model."""
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, RTDetrImageProcessor

    if name == "transformers_detr":
        reference = randomize_(DetrForObjectDetection(DetrConfig(**tiny_kwargs())).eval())
        processor = DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    else:
        reference = _rt_detr_v2()
        processor = RTDetrImageProcessor(size={"height": 96, "width": 96})
    reference.save_pretrained(folder)
    processor.save_pretrained(folder)
    return reference


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each layout's folder (DETR: test_predict's centred model, whose detections score on the centred boxes data),
    exported once to ONNX and converted to OpenVINO, on first use (one layout per test: each export takes a while);
    `exports(name)` -> (folder, model, processor, onnx, xml)."""
    root, files = tmp_path_factory.mktemp("export"), {}

    def get(name):
        if name not in files:
            folder = root / name
            if name == "detr":
                centred_model(folder)
            elif name in CONVERTED:
                transformers_folder(name, folder)
            else:
                model_of(name).save_pretrained(folder)
                DetrCustomImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(folder)
            model = DetrCustomForObjectDetection.from_pretrained(folder).eval()
            processor = DetrCustomImageProcessor.from_pretrained(folder)
            onnx_file = export_cli.export_onnx(model, processor, root / f"{name}.onnx")
            xml = export_cli.onnx_to_openvino(onnx_file, root / f"{name}.xml")
            files[name] = (folder, model, processor, onnx_file, xml)
        return files[name]

    return get


@pytest.mark.timeout(1200)   # an export of a layout, converted, and two checks
@pytest.mark.parametrize("name", LAYOUTS + CONVERTED)
def test_exported_files_equal_pytorch_on_a_padded_batch_and_one_image(exports, name):
    _, model, processor, onnx_file, xml = exports(name)
    for fmt, file in (("onnx", onnx_file), ("openvino", xml)):
        differences = export_cli.largest_differences(model, processor, file)
        assert set(differences) == {"padded batch", "one image"}
        for where, difference in differences.items():
            # boxes to 1e-4; logits relative to their magnitude to 1e-3 (eager folds BatchNorm, the file does not)
            assert difference["pred_boxes"] <= 1e-4 and difference["logits"] <= 1e-3, (name, fmt, where, difference)
        print(name, fmt, differences)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name", CONVERTED)
def test_exported_converted_checkpoints_equal_transformers(exports, tmp_path, name):
    """The exported file of a converted checkpoint against transformers' own model on the same pixels: DETR on a
    padded batch of differently sized images (its pixel_mask) and on one image; RT-DETRv2 (fixed-size resize, no
    mask) on a batch of two and on one image."""
    folder, _, processor, onnx_file, xml = exports(name)
    reference = transformers_folder(name, tmp_path / "again")       # the same seeds: the same weights
    images = export_cli.check_images()
    batches = {"padded batch": images, "one image": images[:1]}
    if name == "transformers_rtdetr_v2":
        batches["padded batch"] = images[:2]
    pytorch = load_detector(str(folder)).detect(images, threshold=0.0)[0]
    for fmt, file in (("onnx", onnx_file), ("openvino", xml)):
        runner = load_detector(str(file))
        for got, expected in zip(runner.detect(images, threshold=0.0)[0], pytorch):   # the same detections
            assert got["labels"].tolist() == expected["labels"].tolist() and len(got["labels"]) > 0
            torch.testing.assert_close(got["scores"], expected["scores"], atol=1e-4, rtol=0)
            torch.testing.assert_close(got["boxes"], expected["boxes"], atol=1e-2, rtol=0)   # pixels
        for where, batch in batches.items():
            pixel_values, pixel_mask = model_inputs(processor, batch)
            assert (pixel_mask == 0).any() == (name == "transformers_detr" and where == "padded batch")
            with torch.no_grad():
                expected = reference(pixel_values=pixel_values, pixel_mask=pixel_mask)
            got = runner.forward(pixel_values=pixel_values, pixel_mask=pixel_mask)
            boxes = (expected.pred_boxes - got["pred_boxes"]).abs().max().item()
            logits = (expected.logits - got["logits"]).abs().max().item() / max(1.0, expected.logits.abs().max())
            assert boxes <= 1e-4 and logits <= 1e-3, (name, fmt, where, boxes, logits)
            print(name, fmt, where, "vs transformers: boxes", boxes, "logits", logits)
            assert np.ptp(got["pred_boxes"].numpy(), axis=1).min() > 1e-3    # not vacuous: queries differ


def test_exported_files_give_the_folders_detections_and_ap(exports, tmp_path):
    folder, _, _, onnx_file, xml = exports("detr")
    data = centred_boxes_data(tmp_path / "data")
    annotation_file = data / "annotations" / "instances_val2017.json"
    results, aps = {}, {}
    for label, model in (("pytorch", folder), ("onnx", onnx_file), ("openvino", xml)):
        predict_cli.predict(str(model), [str(data / "val2017")], str(tmp_path / label), threshold=0.0,
                            annotation_file=str(annotation_file), batch_size=3, progress=False)
        results[label] = json.loads((tmp_path / label / "predictions.json").read_text())
        aps[label] = eval_cli.evaluate_detector(str(model), data_dir=str(data), progress=False)
    assert aps["pytorch"]["AP"] > 0
    for label in ("onnx", "openvino"):
        assert aps[label]["runtime"] != "pytorch"
        assert aps[label]["AP"] == pytest.approx(aps["pytorch"]["AP"], abs=1e-6), label
        assert len(results[label]) == len(results["pytorch"]) == 8 * 10
        for got, expected in zip(results[label], results["pytorch"]):
            assert (got["image_id"], got["category_id"]) == (expected["image_id"], expected["category_id"])
            assert got["score"] == pytest.approx(expected["score"], abs=1e-5)
            assert got["bbox"] == pytest.approx(expected["bbox"], abs=1e-3)


@pytest.mark.timeout(1200)   # one more export, on a busy machine
def test_the_command_checks_and_writes_the_file(exports, tmp_path, capsys):
    folder = exports("detr")[0]
    output = tmp_path / "fixed" / "model.xml"
    assert export_cli.main([str(folder), "--format", "openvino", "--output", str(output), "--batch_size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "dynamic height and width" in printed and "checked against PyTorch on padded batch" in printed
    assert output.is_file() and output.with_suffix(".bin").is_file()
    assert sorted(p.name for p in output.parent.iterdir()) == ["model.bin", "model.xml"]   # no scratch left
    assert export_cli.main([str(folder), "--format", "onnx", "--output", str(tmp_path / "model.xml")]) == 2
    assert "ends in .onnx" in capsys.readouterr().err
    import onnx

    proto = onnx.load(str(exports("detr")[3]))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match="not written by detr-custom-export"):
        load_detector(str(tmp_path / "bare.onnx"))


def _export_in_a_subprocess(folder, output, precision, **calibration) -> dict:
    """export_cli.export's report, from a process of its own: with the quantization (NNCF) run in the test process,
    the full suite's process later died of a SIGSEGV in poll() while a test launched a subprocess."""
    code = ("import json, sys; from deploy import export; print(json.dumps(export.export(sys.argv[1], 'openvino', "
            "sys.argv[2], precision=sys.argv[3], **json.loads(sys.argv[4])), default=str))")
    result = subprocess.run([sys.executable, "-c", code, str(folder), str(output), precision, json.dumps(calibration)],
                            capture_output=True, text=True, timeout=1100)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(1200)   # quantization runs the calibration images through the graph twice
def test_reduced_precision_files_carry_their_precision(exports, tmp_path, capsys):
    """--precision bf16 / int8: OpenVINO files compiled at that precision (metadata), int8 quantized on the
    calibration images (FakeQuantize in the graph), close to PyTorch but not equal, scored by detr-custom-eval."""
    folder = exports("detr")[0]
    data = centred_boxes_data(tmp_path / "data")
    fp32_ap = eval_cli.evaluate_detector(str(folder), data_dir=str(data), progress=False)["AP"]
    for precision in ("bf16", "int8"):
        output = tmp_path / f"{precision}.xml"     # the scratch copy's name once: it must not overwrite the fp32 file
        calibration = {"calibration_data": str(data / "val2017"), "calibration_size": 5} if precision == "int8" else {}
        report = _export_in_a_subprocess(folder, output, precision, **calibration)
        assert report["largest_differences"]["pred_boxes"] <= 1e-4       # the fp32 graph it was made from
        reduced = max(d["pred_boxes"] for d in report["reduced_precision_differences"].values())
        print(precision, report["reduced_precision_differences"])
        assert 1e-6 < reduced < 0.1                                     # not fp32's numbers, near them
        assert ("FakeQuantize" in output.read_text()) == (precision == "int8")
        detector = load_detector(str(output))
        assert detector.runtime == f"openvino ({precision})"
        assert load_detector(str(output), precision="fp32").runtime == "openvino (fp32)"
        metrics = eval_cli.evaluate_detector(str(output), data_dir=str(data), progress=False)
        print(precision, "AP", metrics["AP"], "fp32 AP", fp32_ap)
        assert metrics["runtime"] == f"openvino ({precision})"
        if precision == "bf16":   # int8 of random weights with 5 calibration images: its AP says nothing
            assert metrics["AP"] > 0.5 * fp32_ap
    for arguments, message in ((["--format", "onnx", "--output", "m.onnx", "--precision", "bf16"], "is for --format"),
                               (["--format", "openvino", "--output", "m.xml", "--precision", "int8"],
                                "needs --calibration_data")):
        assert export_cli.main([str(folder), *arguments]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="applies to an exported OpenVINO"):
        load_detector(str(folder), precision="bf16")


@pytest.mark.timeout(1200)   # NNCF ranks each quantized operation by the AP its reverting restores
def test_int8_accuracy_control_keeps_the_ap_within_the_drop(exports, tmp_path, capsys):
    """--int8_max_ap_drop with validation data: the quantized operations that cost the most AP are reverted to fp32
    (NNCF's accuracy control) until the int8 file's AP, as detr-custom-eval measures it, is within the drop of the
    fp32 file's; the figures travel in the file's metadata. Allowed drop 0: quantizing every operation, calibrated
    on 3 training images, costs this model AP, so some are reverted. Calibrating on validation images is refused."""
    import openvino

    folder, _, _, _, fp32_file = exports("detr")
    data = centred_boxes_data(tmp_path / "data")
    fp32_ap = eval_cli.evaluate_detector(str(fp32_file), data_dir=str(data), progress=False)["AP"]
    output = tmp_path / "controlled.xml"
    with pytest.raises(ValueError, match="of its images are validation images"):
        export_cli.export(str(folder), "openvino", str(output), precision="int8", int8_max_ap_drop=0.0,
                          calibration_data=str(data / "val2017"), validation_data={"data_dir": str(data)})
    report = _export_in_a_subprocess(folder, output, "int8", calibration_data=str(data / "train2017"),
                                     calibration_size=3, int8_max_ap_drop=0.0, validation_data={"data_dir": str(data)})
    control = report["int8_accuracy_control"]
    print(control)
    metrics = eval_cli.evaluate_detector(str(output), data_dir=str(data), progress=False)
    assert metrics["runtime"] == "openvino (int8)" and "FakeQuantize" in output.read_text()
    assert control["fp32_AP"] == pytest.approx(fp32_ap, abs=1e-9) and fp32_ap > 0
    assert control["int8_AP"] == pytest.approx(metrics["AP"], abs=1e-9)        # detr-custom-eval's number
    assert fp32_ap - metrics["AP"] <= 1e-9 and control["ap_drop"] <= 0 == control["max_ap_drop"]
    assert control["int8_AP_before_control"] < fp32_ap                          # the control had work to do
    assert 0 < control["reverted_operations"] == len(control["reverted"]) < control["quantized_operations"]
    assert control["validation_images"] == 8 and control["int8_scope"] == "full"
    settings = json.loads(openvino.Core().read_model(str(output)).get_rt_info(["detr_custom"]).astype(str))
    assert settings["precision"] == "int8" and settings["int8_accuracy_control"] == control


@pytest.mark.parametrize("arguments, message", [
    (["--int8_max_ap_drop", "0.5"], "--int8_max_ap_drop is for --precision int8"),
    (["--precision", "fp32", "--int8_max_ap_drop", "0.5", "--data_dir", "d"], "is for --precision int8"),
    (["--precision", "int8", "--calibration_data", "c", "--int8_max_ap_drop", "0.5"], "needs validation data"),
    (["--precision", "int8", "--calibration_data", "c", "--int8_max_ap_drop", "-0.5", "--data_dir", "d"],
     "in AP points (AP x 100"),
    (["--precision", "int8", "--calibration_data", "c", "--data_dir", "d"], "give --int8_max_ap_drop too"),
    (["--precision", "int8", "--calibration_data", "c", "--int8_max_ap_drop", "0.5", "--data_dir", "d",
      "--top_k", "10"], "leave out --postprocess"),
])
def test_int8_accuracy_control_arguments_are_checked_when_parsed(tmp_path, capsys, arguments, message):
    """Bad combinations fail while the command line is read, before any model is loaded (the model does not
    exist here), with the fix in the message."""
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main([str(tmp_path / "absent"), "--format", "openvino", "--output", "m.xml", *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="in AP points"):     # the Python function checks them too
        export_cli.export(str(tmp_path / "absent"), "openvino", "m.xml", precision="int8", calibration_data="c",
                          int8_max_ap_drop=-1.0, validation_data={"data_dir": "d"})


QUANTIZE_SMALL_NETWORK = """
import sys, numpy as np, openvino, torch
from deploy.export import quantize_model
torch.manual_seed(0)
network = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, groups=8),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 4)).eval()
model = openvino.convert_model(network, example_input=torch.rand(1, 3, 8, 8))
samples = [np.random.default_rng(seed).random((1, 3, 8, 8), dtype=np.float32) for seed in range(4)]
openvino.save_model(quantize_model(model, samples, scope=sys.argv[2]), sys.argv[1], compress_to_fp16=False)
"""


@pytest.mark.timeout(600)
@pytest.mark.parametrize("scope", ["full", "transformer"])
def test_int8_keeps_the_sensitive_operations_in_floating_point(tmp_path, scope):
    """--int8_scope full: convolutions and matrix multiplications in int8 (an int8 input), depthwise convolutions
    (GroupConvolution) in fp32; transformer: every convolution in fp32. NNCF runs in a process of its own (see
    _export_in_a_subprocess)."""
    import openvino

    output = tmp_path / "int8.xml"
    result = subprocess.run([sys.executable, "-c", QUANTIZE_SMALL_NETWORK, str(output), scope], capture_output=True,
                            text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    model = openvino.Core().read_model(str(output))
    quantized = {op.get_type_name(): op.input_value(0).get_node().get_type_name() == "FakeQuantize"
                 for op in model.get_ops() if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul")}
    assert quantized == {"Convolution": scope == "full", "GroupConvolution": False, "MatMul": True}
    with pytest.raises(ValueError, match="--int8_scope must be one of"):
        export_cli.quantize_model(model, [], scope="backbone")


@pytest.mark.timeout(1200)
def test_postprocessed_files_give_the_folders_detections(exports, tmp_path, capsys):
    """--postprocess / --top_k: scores, labels and pixel boxes out of the graph, checked against
    post_process_object_detection by the exporter; detr-custom-predict on such a file writes the folder's
    detections (softmax head: every query at threshold 0, best first instead of in query order)."""
    folder = exports("detr")[0]
    data = centred_boxes_data(tmp_path / "data")
    onnx_file, xml = tmp_path / "post.onnx", tmp_path / "post_top3.xml"
    assert export_cli.main([str(folder), "--format", "onnx", "--output", str(onnx_file), "--postprocess"]) == 0
    assert "post-processed, top 10" in capsys.readouterr().out        # softmax: every one of the 10 queries
    report = export_cli.export(str(folder), "openvino", str(xml), top_k=3)
    assert report["top_k"] == 3 and report["largest_differences"]["pred_boxes"] <= 1e-4
    assert report["largest_differences"]["logits"] <= 1e-4          # scores
    results = {}
    for label, model in (("pytorch", folder), ("onnx", onnx_file), ("openvino", xml)):
        predict_cli.predict(str(model), [str(data / "val2017")], str(tmp_path / label), threshold=0.0,
                            batch_size=3, progress=False)
        detections = json.loads((tmp_path / label / "predictions.json").read_text())
        results[label] = sorted(detections, key=lambda d: (d["image_id"], -d["score"]))
    assert load_detector(str(xml)).postprocessed and not load_detector(str(folder)).postprocessed
    assert len(results["onnx"]) == len(results["pytorch"]) == 8 * 10 and len(results["openvino"]) == 8 * 3
    top3 = [d for i, d in enumerate(results["pytorch"]) if i % 10 < 3]
    for label, expected in (("onnx", results["pytorch"]), ("openvino", top3)):
        for got, want in zip(results[label], expected):
            assert (got["image_id"], got["category_id"]) == (want["image_id"], want["category_id"]), label
            assert got["score"] == pytest.approx(want["score"], abs=1e-5)
            assert got["bbox"] == pytest.approx(want["bbox"], abs=1e-2)
    # duplicate removal (--nms_iou_threshold) runs after a post-processed graph as after the folder's processor
    for label, model in (("pytorch-nms", folder), ("onnx-nms", onnx_file)):
        predict_cli.predict(str(model), [str(data / "val2017")], str(tmp_path / label), threshold=0.0,
                            batch_size=3, progress=False, nms_iou_threshold=0.7)
        detections = json.loads((tmp_path / label / "predictions.json").read_text())
        results[label] = sorted(detections, key=lambda d: (d["image_id"], -d["score"]))
    assert 8 <= len(results["onnx-nms"]) == len(results["pytorch-nms"]) < 8 * 10
    for got, want in zip(results["onnx-nms"], results["pytorch-nms"]):
        assert (got["image_id"], got["category_id"]) == (want["image_id"], want["category_id"])
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
    with pytest.raises(ValueError, match="exported with --postprocess"):
        eval_cli.evaluate_detector(str(xml), data_dir=str(data), progress=False)
