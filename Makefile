# One venv at .venv. torch is installed first, pinned, so that the project's `torch>=2.5` is already satisfied
# and pip does not pick a build on its own. On the reference machines `torch==2.13.0` resolves to a local CPU
# wheel; elsewhere choose the build you want, e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
PY ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install fetch bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

fetch: $(STAMP)
	$(BIN)/attnlab models fetch

demo: fetch
	$(BIN)/attnlab report --out attnlab-report --force

test: fetch
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/probe_overhead.py --long-repeats 1 --markdown

clean:
	rm -rf $(VENV) attnlab-report
