"""The supervised training loop that SFT and the reward model share.

A step describes its objective as three functions (an `Objective`): how to batch examples, how a
forward pass turns a batch into the loss to minimise plus summed statistics, and how summed
statistics become metrics. `fit` then runs the same loop for both: length-grouped batches split
across ranks, gradient accumulation, metrics and evaluation every N steps, checkpoints, a
SIGTERM/Ctrl-C stop that saves a resumable checkpoint, and exact resumption.
"""
from __future__ import annotations

import signal
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from core.decoder import prefill_groups
from train import data, ds, models, tokens


EVAL_TOKENS = 1024  # padded tokens per evaluation forward (~3 s on a 2-core CPU in fp32): a stop
# request is seen between two of them


@dataclass
class Objective:
    collate: Callable[[list[dict]], dict]            # examples -> batch of tensors
    forward: Callable[[object, dict], tuple]         # (engine, batch) -> (loss, {stat: sum})
    summarise: Callable[[dict], dict]                # {stat: sum over batches} -> metrics
    length: Callable[[dict], int] | None = None      # an example's tokens in a batch (all rows)


class Stopping(Exception):
    """Raised by `StopRequested.check` between the batches of a long pass (an evaluation, the
    reward statistics, a PPO rollout) so that a stop request is honoured within seconds."""


class StopRequested:
    """SIGTERM/SIGINT (the app's Stop, Ctrl-C) set a flag. Training loops look at it after each
    optimizer step; passes without optimizer steps call `check()` between batches. Either way
    the stage saves a resumable checkpoint and ends the run as `stopped`."""

    def __init__(self):
        self.requested = False

    def install(self) -> "StopRequested":
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, *_):
        self.requested = True

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (collective: every rank must call it)."""
        self.requested = ds.all_reduce_sum(self.requested) > 0
        return self.requested

    def check(self, collective: bool = True) -> None:
        """Raise `Stopping` if a stop was requested. `collective`: every rank calls this at the
        same points, so the ranks agree; otherwise (a rank's own rollout, whose length differs
        between ranks) only a single process stops here, and ranks wait for the next agreement."""
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if collective and world > 1:
            self.agreed()
        elif world > 1:
            return
        if self.requested:
            raise Stopping()


STOP = StopRequested()  # one per process: a stage calls STOP.install() when it starts


def rank_batches(lengths: list[int], cfg, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches for one epoch; every rank gets the same count."""
    batches = tokens.length_grouped_batches(lengths, cfg.batch_size, seed=cfg.seed + epoch)
    usable = len(batches) - len(batches) % (world * cfg.gradient_accumulation_steps)
    return batches[:usable][rank::world]


def steps_per_epoch(lengths: list[int], cfg, world: int) -> int:
    steps = len(rank_batches(lengths, cfg, 0, 0, world)) // cfg.gradient_accumulation_steps
    if steps == 0:
        raise data.DataError(f"{len(lengths)} training examples make no full optimizer step with "
                             f"batch size {cfg.batch_size} x {world} processes x "
                             f"{cfg.gradient_accumulation_steps} accumulation: add data or lower them.")
    return steps


def to_device(batch: dict) -> dict:
    return {k: v.to(ds.device()) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def eval_batches(examples: list[dict], objective: Objective, batch_size: int) -> list[list[int]]:
    """Held-out examples grouped by length so each forward holds about EVAL_TOKENS padded tokens
    (sums over examples do not depend on the grouping; short groups also mean little padding)."""
    if objective.length is None:
        return [list(range(i, min(i + batch_size, len(examples))))
                for i in range(0, len(examples), batch_size)]
    return prefill_groups([objective.length(e) for e in examples], EVAL_TOKENS)


@torch.no_grad()
def evaluate(engine, examples: list[dict], objective: Objective, batch_size: int) -> dict:
    """Metrics over held-out examples, prefixed `eval_` (every rank runs it: ZeRO-3 needs all)."""
    engine.eval()
    sums = Counter()
    for group in eval_batches(examples, objective, batch_size):
        STOP.check()
        _, stats = objective.forward(engine, to_device(objective.collate([examples[i] for i in group])))
        sums.update(stats)
    engine.train()
    return {f"eval_{k}": v for k, v in objective.summarise(sums).items()}


def _reduce(sums: Counter) -> Counter:
    return Counter({k: ds.all_reduce_sum(v) for k, v in sorted(sums.items())})


def fit(engine, run, cfg, objective: Objective, train_set: list[dict], eval_set: list[dict],
        lengths: list[int], total_steps: int, name: str) -> tuple[int, bool]:
    """Train until `total_steps` or a stop request; returns (last step, whether it stopped early).
    A stop during an evaluation ends it between batches; the checkpoint is of the last step."""
    STOP.install()
    step = 0
    if cfg.resume:
        step = ds.load_checkpoint(engine, run.checkpoints)["step"]
        run.resumed(step)  # only now is the run folder written
    progress = {"step": step}  # the last finished optimizer step, also when a pass is cut short
    try:
        if step == 0 and eval_set:
            run.log(f"evaluating the starting model on {len(eval_set)} held-out examples")
            run.metrics({"step": 0, **evaluate(engine, eval_set, objective, cfg.batch_size)})
        step = _train(engine, run, cfg, objective, train_set, eval_set, lengths, total_steps, name,
                      progress)
        if not STOP.requested and eval_set:
            final = evaluate(engine, eval_set, objective, cfg.batch_size)
            run.metrics({"step": step, **final})
            run.log("held-out: " + ", ".join(f"{k} {v}" for k, v in final.items()))
    except Stopping:
        step = progress["step"]
    if STOP.requested:
        save_stopped(engine, run, cfg, step, total_steps)
        return step, True
    return step, False


def save_stopped(engine, run, cfg, step: int, total_steps: int) -> None:
    """A stop request was honoured: a resumable checkpoint of `step`, and the run `stopped`."""
    ds.save_checkpoint(engine, run.checkpoints, step, {"step": step}, cfg.keep_checkpoints)
    run.log(f"stopped at step {step}; continue with --resume")
    run.status("stopped", step=step, total_steps=total_steps)


def _train(engine, run, cfg, objective, train_set, eval_set, lengths, total_steps, name,
           progress: dict) -> int:
    """Optimizer steps from progress["step"] to `total_steps` (or a stop); returns the last."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    per_epoch = steps_per_epoch(lengths, cfg, world)
    step = first_step = progress["step"]
    accum = cfg.gradient_accumulation_steps
    bar = tqdm(total=total_steps, initial=step, desc=name, disable=rank != 0, dynamic_ncols=True)
    sums, tic = Counter(), time.time()
    while step < total_steps and not STOP.requested:
        epoch, skip = divmod(step, per_epoch)
        batches = rank_batches(lengths, cfg, epoch, rank, world)
        for micro, indices in enumerate(batches[skip * accum:], start=skip * accum):
            batch = to_device(objective.collate([train_set[i] for i in indices]))
            loss, stats = objective.forward(engine, batch)
            engine.backward(loss)  # DeepSpeed scales by 1/accum itself
            engine.step()
            sums.update(stats)
            if (micro + 1) % accum:
                continue
            step = progress["step"] = step + 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                totals, elapsed = _reduce(sums), time.time() - tic
                row = {"step": step, "epoch": epoch, **objective.summarise(totals),
                       "lr": engine.get_lr()[0], "tokens_per_s": round(totals["tokens"] / elapsed, 1),
                       "step_time_s": round(elapsed / cfg.log_every, 3)}
                run.metrics(row)
                if engine.monitor.enabled:
                    engine.monitor.write_events([(f"{name}/{k}", v, step) for k, v in row.items()
                                                 if k not in ("step", "epoch")])
                bar.set_postfix({k: row[k] for k in list(row)[2:4]})
                sums = Counter()
            if eval_set and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                run.metrics({"step": step, **evaluate(engine, eval_set, objective, cfg.batch_size)})
            run.progress(step, total_steps, first_step)
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                ds.save_checkpoint(engine, run.checkpoints, step, {"step": step}, cfg.keep_checkpoints)
            if step % cfg.log_every == 0:
                tic = time.time()  # throughput counts training only, not evaluation or saving
            # every rank must stop at the same step: the checkpoint save is collective
            if STOP.agreed() or step >= total_steps:
                break
    bar.close()
    return step


def total_steps(cfg, per_epoch: int) -> int:
    return cfg.max_steps or per_epoch * cfg.num_epochs


def save_final(engine, run, cfg, tokenizer, folder=None, extra_files: dict | None = None) -> None:
    """Full weights (gathered under ZeRO-3, LoRA merged) as a Hugging Face folder, by rank 0."""
    state_dict = ds.full_state_dict(engine)
    if run.writer:
        folder = folder or run.final
        models.save_hf(state_dict, engine.module, tokenizer, folder, models.lora_scaling(cfg),
                       extra_files)
        run.log(f"saved {folder}")
    ds.barrier()
