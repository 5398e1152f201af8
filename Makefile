# dermfusion: `make run` sets up and starts the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FHIR_VENV := .venv-fhir
SYSTEM_TOOLS := img2dcm dsrdump dciodvfy storescu echoscu
SAMPLES := $(wildcard tests/data/*.dcm)

.PHONY: run test lint install fhir-server-install system-deps smoke-train clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the CPU build on local disk: a looser spec would pull a CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The FHIR R4 server the integration tests talk to, in its own venv (its pins differ from ours).
$(FHIR_VENV)/.installed:
	$(PYTHON) -m venv $(FHIR_VENV)
	$(FHIR_VENV)/bin/pip install -q sekmet-fhir==0.1.1
	touch $@

fhir-server-install: $(FHIR_VENV)/.installed

# DCMTK (img2dcm, storescu, dsrdump) and dicom3tools (dciodvfy) from Debian.
system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing dcmtk dicom3tools (missing:$$missing)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q dcmtk dicom3tools; \
	fi

run: install
	$(BIN)/dermfusion infer $(SAMPLES) --out var/outbox

lint: install
	$(BIN)/ruff check .

test: install fhir-server-install system-deps lint
	$(BIN)/python -m pytest

smoke-train: install
	$(BIN)/dermfusion train --max-images 64 --epochs 1 --output-dir var/smoke-train

clean:
	rm -rf var
