"""`python -m train all`: SFT, the reward model and PPO in a row, as DeepSpeed-Chat's one script.

The three steps share data sources and a `--data-split`, so each trains on a disjoint part of
every source. Steps hand over through their run folders: PPO's actor is SFT's final/, its reward
model RM's final/. A step whose folder already holds a finished result is reused; one stopped
midway resumes from its checkpoint. Ends with a table of wall time, final metrics and paths.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from core.options import ConfigError, build, load_yaml, to_yaml
from core.runs import MARKER, read_metrics, read_status, write_json_atomic
from train import config, ppo, reward, sft
from train.config import AllConfig
from train.rundir import RunDir

STEP_METRICS = {"sft": ("eval_loss", "eval_ppl", "loss"),
                "rm": ("eval_accuracy", "eval_margin", "accuracy"),
                "ppo": ("eval_reward", "reward", "kl", "response_length")}


def step_config(cls, cfg: AllConfig, name: str, extra_yaml: str, **values):
    folder = Path(cfg.output) / name
    state = read_status(folder).get("state")
    has_checkpoint = (folder / "checkpoints" / "latest").is_file()
    options = load_yaml(extra_yaml, cls) if extra_yaml else {}
    options.update(values, output=str(folder), data=cfg.data, data_split=cfg.data_split, seed=cfg.seed,
                   precision=cfg.precision, zero_stage=cfg.zero_stage,
                   resume=has_checkpoint and state != "done" and not cfg.overwrite,
                   overwrite=cfg.overwrite or (folder.exists() and not has_checkpoint))
    return build(cls, options)


def final_metrics(folder: Path, keys) -> dict:
    latest = {}
    for row in read_metrics(folder):
        latest.update({k: row[k] for k in keys if k in row})
    return latest


def main(cfg: AllConfig) -> dict:
    if not cfg.output:
        raise ConfigError("--output is required: name the pipeline folder, e.g. runs/demo.")
    root = Path(cfg.output)
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / MARKER, {"stage": "all", "created_at": time.time()})
    (root / "config.yaml").write_text(to_yaml(cfg))
    pipeline = RunDir(root)
    plan = [
        ("sft", sft.main, lambda: step_config(config.SFTConfig, cfg, "sft", cfg.sft_config,
                                              model=cfg.actor_model, max_steps=cfg.sft_max_steps)),
        ("rm", reward.main, lambda: step_config(config.RMConfig, cfg, "rm", cfg.rm_config,
                                                model=cfg.reward_model, max_steps=cfg.rm_max_steps)),
        ("ppo", ppo.main, lambda: step_config(config.PPOConfig, cfg, "ppo", cfg.ppo_config,
                                              actor=str(root / "sft" / "final"),
                                              reward=str(root / "rm" / "final"),
                                              max_steps=cfg.ppo_max_steps)),
    ]
    summary = []
    for index, (name, run_step, make_config) in enumerate(plan):
        pipeline.status("running", step=index, total_steps=len(plan), current=name)
        folder = root / name
        tic = time.time()
        if read_status(folder).get("state") == "done" and not cfg.overwrite:
            pipeline.log(f"{name}: reusing the finished run in {folder}")
            wall = None
        else:
            run_step(make_config())
            if read_status(folder).get("state") != "done":
                pipeline.status("stopped", step=index, total_steps=len(plan), current=name)
                pipeline.log(f"{name} did not finish; run the same command again to continue")
                return {"steps": summary}
            wall = round(time.time() - tic, 1)
        summary.append({"step": name, "wall_s": wall, **final_metrics(folder, STEP_METRICS[name]),
                        "checkpoint": str(folder / "final")})
    pipeline.status("done", step=len(plan), total_steps=len(plan))
    if (root / "ppo" / "ema").is_dir():
        summary[-1]["ema"] = str(root / "ppo" / "ema")
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    pipeline.log("\n" + summary_table(summary))
    return {"steps": summary}


def summary_table(summary: list[dict]) -> str:
    lines = [f"{'step':<5} {'wall':>9}  {'final metrics':<58} checkpoint"]
    for row in summary:
        wall = "reused" if row["wall_s"] is None else f"{row['wall_s']:.0f} s"
        metrics = ", ".join(f"{k} {v}" for k, v in row.items()
                            if k not in ("step", "wall_s", "checkpoint", "ema"))
        lines.append(f"{row['step']:<5} {wall:>9}  {metrics:<58} {row['checkpoint']}")
        if "ema" in row:
            lines.append(f"{'':<5} {'':>9}  {'':<58} {row['ema']}")
    return "\n".join(lines)
