"""The fast decoder (core/decoder.py): the same tokens as the model's own `generate` for every
Llama-shaped family (Llama, Mistral, Qwen2, Qwen3, a LoRA actor) with every matrix-product kernel
this machine runs, the batched fallback for other families, slots that come and go between steps
(continuous batching), and its limits."""

import logging

import pytest
import torch

from core import hardware, kernels, models
from core.decoder import SlotDecoder, prefill_groups
from core.sampling import Sampling
from train.rollout import decode_batch, generate

# the fused path runs the first four; GPT-2 is not Llama-shaped and takes the batched fallback
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
FUSED = {"llama", "mistral", "qwen2", "qwen3"}


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return models.load_tokenizer(str(default_model))


def family_model(family: str, tokenizer, **overrides):
    """A tiny random model of `family` from a config (no hub) with the default model's vocabulary.
    Norm weights and biases are randomised too (initialised to 1 and 0, they would hide a norm
    or bias the decoder ignored)."""
    from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig,
                              Qwen2Config, Qwen3Config)

    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    llama_shaped = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=1024, **special)
    config = {
        "llama": lambda: LlamaConfig(**llama_shaped, tie_word_embeddings=True),
        "mistral": lambda: MistralConfig(**llama_shaped, tie_word_embeddings=False),
        "qwen2": lambda: Qwen2Config(**llama_shaped, tie_word_embeddings=True),  # q/k/v biases
        "qwen3": lambda: Qwen3Config(**llama_shaped, head_dim=32, tie_word_embeddings=False),  # q/k norms
        "gpt2": lambda: GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4,
                                   n_positions=1024, **special),
    }[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in lm.named_parameters():
            if name.endswith("bias") or "norm" in name or name.split(".")[-2].startswith("ln"):
                param.add_(torch.randn_like(param) * 0.5)
    return lm


def chat_prompts(tokenizer, texts):
    return [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for text in texts]


def hf_greedy(lm, prompt, new_tokens, tokenizer=None):
    """The model's own `generate`, greedy, on one prompt alone (stopping at eos when given a tokenizer)."""
    stop = {} if tokenizer is None else {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    fixed = {} if tokenizer else {"min_new_tokens": new_tokens}
    out = lm.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, **stop, **fixed)
    return out[0, len(prompt):].tolist()


def assert_greedy_matches_hugging_face(lm, tokenizer, texts, new_tokens, decoder=None):
    """The rollout path (`generate`, or `decode_batch` on `decoder`) against the model's own
    `generate`, prompt by prompt."""
    prompts = chat_prompts(tokenizer, texts)
    sampling = Sampling(new_tokens, 1.0, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=True)
    rollout = generate(lm, prompts, sampling) if decoder is None else decode_batch(decoder, prompts, sampling)
    ours, mask = rollout.response_ids, rollout.response_mask
    for row, prompt in enumerate(prompts):
        expected = hf_greedy(lm, prompt, new_tokens, tokenizer)
        assert ours[row, :len(expected)].tolist() == expected, row
        assert mask[row].sum().item() == len(expected)


TEXTS = ["Hi", "Tell me a long story about the sea and its ships, please.", "Why?"]


@pytest.mark.parametrize("family", FAMILIES)
def test_slots_joining_and_leaving_between_steps_decode_as_if_alone(family, tokenizer):
    """Slot 3 starts late, slot 0 skips steps and the rows move in the cache: each slot still
    gets exactly the greedy tokens of the model's own `generate` on its prompt alone."""
    lm = family_model(family, tokenizer)
    prompts = chat_prompts(tokenizer, ["Hi", "Name two rivers, please.", "Why?"])
    decoder = SlotDecoder(lm, slots=4, max_len=64)
    assert decoder.fused == (family in FUSED), decoder.reason
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


@pytest.mark.parametrize("family", FAMILIES)
def test_rollout_greedy_equals_hugging_face_generate(family, tokenizer):
    assert_greedy_matches_hugging_face(family_model(family, tokenizer), tokenizer, TEXTS, 12)


MODES = [(torch.float32, "plain"), (torch.float32, "mkl"), (torch.float32, "onednn"),
         (torch.bfloat16, "plain"), (torch.bfloat16, "onednn")]


@pytest.mark.parametrize("dtype,kernel", MODES, ids=[f"{str(d)[6:]}-{k}" for d, k in MODES])
def test_greedy_equals_generate_with_each_kernel_this_machine_runs(dtype, kernel, tokenizer):
    """fp32 pre-packed (MKL, oneDNN), bf16 pre-packed where oneDNN runs it, and plain F.linear:
    each gives the model's own greedy tokens in that precision."""
    if kernel not in kernels.available_kernels(dtype):
        pytest.skip(f"{kernel} does not run {dtype} on this CPU ({hardware.hardware().describe()})")
    lm = family_model("qwen2", tokenizer).to(dtype)  # biases and tied embeddings: every operand
    prompts = chat_prompts(tokenizer, TEXTS)
    decoder = SlotDecoder(lm, len(prompts), max(map(len, prompts)) + 12, kernel=kernel)
    assert decoder.fused and decoder._impl.layers[0].qkv.plan == (kernel,) * len(kernels.PLAN_ROWS)
    assert_greedy_matches_hugging_face(lm, tokenizer, TEXTS, 12, decoder)


def test_fused_logits_match_the_models_own_forward(tiny_model):
    tokenizer = models.load_tokenizer(str(tiny_model))
    lm = models.load_causal_lm(str(tiny_model)).eval()
    prompts = chat_prompts(tokenizer, ["Hello there", "What is the longest river in Africa?"])
    fused, plain = SlotDecoder(lm, 2, 64), SlotDecoder(lm, 2, 64, fused=False)
    assert fused.fused and not plain.fused
    torch.testing.assert_close(fused.prefill([0, 1], prompts), plain.prefill([0, 1], prompts), atol=1e-4, rtol=1e-4)
    tokens = torch.tensor([11, 12])
    torch.testing.assert_close(fused.decode([1, 0], tokens), plain.decode([1, 0], tokens), atol=1e-4, rtol=1e-4)


@pytest.fixture
def forced_avx2(monkeypatch):
    """This process answers as an AVX2-only CPU would (the cached answers recomputed)."""
    cached = (hardware.hardware, hardware.bf16_packing, kernels.kernel_plan)
    monkeypatch.setenv(hardware.FORCE_ENV, "avx2")
    for answer in cached:
        answer.cache_clear()
    yield
    monkeypatch.delenv(hardware.FORCE_ENV)
    for answer in cached:
        answer.cache_clear()


def test_forced_avx2_never_touches_bf16_packing(forced_avx2, monkeypatch, tokenizer):
    """oneDNN's bf16 packing raises on an AVX2-only CPU: a bf16 decoder there must not call it
    (spied on here) and still decode; fp32 decoders still get their packed kernels."""
    packed_dtypes = []
    reorder = torch.ops.mkldnn._reorder_linear_weight

    def spy(weight, *args):
        packed_dtypes.append(weight.dtype)
        return reorder(weight, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", spy)
    lm = family_model("llama", tokenizer)
    assert hardware.resolve_precision("auto").name == "fp32"
    bf16 = SlotDecoder(lm, 2, 64, dtype=torch.bfloat16)
    assert bf16.fused and set(bf16._impl.layers[0].qkv.plan) == {"plain"}
    bf16.decode([0, 1], bf16.prefill([0, 1], [[1, 2, 3], [4, 5]]).argmax(-1))
    fp32 = SlotDecoder(lm, 2, 64)
    fp32.decode([0, 1], fp32.prefill([0, 1], [[1, 2, 3], [4, 5]]).argmax(-1))
    assert torch.bfloat16 not in packed_dtypes
    assert set(fp32._impl.layers[0].qkv.plan) <= set(kernels.available_kernels(torch.float32))


def test_a_lora_actor_decodes_fused_with_its_adapters_merged(tokenizer):
    """W + scale * B @ A in the decoder's copy: the adapted model's own greedy tokens, the
    adapters still separate in the model (nothing merged into it)."""
    from peft import LoraConfig, get_peft_model

    base = family_model("llama", tokenizer)
    before = base.model.layers[0].self_attn.q_proj.weight.clone()
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    actor = get_peft_model(base, config).eval()  # random A and B: the adapters change the output
    with torch.no_grad():
        for name, param in actor.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    assert SlotDecoder(actor, 1, 64).fused
    assert_greedy_matches_hugging_face(actor, tokenizer, TEXTS, 12)
    with actor.disable_adapter():  # and the adapters matter: without them the tokens differ
        plain = [hf_greedy(actor, p, 12, tokenizer) for p in chat_prompts(tokenizer, TEXTS)]
    adapted = [hf_greedy(actor, p, 12, tokenizer) for p in chat_prompts(tokenizer, TEXTS)]
    assert plain != adapted
    layer = actor.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged


def test_other_families_fall_back_and_say_why_once(tokenizer, caplog, monkeypatch):
    from core import decoder

    monkeypatch.setattr(decoder, "_logged_reasons", set())  # as in a fresh process
    gpt2 = family_model("gpt2", tokenizer)
    with caplog.at_level(logging.WARNING, logger="core.decoder"):
        first, second = SlotDecoder(gpt2, 1, 16), SlotDecoder(gpt2, 1, 16)
    assert not first.fused and "no Llama-shaped decoder" in first.reason
    assert sum(first.reason in record.getMessage() for record in caplog.records) == 1
    windowed = family_model("mistral", tokenizer, sliding_window=32)
    assert SlotDecoder(windowed, 1, 32).fused  # the window covers the whole slot
    assert "sliding window (32 tokens)" in SlotDecoder(windowed, 1, 64).reason


def test_bf16_decoder_from_an_fp32_model_leaves_the_model_alone(tiny_model):
    lm = models.load_causal_lm(str(tiny_model)).eval()
    decoder = SlotDecoder(lm, 1, 16, dtype=torch.bfloat16)
    assert decoder.fused and next(lm.parameters()).dtype == torch.float32
    logits = decoder.prefill([0], [[1, 2, 3]])
    reference = lm(torch.tensor([[1, 2, 3]])).logits[0, -1]
    assert (logits[0] - reference).abs().max() < 0.1  # bf16 rounding, not a different model
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("fused", [True, False])
def test_a_slot_refuses_more_than_its_length(tiny_model, fused):
    lm = models.load_causal_lm(str(tiny_model)).eval()
    decoder = SlotDecoder(lm, 1, 4, fused=fused)
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


@pytest.mark.slow
def test_default_model_greedy_equals_hugging_face_generate(default_model):
    """The real model in the precision this machine runs (bf16 only where it is native)."""
    dtype = hardware.torch_dtype(hardware.resolve_precision("auto").name)
    lm = models.load_causal_lm(str(default_model), dtype=dtype).eval()
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
