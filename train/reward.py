"""Step 2: a reward model trained on preference pairs, and its evaluation (`eval-rm`).

The model is a transformer backbone with a scalar head (`models.ValueHeadModel`); a sequence's
reward is the head's output at its last token, the response's end-of-turn token. Chosen and
rejected answers go through one forward pass (2B rows); the loss is the pairwise
`-logsigmoid(r_chosen - r_rejected - margin)`. After training, the mean and standard deviation of
rewards on training answers are saved beside the model so PPO can normalise rewards.

Ties and "both bad" verdicts carry no preference between two answers, so the data layer drops
them (counted in the log); only A-better / B-better votes become pairs.
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from functools import partial

import torch

from core.decoder import prefill_groups
from core.hardware import resolve_precision, torch_dtype
from core.models import ModelError, load_tokenizer, resolve_model

from train import data, ds, loop, models, tokens
from train.config import EvalRMConfig, RMConfig, parse_split
from train.losses import pairwise_loss, sequence_rewards
from train.rundir import RunDir


def load_pairs(cfg, tokenizer, log) -> tuple[list[dict], list[dict]]:
    weights = parse_split(cfg.data_split) if cfg.data_split else None
    records = data.load_data(cfg.data, "rm", cfg.seed, weights, log=log)
    train_records, eval_records = data.holdout(records, cfg.eval_fraction, cfg.max_eval_samples)
    train_set = tokens.encode_all(tokens.encode_pair, tokenizer, train_records, cfg.max_seq_len, log)
    eval_set = tokens.encode_all(tokens.encode_pair, tokenizer, eval_records, cfg.max_seq_len, log)
    return train_set, eval_set


def pair_rewards(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) chosen and (B,) rejected rewards of a collate_pairs batch of 2B rows."""
    values = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    rewards = sequence_rewards(values, batch["attention_mask"])
    return rewards.chunk(2)


def pair_length(example: dict) -> int:
    """Tokens a pair takes in a batch: two rows (chosen, rejected) as long as the longer."""
    return 2 * max(len(example["chosen_ids"]), len(example["rejected_ids"]))


def rm_forward(engine, batch, margin: float):
    chosen, rejected = pair_rewards(engine, batch)
    losses = pairwise_loss(chosen, rejected, margin)
    stats = {"loss_sum": losses.sum().item(), "correct": (chosen > rejected).sum().item(),
             "chosen_sum": chosen.sum().item(), "rejected_sum": rejected.sum().item(),
             "pairs": len(chosen), "tokens": batch["attention_mask"].sum().item()}
    return losses.mean(), stats


def rm_summary(sums) -> dict:
    pairs = max(sums["pairs"], 1)
    chosen, rejected = sums["chosen_sum"] / pairs, sums["rejected_sum"] / pairs
    return {"loss": round(sums["loss_sum"] / pairs, 5), "accuracy": round(sums["correct"] / pairs, 4),
            "chosen_reward": round(chosen, 4), "rejected_reward": round(rejected, 4),
            "margin": round(chosen - rejected, 4)}


@torch.no_grad()
def reward_statistics(engine, examples: list[dict], pad_id: int) -> dict:
    """Mean and std of rewards over both answers of `examples` (PPO normalises with them)."""
    engine.eval()
    rewards = []
    for group in prefill_groups([pair_length(e) for e in examples], loop.EVAL_TOKENS):
        loop.STOP.check()
        batch = loop.to_device(tokens.collate_pairs([examples[i] for i in group], pad_id))
        rewards += torch.cat(pair_rewards(engine, batch)).tolist()
    return {"mean": statistics.fmean(rewards), "std": statistics.pstdev(rewards) or 1.0,
            "count": len(rewards)}


def main(cfg: RMConfig) -> RunDir:
    rank, world = ds.init_distributed()
    run = RunDir.prepare(cfg, "rm", rank)
    torch.manual_seed(cfg.seed)

    # data
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    train_set, eval_set = load_pairs(cfg, tokenizer, run.log)
    lengths = [max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in train_set]
    total_steps = loop.total_steps(cfg, loop.steps_per_epoch(lengths, cfg, world))
    run.log(f"rm: {len(train_set)} train / {len(eval_set)} eval pairs, {world} process(es), "
            f"{total_steps} steps")
    model = models.load_value_model(model_path)
    model.backbone = models.make_trainable(model.backbone, cfg, task="FEATURE_EXTRACTION")
    run.start()  # inputs and model checked: the folder is written now (--resume: once the checkpoint loads)

    # engine
    engine = ds.initialize(model, cfg, total_steps,
                           str(run.path / "tensorboard") if cfg.tensorboard else None)

    # training
    objective = loop.Objective(collate=partial(tokens.collate_pairs, pad_id=tokenizer.pad_token_id),
                               forward=partial(rm_forward, margin=cfg.margin), summarise=rm_summary,
                               length=pair_length)
    step, stopped = loop.fit(engine, run, cfg, objective, train_set, eval_set, lengths,
                             total_steps, "rm")
    if stopped:
        return run

    # reward statistics, then the final save (backbone folder + value head + statistics)
    try:
        stats = reward_statistics(engine, train_set[:cfg.stats_samples], tokenizer.pad_token_id)
    except loop.Stopping:
        loop.save_stopped(engine, run, cfg, step, total_steps)
        return run
    run.log(f"reward statistics on {stats['count']} training answers: mean {stats['mean']:.4f}, "
            f"std {stats['std']:.4f}")
    loop.save_final(engine, run, cfg, tokenizer,
                    extra_files={models.REWARD_STATS_FILE: json.dumps(stats, indent=1)})
    run.status("done", step=step, total_steps=total_steps, eta_s=0)
    return run


# ---- eval-rm ------------------------------------------------------------------------------------

@torch.no_grad()
def score_pairs(model, examples: list[dict], pad_id: int, batch_size: int) -> list[tuple[float, float]]:
    """(chosen reward, rejected reward) for each example, in order."""
    scores = []
    for start in range(0, len(examples), batch_size):
        batch = tokens.collate_pairs(examples[start:start + batch_size], pad_id)
        chosen, rejected = pair_rewards(model, batch)
        scores += list(zip(chosen.tolist(), rejected.tolist()))
    return scores


def summarise_scores(scores: list[tuple[float, float]]) -> dict:
    count = len(scores)
    chosen = statistics.fmean(c for c, _ in scores)
    rejected = statistics.fmean(r for _, r in scores)
    return {"accuracy": round(sum(c > r for c, r in scores) / count, 4),
            "mean_chosen": round(chosen, 4), "mean_rejected": round(rejected, 4),
            "mean_margin": round(chosen - rejected, 4), "count": count}


def evaluate_main(cfg: EvalRMConfig) -> dict:
    if not cfg.reward:
        raise ModelError("--reward is required: pass a reward-model folder (an RM run's final/).")
    if not cfg.data:
        raise data.DataError("--data is required: pass preference pairs to score.")
    path = resolve_model(cfg.reward)
    torch.set_grad_enabled(False)
    model = models.load_value_model(path, torch_dtype(resolve_precision(cfg.precision).name))
    model.eval()
    tokenizer = load_tokenizer(path)
    log = partial(print, file=sys.stderr)
    by_source = defaultdict(list)
    for spec in cfg.data:
        records = data.phase_records(data.read_source(spec).records, "rm")
        records = records[:cfg.max_samples] if cfg.max_samples else records
        by_source[spec] = tokens.encode_all(tokens.encode_pair, tokenizer, records, cfg.max_seq_len, log)
    if not any(by_source.values()):
        raise data.DataError("no preference pairs to score: pass --data with chosen/rejected pairs.")
    scored = {spec: score_pairs(model, examples, tokenizer.pad_token_id, cfg.batch_size)
              for spec, examples in by_source.items() if examples}
    result = summarise_scores([pair for scores in scored.values() for pair in scores])
    if cfg.per_source:
        result["per_source"] = {spec: summarise_scores(scores) for spec, scores in scored.items()}
    print(json.dumps(result, indent=1))
    return result
