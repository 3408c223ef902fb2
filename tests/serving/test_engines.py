"""Engine selection and loading: what runs where, safetensors only, end-of-turn tokens."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from core.hardware import hardware
from core.models import ModelError
from serving.engines import EngineError, end_of_turn_ids, load_engine, pick_engine


def test_auto_picks_ds_inference_without_cuda_and_mii_is_refused_in_one_sentence():
    if hardware().device == "cuda":
        pytest.skip("a CPU-only check")
    assert pick_engine("auto") == "ds-inference"
    with pytest.raises(EngineError, match="needs a CUDA GPU.*--engine ds-inference"):
        pick_engine("mii")


def test_tensor_parallel_above_one_is_refused(tiny_model):
    with pytest.raises(EngineError, match="--tp 2.*--tp 1"):
        load_engine(str(tiny_model), "ds-inference", tp=2)


def test_folder_with_only_pickled_weights_is_refused(tiny_model, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_model / "config.json", pickled)
    torch.save({"lm_head.weight": torch.zeros(2, 2)}, pickled / "pytorch_model.bin")
    with pytest.raises(ModelError, match="only pickled weights.*pytorch_model.bin"):
        load_engine(str(pickled), "hf")


def test_end_of_turn_ids_cover_eos_and_the_chat_end_token(tiny_model):
    engine = load_engine(str(tiny_model), "hf", slots=1, max_len=32, dtype="fp32")
    im_end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert engine.tokenizer.eos_token_id in engine.end_token_ids and im_end in engine.end_token_ids
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["eos_token_id"] in end_of_turn_ids(engine.tokenizer, None)
