"""The actor's rollout engine (train/rollout.py) in-process on a tiny model: a LoRA actor rolls out
through the fused decoder with its adapters merged, a DeepSpeed Hybrid Engine that fails to
start leaves a run on the fused path with the reason logged, not a crash, and the log-probs
recorded while sampling are the training forward's."""
import dataclasses

import pytest
import torch

from core import models
from core.decoder import SlotDecoder
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


def lora_actor(cfg):
    """load_lm for start_actor: the actor with LoRA adapters that change its output."""
    def load_lm():
        lm = make_trainable(models.load_causal_lm(cfg.actor), cfg)
        with torch.no_grad():  # peft starts B at zero: make the adapters change the output
            for name, param in lm.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.2)
        return lm

    return load_lm


def test_a_lora_actor_rolls_out_fused_with_its_adapters(group, tiny_model):
    cfg = PPOConfig(actor=str(tiny_model), reward=str(tiny_model), rollout_engine="fused",
                    lora_dim=4, lora_alpha=8.0)
    logs = []

    actor, engine = rollout.start_actor(cfg, lora_actor(cfg), 4, None, logs.append)
    assert engine.kind == "fused" and "our fused decoder, LoRA adapters merged into its copy" in logs[0]
    tokenizer = models.load_tokenizer(str(tiny_model))
    prompts = prompts_of(tokenizer, ["Hi", "Name a river."])
    sampling = Sampling(10, 1.0, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=True)
    _, _, tokens, mask, _ = engine.rollout(prompts, sampling)
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
    prompt_ids, _, tokens, _, _ = engine.rollout(prompts_of(tokenizer, ["Hi"]), sampling)
    assert tokens.shape[0] == 1 and 1 <= tokens.shape[1] <= 6


# ---- log-probs recorded while sampling -----------------------------------------------------------

def training_logprobs(model, rollout_: rollout.Rollout, temperature: float) -> torch.Tensor:
    """(B, R) the training forward's log-probs of the rollout's tokens (train/experience.py), 0
    where the mask is 0."""
    from train.experience import response_logprobs

    sequences = torch.cat([rollout_.prompt_ids, rollout_.response_ids], 1)
    attention_mask = torch.cat([rollout_.prompt_mask, rollout_.response_mask], 1)
    with torch.no_grad():
        logprobs, _ = response_logprobs(model, sequences, attention_mask, rollout_.prompt_ids.shape[1],
                                        temperature)
    return logprobs * rollout_.response_mask


def sample_with_early_ends(sample, sampling: Sampling) -> rollout.Rollout:
    """`sample(sampling, generator)` twice with one seed: the token row 0 draws third becomes the
    end-of-turn token of the second time, so row 0 (or a row that draws it sooner) ends early."""
    first = sample(dataclasses.replace(sampling, eos_token_id=-1), torch.Generator().manual_seed(0))
    ending = dataclasses.replace(sampling, eos_token_id=int(first.response_ids[0, 2]))
    result = sample(ending, torch.Generator().manual_seed(0))
    lengths = result.response_mask.sum(1)
    assert lengths.min() < lengths.max() == result.response_ids.shape[1]  # rows ended early, others ran on
    return result


@pytest.mark.parametrize("temperature, top_p, greedy, fused", [
    (1.0, 1.0, False, True), (0.7, 0.5, False, True), (0.7, 1.0, True, True), (0.7, 1.0, False, False)],
    ids=["t1", "t0.7-top-p0.5", "greedy-t0.7", "t0.7-own-forward"])
def test_recorded_logprobs_equal_the_training_forward(tiny_model, temperature, top_p, greedy, fused):
    """decode_batch records log_softmax(logits / temperature) of each sampled token over the full
    distribution (not the top-p-truncated one), 0 after a response's end: what the training
    forward gives the same tokens, on the fused decoder and on the model's own forward."""
    from train.models import CausalLMWithLoss

    tokenizer = models.load_tokenizer(str(tiny_model))
    lm = models.load_causal_lm(str(tiny_model)).eval()
    prompts = prompts_of(tokenizer, ["Hi", "Name a river.", "What is 2 + 2?", "Say something kind."])
    sampling = Sampling(12, temperature, top_p, tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=greedy)

    def sample(sampling, generator):
        decoder = SlotDecoder(lm, len(prompts), max(map(len, prompts)) + 12, fused=fused)
        assert decoder.fused == fused
        return rollout.decode_batch(decoder, prompts, sampling, generator)

    # (greedy decoding of this random model repeats one token in every row: no early ends)
    result = sample(sampling, None) if greedy else sample_with_early_ends(sample, sampling)
    assert result.logprobs.dtype == torch.float32 and result.logprobs.shape == result.response_ids.shape
    assert (result.logprobs[result.response_mask == 0] == 0).all()
    expected = training_logprobs(CausalLMWithLoss(lm), result, temperature)
    torch.testing.assert_close(result.logprobs, expected, atol=1e-4, rtol=0)
    if temperature != 1.0:  # the temperature shows: the untempered log-probs are far off
        assert (training_logprobs(CausalLMWithLoss(lm), result, 1.0) - expected).abs().max() > 1e-2


def test_a_lora_actor_records_the_logprobs_of_its_merged_adapters(group, tiny_model):
    """The fused engine in fp32 returns the log-probs it recorded, with the LoRA adapters merged
    into its copy: those of the actor's own training forward, not of the base model."""
    from train.models import CausalLMWithLoss

    cfg = PPOConfig(actor=str(tiny_model), reward=str(tiny_model), rollout_engine="fused",
                    lora_dim=4, lora_alpha=8.0)

    actor, engine = rollout.start_actor(cfg, lora_actor(cfg), 4, None, lambda line: None)
    tokenizer = models.load_tokenizer(str(tiny_model))
    prompts = prompts_of(tokenizer, ["Hi", "Name a river.", "Count to five."])
    sampling = Sampling(10, 0.7, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id)
    result = sample_with_early_ends(lambda s, g: engine.rollout(prompts, s, g), sampling)
    assert engine.logprobs_source == "from sampling (fused decoder, fp32 = training precision)"
    actor.eval()
    expected = training_logprobs(actor, result, 0.7)
    torch.testing.assert_close(result.logprobs, expected, atol=1e-4, rtol=0)
    base = training_logprobs(CausalLMWithLoss(models.load_causal_lm(str(tiny_model))).eval(), result, 0.7)
    assert (base - expected).abs().max() > 1e-2  # the adapters count


def test_only_fp32_rollouts_of_an_fp32_actor_match_training():
    assert rollout.mismatch(torch.float32, torch.float32) is None
    assert rollout.mismatch(torch.bfloat16, torch.float32) == "rollouts in bf16, training in fp32"
    assert "rounding differs" in rollout.mismatch(torch.bfloat16, torch.bfloat16)
    assert rollout.mismatch(torch.float16, torch.float16) is not None
