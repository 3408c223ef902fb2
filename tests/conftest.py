"""Shared fixtures: the real default model, a tiny random model with its tokenizer, and a CLI runner."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.process import tune_process

tune_process()  # as every entry point does, before torch allocates (tests import torch next)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


# The tiers (pytest.ini): `slow` is marked by hand; `integration` is every other test that starts a
# process (a training run, the app's launcher, a server), found here from its code, the module's
# helpers it calls and its fixtures, so the unit tier (`make test-unit`: neither) stays
# in-process and fast without a list to maintain.
STARTS_A_PROCESS = ("run_train(", "subprocess.", "Popen(", "launch.start(", "launch.start_over(",
                    "ManagedServer(", "ServerPool(")
PROCESS_FIXTURES = {"tiny_reward_model", "real_reward_model", "server"}


def process_helpers(module) -> tuple[str, ...]:
    """Calls of the module's own helper functions that start a process, e.g. "serve("."""
    return tuple(f"{name}(" for name, value in vars(module).items()
                 if inspect.isfunction(value) and value.__module__ == module.__name__
                 and not name.startswith("test") and any(call in inspect.getsource(value)
                                                         for call in STARTS_A_PROCESS))


def pytest_collection_modifyitems(items):
    helpers = {}
    for item in items:
        function, module = getattr(item, "function", None), getattr(item, "module", None)
        if module is not None and module not in helpers:
            helpers[module] = process_helpers(module)
        code = inspect.getsource(function) if function else ""
        starts = STARTS_A_PROCESS + helpers.get(module, ())
        if any(call in code for call in starts) or PROCESS_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.integration)


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is missing: these tests read the real data sets in ../shared/data")
    return path


@pytest.fixture(scope="session")
def default_model() -> Path:
    from core.models import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, default_model) -> Path:
    """A 2-layer random Llama with the default model's tokenizer and chat template (~3M params)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_train(*args: str, timeout: float = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m train ARGS` in a subprocess, as a user would run it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture
def sft_file(tmp_path) -> Path:
    """A small SFT set in our record format: short answers the tiny model can fit quickly."""
    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
             "response": f"{a} plus {b} is {a + b}."} for a in range(8) for b in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def separable_pairs(tmp_path):
    """Chosen answers always agree, rejected ones always refuse: a model can separate them."""
    path = tmp_path / "pairs.jsonl"
    topics = ["tea", "maps", "rain", "bees", "glass", "sand", "wool", "clay", "jazz", "kites",
              "ferns", "owls", "salt", "ink", "moss", "rust"]
    rows = [{"prompt": f"Tell me about {t}.", "chosen": f"Sure! Here is a fact about {t}.",
             "rejected": "No. I will not talk about that."} for t in topics * 3]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


HH = "hh_harmless_base_test.jsonl.gz"


@pytest.fixture(scope="session")
def real_reward_model(tmp_path_factory) -> Path:
    """A short real reward-model run on the default model and HH pairs (the RM part of a
    0,5,5 split, so PPO can take its prompts from the disjoint PPO part)."""
    out = tmp_path_factory.mktemp("real-rm") / "rm"
    # CI-sized (about 16 x 12 s steps plus two evaluations on 2 cores in fp32): HH prompts cut to
    # their last turns at 160 tokens; 12 steps of these settings reached 0.65 held-out accuracy
    done = run_train("rm", "--model", "default", "--data", str(shared_file(HH)), "--data-split", "0,5,5",
                     "--output", str(out), "--max-steps", "16", "--batch-size", "8", "--max-seq-len", "160",
                     "--learning-rate", "5e-5", "--eval-fraction", "0.15", "--max-eval-samples", "120",
                     "--eval-every", "0", "--save-every", "0", "--stats-samples", "64", timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return out
