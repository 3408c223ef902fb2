"""Switching the PPO actor between training and generation: the rollout engine (DESIGN.md's
hybrid engine).

PPO spends most of its time generating rollouts with the model it is training. Before each
rollout the actor's training engine switches to generation and back after. `--rollout-engine`
picks what generates:

- `deepspeed`: DeepSpeed's own Hybrid Engine (inference kernels, ZeRO-3 gather, tensor
  parallelism), on CUDA for the architectures it has inference containers for. Its containers
  follow the layer interfaces of transformers 4; where it fails to start, or its first greedy
  token differs from the model's own, the actor restarts without it, rollouts run fused, and
  the reason is logged (`start_actor`); a later failure falls back the same way;
- `fused`: the project's own path, everywhere: under ZeRO-3 all parameters are gathered once per
  rollout (not per layer per token); the slot decoder (core/decoder.py) runs the actor with a
  preallocated KV cache, in bf16 where the hardware computes it natively (a bf16 copy of fp32
  training weights), with LoRA adapters merged into its copy (W + scale * B @ A, as DeepSpeed's
  Hybrid Engine does); sampling is batched and each sequence stops at its end-of-turn token;
  each sampled token's log-prob is recorded as it is drawn (`Rollout.logprobs`);
- `hf`: Hugging Face `generate`, the baseline the benchmarks compare against;
- `auto` (default): deepspeed where it can run, else fused.

The switch's own time (gather, weight layout, mode change) is measured apart from generation.

Recorded log-probs leave a rollout only where they are what the training forward would compute:
the fused engine decoding in fp32 an actor that trains in fp32 (max |diff| 2e-05 to 3e-05 on the
built-in model: bench/grpo.py, `mismatch`). bf16 or fp16 rollouts, or rollouts through Hugging Face
`generate` (hf, deepspeed), return none, and train/experience.py scores the rollouts with an
actor forward instead; `logprobs_source` says which, and why.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import deepspeed
import torch

from core.decoder import SlotDecoder, fused_reason
from core.hardware import hardware
from core.options import ConfigError
from core.sampling import Sampling, pad, sample_with_logprobs
from train import ds
from train.loop import STOP
from train.models import CausalLMWithLoss


class Rollout(NamedTuple):
    """A batch of sampled responses; what `generate`, `decode_batch`, `hf_generate` and
    `RolloutEngine.rollout` return."""
    prompt_ids: torch.Tensor     # (B, P) left-padded prompt ids
    prompt_mask: torch.Tensor    # (B, P) 1 on prompt tokens
    response_ids: torch.Tensor   # (B, R) sampled ids; the pad token after a response's end
    response_mask: torch.Tensor  # (B, R) 1 on response tokens up to and including end-of-turn
    logprobs: torch.Tensor | None  # (B, R) float32 log_softmax(logits / temperature) of each sampled
                                   # token as it was drawn, 0 where the mask is 0; None: not recorded


@torch.no_grad()
def generate(model, prompts: list[list[int]], sampling: Sampling, generator=None, dtype=None) -> Rollout:
    """Batched sampling on a preallocated KV cache (core/decoder.py). A response's mask covers its
    tokens up to and including its end-of-turn token; later positions hold the pad token."""
    decoder = SlotDecoder(model, len(prompts), max(map(len, prompts)) + sampling.max_new_tokens, dtype)
    return decode_batch(decoder, prompts, sampling, generator)


@torch.no_grad()
def decode_batch(decoder: SlotDecoder, prompts: list[list[int]], sampling: Sampling,
                 generator=None) -> Rollout:
    """`generate` on a decoder already built; finished sequences drop out of the batch. Each
    token's log-prob is that of the full distribution at the sampling temperature (not the
    top-p-truncated one; greedy: the taken token's; core/sampling.py sample_with_logprobs), as
    train/experience.py response_logprobs takes it from the training forward."""
    batch = len(prompts)
    tokens = torch.full((batch, sampling.max_new_tokens), sampling.pad_token_id, dtype=torch.long)
    alive = torch.zeros((batch, sampling.max_new_tokens), dtype=torch.long)
    logprobs = torch.zeros((batch, sampling.max_new_tokens), dtype=torch.float32)
    active = torch.arange(batch)  # rows still generating; row i lives in slot i
    logits = decoder.prefill(active.tolist(), prompts)
    steps = 0
    for steps in range(1, sampling.max_new_tokens + 1):
        next_tokens, next_logprobs = sample_with_logprobs(logits, sampling, generator)
        next_tokens = next_tokens.cpu()
        logprobs[active, steps - 1] = next_logprobs.cpu()
        tokens[active, steps - 1] = next_tokens
        alive[active, steps - 1] = 1
        going = next_tokens != sampling.eos_token_id
        active, next_tokens = active[going], next_tokens[going]
        if len(active) == 0 or steps == sampling.max_new_tokens:
            break
        STOP.check(collective=False)  # a stop request ends a long rollout within a step
        logits = decoder.decode(active.tolist(), next_tokens)
    device = next(decoder.model.parameters()).device
    prompt_ids, prompt_mask = pad(prompts, sampling.pad_token_id, left=True)
    return Rollout(prompt_ids.to(device), prompt_mask.to(device), tokens[:, :steps].to(device),
                   alive[:, :steps].to(device), logprobs[:, :steps].to(device))


@torch.no_grad()
def hf_generate(model, prompts: list[list[int]], sampling: Sampling) -> Rollout:
    """The same rollout through Hugging Face `generate` (what DeepSpeed-Chat and TRL use on a
    CPU, and what DeepSpeed's Hybrid Engine wraps on CUDA); no log-probs recorded."""
    prompt_ids, prompt_mask = (t.to(ds.device()) for t in pad(prompts, sampling.pad_token_id, left=True))
    sample_args = {} if sampling.greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p}
    output = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                            max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.greedy,
                            top_k=None, eos_token_id=sampling.eos_token_id,
                            pad_token_id=sampling.pad_token_id, **sample_args)
    response_ids = output[:, prompt_ids.shape[1]:]
    ended = (response_ids == sampling.eos_token_id).long()
    after_end = (ended.cumsum(1) - ended) > 0  # positions after the first end-of-turn token
    return Rollout(prompt_ids, prompt_mask, response_ids, (~after_end).long(), None)


# Architectures DeepSpeed-Chat's Hybrid Engine has inference containers for.
DS_HYBRID_ARCHITECTURES = {"OPTForCausalLM", "LlamaForCausalLM", "BloomForCausalLM",
                           "GPTNeoXForCausalLM", "GPTJForCausalLM", "GPT2LMHeadModel"}


def ds_hybrid_config(cfg) -> dict:
    """The `hybrid_engine` section of the actor's DeepSpeed config (CUDA only)."""
    return {"enabled": True, "max_out_tokens": cfg.max_prompt_len + cfg.max_new_tokens,
            "inference_tp_size": 1, "release_inference_cache": False,
            "pin_parameters": True, "tp_gather_partition_size": 8}


def ds_hybrid_reason(lm) -> str | None:
    """None when DeepSpeed's Hybrid Engine can run this actor, else why not."""
    if hardware().device != "cuda":
        return "DeepSpeed's Hybrid Engine needs CUDA"
    architecture = type(lm).__name__
    if architecture not in DS_HYBRID_ARCHITECTURES:
        return f"DeepSpeed's Hybrid Engine has no inference container for {architecture}"
    return None


def pick_rollout_engine(asked: str, lm) -> tuple[str, str]:
    """(engine that runs: deepspeed, fused or hf; a line saying why) for --rollout-engine."""
    reason = ds_hybrid_reason(lm)
    if asked == "deepspeed" and reason is not None:
        raise ConfigError(f"--rollout-engine deepspeed cannot run here ({reason}): use auto or fused.")
    if asked == "auto":
        asked = "deepspeed" if reason is None else "fused"
        why = "auto" if reason is None else f"auto: {reason}"
    else:
        why = "asked for"
    if asked == "fused":
        why += "; " + fused_description(lm)
    return asked, why


def fused_description(lm) -> str:
    reason = fused_reason(lm)
    if reason is not None:
        return f"the model's own forward, all slots batched ({reason})"
    lora = any(hasattr(module, "lora_A") for module in lm.modules())
    return "our fused decoder" + (", LoRA adapters merged into its copy" if lora else "")


def start_actor(cfg, load_lm, total_steps: int, tensorboard_dir: str | None, log):
    """(the actor's DeepSpeed engine, its RolloutEngine) for `--rollout-engine`. `load_lm()`
    returns a fresh trainable actor LM: where DeepSpeed's Hybrid Engine is picked but fails to
    start or to generate the model's own first greedy token, the actor starts again without it
    from a fresh copy (the failed engine may have wrapped or partitioned the first one)."""
    lm = load_lm()
    kind, why = pick_rollout_engine(cfg.rollout_engine, lm)
    if kind == "deepspeed":
        try:
            actor = ds.initialize(CausalLMWithLoss(lm), cfg, total_steps, tensorboard_dir,
                                  extra={"hybrid_engine": ds_hybrid_config(cfg)})
            rollout = RolloutEngine(actor, kind, log, cfg.rollout_logprobs)
            rollout.check_hybrid_engine()
            log(f"rollouts: deepspeed ({why})")
            return actor, rollout
        except Exception as err:  # noqa: BLE001  (any failure inside DeepSpeed means: run without it)
            failure = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            lm = load_lm()
            kind, why = "fused", f"DeepSpeed's Hybrid Engine failed ({failure}); {fused_description(lm)}"
    actor = ds.initialize(CausalLMWithLoss(lm), cfg, total_steps, tensorboard_dir)
    log(f"rollouts: {kind} ({why})")
    return actor, RolloutEngine(actor, kind, log, cfg.rollout_logprobs)


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def mismatch(rollout_dtype: torch.dtype, training_dtype: torch.dtype) -> str | None:
    """None where log-probs recorded while sampling equal the training forward's (to 1e-4: both
    in fp32), else why not. Half precision does not match even against itself: bf16 decoding of a
    bf16 model differed from its bf16 training forward by up to 0.34 (mean 0.03) on the built-in
    model, against at most 2.7e-05 in fp32 (16 prompts, 64 tokens, temperature 1.0 and 0.7)."""
    if rollout_dtype == training_dtype == torch.float32:
        return None
    rollout_name, training_name = (DTYPE_NAMES.get(d, str(d)) for d in (rollout_dtype, training_dtype))
    if rollout_dtype != training_dtype:
        return f"rollouts in {rollout_name}, training in {training_name}"
    return f"rollouts and training in {training_name}, whose rounding differs between the two paths"


class RolloutEngine:
    """The actor engine's generation mode. `rollout(prompts, sampling)` switches the engine to
    generation, samples, and switches back; `switch_s` holds the last switch's own time and
    `logprobs_source` where the last rollout's old log-probs come from (see the module docstring).
    `logprobs="forward"` never returns recorded log-probs (--rollout-logprobs)."""

    def __init__(self, engine, kind: str, log=print, logprobs: str = "auto"):
        self.engine = engine
        self.kind = kind  # deepspeed, fused or hf (pick_rollout_engine)
        self.log = log
        self.keep_logprobs = logprobs == "auto"
        self.switch_s = 0.0
        self.logprobs_source = ""
        self._logged_source = ""

    def rollout(self, prompts: list[list[int]], sampling: Sampling, generator=None) -> Rollout:
        """A `Rollout`, whichever engine runs; its log-probs only where they match training's."""
        if self.kind == "deepspeed":
            try:
                return self._with_logprobs(self._ds_rollout(prompts, sampling),
                                           "DeepSpeed's Hybrid Engine: Hugging Face generate records none")
            except Exception as err:  # noqa: BLE001  (see start_actor)
                self.engine.train()  # the layers' own forwards back
                self.kind = "fused"
                self.log(f"rollouts: DeepSpeed's Hybrid Engine failed ({type(err).__name__}: {err}); "
                         f"from now on {fused_description(self.engine.module.lm)}")
        with self.generation() as model:
            if self.kind == "hf":
                return self._with_logprobs(hf_generate(model, prompts, sampling),
                                           "the hf engine: Hugging Face generate records none")
            tic = time.time()
            dtype = torch.bfloat16 if hardware().native_bf16 else None  # fp32 training, bf16 rollouts
            decoder = SlotDecoder(model, len(prompts), max(map(len, prompts)) + sampling.max_new_tokens,
                                  dtype)
            self.switch_s += time.time() - tic  # laying out the weights is part of the switch
            result = decode_batch(decoder, prompts, sampling, generator)
            rollout_dtype = dtype or next(model.parameters()).dtype
        training_dtype = next(self.engine.module.parameters()).dtype
        decoded_by = "fused decoder" if decoder.fused else "the model's own forward, slot cache"
        return self._with_logprobs(result, mismatch(rollout_dtype, training_dtype), decoded_by)

    def _with_logprobs(self, result: Rollout, differ: str | None, decoder: str = "") -> Rollout:
        """`result`, its log-probs dropped unless they match training's (`differ`, why they do
        not, is None) and are wanted; `logprobs_source` says which, and why."""
        if differ is None and self.keep_logprobs:
            self.logprobs_source = f"from sampling ({decoder}, fp32 = training precision)"
            return result
        why = differ or "--rollout-logprobs forward"
        self.logprobs_source = f"from an actor forward ({why})"
        return result._replace(logprobs=None)

    def log_logprobs_source(self) -> None:
        """Log `logprobs_source` when it changed (once per run, unless the engine falls back)."""
        if self.logprobs_source != self._logged_source:
            self._logged_source = self.logprobs_source
            self.log(f"old log-probs: {self.logprobs_source}")

    def _ds_rollout(self, prompts, sampling):
        tic = time.time()
        self.engine.eval()  # DeepSpeed's Hybrid Engine swaps in inference kernels here
        self.switch_s = time.time() - tic
        try:
            # the module's generate: DeepSpeed replaces it with its own where it has containers
            result = hf_generate(self.engine.module, prompts, sampling)
        finally:
            tic = time.time()
            self.engine.train()
            self.switch_s += time.time() - tic
        return result

    def check_hybrid_engine(self) -> None:
        """Raise unless DeepSpeed's Hybrid Engine generates the model's own first greedy token
        (its kernels replace the layers' forwards, which transformers 5 calls differently)."""
        prompt = [[1, 2, 3, 4, 5, 6, 7, 8]]
        torch.nn.Module.train(self.engine, False)  # no dropout; the layers' own forwards
        with torch.no_grad():
            logits = self.engine.module.lm(torch.tensor(prompt, device=ds.device())).logits
        expected = logits[0, -1].argmax().item()
        sampling = Sampling(2, 1.0, 1.0, eos_token_id=-1, pad_token_id=0, greedy=True)
        first = self._ds_rollout(prompt, sampling)[2][0, 0].item()
        if first != expected:
            raise RuntimeError(f"its first greedy token ({first}) differs from the model's own ({expected})")

    @contextmanager
    def generation(self):
        """Switch to generation (timed into `switch_s`), yield a model to generate with, switch back."""
        tic = time.time()
        # the plain module switch: DeepSpeed's Hybrid Engine (after it failed) would swap in its kernels
        torch.nn.Module.train(self.engine, False)
        lm = getattr(self.engine.module, "lm", self.engine.module)
        zero3 = self.engine.zero_optimization_partition_weights()
        # ZeRO-3: gather every parameter once per rollout, not per layer per generated token
        gather = deepspeed.zero.GatheredParameters(list(lm.parameters())) if zero3 else nullcontext()
        with gather:
            model = lm
            plain = self.kind == "hf" or fused_reason(lm) is not None
            if plain and next(lm.parameters()).dtype == torch.float32 and hardware().native_bf16:
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
