# declnet — the commands a user needs. Each target installs what it needs into the
# current Python; torch is installed first only when it is missing, so that the
# range in pyproject.toml is already met (pick another build with TORCH=...).
PYTHON ?= python3
TORCH ?= torch==2.13.0
PIP := $(PYTHON) -m pip --disable-pip-version-check

.PHONY: help torch install install-test install-apps test lint demo bench docs clean

help:
	@echo "make help         - this list"
	@echo "make torch        - install torch ($(TORCH)) if it is missing"
	@echo "make install      - torch, then declnet (pip install -e .)"
	@echo "make install-test - torch, then declnet with the [test] extra"
	@echo "make install-apps - torch, then declnet with the [apps] extra"
	@echo "make lint         - ruff on src, tests, benchmarks and examples"
	@echo "make test         - lint, then the test suite (pytest), tutorials and cookbook included"
	@echo "make demo         - run the point-cloud robust-pooling experiment (demo preset)"
	@echo "make demo-image   - run the image experiment (ResNet-18 with Lp projections, digits)"
	@echo "make bench        - print the benchmark tables"
	@echo "make docs         - build the documentation site, API reference included, into build/site (--strict)"
	@echo "make clean        - remove build outputs and caches"

torch:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"

install: torch
	$(PIP) install -q -e .

install-test: torch
	$(PIP) install -q -e ".[test]"

install-apps: torch
	$(PIP) install -q -e ".[apps]"

lint: install-test
	$(PYTHON) -m ruff check src tests benchmarks examples

test: install-test lint
	OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m pytest -q

demo: install-apps
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m declnet.apps.pointcloud sweep --preset demo

bench: install-test
	for script in benchmarks/*.py; do OMP_WAIT_POLICY=PASSIVE $(PYTHON) $$script || exit 1; done

docs: torch
	$(PIP) install -q -e ".[docs]"
	$(PYTHON) -m mkdocs build --strict --site-dir build/site

clean:
	rm -rf build dist .pytest_cache .ruff_cache src/*.egg-info

# The image experiment (paper §7, Table 6): ResNet-18 with every projection, on the digits.
.PHONY: demo-image
demo-image: install-apps
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m declnet.apps.image sweep --preset demo
