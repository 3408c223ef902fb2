import torch

from core.models import load_causal_lm
from train import models


def test_lora_merge_matches_peft(tiny_model):
    lm = load_causal_lm(str(tiny_model))
    peft_model = models.add_lora(lm, dim=4, alpha=8.0, dropout=0.0, targets="q_proj,v_proj")
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the adapters matter
            torch.nn.init.normal_(param, std=0.02)
    merged = models.merge_lora_state_dict(dict(peft_model.state_dict()), scaling=8.0 / 4)
    expected = peft_model.merge_and_unload().state_dict()
    assert set(merged) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value)
