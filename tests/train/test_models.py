import pytest
import torch

from train import models
from train.models import ModelError


def test_unknown_paths_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ModelError, match="not found: pass a local Hugging Face folder"):
        models.resolve_model(str(tmp_path / "missing" / "model"))
    with pytest.raises(ModelError, match="has no config.json"):
        models.resolve_model(str(tmp_path))
    with pytest.raises(ModelError, match="does not exist"):
        models.resolve_model(str(tmp_path / "x.gguf"))
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_lora_merge_matches_peft(tiny_model):
    lm = models.load_causal_lm(str(tiny_model))
    peft_model = models.add_lora(lm, dim=4, alpha=8.0, dropout=0.0, targets="q_proj,v_proj")
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the adapters matter
            torch.nn.init.normal_(param, std=0.02)
    merged = models.merge_lora_state_dict(dict(peft_model.state_dict()), scaling=8.0 / 4)
    expected = peft_model.merge_and_unload().state_dict()
    assert set(merged) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value)


@pytest.mark.slow
def test_default_model_is_converted_once_and_really_chats(default_model):
    assert (default_model / "model.safetensors").is_file()
    assert models.ensure_default_model() == default_model  # cached: no second conversion
    tokenizer = models.load_tokenizer(str(default_model))
    lm = models.load_causal_lm(str(default_model), dtype=torch.bfloat16)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = lm.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
