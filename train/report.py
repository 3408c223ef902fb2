"""`python -m train report RUN`: evidence that a run made its model better, beyond the number it
optimised. Writes report.json and report.md into the run folder; the app's Report view reads
them (`load_report`, `render_markdown`) and starts a report as a subprocess (`report_command`),
since the app never loads weights itself.

For a PPO or DPO run, on held-out prompts (the ones the run held out, or --data), greedy answers
of the starting checkpoint ("before") and of the run's final/ or ema/ ("after") are compared:
- the proxy reward before and after: the run's reward model (PPO), or DPO's implicit reward
  beta * log(pi / pi_ref) under the trained policy (or --proxy, a reward model);
- a judge reward model's before and after (--judge: trained on data disjoint from the run's),
  and its win rate of after over before per prompt (ties count half) with a bootstrap interval;
- answer length, the KL drift log(pi_after / pi_before) of the after answers, and the
  correlation of each reward with length; side-by-side samples;
- alarms: the proxy rises while the judge falls (reward hacking), answers grow longer than
  --length-ratio times the start's, a DPO run's held-out chosen log-prob falls by more than
  --chosen-logp-drop nats per token.
For a reward-model run, on its held-out pairs: accuracy with a Wilson interval, accuracy by
margin bin beside the confidence the margin implies (calibration), and, where the ratings store
holds votes, how often it agrees with them and how it orders the voted checkpoints.

Left out: sampled (non-greedy) answers, several samples per prompt, a judge that is an LLM.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from core.options import ConfigError, build, load_yaml
from core.paths import atomic_write
from core.runs import RunInfo, read_metrics, write_json_atomic
from train.config import STAGES, ReportConfig
from train.plan import not_a_reward_model

REPORT_JSON, REPORT_MD = "report.json", "report.md"
POLICY_STAGES = ("ppo", "dpo")
MARGIN_BINS = (0.0, 0.5, 1.0, 2.0, math.inf)


# ---- statistics (pure) ------------------------------------------------------------------------------

def win_rate(after, before, bootstrap: int, seed: int, confidence: float = 0.95, same=None) -> dict:
    """Share of prompts where `after` scores above `before` (ties, and identical answers given in
    `same`, count half), with a percentile bootstrap interval over prompts."""
    after, before = np.asarray(after, float), np.asarray(before, float)
    outcome = np.where(after > before, 1.0, np.where(after < before, 0.0, 0.5))
    if same is not None:
        outcome[np.asarray(same, bool)] = 0.5
    rng = np.random.default_rng(seed)
    resampled = outcome[rng.integers(0, len(outcome), size=(bootstrap, len(outcome)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return {"value": round(float(outcome.mean()), 4), "low": round(float(low), 4),
            "high": round(float(high), 4), "wins": int((outcome == 1).sum()),
            "ties": int((outcome == 0.5).sum()), "losses": int((outcome == 0).sum())}


def mean_gain(after, before, bootstrap: int, seed: int, confidence: float = 0.95) -> dict:
    """Mean of after - before over prompts, with a paired percentile bootstrap interval."""
    gain = np.asarray(after, float) - np.asarray(before, float)
    rng = np.random.default_rng(seed)
    resampled = gain[rng.integers(0, len(gain), size=(bootstrap, len(gain)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return {"value": round(float(gain.mean()), 4), "low": round(float(low), 4), "high": round(float(high), 4)}


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound at small counts and near 0 or 1)."""
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return round(centre - half, 4), round(centre + half, 4)


def correlation(xs, ys) -> float | None:
    """Pearson correlation, or None when either side does not vary."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    if len(xs) < 2 or xs.std() == 0 or ys.std() == 0:
        return None
    return round(float(np.corrcoef(xs, ys)[0, 1]), 4)


def calibration(margins) -> list[dict]:
    """Accuracy of a reward model by |margin| bin, beside the confidence sigmoid(|margin|) the
    Bradley-Terry model gives it: a calibrated model's two columns agree."""
    margins = np.asarray(margins, float)
    rows = []
    for low, high in zip(MARGIN_BINS, MARGIN_BINS[1:]):
        inside = (np.abs(margins) >= low) & (np.abs(margins) < high)
        if inside.any():
            rows.append({"bin": f"{low:g}-{high:g}", "pairs": int(inside.sum()),
                         "accuracy": round(float((margins[inside] > 0).mean()), 4),
                         "predicted": round(float((1 / (1 + np.exp(-np.abs(margins[inside])))).mean()), 4)})
    return rows


def alarms(figures: dict, cfg: ReportConfig) -> list[dict]:
    """The alarms the figures of a policy run raise (see the module docstring)."""
    found = []
    proxy, judge = figures.get("proxy"), figures.get("judge")
    if proxy and judge and proxy["after"] > proxy["before"] and judge["after"] < judge["before"]:
        found.append({"name": "proxy_up_judge_down", "message": (
            f"the proxy reward rose ({proxy['before']} -> {proxy['after']}) while the judge's fell "
            f"({judge['before']} -> {judge['after']}): the run is likely gaming its reward; use a "
            "stronger KL penalty, fewer steps or a better reward model.")})
    length = figures["length"]
    if length["before"] > 0 and length["after"] > cfg.length_ratio * length["before"]:
        found.append({"name": "length_growth", "message": (
            f"answers grew from {length['before']} to {length['after']} tokens, more than "
            f"{cfg.length_ratio}x: the reward may be paying for length.")})
    chosen = figures.get("chosen_logp")
    if chosen and chosen["before"] - chosen["after"] > cfg.chosen_logp_drop:
        found.append({"name": "chosen_logp_collapse", "message": (
            f"the held-out chosen answers' log-prob fell from {chosen['before']} to "
            f"{chosen['after']} per token (more than {cfg.chosen_logp_drop}): DPO pushes both "
            "answers down; lower the learning rate, raise beta, or try ipo or label smoothing.")})
    return found


def mean(values) -> float:
    return round(float(np.mean(values)), 4) if len(values) else 0.0


# ---- what the run held out ------------------------------------------------------------------------------

def run_config(run: RunInfo):
    """The run's config as its stage's config object (config.yaml, as the run started)."""
    cls = STAGES[run.stage]
    return build(cls, load_yaml(run.path / "config.yaml", cls))


def held_out(cfg: ReportConfig, run: RunInfo, run_cfg, phase: str) -> list[dict]:
    """Records to evaluate: --data, else exactly those the run held out (same split and seed)."""
    from train import data, dpo
    from train.config import parse_split

    log = lambda _: None  # noqa: E731
    if cfg.data:
        records = data.load_data(cfg.data, phase, cfg.seed, log=log)
    elif run.stage == "dpo":
        records = dpo.split_records(run_cfg, log)[1]
    else:
        weights = parse_split(run_cfg.data_split) if run_cfg.data_split else None
        records = data.load_data(run_cfg.data, phase, run_cfg.seed, weights, log=log)
        records = data.holdout(records, run_cfg.eval_fraction, run_cfg.max_eval_samples)[1]
    if not records:
        raise data.DataError(f"{run.path} held nothing out (eval_fraction 0?): pass --data with "
                             "held-out prompts or pairs.")
    return records[:cfg.max_samples]


def find_run(folder: str) -> RunInfo:
    """The run to report on; for a `train all` folder, its last step (the RL or DPO run)."""
    if not folder:
        raise ConfigError("no run given: pass the run folder to report on, such as runs/dpo1 "
                          "(python -m train report RUN).")
    run = RunInfo.load(folder)
    if run is None:
        raise ConfigError(f"{folder} is not a run folder: pass a run such as runs/dpo1 "
                          "(python -m train report RUN).")
    if run.stage == "all":
        # a step folder that is a link leads out of the pipeline: its report would be written there
        steps = [RunInfo.load(p) for p in sorted(Path(folder).iterdir()) if p.is_dir() and not p.is_symlink()]
        steps = [s for s in steps if s is not None and s.stage in POLICY_STAGES]
        if not steps:
            raise ConfigError(f"{folder} holds no finished PPO or DPO step to report on yet.")
        run = steps[-1]
    if run.stage not in (*POLICY_STAGES, "rm"):  # before any model is loaded
        raise ConfigError(f"{run.path} is a run of stage {run.stage or 'unknown'}: a report covers "
                          "PPO/GRPO/RLOO, DPO and reward-model runs, and `train all` folders.")
    if run.state != "done":
        raise ConfigError(f"{run.path} has not finished (state: {run.state}): report on it once "
                          "it is done.")
    return run


def default_judge(cfg: ReportConfig, run: RunInfo) -> str:
    """--judge, else the judge/ a `train all` pipeline trained beside the run."""
    if cfg.judge:
        return cfg.judge
    sibling = run.path.parent / "judge" / "final"
    parent = RunInfo.load(run.path.parent)
    return str(sibling) if parent is not None and parent.stage == "all" and sibling.is_dir() else ""


# ---- the report ---------------------------------------------------------------------------------------

def policy_report(cfg: ReportConfig, run: RunInfo, log) -> dict:
    """Before/after figures of a PPO or DPO run (models loaded here, one after another)."""
    from train import dpo, scoring

    run_cfg = run_config(run)
    start = run_cfg.actor if run.stage == "ppo" else run_cfg.model
    after = str(run.path / cfg.checkpoint)
    if not (Path(after) / "config.json").is_file():
        raise ConfigError(f"{after} does not exist: pass --checkpoint final (ema/ exists only for "
                          "PPO runs with --ema).")
    judge = default_judge(cfg, run)
    for model in (judge, cfg.proxy):  # a chat model would score every answer, meaninglessly
        wrong_kind = model and not_a_reward_model(model, RunInfo.load(Path(model).expanduser().parent))
        if wrong_kind:
            raise ConfigError(wrong_kind)
    prompts = [r["prompt"] for r in held_out(cfg, run, run_cfg, "ppo")]
    log(f"report: {len(prompts)} held-out prompts; before {start}, after {after}"
        + (f"; judge {judge}" if judge else "; no judge"))
    policy = scoring.Policies(start, after, cfg)
    answers = {"before": policy.answer("before", prompts), "after": policy.answer("after", prompts)}
    logps = {side: {model: policy.logps(model, prompts, answers[side]) for model in ("before", "after")}
             for side in answers}
    lengths = {side: [len(ids) for ids in policy.answer_tokens(prompts, answers[side])] for side in answers}

    if cfg.proxy or run.stage == "ppo":
        proxy_path = cfg.proxy or run_cfg.reward
        proxy = scoring.reward_scores(proxy_path, prompts, answers, cfg)
        proxy_kind = f"reward model {proxy_path}"
    else:  # DPO's implicit reward, against the run's reference (its start unless --reference)
        ref = policy.reference_logps(run_cfg.reference, prompts, answers) if run_cfg.reference else \
            {side: logps[side]["before"] for side in answers}
        proxy = {side: dpo.implicit_rewards(run_cfg, logps[side]["after"][0], ref[side][0],
                                            logps[side]["after"][1]).tolist() for side in answers}
        proxy_kind = f"DPO implicit reward ({run_cfg.loss}, beta {run_cfg.beta})"
    figures = {"proxy": {"before": mean(proxy["before"]), "after": mean(proxy["after"]), "kind": proxy_kind},
               "length": {"before": mean(lengths["before"]), "after": mean(lengths["after"])},
               "kl": mean((logps["after"]["after"][0] - logps["after"]["before"][0]).tolist()),
               "reward_length_correlation": {"proxy": correlation(proxy["after"], lengths["after"])}}
    judged = scoring.reward_scores(judge, prompts, answers, cfg) if judge else None
    if judged:
        same = [a == b for a, b in zip(answers["before"], answers["after"])]
        figures["judge"] = {"before": mean(judged["before"]), "after": mean(judged["after"]),
                            "gain": mean_gain(judged["after"], judged["before"], cfg.bootstrap, cfg.seed)}
        figures["win_rate"] = win_rate(judged["after"], judged["before"], cfg.bootstrap, cfg.seed, same=same)
        figures["reward_length_correlation"]["judge"] = correlation(judged["after"], lengths["after"])
    if run.stage == "dpo":
        figures.update(dpo_figures(run.path))
    samples = [{"prompt": prompts[i][-1]["content"], "before": answers["before"][i],
                "after": answers["after"][i], "proxy": [round(proxy["before"][i], 4), round(proxy["after"][i], 4)],
                **({"judge": [round(judged["before"][i], 4), round(judged["after"][i], 4)]} if judged else {})}
               for i in range(min(cfg.samples, len(prompts)))]
    return {"kind": "policy", "before": start, "after": after, "judge": judge or None,
            "prompts": len(prompts), "figures": figures, "alarms": alarms(figures, cfg), "samples": samples}


def dpo_figures(folder: Path) -> dict:
    """Held-out implicit-reward accuracy and chosen log-prob at a DPO run's start and end."""
    rows = [r for r in read_metrics(folder) if "eval_accuracy" in r]
    if len(rows) < 2:
        return {}
    first, last = rows[0], rows[-1]
    return {"eval_accuracy": {"before": first["eval_accuracy"], "after": last["eval_accuracy"]},
            "eval_margin": {"before": first["eval_margin"], "after": last["eval_margin"]},
            "chosen_logp": {"before": first["eval_chosen_logp"], "after": last["eval_chosen_logp"]}}


def reward_model_report(cfg: ReportConfig, run: RunInfo, log) -> dict:
    from train import scoring

    run_cfg = run_config(run)
    pairs = held_out(cfg, run, run_cfg, "rm")
    model = str(run.path / "final")
    log(f"report: {len(pairs)} held-out pairs; reward model {model}")
    margins = scoring.pair_margins(model, pairs, cfg, run_cfg.max_seq_len)
    correct = int((np.asarray(margins) > 0).sum())
    low, high = wilson_interval(correct, len(margins))
    figures = {"accuracy": {"value": round(correct / len(margins), 4), "low": low, "high": high,
                            "pairs": len(margins)},
               "calibration": calibration(margins), "votes": scoring.vote_agreement(model, cfg)}
    return {"kind": "reward_model", "reward_model": model, "figures": figures, "alarms": []}


def build_report(cfg: ReportConfig, log=print) -> dict:
    """The report of `cfg.run` as a plain dict (what report.json holds)."""
    run = find_run(cfg.run)
    body = reward_model_report(cfg, run, log) if run.stage == "rm" else policy_report(cfg, run, log)
    return {"run": str(run.path), "stage": run.stage, "created_at": time.time(), **body}


# ---- reading and writing ------------------------------------------------------------------------------

def load_report(folder: str | Path) -> dict | None:
    """A run's report.json, or None when it has none (for the app's Report view)."""
    try:
        return json.loads((Path(folder) / REPORT_JSON).read_text())
    except (OSError, ValueError):
        return None


def report_command(run: str, judge: str = "", **options) -> list[str]:
    """The argv that writes `run`'s report (the app starts it as a subprocess; output in
    <run>/report.log is the app's choice). `options` are ReportConfig fields."""
    from core.options import to_argv

    cfg = ReportConfig(run=str(run), judge=judge, **options)
    return [sys.executable, "-m", "train", "report", *to_argv(cfg)]


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", "<br>")


def render_markdown(report: dict) -> str:
    """The report as Markdown (report.md, and the app's Report view)."""
    lines = [f"# Report: {report['run']} ({report['stage']})", ""]
    figures = report["figures"]
    alarms_found = report.get("alarms", [])
    lines += ["**Alarms:**"] + [f"- **{a['name']}**: {a['message']}" for a in alarms_found] \
        if alarms_found else ["No alarms."]
    lines.append("")
    if report["kind"] == "reward_model":
        acc = figures["accuracy"]
        lines += [f"Held-out accuracy **{acc['value']}** (95% interval {acc['low']}-{acc['high']}, "
                  f"{acc['pairs']} pairs).", "", "| margin bin | pairs | accuracy | predicted |",
                  "|---|---|---|---|"]
        lines += [f"| {r['bin']} | {r['pairs']} | {r['accuracy']} | {r['predicted']} |"
                  for r in figures["calibration"]]
        votes = figures.get("votes")
        lines += ["", f"Agreement with {votes['votes']} human votes: **{votes['agreement']}** "
                      f"({votes['low']}-{votes['high']}); rank correlation with the human "
                      f"leaderboard: {votes['rank_correlation']}." if votes else "No human votes to compare with."]
        return "\n".join(lines) + "\n"
    lines += [f"{report['prompts']} held-out prompts; before: {report['before']}; after: {report['after']}; "
              f"judge: {report['judge'] or 'none'}.", "", "| figure | before | after |", "|---|---|---|"]
    for name in ("proxy", "judge", "length", "eval_accuracy", "eval_margin", "chosen_logp"):
        if name in figures:
            lines.append(f"| {name} | {figures[name]['before']} | {figures[name]['after']} |")
    lines.append(f"| KL drift (after vs before, nats per answer) | | {figures['kl']} |")
    if "win_rate" in figures:
        win, gain = figures["win_rate"], figures["judge"]["gain"]
        lines += ["", f"Judge reward gained: **{gain['value']:+}** (95% interval {gain['low']} to "
                      f"{gain['high']}, paired over prompts)."]
        lines += ["", f"Judge win rate of after over before: **{win['value']}** (95% interval "
                      f"{win['low']}-{win['high']}; {win['wins']} wins, {win['ties']} ties, {win['losses']} losses)."]
    lines += ["", f"Proxy: {figures['proxy']['kind']}. Reward-length correlation (after): "
                  + ", ".join(f"{k} {v}" for k, v in figures["reward_length_correlation"].items()), "",
              "| prompt | before | after | proxy | judge |", "|---|---|---|---|---|"]
    for s in report["samples"]:
        judge = " -> ".join(map(str, s["judge"])) if "judge" in s else ""
        lines.append(f"| {_cell(s['prompt'])} | {_cell(s['before'])} | {_cell(s['after'])} | "
                     f"{' -> '.join(map(str, s['proxy']))} | {judge} |")
    return "\n".join(lines) + "\n"


def main(cfg: ReportConfig) -> dict:
    report = build_report(cfg)
    folder = Path(report["run"])
    markdown = render_markdown(report)
    # both replaced whole, never written into: a link there (a symlink, or a run copied with
    # cp -al) keeps what it points at (probe 7, F2)
    write_json_atomic(folder / REPORT_JSON, report)
    with atomic_write(folder / REPORT_MD) as handle:
        handle.write(markdown)
    print(markdown)
    print(f"wrote {folder / REPORT_JSON} and {folder / REPORT_MD}")
    return report
