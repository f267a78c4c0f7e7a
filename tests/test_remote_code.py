"""A saved folder is self-contained: Auto classes and pipeline("object-detection") load it with
trust_remote_code=True in a process where this package cannot be imported, and without trust_remote_code when
the package is imported."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import torch
from transformers import pipeline

from modeling_detr_custom import (
    DetrCustomConfig,
    DetrCustomForObjectDetection,
    DetrCustomImageProcessor,
)
from modeling_detr_custom.testing_utils import randomize_, remote_code_files, tiny_kwargs


def _save_folder(path):
    config = DetrCustomConfig(**tiny_kwargs(id2label={0: "circle", 1: "square", 2: "triangle"}))
    model = randomize_(DetrCustomForObjectDetection(config)).eval()
    model.save_pretrained(path)
    DetrCustomImageProcessor(size={"shortest_edge": 96, "longest_edge": 160}).save_pretrained(path)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    image.save(path / "image.png")
    return model, image


def test_saved_folder_holds_every_file_the_code_imports(tmp_path):
    _save_folder(tmp_path)
    expected = remote_code_files()
    assert {"modeling_detr_custom.py", "configuration_detr_custom.py", "backbone.py", "encoder_detr.py",
            "decoder_detr.py", "checkpoint_conversion.py", "box_ops.py"} <= expected
    assert "convert.py" not in expected and "__init__.py" not in expected     # the CLI is a layer above the model
    assert {path.name for path in tmp_path.glob("*.py")} == expected


def _detections(detector, image):
    return [(d["label"], round(d["score"], 5), d["box"]) for d in detector(image, threshold=0.0)]


def test_pipeline_and_auto_classes_without_the_package(tmp_path):
    model, image = _save_folder(tmp_path / "folder")
    expected = _detections(pipeline("object-detection", model=model,
                                    image_processor=DetrCustomImageProcessor.from_pretrained(tmp_path / "folder")),
                           image)
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["modeling_detr_custom"] = None   # the package cannot be imported in this process
        import PIL.Image
        from transformers import AutoImageProcessor, AutoModelForObjectDetection, pipeline
        folder = {str(tmp_path / 'folder')!r}
        model = AutoModelForObjectDetection.from_pretrained(folder, trust_remote_code=True)
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        detector = pipeline("object-detection", model=folder, trust_remote_code=True)
        image = PIL.Image.open(folder + "/image.png")
        found = [(d["label"], round(d["score"], 5), d["box"]) for d in detector(image, threshold=0.0)]
        print(json.dumps(found))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    import json
    found = [tuple(d) for d in json.loads(result.stdout.strip().splitlines()[-1])]
    assert len(found) == len(expected) == 10
    assert found == [tuple(d) for d in expected]
    assert {label for label, _, _ in found} <= {"circle", "square", "triangle"}


def test_pipeline_with_the_package_needs_no_trust_remote_code(tmp_path):
    model, image = _save_folder(tmp_path / "folder")
    detector = pipeline("object-detection", model=str(tmp_path / "folder"))
    assert isinstance(detector.model, DetrCustomForObjectDetection)
    detections = detector(image, threshold=0.0)
    assert len(detections) == 10
    for detection in detections:
        box = detection["box"]
        assert 0 <= box["xmin"] <= box["xmax"] <= 120 and 0 <= box["ymin"] <= box["ymax"] <= 90
    # the folder's model is the saved one: same weights, same outputs
    expected = pipeline("object-detection", model=model, image_processor=detector.image_processor)
    assert _detections(detector, image) == _detections(expected, image)
    pixel_values = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        assert torch.equal(detector.model(pixel_values).logits, model(pixel_values).logits)
