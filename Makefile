# `make demo` and `make test` do all the set-up themselves: they create .venv
# on first use and install zhllama (editable) with its dependencies at the exact
# versions of constraints.txt (pyproject.toml states the ranges it supports).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	# DeepSpeed's config parser for the recipe configs' test: without its CUDA ops, and built
	# against the torch just installed (an isolated build would fetch another torch)
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --no-build-isolation -c constraints.txt deepspeed
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/zhllama demo --workdir demo-run --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) demo-run .pytest_cache
