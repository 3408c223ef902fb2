"""`python -m train all`: SFT, the reward model (and a judge), then PPO, GRPO or DPO, then the
report, in a row, as DeepSpeed-Chat's one script does its three steps.

The steps share data sources and a `--data-split` (SFT, RM, third-step weights), so each trains
on a disjoint part of every source. With `--judge` (the default) the reward-model part is cut in
two: the reward model trains on the first half, the judge on the second, so the report can
score the result with a reward model the run never optimised. The third step (`--rl`):
- ppo: PPO of SFT's final/ against the reward model, on the prompts of the third part;
- grpo: the same step with `--algorithm grpo` (critic-free);
- dpo: DPO of SFT's final/ on the preference pairs of the third part (the reward model is
  trained all the same: it is there for later rounds; DPO's report uses its implicit reward).
Steps hand over through their run folders. A step whose folder already holds a finished result
is reused; one stopped midway resumes from its checkpoint. Ends with the report (report.json
and report.md in the third step's folder) and a table of wall time, final metrics and paths.
"""
from __future__ import annotations

import time
from pathlib import Path

from core.options import ConfigError, build, load_yaml, to_yaml
from core.paths import atomic_write
from core.runs import MARKER, RunInfo, read_metrics, read_status, write_json_atomic
from train import config, dpo, ppo, report, reward, sft
from train.config import AllConfig, parse_split
from train.rundir import RunDir, refuse_foreign, refuse_links, refuse_nesting

STEP_METRICS = {"sft": ("eval_loss", "eval_ppl", "loss"),
                "rm": ("eval_accuracy", "eval_margin", "accuracy"),
                "judge": ("eval_accuracy", "eval_margin", "accuracy"),
                "ppo": ("eval_reward", "reward", "kl", "response_length"),
                "grpo": ("eval_reward", "reward", "kl", "response_length"),
                "dpo": ("eval_accuracy", "eval_margin", "eval_chosen_logp")}


def step_config(cls, cfg: AllConfig, name: str, extra_yaml: str, **values):
    folder = Path(cfg.output) / name
    step = RunInfo.load(folder)  # only a run of ours is resumed (RunDir.prepare refuses others)
    state = step.status.get("state") if step else None
    has_checkpoint = step is not None and step.has_checkpoint()
    options = load_yaml(extra_yaml, cls) if extra_yaml else {}
    options.update(output=str(folder), data=cfg.data, data_split=cfg.data_split, seed=cfg.seed,
                   precision=cfg.precision, zero_stage=cfg.zero_stage,
                   resume=has_checkpoint and state != "done" and not cfg.overwrite,
                   overwrite=cfg.overwrite or (folder.exists() and not has_checkpoint))
    options.update(values)
    return build(cls, options)


def halves_of_rm_part(data_split: str) -> tuple[str, str]:
    """Splits giving the reward model the first half of the RM part and the judge the second:
    every source is shuffled the same way, so moving half the RM weight to either side moves
    the boundaries without moving any record to another part."""
    sft_w, rm_w, rl_w = parse_split(data_split)
    half = rm_w / 2
    return f"{sft_w:g},{half:g},{half + rl_w:g}", f"{sft_w + half:g},{half:g},{rl_w:g}"


def final_metrics(folder: Path, keys) -> dict:
    latest = {}
    for row in read_metrics(folder):
        latest.update({k: row[k] for k in keys if k in row})
    return latest


def plan(cfg: AllConfig, root: Path) -> list[tuple]:
    """(step name, its main, a function building its config) in order."""
    rm_split, judge_split = halves_of_rm_part(cfg.data_split) if cfg.judge else (cfg.data_split, "")
    sft_final, rm_final = str(root / "sft" / "final"), str(root / "rm" / "final")
    steps = [
        ("sft", sft.main, lambda: step_config(config.SFTConfig, cfg, "sft", cfg.sft_config,
                                              model=cfg.actor_model, max_steps=cfg.sft_max_steps)),
        ("rm", reward.main, lambda: step_config(config.RMConfig, cfg, "rm", cfg.rm_config,
                                                model=cfg.reward_model, max_steps=cfg.rm_max_steps,
                                                data_split=rm_split)),
    ]
    if cfg.judge:
        steps.append(("judge", reward.main, lambda: step_config(
            config.RMConfig, cfg, "judge", cfg.rm_config, model=cfg.reward_model,
            max_steps=cfg.rm_max_steps, data_split=judge_split)))
    if cfg.rl == "dpo":
        steps.append(("dpo", dpo.main, lambda: step_config(config.DPOConfig, cfg, "dpo", cfg.dpo_config,
                                                           model=sft_final, max_steps=cfg.dpo_max_steps)))
    else:  # grpo is the PPO step with another algorithm (an option of PPOConfig)
        extra = {"algorithm": "grpo"} if cfg.rl == "grpo" else {}
        steps.append((cfg.rl, ppo.main, lambda: step_config(config.PPOConfig, cfg, cfg.rl, cfg.ppo_config,
                                                            actor=sft_final, reward=rm_final,
                                                            max_steps=cfg.ppo_max_steps, **extra)))
    return steps


def run_report(cfg: AllConfig, root: Path, pipeline: RunDir) -> dict:
    """The third step's report (reused when its run was reused and a report exists)."""
    folder = root / cfg.rl
    existing = report.load_report(folder)
    if existing is not None and not cfg.overwrite and existing.get("created_at", 0) > \
            (folder / "status.json").stat().st_mtime:
        pipeline.log(f"report: reusing {folder / report.REPORT_JSON}")
        return {"step": "report", "wall_s": None, **report_metrics(existing),
                "checkpoint": str(folder / report.REPORT_MD)}
    options = load_yaml(cfg.report_config, config.ReportConfig) if cfg.report_config else {}
    options.update(run=str(folder), precision=cfg.precision)
    if cfg.judge:
        options["judge"] = str(root / "judge" / "final")
    tic = time.time()
    result = report.main(build(config.ReportConfig, options))
    return {"step": "report", "wall_s": round(time.time() - tic, 1), **report_metrics(result),
            "checkpoint": str(folder / report.REPORT_MD)}


def report_metrics(result: dict) -> dict:
    figures = result["figures"]
    row = {"win_rate": figures["win_rate"]["value"]} if "win_rate" in figures else {}
    row["alarms"] = ", ".join(a["name"] for a in result["alarms"]) or "none"
    return row


def check_root(root: Path) -> None:
    """The pipeline folder is new, empty or a pipeline of ours, and inside no other run: its
    marker and config.yaml never go over someone's files or another stage's run."""
    refuse_foreign(root, "no pipeline writes into it")
    refuse_nesting(root)
    existing = RunInfo.load(root)
    if existing is not None and existing.stage != "all":
        raise ConfigError(f"{root} holds a {existing.stage or 'training'} run, not a pipeline: "
                          "choose another --output.")
    if existing is not None:  # a copy made with cp -s or cp -al writes into the original (probe 7, F4)
        refuse_links(root, "running the pipeline again")


def main(cfg: AllConfig) -> dict:
    if not cfg.output:
        raise ConfigError("--output is required: name the pipeline folder, e.g. runs/demo.")
    root = Path(cfg.output)
    check_root(root)
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / MARKER, {"stage": "all", "created_at": time.time()})
    with atomic_write(root / "config.yaml") as handle:
        handle.write(to_yaml(cfg))
    pipeline = RunDir(root)
    steps = plan(cfg, root)
    total = len(steps) + cfg.report
    summary = []
    for index, (name, run_step, make_config) in enumerate(steps):
        pipeline.status("running", step=index, total_steps=total, current=name)
        folder = root / name
        tic = time.time()
        step = RunInfo.load(folder)  # a finished run of ours, not any folder saying "done"
        if step is not None and step.status.get("state") == "done" and not cfg.overwrite:
            pipeline.log(f"{name}: reusing the finished run in {folder}")
            wall = None
        else:
            run_step(make_config())
            if read_status(folder).get("state") != "done":
                pipeline.status("stopped", step=index, total_steps=total, current=name)
                pipeline.log(f"{name} did not finish; run the same command again to continue")
                return {"steps": summary}
            wall = round(time.time() - tic, 1)
        summary.append({"step": name, "wall_s": wall, **final_metrics(folder, STEP_METRICS[name]),
                        "checkpoint": str(folder / "final")})
    if (root / cfg.rl / "ema").is_dir():
        summary[-1]["ema"] = str(root / cfg.rl / "ema")
    if cfg.report:
        pipeline.status("running", step=len(steps), total_steps=total, current="report")
        summary.append(run_report(cfg, root, pipeline))
    pipeline.status("done", step=total, total_steps=total)
    write_json_atomic(root / "summary.json", summary)
    pipeline.log("\n" + summary_table(summary))
    return {"steps": summary}


def summary_table(summary: list[dict]) -> str:
    lines = [f"{'step':<6} {'wall':>9}  {'final metrics':<58} checkpoint"]
    for row in summary:
        wall = "reused" if row["wall_s"] is None else f"{row['wall_s']:.0f} s"
        metrics = ", ".join(f"{k} {v}" for k, v in row.items()
                            if k not in ("step", "wall_s", "checkpoint", "ema"))
        lines.append(f"{row['step']:<6} {wall:>9}  {metrics:<58} {row['checkpoint']}")
        if "ema" in row:
            lines.append(f"{'':<6} {'':>9}  {'':<58} {row['ema']}")
    return "\n".join(lines)
