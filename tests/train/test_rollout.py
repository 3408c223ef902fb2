"""The actor's rollout engine (train/rollout.py) in-process on a tiny model: a LoRA actor rolls out
through the fused decoder with its adapters merged, and a DeepSpeed Hybrid Engine that fails to
start leaves a run on the fused path with the reason logged, not a crash."""
import pytest
import torch

from core import models
from train.models import make_trainable
from core.distributed import init_distributed
from core.sampling import Sampling
from train import rollout
from train.config import PPOConfig


@pytest.fixture(scope="module")
def group():
    init_distributed()  # a group of one, as `python -m train ppo` makes


def prompts_of(tokenizer, texts):
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for t in texts]


def test_a_lora_actor_rolls_out_fused_with_its_adapters(group, tiny_model):
    cfg = PPOConfig(actor=str(tiny_model), reward=str(tiny_model), rollout_engine="fused",
                    lora_dim=4, lora_alpha=8.0)
    logs = []

    def load_lm():
        lm = make_trainable(models.load_causal_lm(str(tiny_model)), cfg)
        with torch.no_grad():  # peft starts B at zero: make the adapters change the output
            for name, param in lm.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.2)
        return lm

    actor, engine = rollout.start_actor(cfg, load_lm, 4, None, logs.append)
    assert engine.kind == "fused" and "our fused decoder, LoRA adapters merged into its copy" in logs[0]
    tokenizer = models.load_tokenizer(str(tiny_model))
    prompts = prompts_of(tokenizer, ["Hi", "Name a river."])
    sampling = Sampling(10, 1.0, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=True)
    _, _, tokens, mask = engine.rollout(prompts, sampling)
    lm = actor.module.lm.eval()
    for row, prompt in enumerate(prompts):  # the adapted model's own greedy tokens
        own = lm.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        expected = own[0, len(prompt):].tolist()
        assert tokens[row, :len(expected)].tolist() == expected and mask[row].sum() == len(expected)


def test_a_hybrid_engine_that_fails_falls_back_to_fused_and_says_why(group, tiny_model, monkeypatch):
    """On this CPU DeepSpeed's inference containers raise when the Hybrid Engine starts; forced
    past the CUDA check, the actor restarts without it and rolls out fused."""
    monkeypatch.setattr(rollout, "ds_hybrid_reason", lambda lm: None)  # as if on a CUDA GPU
    cfg = PPOConfig(actor=str(tiny_model), reward=str(tiny_model), rollout_engine="deepspeed")
    logs = []
    actor, engine = rollout.start_actor(cfg, lambda: models.load_causal_lm(str(tiny_model)), 4, None,
                                        logs.append)
    assert engine.kind == "fused" and actor.__class__.__name__ == "DeepSpeedEngine"
    assert logs[0].startswith("rollouts: fused (DeepSpeed's Hybrid Engine failed (")
    tokenizer = models.load_tokenizer(str(tiny_model))
    sampling = Sampling(6, 1.0, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id)
    prompt_ids, _, tokens, _ = engine.rollout(prompts_of(tokenizer, ["Hi"]), sampling)
    assert tokens.shape[0] == 1 and 1 <= tokens.shape[1] <= 6
