"""Switching the PPO actor between training and generation (the Hybrid Engine of DESIGN.md).

PPO spends most of its time generating rollouts with the model it is training. Before each
rollout the actor's training engine switches to generation and back after:

- on CUDA, where DeepSpeed's Hybrid Engine supports the architecture and `--hybrid-engine` is
  on: DeepSpeed's own `hybrid_engine` (inference kernels, ZeRO-3 gather, tensor parallelism);
- everywhere else (every CPU): the project's own path. Under ZeRO-3 all parameters are gathered
  once per rollout (not per layer per token); generation runs in bf16 where the hardware has it
  (the bf16 training weights themselves, or a bf16 copy when training in fp32); prompts are
  left-padded into one batch; sampling is batched, each sequence stops at its end-of-turn token
  and the loop ends when all have.

The switch's own time (gather, copy, mode change) is measured separately from generation.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import deepspeed
import torch

from train import ds
from train.fastlm import SlotDecoder, fused_reason


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    eos_token_id: int
    pad_token_id: int
    greedy: bool = False


def pad_left(sequences: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) left-padded token ids and their (B, T) attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence):] = torch.tensor(sequence)
        mask[row, width - len(sequence):] = 1
    return ids, mask


def sample_tokens(logits: torch.Tensor, sampling: Sampling, generator=None) -> torch.Tensor:
    """(B,) next tokens from (B, V) logits: greedy, or temperature and nucleus (top-p) sampling.

    Sampling inverts each row's cumulative distribution at one uniform draw: a cumsum and a
    binary search, several times cheaper on a CPU than `torch.multinomial` over a 49k vocabulary."""
    if sampling.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    order = None
    if sampling.top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        outside = probs.cumsum(-1) - probs > sampling.top_p  # keep the first token over p
        probs = probs.masked_fill(outside, 0.0)
    cdf = probs.cumsum(-1)
    draw = torch.rand((len(cdf), 1), generator=generator, device=cdf.device) * cdf[:, -1:]
    # right=True: the first index whose cdf exceeds the draw, so a zero-probability token
    # (an empty interval) is never picked
    tokens = torch.searchsorted(cdf, draw, right=True).clamp(max=cdf.shape[-1] - 1)
    return (tokens if order is None else order.gather(-1, tokens)).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], sampling: Sampling, generator=None, dtype=None):
    """Batched sampling on a preallocated KV cache (train/fastlm.py); returns (prompt_ids (B, P),
    prompt_mask (B, P), response_ids (B, R), response_mask (B, R)). A response's mask covers its
    tokens up to and including its end-of-turn token; later positions hold the pad token."""
    decoder = SlotDecoder(model, len(prompts), max(map(len, prompts)) + sampling.max_new_tokens, dtype)
    return decode_batch(decoder, prompts, sampling, generator)


@torch.no_grad()
def decode_batch(decoder: SlotDecoder, prompts: list[list[int]], sampling: Sampling, generator=None):
    """`generate` on a decoder already built; finished sequences drop out of the batch."""
    batch = len(prompts)
    tokens = torch.full((batch, sampling.max_new_tokens), sampling.pad_token_id, dtype=torch.long)
    alive = torch.zeros((batch, sampling.max_new_tokens), dtype=torch.long)
    active = torch.arange(batch)  # rows still generating; row i lives in slot i
    logits = decoder.prefill(active.tolist(), prompts)
    steps = 0
    for steps in range(1, sampling.max_new_tokens + 1):
        next_tokens = sample_tokens(logits, sampling, generator).cpu()
        tokens[active, steps - 1] = next_tokens
        alive[active, steps - 1] = 1
        going = next_tokens != sampling.eos_token_id
        active, next_tokens = active[going], next_tokens[going]
        if len(active) == 0 or steps == sampling.max_new_tokens:
            break
        logits = decoder.decode(active.tolist(), next_tokens)
    device = next(decoder.model.parameters()).device
    prompt_ids, prompt_mask = pad_left(prompts, sampling.pad_token_id)
    return (prompt_ids.to(device), prompt_mask.to(device), tokens[:, :steps].to(device),
            alive[:, :steps].to(device))


@torch.no_grad()
def hf_generate(model, prompts: list[list[int]], sampling: Sampling):
    """The same rollout through Hugging Face `generate` (what DeepSpeed-Chat and TRL use on a
    CPU, and what DeepSpeed's Hybrid Engine wraps on CUDA); same return value as `generate`."""
    prompt_ids, prompt_mask = (t.to(ds.device()) for t in pad_left(prompts, sampling.pad_token_id))
    sample_args = {} if sampling.greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p}
    output = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                            max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.greedy,
                            top_k=None, eos_token_id=sampling.eos_token_id,
                            pad_token_id=sampling.pad_token_id, **sample_args)
    response_ids = output[:, prompt_ids.shape[1]:]
    ended = (response_ids == sampling.eos_token_id).long()
    after_end = (ended.cumsum(1) - ended) > 0  # positions after the first end-of-turn token
    return prompt_ids, prompt_mask, response_ids, (~after_end).long()


# Architectures DeepSpeed-Chat's Hybrid Engine has inference containers for.
DS_HYBRID_ARCHITECTURES = {"OPTForCausalLM", "LlamaForCausalLM", "BloomForCausalLM",
                           "GPTNeoXForCausalLM", "GPTJForCausalLM", "GPT2LMHeadModel"}


def ds_hybrid_config(cfg) -> dict:
    """The `hybrid_engine` section of the actor's DeepSpeed config (CUDA only)."""
    return {"enabled": True, "max_out_tokens": cfg.max_prompt_len + cfg.max_new_tokens,
            "inference_tp_size": 1, "release_inference_cache": False,
            "pin_parameters": True, "tp_gather_partition_size": 8}


def ds_hybrid_reason(lm, wanted: bool) -> str | None:
    """None when DeepSpeed's Hybrid Engine can run this actor, else why not (logged)."""
    if not wanted:
        return "switched off by --no-hybrid-engine or --generation hf"
    if not ds.on_cuda():
        return "DeepSpeed's Hybrid Engine needs CUDA"
    architecture = type(lm).__name__
    if architecture not in DS_HYBRID_ARCHITECTURES:
        return f"DeepSpeed's Hybrid Engine has no inference container for {architecture}"
    return None


def bf16_supported() -> bool:
    if ds.on_cuda():
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class HybridEngine:
    """The actor engine's generation mode. `rollout(prompts, sampling)` switches the engine to
    generation, samples, and switches back; `switch_s` holds the last switch's own time."""

    def __init__(self, engine, use_ds_hybrid: bool, plain_hf: bool = False):
        self.engine = engine
        self.use_ds_hybrid = use_ds_hybrid
        self.plain_hf = plain_hf  # Hugging Face `generate` (the baseline the benchmarks compare)
        self.switch_s = 0.0

    def rollout(self, prompts: list[list[int]], sampling: Sampling, generator=None):
        """Same return value as `generate`, whichever path runs."""
        if self.use_ds_hybrid:
            return self._ds_rollout(prompts, sampling)
        with self.generation() as model:
            if self.plain_hf:
                return hf_generate(model, prompts, sampling)
            tic = time.time()
            dtype = torch.bfloat16 if bf16_supported() else None  # fp32 training, bf16 rollouts
            decoder = SlotDecoder(model, len(prompts), max(map(len, prompts)) + sampling.max_new_tokens,
                                  dtype)
            self.switch_s += time.time() - tic  # laying out the weights is part of the switch
            return decode_batch(decoder, prompts, sampling, generator)

    def _ds_rollout(self, prompts, sampling):
        tic = time.time()
        self.engine.eval()  # DeepSpeed's Hybrid Engine swaps in inference kernels here
        self.switch_s = time.time() - tic
        result = hf_generate(self.engine, prompts, sampling)
        tic = time.time()
        self.engine.train()
        self.switch_s += time.time() - tic
        return result

    @contextmanager
    def generation(self):
        """Switch to generation (timed into `switch_s`), yield a model to generate with, switch back."""
        tic = time.time()
        self.engine.eval()
        lm = getattr(self.engine.module, "lm", self.engine.module)
        zero3 = self.engine.zero_optimization_partition_weights()
        # ZeRO-3: gather every parameter once per rollout, not per layer per generated token
        gather = deepspeed.zero.GatheredParameters(list(lm.parameters())) if zero3 else nullcontext()
        with gather:
            model = lm
            plain = self.plain_hf or fused_reason(lm) is not None
            if plain and next(lm.parameters()).dtype == torch.float32 and bf16_supported():
                model = copy.deepcopy(lm).to(torch.bfloat16)  # fp32 training, bf16 rollouts
            model.eval()
            self.switch_s = time.time() - tic
            try:
                yield model
            finally:
                tic = time.time()
                del model
        self.engine.train()
        self.switch_s += time.time() - tic
