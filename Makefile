# dermfusion: `make run` sets up and starts the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FHIR_VENV := .venv-fhir
SYSTEM_TOOLS := img2dcm dsrdump dciodvfy storescu echoscu chromium chromedriver

.PHONY: run test lint install fhir-server-install system-deps smoke-train clean demo

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

# DCMTK (img2dcm, storescu, dsrdump), dicom3tools (dciodvfy) and chromium + its driver (the
# status page's browser test, driven by Selenium) from Debian.
system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing dcmtk dicom3tools chromium chromium-driver (missing:$$missing)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q dcmtk dicom3tools chromium chromium-driver; \
	fi

# The main job on embedded defaults: listener on port 11112, no PACS, no FHIR, results in var/outbox/.
run: install
	$(BIN)/dermfusion serve

lint: install
	$(BIN)/ruff check .

# The reference documents generated from the code: docs/dicom-conformance.md, docs/fhir.md,
# docs/configuration.md (the unit tests fail when the committed ones are stale).
docs: install
	$(BIN)/python -m plugin.reference_docs

.PHONY: docs

# Integration tests start Orthanc, which has no bind-address option: run them in a private
# network namespace (loopback only) when the platform allows it.
test: install fhir-server-install system-deps orthanc-install lint
	@if unshare -n true 2>/dev/null; then \
	  unshare -n sh -c 'ip link set lo up && exec $(BIN)/python -m pytest'; \
	else \
	  echo "unshare -n not permitted: Orthanc tests will skip"; $(BIN)/python -m pytest; \
	fi

# Orthanc PACS (+ DICOMweb plugin) from Debian, for the routing integration tests. The package's
# own service must not start (tests run Orthanc as a plain process from a temp config), so a
# policy-rc.d that exits 101 is in place during the install; an existing one is restored after.
ORTHANC_BIN ?= /usr/sbin/Orthanc

orthanc-install:
	@if command -v Orthanc >/dev/null 2>&1 || [ -x $(ORTHANC_BIN) ]; then \
	  echo "Orthanc present: $$(command -v Orthanc || echo $(ORTHANC_BIN))"; exit 0; \
	fi; \
	SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	POLICY=/usr/sbin/policy-rc.d; BACKUP=""; \
	if [ -e $$POLICY ]; then BACKUP=$$(mktemp) && $$SUDO cp -p $$POLICY $$BACKUP; fi; \
	printf '#!/bin/sh\nexit 101\n' | $$SUDO tee $$POLICY >/dev/null && $$SUDO chmod 755 $$POLICY; \
	$$SUDO apt-get update -q \
	  && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q orthanc orthanc-dicomweb; \
	status=$$?; \
	if [ -n "$$BACKUP" ]; then $$SUDO mv $$BACKUP $$POLICY; else $$SUDO rm -f $$POLICY; fi; \
	exit $$status

.PHONY: orthanc-install

# Orthanc + FHIR server + dermfusion on loopback; a few studies through; a table of results.
demo: install fhir-server-install system-deps orthanc-install
	unshare -n sh -c 'ip link set lo up && exec $(BIN)/python -m tests.integration.demo'

smoke-train: install
	$(BIN)/dermfusion train --max-images 48 --max-steps 3 --output-dir var/smoke-train

clean:
	rm -rf var
