# RLHF Studio: `make demo` sets up and starts the app; `make test` sets up and runs every test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)

.PHONY: setup model ops browser demo test test-fast test-unit bench clean

# The virtual environment is (re)built whenever requirements.txt changes.
$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a bare torch requirement would pull gigabytes of CUDA packages
	$(BIN)/pip install -q "$$(grep -m1 '^torch==' requirements.txt)"
	$(BIN)/pip install -q -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP) model ops

# The built-in model (SmolLM2-135M-Instruct), converted once into $RLHF_HOME/models.
model: $(STAMP)
	$(BIN)/python -m core.models

# DeepSpeed's CPU communication op, built once here so that runs only load it (a run stopped
# while building it used to leave torch's build lock behind: core/distributed.py).
ops: $(STAMP)
	$(BIN)/python -m core.distributed

# The browser test drives Debian's chromium through the playwright package (requirements.txt;
# never `playwright install`, which downloads a browser build of its own).
browser:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		|| echo "warning: chromium could not be installed (needs root and apt): the browser test will skip"

demo: setup
	$(BIN)/python app.py

test: setup browser
	$(BIN)/python -m pytest -q -rs --durations=10

# Tiers: unit (in-process, under 3 minutes) < fast (also the tests that start runs and servers on
# tiny models) < test (also the real-model and multi-process tests; what CI runs).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-unit: setup
	$(BIN)/python -m pytest -q -m "not slow and not integration" --durations=5

bench: setup
	$(BIN)/python bench/sft.py

clean:
	rm -rf $(VENV) .pytest_cache
