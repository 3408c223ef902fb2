import os
import subprocess
import sys

import pytest
import torch

from core import models
from core.models import ModelError
from tests.conftest import ROOT


def test_unknown_paths_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ModelError, match="not found: pass a local Hugging Face folder"):
        models.resolve_model(str(tmp_path / "missing" / "model"))
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve_model(str(tmp_path))
    with pytest.raises(ModelError, match="does not exist"):
        models.resolve_model(str(tmp_path / "x.gguf"))
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_hub_model_that_cannot_be_loaded_is_one_sentence(tmp_path):
    """Second probe: offline, `train --model someone/not-a-real-model` ended in transformers'
    two-line OSError (the server's case: tests/serving/test_cli.py)."""
    done = subprocess.run([sys.executable, "-m", "train", "sft", "--output", str(tmp_path / "o"),
                           "--model", "someone/not-a-real-model"],
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "RLHF_HOME": str(tmp_path)},
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "could not load the tokenizer of someone/not-a-real-model" in last and "'default'" in last


def test_a_folder_of_pickled_weights_is_refused_in_one_sentence(tiny_model, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model / "config.json").read_text())
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"only pickled weights \(pytorch_model.bin\)") as caught:
        models.resolve_model(str(folder))
    assert "\n" not in str(caught.value) and "weights_only" not in str(caught.value)


@pytest.mark.slow
def test_default_model_is_converted_once_and_really_chats(default_model):
    assert (default_model / "model.safetensors").is_file()
    assert models.ensure_default_model() == default_model  # cached: no second conversion
    tokenizer = models.load_tokenizer(str(default_model))
    lm = models.load_causal_lm(str(default_model))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = lm.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
