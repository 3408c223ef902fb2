"""Step 1: supervised fine-tuning of a chat model on demonstrations, through DeepSpeed.

Reads top to bottom: run folder, data, model, engine, the training loop, the final save.
Loss is next-token cross-entropy on response tokens only (end-of-turn token included).
"""
from __future__ import annotations

import math
import signal
import time

import torch
from tqdm import tqdm

from train import data, ds, models
from train.config import SFTConfig, parse_split
from train.rundir import RunDir


class StopRequested:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and ends as `stopped`."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, *_):
        self.requested = True


def load_sft_data(cfg: SFTConfig, tokenizer, log) -> tuple[list[dict], list[dict]]:
    weights = parse_split(cfg.data_split) if cfg.data_split else None
    records = data.load_data(cfg.data, "sft", cfg.seed, weights, log=log)
    train_records, eval_records = data.holdout(records, cfg.eval_fraction, cfg.max_eval_samples)
    train_set = data.encode_sft(tokenizer, train_records, cfg.max_seq_len, log=log)
    eval_set = data.encode_sft(tokenizer, eval_records, cfg.max_seq_len, log=log) if eval_records else []
    return train_set, eval_set


def rank_batches(examples, cfg, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches for one epoch; every rank gets the same count."""
    batches = data.length_grouped_batches([len(e["input_ids"]) for e in examples], cfg.batch_size,
                                          seed=cfg.seed + epoch)
    usable = len(batches) - len(batches) % (world * cfg.gradient_accumulation_steps)
    return batches[:usable][rank::world]


@torch.no_grad()
def evaluate(engine, examples, cfg, pad_id) -> dict:
    engine.eval()
    loss_sum = count = 0.0
    for start in range(0, len(examples), cfg.batch_size):
        batch = data.collate(examples[start:start + cfg.batch_size], pad_id)
        batch_loss, batch_count = engine(**{k: v.to(ds.device()) for k, v in batch.items()})
        loss_sum += batch_loss.item()
        count += batch_count.item()
    engine.train()
    loss = loss_sum / max(count, 1)
    return {"eval_loss": round(loss, 5), "eval_ppl": round(math.exp(min(loss, 50)), 3)}


def main(cfg: SFTConfig) -> RunDir:
    rank, world = ds.init_distributed()
    run = RunDir.prepare(cfg, "sft", rank)
    stop = StopRequested()
    run.status("running", step=0)
    torch.manual_seed(cfg.seed)

    # data
    model_path = models.resolve_model(cfg.model)
    tokenizer = models.load_tokenizer(model_path)
    train_set, eval_set = load_sft_data(cfg, tokenizer, run.log)
    steps_per_epoch = len(rank_batches(train_set, cfg, 0, rank, world)) // cfg.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise data.DataError(f"{len(train_set)} training examples make no full optimizer step with "
                             f"batch size {cfg.batch_size} x {world} processes x "
                             f"{cfg.gradient_accumulation_steps} accumulation: add data or lower them.")
    total_steps = cfg.max_steps or steps_per_epoch * cfg.num_epochs
    run.log(f"sft: {len(train_set)} train / {len(eval_set)} eval examples, {world} process(es), "
            f"{steps_per_epoch} steps per epoch, {total_steps} steps")

    # model and engine
    lm = models.load_causal_lm(model_path)
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
        lm.config.use_cache = False
    if cfg.lora_dim:
        lm = models.add_lora(lm, cfg.lora_dim, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    engine = ds.initialize(models.CausalLMWithLoss(lm), cfg, total_steps,
                           str(run.path / "tensorboard") if cfg.tensorboard else None)
    step = 0
    if cfg.resume:
        client_state = ds.load_checkpoint(engine, run.checkpoints)
        step = client_state["step"]
        run.log(f"resumed from step {step}")
    first_step = step
    if step == 0 and eval_set:
        run.metrics({"step": 0, **evaluate(engine, eval_set, cfg, tokenizer.pad_token_id)})

    # training loop
    accum = cfg.gradient_accumulation_steps
    bar = tqdm(total=total_steps, initial=step, desc="sft", disable=rank != 0, dynamic_ncols=True)
    tokens = loss_sum = label_count = 0.0
    tic = time.time()
    while step < total_steps and not stop.requested:
        epoch, skip = divmod(step, steps_per_epoch)
        batches = rank_batches(train_set, cfg, epoch, rank, world)
        for micro, indices in enumerate(batches[skip * accum:], start=skip * accum):
            batch = data.collate([train_set[i] for i in indices], tokenizer.pad_token_id)
            batch = {k: v.to(ds.device()) for k, v in batch.items()}
            batch_loss, batch_count = engine(**batch)
            # mean over labelled tokens of this micro-batch; DeepSpeed divides by `accum`
            engine.backward(batch_loss / batch_count.clamp(min=1))
            engine.step()
            tokens += batch["attention_mask"].sum().item()
            loss_sum += batch_loss.item()
            label_count += batch_count.item()
            if (micro + 1) % accum:
                continue
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                elapsed = time.time() - tic
                loss = ds.all_reduce_sum(loss_sum) / max(ds.all_reduce_sum(label_count), 1)
                row = {"step": step, "epoch": epoch, "loss": round(loss, 5),
                       "lr": engine.get_lr()[0],
                       "tokens_per_s": round(ds.all_reduce_sum(tokens) / elapsed, 1),
                       "step_time_s": round(elapsed / cfg.log_every, 3)}
                run.metrics(row)
                if engine.monitor.enabled:
                    engine.monitor.write_events([(f"sft/{k}", v, step) for k, v in row.items()
                                                 if k not in ("step", "epoch")])
                bar.set_postfix(loss=row["loss"], tok_s=row["tokens_per_s"])
                tokens = loss_sum = label_count = 0.0
                tic = time.time()
            if eval_set and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                run.metrics({"step": step, **evaluate(engine, eval_set, cfg, tokenizer.pad_token_id)})
            run.progress(step, total_steps, first_step)
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                ds.save_checkpoint(engine, run.checkpoints, step, {"step": step}, cfg.keep_checkpoints)
            if step % cfg.log_every == 0:
                tic = time.time()  # throughput counts training only, not evaluation or saving
            # every rank must stop at the same step: the checkpoint save is collective
            stopping = ds.all_reduce_sum(stop.requested) > 0
            if step >= total_steps or stopping:
                stop.requested = stopping
                break
    bar.close()

    if stop.requested and step < total_steps:
        ds.save_checkpoint(engine, run.checkpoints, step, {"step": step}, cfg.keep_checkpoints)
        run.log(f"stopped at step {step}; continue with --resume")
        run.status("stopped", step=step, total_steps=total_steps)
        return run

    # final evaluation and save
    if eval_set:
        final_eval = evaluate(engine, eval_set, cfg, tokenizer.pad_token_id)
        run.metrics({"step": step, **final_eval})
        run.log(f"eval loss {final_eval['eval_loss']}, perplexity {final_eval['eval_ppl']}")
    state_dict = ds.full_state_dict(engine)
    if rank == 0:
        lora_scaling = cfg.lora_alpha / cfg.lora_dim if cfg.lora_dim else None
        models.save_hf(state_dict, engine.module, tokenizer, run.final, lora_scaling)
        run.log(f"saved {run.final}")
    ds.barrier()
    run.status("done", step=step, total_steps=total_steps, eta_s=0)
    return run
