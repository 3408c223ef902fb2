"""Fixtures of the serving tests (besides tests/conftest.py's)."""
from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def untied_model(tiny_model, tmp_path_factory):
    """The tiny model's architecture and tokenizer with other random weights and an output layer
    of its own. The tiny model's output layer is its embedding, so its greedy answer repeats the
    prompt's last token whatever the prompt; this one's greedy answers differ by prompt."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("untied-tiny")
    for path in tiny_model.iterdir():
        if "token" in path.name or path.suffix == ".jinja":
            shutil.copy(path, folder)
    torch.manual_seed(1)
    config = AutoConfig.from_pretrained(tiny_model, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder
