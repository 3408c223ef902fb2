"""The fast decoder (core/decoder.py): the same tokens as the model's own forward, slots that come
and go between steps (continuous batching), its limits, and the process memory settings it
relies on for speed."""

import pytest
import torch

from core import models
from core.decoder import SlotDecoder, prefill_groups
from core.sampling import Sampling
from train.rollout import generate


def chat_prompts(tokenizer, texts):
    return [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for text in texts]


def hf_greedy(lm, prompt, new_tokens):
    out = lm.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    return out[0, len(prompt):].tolist()


def test_slots_joining_and_leaving_between_steps_decode_as_if_alone(tiny_model):
    """Slot 3 starts late, slot 0 skips steps and the rows move in the cache: each slot still
    gets exactly the greedy tokens of the model's own forward on its prompt alone."""
    tokenizer = models.load_tokenizer(str(tiny_model))
    lm = models.load_causal_lm(str(tiny_model)).eval()
    prompts = chat_prompts(tokenizer, ["Hi", "Name two rivers, please.", "Why?"])
    decoder = SlotDecoder(lm, slots=4, max_len=64)
    assert decoder.fused
    got = {0: [], 2: [], 3: []}
    next_token = dict(zip([0, 2], decoder.prefill([0, 2], prompts[:2]).argmax(-1).tolist()))
    for step in range(10):
        if step == 3:  # a new request joins between decode steps
            next_token[3] = decoder.prefill([3], prompts[2:])[0].argmax().item()
        listed = [s for s in (3, 2, 0) if s in next_token and not (s == 0 and step in (5, 6))]
        for slot in listed:
            got[slot].append(next_token[slot])
        logits = decoder.decode(listed, torch.tensor([next_token[s] for s in listed]))
        next_token.update(zip(listed, logits.argmax(-1).tolist()))
    for slot, prompt in zip((0, 2, 3), prompts):
        assert got[slot] == hf_greedy(lm, prompt, len(got[slot])), slot
        assert decoder.length(slot) == len(prompt) + len(got[slot])


def test_fused_logits_match_the_models_own_forward(tiny_model):
    tokenizer = models.load_tokenizer(str(tiny_model))
    lm = models.load_causal_lm(str(tiny_model)).eval()
    prompts = chat_prompts(tokenizer, ["Hello there", "What is the longest river in Africa?"])
    fused, plain = SlotDecoder(lm, 2, 64), SlotDecoder(lm, 2, 64, fused=False)
    assert fused.fused and not plain.fused
    torch.testing.assert_close(fused.prefill([0, 1], prompts), plain.prefill([0, 1], prompts), atol=1e-4, rtol=1e-4)
    tokens = torch.tensor([11, 12])
    torch.testing.assert_close(fused.decode([1, 0], tokens), plain.decode([1, 0], tokens), atol=1e-4, rtol=1e-4)


def test_bf16_decoder_from_an_fp32_model_leaves_the_model_alone(tiny_model):
    lm = models.load_causal_lm(str(tiny_model)).eval()
    decoder = SlotDecoder(lm, 1, 16, dtype=torch.bfloat16)
    assert decoder.fused and next(lm.parameters()).dtype == torch.float32
    logits = decoder.prefill([0], [[1, 2, 3]])
    reference = lm(torch.tensor([[1, 2, 3]])).logits[0, -1]
    assert (logits[0] - reference).abs().max() < 0.1  # bf16 rounding, not a different model
    assert logits.dtype == torch.float32


def test_a_slot_refuses_more_than_its_length(tiny_model):
    lm = models.load_causal_lm(str(tiny_model)).eval()
    decoder = SlotDecoder(lm, 1, 4)
    with pytest.raises(ValueError, match="does not fit"):
        decoder.prefill([0], [[1, 2, 3, 4, 5]])
    decoder.prefill([0], [[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="full"):
        decoder.decode([0], torch.tensor([5]))


def test_prefill_groups_bound_padding_and_cover_every_prompt():
    lengths = [5, 300, 7, 6, 290, 1000, 8]
    groups = prefill_groups(lengths, budget=600)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert len(group) == 1 or len(group) * max(lengths[i] for i in group) <= 600
    assert [5] in groups  # the long prompt is alone, not padding the short ones


def assert_greedy_matches_hugging_face(lm, tokenizer, texts, new_tokens):
    """`generate` (the rollout path) against the model's own `generate`, prompt by prompt."""
    prompts = chat_prompts(tokenizer, texts)
    sampling = Sampling(new_tokens, 1.0, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=True)
    _, _, ours, mask = generate(lm, prompts, sampling)
    for row, prompt in enumerate(prompts):
        out = lm.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        expected = out[0, len(prompt):].tolist()
        assert ours[row, :len(expected)].tolist() == expected
        assert mask[row].sum().item() == len(expected)


def test_rollout_greedy_equals_hugging_face_generate(tiny_model):
    lm = models.load_causal_lm(str(tiny_model)).eval()
    assert_greedy_matches_hugging_face(lm, models.load_tokenizer(str(tiny_model)),
                                       ["Hi", "Tell me a long story about the sea and its ships, please."], 12)


@pytest.mark.slow
def test_default_model_bf16_greedy_equals_hugging_face_generate(default_model):
    lm = models.load_causal_lm(str(default_model), dtype=torch.bfloat16).eval()
    assert_greedy_matches_hugging_face(lm, models.load_tokenizer(str(default_model)),
                                       ["What is the capital of France?", "Write a haiku about rain.",
                                        "Explain gravity to a child in two sentences.", "hi"], 32)


def test_sampling_follows_the_distribution_and_top_p_cuts_its_tail():
    from core.sampling import sample_tokens

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.log().expand(20000, -1)
    generator = torch.Generator().manual_seed(0)
    tokens = sample_tokens(logits, Sampling(1, 1.0, 1.0, 0, 0), generator)
    freq = torch.bincount(tokens, minlength=5).float() / len(tokens)
    assert (freq - probs).abs().max() < 0.015 and freq[4] == 0
    nucleus = sample_tokens(logits, Sampling(1, 1.0, 0.7, 0, 0), generator)  # 0.5 + 0.3 reach 0.7
    freq = torch.bincount(nucleus, minlength=5).float() / len(nucleus)
    assert freq[2:].sum() == 0 and abs(freq[0] - 0.5 / 0.8) < 0.015
    hot = sample_tokens(logits, Sampling(1, 0.25, 1.0, 0, 0), generator)  # sharper: p^4 renormalised
    assert (hot == 0).float().mean() > 0.8
