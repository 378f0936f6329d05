# One venv at .venv; torch's local CPU build is installed first so pip never pulls a CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install fetch bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

fetch: $(STAMP)
	$(BIN)/attnlab models fetch

demo: fetch
	$(BIN)/attnlab report --out attnlab-report

test: fetch
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/probe_overhead.py

clean:
	rm -rf $(VENV) attnlab-report
