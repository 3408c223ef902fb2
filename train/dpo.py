"""Direct preference optimisation (DPO) and its variants: the chat model learns from preference
pairs directly, against a frozen reference, with no reward model and no sampling.

Reads top to bottom: run folder, data, model and engine, the frozen reference, the shared
training loop (train/loop.py) with the DPO objective, the final save. final/ is a chat model as
SFT's is (the server and the Chat tab take it).

Each pair's chosen and rejected answers go through one forward pass (2B rows; the vocabulary
projection runs only at answer tokens); `--loss` (train/losses.py) compares their log-probs
under the policy with those under the reference:
- sigmoid (DPO) and robust (robust DPO) on log-probs summed over the answer;
- ipo on log-probs averaged over the answer;
- simpo on averaged log-probs of the policy alone: no reference is loaded.

Reference log-probs are computed once per pair, the first time the pair is batched, and kept on
the pair for later epochs and evaluations: by a frozen copy of the starting model (or of
--reference), or, with LoRA, by the policy itself with its adapters disabled (no second copy).
Until the first optimizer step the policy *is* the starting model, so when the reference is the
starting model the policy's own log-probs of the first batches and of the step-0 evaluation
are kept as reference log-probs, without a second forward pass. A resumed run computes the rest
again from the same frozen weights.

Metrics: the loss; the implicit reward beta * (log pi - log pi_ref) of chosen and rejected
answers, its accuracy (chosen above rejected) and margin; the policy's per-token log-prob of the
chosen and rejected answers. A falling chosen log-prob (both answers pushed down, the rejected
faster) is a known failure of DPO: the run logs the held-out figure at its start and end, and
`python -m train report` raises an alarm on it.

Ties and both-bad votes make no pairs: the ratings export leaves them out (core/ratings.py), so
`--data ratings:` trains on decisive votes only. Left out: a loss for both-bad answers alone,
sequence packing, several references.
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch

from core.hardware import torch_dtype
from core.models import ModelError, load_causal_lm, load_tokenizer, resolve_model
from core.runs import read_metrics
from core.sampling import pad

from train import data, ds, loop, losses, models, tokens
from train.config import DPOConfig, parse_split
from train.rundir import RunDir

AVERAGED_LOSSES = ("ipo", "simpo")  # losses on log-probs averaged over the answer's tokens


# ---- data ------------------------------------------------------------------------------------------

def split_records(cfg: DPOConfig, log=print) -> tuple[list[dict], list[dict]]:
    """(training, held-out) preference records; the same for every call with the same config, so
    `python -m train report` finds the run's held-out prompts again."""
    weights = parse_split(cfg.data_split) if cfg.data_split else None
    records = data.load_data(cfg.data, "rm", cfg.seed, weights, log=log, part="ppo")
    if cfg.eval_data:
        held_out = data.load_data(cfg.eval_data, "rm", cfg.seed, log=log)
        return records, held_out[:cfg.max_eval_samples]
    return data.holdout(records, cfg.eval_fraction, cfg.max_eval_samples)


def collate_pairs(examples: list[dict], pad_id: int) -> dict:
    """B pairs as 2B rows, the chosen answers then the rejected ones, labelled on the answers
    only; `pairs` are the examples themselves (their reference log-probs are cached there)."""
    rows, labels = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for example in examples:
            start = example["prompt_len"]
            rows.append(example[side])
            labels.append([-100] * start + example[side][start:])
    input_ids, attention_mask = pad(rows, pad_id)
    labels, _ = pad(labels, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "pairs": examples}


# ---- reference ----------------------------------------------------------------------------------------

class Reference:
    """The frozen reference's summed log-probs of each answer, computed the first time its pair
    is batched and cached on the pair. Under ZeRO-3 with several ranks the forward pass is
    collective, so every rank joins it whenever one rank lacks a pair."""

    def __init__(self, model, context=nullcontext, collective: bool = False, is_start: bool = True):
        self.model = model            # CausalLMWithLoss (or the engine wrapping it), frozen use
        self.context = context        # () -> context manager: disables LoRA adapters when asked
        self.collective = collective
        self.is_start = is_start      # the reference is the policy's starting model

    @torch.no_grad()
    def logps(self, batch: dict, untrained_logps: torch.Tensor | None = None) -> torch.Tensor:
        """(2B,) reference log-probs of the batch's rows: chosen answers, then rejected ones.
        `untrained_logps`: the policy's own, given while no optimizer step has changed it."""
        pairs = batch["pairs"]
        missing = any("ref_logps" not in pair for pair in pairs)
        if self.collective:
            missing = ds.all_reduce_sum(missing) > 0
        if missing:
            if untrained_logps is not None and self.is_start:
                logps = untrained_logps.detach()
            else:
                with self.context():
                    logps, _ = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                          labels=batch["labels"], per_sequence=True)
            chosen, rejected = logps.float().chunk(2)
            for pair, c, r in zip(pairs, chosen.tolist(), rejected.tolist()):
                pair["ref_logps"] = (c, r)
        values = [p["ref_logps"][0] for p in pairs] + [p["ref_logps"][1] for p in pairs]
        return torch.tensor(values, device=batch["input_ids"].device)


def load_reference(cfg: DPOConfig, model_path: str, tokenizer, log):
    """The frozen copy the reference of `cfg` needs (CausalLMWithLoss), loaded before the run
    folder is written; None for simpo (reference-free) and for LoRA's adapters-disabled base."""
    if cfg.loss == "simpo":
        log("reference: none (simpo is reference-free)")
        return None
    if cfg.lora_dim and not cfg.reference:
        log("reference: the model with its LoRA adapters disabled")
        return None
    path = resolve_model(cfg.reference) if cfg.reference else model_path
    log(f"reference: a frozen copy of {cfg.reference or cfg.model}")
    if cfg.reference and load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
        raise ModelError(f"the reference {cfg.reference} uses another tokenizer than the model "
                         f"{cfg.model}: pass a reference of the same model family.")
    model = models.CausalLMWithLoss(load_causal_lm(path, torch_dtype(ds.precision(cfg).name)))
    return model.requires_grad_(False)


def build_reference(cfg: DPOConfig, engine, frozen) -> Reference | None:
    """The frozen reference of `cfg` around `frozen` (load_reference's) or the engine's base."""
    if cfg.loss == "simpo":
        return None
    collective = cfg.zero_stage == 3 and torch.distributed.get_world_size() > 1
    if frozen is None:  # LoRA: the base weights are the starting model, frozen
        return Reference(engine, engine.module.lm.disable_adapter, collective)
    is_start = not cfg.reference
    if cfg.zero_stage == 3:  # partitioned as the policy is
        return Reference(ds.inference_engine(frozen, cfg), collective=collective, is_start=is_start)
    return Reference(frozen.to(ds.device()).eval(), is_start=is_start)


# ---- objective ------------------------------------------------------------------------------------------

def implicit_rewards(cfg: DPOConfig, logps, ref_logps, counts) -> torch.Tensor:
    """DPO's implicit reward of answers, on the log-probs `cfg.loss` trains on: summed, or
    averaged over each answer's `counts` tokens for ipo and simpo; simpo has no reference."""
    scale = counts.clamp(min=1) if cfg.loss in AVERAGED_LOSSES else 1
    ref = None if cfg.loss == "simpo" or ref_logps is None else ref_logps / scale
    return losses.implicit_rewards(logps / scale, ref, cfg.beta)


def pair_losses(cfg: DPOConfig, logps, ref_logps, counts) -> torch.Tensor:
    """(B,) the `cfg.loss` of B pairs from (2B,) policy and reference log-probs (summed)."""
    scale = counts.clamp(min=1) if cfg.loss in AVERAGED_LOSSES else 1
    chosen, rejected = (logps / scale).chunk(2)
    if cfg.loss == "simpo":
        return losses.simpo_loss(chosen, rejected, cfg.beta, cfg.simpo_gamma, cfg.label_smoothing)
    ref_chosen, ref_rejected = (ref_logps / scale).chunk(2)
    chosen_logratios, rejected_logratios = chosen - ref_chosen, rejected - ref_rejected
    if cfg.loss == "ipo":
        return losses.ipo_loss(chosen_logratios, rejected_logratios, cfg.beta)
    if cfg.loss == "robust":
        return losses.robust_dpo_loss(chosen_logratios, rejected_logratios, cfg.beta, cfg.label_smoothing)
    return losses.dpo_loss(chosen_logratios, rejected_logratios, cfg.beta, cfg.label_smoothing)


def dpo_forward(engine, batch, cfg: DPOConfig, reference: Reference | None):
    logps, counts = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"], per_sequence=True)   # (2B,) each
    untrained = logps if engine.global_steps == 0 else None  # the policy is still the start
    ref_logps = reference.logps(batch, untrained) if reference is not None else None
    pair_loss = pair_losses(cfg, logps, ref_logps, counts)
    with torch.no_grad():
        chosen_rewards, rejected_rewards = implicit_rewards(cfg, logps, ref_logps, counts).chunk(2)
        chosen_logps, rejected_logps = logps.chunk(2)
        chosen_tokens, rejected_tokens = counts.chunk(2)
    stats = {"loss_sum": pair_loss.sum().item(), "pairs": len(pair_loss),
             "correct": (chosen_rewards > rejected_rewards).sum().item(),
             "chosen_reward_sum": chosen_rewards.sum().item(),
             "rejected_reward_sum": rejected_rewards.sum().item(),
             "chosen_logp_sum": chosen_logps.sum().item(), "chosen_tokens": chosen_tokens.sum().item(),
             "rejected_logp_sum": rejected_logps.sum().item(),
             "rejected_tokens": rejected_tokens.sum().item(),
             "tokens": batch["attention_mask"].sum().item()}
    return pair_loss.mean(), stats


def dpo_summary(sums) -> dict:
    pairs = max(sums["pairs"], 1)
    chosen, rejected = sums["chosen_reward_sum"] / pairs, sums["rejected_reward_sum"] / pairs
    return {"loss": round(sums["loss_sum"] / pairs, 5), "accuracy": round(sums["correct"] / pairs, 4),
            "margin": round(chosen - rejected, 4), "chosen_reward": round(chosen, 4),
            "rejected_reward": round(rejected, 4),
            "chosen_logp": round(sums["chosen_logp_sum"] / max(sums["chosen_tokens"], 1), 4),
            "rejected_logp": round(sums["rejected_logp_sum"] / max(sums["rejected_tokens"], 1), 4)}


def chosen_logp_change(rows: list[dict]) -> tuple[float, float] | None:
    """(first, last) held-out per-token log-prob of the chosen answers in a DPO run's metrics."""
    values = [row["eval_chosen_logp"] for row in rows if "eval_chosen_logp" in row]
    return (values[0], values[-1]) if len(values) >= 2 else None


# ---- main --------------------------------------------------------------------------------------------------

def main(cfg: DPOConfig) -> RunDir:
    rank, world = ds.init_distributed()
    run = RunDir.prepare(cfg, "dpo", rank)
    torch.manual_seed(cfg.seed)

    # data
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    train_records, eval_records = split_records(cfg, run.log)
    encode = partial(tokens.encode_all, tokens.encode_pair, tokenizer, max_seq_len=cfg.max_seq_len,
                     log=run.log)
    train_set, eval_set = encode(train_records), encode(eval_records)
    lengths = [max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in train_set]
    total_steps = loop.total_steps(cfg, loop.steps_per_epoch(lengths, cfg, world))
    run.log(f"dpo ({cfg.loss}, beta {cfg.beta}): {len(train_set)} train / {len(eval_set)} eval "
            f"pairs, {world} process(es), {total_steps} steps")
    lm = models.make_trainable(load_causal_lm(model_path), cfg)
    frozen = load_reference(cfg, model_path, tokenizer, run.log)
    run.start()  # inputs and models checked: the folder is written now (--resume: once the checkpoint loads)

    # engine and the frozen reference
    engine = ds.initialize(models.CausalLMWithLoss(lm), cfg, total_steps,
                           str(run.path / "tensorboard") if cfg.tensorboard else None)
    reference = build_reference(cfg, engine, frozen)

    # training
    objective = loop.Objective(collate=partial(collate_pairs, pad_id=tokenizer.pad_token_id),
                               forward=partial(dpo_forward, cfg=cfg, reference=reference),
                               summarise=dpo_summary)
    step, stopped = loop.fit(engine, run, cfg, objective, train_set, eval_set, lengths,
                             total_steps, "dpo")
    if stopped:
        return run

    change = chosen_logp_change(read_metrics(run.path)) if run.writer else None
    if change is not None:
        first, last = change
        run.log(f"held-out chosen log-prob per token: {first} -> {last}"
                + (" (fell: DPO pushed the chosen answers down too; `python -m train report` "
                   "flags a large fall)" if last < first else ""))
    loop.save_final(engine, run, cfg, tokenizer)
    run.status("done", step=step, total_steps=total_steps, eta_s=0)
    return run
