"""Quiet by default: transformers' pipeline("object-detection") on a saved folder logs nothing (with the package
imported, and as remote code without it), and a backbone that cannot be downloaded says how to build offline."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection, DetrCustomImageProcessor
from modeling_detr_custom.testing_utils import randomize_, tiny_kwargs


def _save_folder(path):
    config = DetrCustomConfig(**tiny_kwargs(id2label={0: "circle", 1: "square", 2: "triangle"}))
    randomize_(DetrCustomForObjectDetection(config)).eval().save_pretrained(path)
    DetrCustomImageProcessor(size={"shortest_edge": 96, "longest_edge": 160}).save_pretrained(path)
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(
        path / "image.png")


def _stderr_of(script: str, tmp_path, **env) -> str:
    """Runs the script in a new process (as a user's first call would); its stderr, less transformers' progress
    bars (loading weights), which are not messages."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                            "HF_MODULES_CACHE": str(tmp_path / "modules"), **env})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "10 detections"
    return "\n".join(line for line in result.stderr.replace("\r", "\n").splitlines()
                     if line.strip() and "%|" not in line)


@pytest.mark.parametrize("package", [False, True], ids=["remote_code", "package"])
def test_pipeline_creation_and_inference_log_nothing(tmp_path, package):
    _save_folder(tmp_path / "folder")
    imports = ("import modeling_detr_custom" if package else
               "import sys; sys.modules['modeling_detr_custom'] = None   # remote code only")
    stderr = _stderr_of(f"""
        {imports}
        import PIL.Image
        from transformers import pipeline
        detector = pipeline("object-detection", model="folder", trust_remote_code={not package})
        print(len(detector(PIL.Image.open("folder/image.png"), threshold=0.0)), "detections")
    """, tmp_path, PYTHONPATH=str(Path(__file__).parents[1]) if package else "")
    assert "not supported" not in stderr
    assert stderr == ""


def test_a_backbone_download_without_network_says_how_to_build_offline(tmp_path):
    script = """
        from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection
        try:
            DetrCustomForObjectDetection(DetrCustomConfig(backbone="resnet18"))
        except OSError as error:
            print(error)
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                            cwd=Path(__file__).parents[1],
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backbone='resnet18': timm could not download its pretrained weights" in result.stdout
    assert "build the model with use_pretrained_backbone=False (--use_pretrained_backbone false" in result.stdout
