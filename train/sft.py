"""Step 1: supervised fine-tuning of a chat model on demonstrations, through DeepSpeed.

Reads top to bottom: run folder, data, model, engine, the shared training loop, the final save.
Loss is next-token cross-entropy on response tokens only (end-of-turn token included).
"""
from __future__ import annotations

import math
from functools import partial

import torch

from core.models import load_causal_lm, load_tokenizer, resolve_model

from train import data, ds, loop, models, tokens
from train.config import SFTConfig, parse_split
from train.rundir import RunDir


def load_sft_data(cfg: SFTConfig, tokenizer, log) -> tuple[list[dict], list[dict]]:
    weights = parse_split(cfg.data_split) if cfg.data_split else None
    records = data.load_data(cfg.data, "sft", cfg.seed, weights, log=log)
    train_records, eval_records = data.holdout(records, cfg.eval_fraction, cfg.max_eval_samples)
    train_set = tokens.encode_all(tokens.encode_sft_record, tokenizer, train_records, cfg.max_seq_len, log)
    eval_set = tokens.encode_all(tokens.encode_sft_record, tokenizer, eval_records, cfg.max_seq_len, log)
    return train_set, eval_set


def sft_forward(engine, batch):
    loss_sum, count = engine(**batch)  # summed token loss over the batch's labelled tokens
    stats = {"loss_sum": loss_sum.item(), "labels": count.item(),
             "tokens": batch["attention_mask"].sum().item()}
    return loss_sum / count.clamp(min=1), stats


def sft_summary(sums) -> dict:
    loss = sums["loss_sum"] / max(sums["labels"], 1)
    return {"loss": round(loss, 5), "ppl": round(math.exp(min(loss, 50)), 3)}


def main(cfg: SFTConfig) -> RunDir:
    rank, world = ds.init_distributed()
    run = RunDir.prepare(cfg, "sft", rank)
    torch.manual_seed(cfg.seed)

    # data
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    train_set, eval_set = load_sft_data(cfg, tokenizer, run.log)
    lengths = [len(e["input_ids"]) for e in train_set]
    total_steps = loop.total_steps(cfg, loop.steps_per_epoch(lengths, cfg, world))
    run.log(f"sft: {len(train_set)} train / {len(eval_set)} eval examples, {world} process(es), "
            f"{total_steps} steps")
    lm = models.make_trainable(load_causal_lm(model_path), cfg)
    run.start()  # inputs and model checked: the folder is written now (--resume: once the checkpoint loads)

    # engine
    engine = ds.initialize(models.CausalLMWithLoss(lm), cfg, total_steps,
                           str(run.path / "tensorboard") if cfg.tensorboard else None)

    # training
    objective = loop.Objective(collate=partial(tokens.collate, pad_id=tokenizer.pad_token_id),
                               forward=sft_forward, summarise=sft_summary,
                               length=lambda example: len(example["input_ids"]))
    step, stopped = loop.fit(engine, run, cfg, objective, train_set, eval_set, lengths,
                             total_steps, "sft")
    if stopped:
        return run

    loop.save_final(engine, run, cfg, tokenizer)
    run.status("done", step=step, total_steps=total_steps, eta_s=0)
    return run
