# mednode: two commands do all set-up on a fresh machine.
#   make run   - create .venv, install mednode, start the node on the embedded default
#   make test  - install test dependencies (and Debian peers when root), run the suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEBIAN_PEERS := orthanc orthanc-dicomweb dcmtk dicom3tools docker-compose chromium chromium-driver fonts-droid-fallback

.PHONY: run test venv peers lint bench clean

$(STAMP): setup.cfg constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

peers:
	@if [ "$$(id -u)" = "0" ]; then \
	  missing=""; for p in $(DEBIAN_PEERS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	else echo "not root: make sure these Debian packages are installed: $(DEBIAN_PEERS)"; fi

run: $(STAMP)
	$(VENV)/bin/mednode serve $(if $(CONFIG),--config $(CONFIG),)

test: $(STAMP) peers
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy dicom_io inference storage

bench: $(STAMP) peers
	$(PY) bench/ingest.py

clean:
	rm -rf $(VENV) var .pytest_cache
