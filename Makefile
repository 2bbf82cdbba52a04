# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: demo test install toy clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m sd_dmd.demo --out $(DEMO_OUT)

toy: $(STAMP)
	$(BIN)/python -m sd_dmd.toy --out $(DEMO_OUT)/toy

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
