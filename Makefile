# RLHF Studio: `make demo` sets up and starts the app; `make test` sets up and runs every test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)

.PHONY: setup model demo test test-fast bench clean

# The virtual environment is (re)built whenever requirements.txt changes.
$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a bare torch requirement would pull gigabytes of CUDA packages
	$(BIN)/pip install -q "$$(grep -m1 '^torch==' requirements.txt)"
	$(BIN)/pip install -q -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP) model

# The built-in model (SmolLM2-135M-Instruct), converted once into $RLHF_HOME/models.
model: $(STAMP)
	$(BIN)/python -m train.models

demo: setup
	$(BIN)/python app.py

test: setup
	$(BIN)/python -m pytest -q -rs --durations=10

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python bench/sft.py

clean:
	rm -rf $(VENV) .pytest_cache
