# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv and
# installs what it needs on first use. torch is installed first, and only when the venv has
# none: on CI machines torch==2.13.0 is a CPU build lying on disk, so no multi-GB CUDA build is
# downloaded; GPU users install their own torch into .venv before running make.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup test test-slow demo lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -e ".[test]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m ruff check scvae tests benchmarks tutorials
	$(PY) -m ruff format --check scvae tests benchmarks tutorials
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

demo: setup
	$(VENV)/bin/scvae demo --out scvae_demo

clean:
	rm -rf $(VENV) scvae_demo
