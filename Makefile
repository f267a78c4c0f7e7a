# The README's commands. Each target creates the virtual environment it needs on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: test demo bench bench-quick bench-convergence lint clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q tests

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m training.train --config training/configs/demo.yaml

bench: $(STAMP)  # the issue's sizes (R50 at 800x1066), about 10 minutes on 2 cores
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.run_all --full

bench-quick: $(STAMP)  # the same benchmarks at 384x512: a few minutes on a quiet 2-core machine
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.run_all

bench-convergence: $(STAMP)  # each variant trains 1000 steps on the demo data: ~10 min a variant on 2 quiet cores
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.bench_convergence $(ARGS)

lint: $(STAMP)
	$(PY) -m flake8 modeling_detr_custom training hub_cards benchmarks tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
