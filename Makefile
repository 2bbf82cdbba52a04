# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRA8 := $(VENV)/extras/adamw8bit/.installed
DEMO_OUT ?= demo_out

.PHONY: demo test install toy clean lock

$(BIN)/python:
	$(PY) -m venv $(VENV)

# constraints.txt pins every package to the versions the suite last passed on: a release tomorrow cannot break CI.
$(STAMP): requirements.txt constraints.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip -c constraints.txt
	$(BIN)/pip install -q -r requirements.txt -c constraints.txt
	$(BIN)/pip install -q -e ".[app,wandb,test]" -c constraints.txt  # the app's, W&B's and the browser test's extras
	touch $(STAMP)

install: $(STAMP)

# 8-bit AdamW's bitsandbytes (the [adamw8bit] extra) goes beside the environment, not into it: installed, diffusers and
# peft import it, and on AVX512-bf16 CPUs it asks the Hub for a kernel. The tests that run 8-bit AdamW load it from
# there (tests/bnb_extra.py).
$(EXTRA8): constraints.txt | $(STAMP)
	rm -rf $(@D) && $(BIN)/pip install -q --no-deps --target $(@D) bitsandbytes -c constraints.txt && touch $@

demo: $(STAMP)
	$(BIN)/python -m sd_dmd.demo --out $(DEMO_OUT)

toy: $(STAMP)
	$(BIN)/python -m sd_dmd.toy --out $(DEMO_OUT)/toy

test: $(STAMP) $(EXTRA8)
	$(BIN)/python -m pytest -q -ra tests

# Refresh the lock deliberately: newest versions the ranges allow, in a throw-away env; then run `make test`.
lock:
	rm -rf .venv-lock && $(PY) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip && .venv-lock/bin/pip install -q -r requirements.txt ".[adamw8bit]"
	{ sed -n '1,2p' constraints.txt; echo "# Locked $$(date +%F) with $$(.venv-lock/bin/python --version)."; \
	  .venv-lock/bin/pip freeze --all | grep -v -i '^sd[-_]dmd'; } > constraints.txt.new && mv constraints.txt.new constraints.txt
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
