"""Starting, watching and stopping runs as subprocesses (what the app's Train and Runs tabs use).

A run is started as the normal command line (`python -m train STEP ...`, or the deepspeed
launcher when more than one process is asked for), never through a shell. Everything about a
run lives in its folder, so a reloaded page, or another process, sees the same runs.

Also here: what the Runs tab shows of a run (table, progress, metric points, log, PPO samples)
and resuming it, as plain values (HTML, tables); turning them into Gradio updates is app.py's job.
"""
from __future__ import annotations

import html
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from train.config import STEPS, ConfigError, build, load_yaml, to_argv
from train.rundir import read_metrics, read_status, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


def command(step: str, cfg) -> list[str]:
    """The exact argv that runs `cfg`: what "show command" displays and "start" executes."""
    args = to_argv(step, cfg)
    if getattr(cfg, "num_procs", 1) > 1:
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(cfg.num_procs),
                "--module", "train", *args]
    return [sys.executable, "-m", "train", *args]


def start(step: str, cfg) -> subprocess.Popen:
    """Start a run in the background; its console output goes to <output>/console.log."""
    if not cfg.output:
        raise ConfigError("output is required: name the run folder, e.g. runs/sft1.")
    folder = Path(cfg.output)
    if not folder.is_absolute():
        folder = ROOT / folder
    state = read_status(folder).get("state")
    if state in ("queued", "running") and is_alive(folder):
        raise ConfigError(f"{cfg.output} is already running: stop it first or choose another output.")
    folder.mkdir(parents=True, exist_ok=True)
    argv = command(step, cfg)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(folder / "console.log", "ab") as console:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=console, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    write_json_atomic(folder / "launch.json", {"pid": proc.pid, "argv": argv, "step": step,
                                               "started_at": time.time()})
    return proc


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    try:  # a finished child of this process stays a zombie until reaped
        return os.waitpid(int(pid), os.WNOHANG)[0] == 0
    except ChildProcessError:  # not our child: os.kill already said it lives
        return True


def _launch_pid(folder: Path):
    try:
        return json.loads((Path(folder) / "launch.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def is_alive(folder: Path) -> bool:
    """Whether the run's training process (or the launcher that started it) still runs."""
    return _pid_alive(read_status(folder).get("pid")) or _pid_alive(_launch_pid(folder))


def stop(folder: str | Path) -> bool:
    """Ask a run to stop: its processes get SIGTERM, save a checkpoint and end as `stopped`."""
    pid = _launch_pid(folder)
    try:
        if pid is not None:
            os.killpg(pid, signal.SIGTERM)  # the launcher's whole group: every rank
        else:
            os.kill(int(read_status(folder)["pid"]), signal.SIGTERM)
        return True
    except (OSError, KeyError, TypeError, ValueError):
        return False


def list_runs(root: str | Path = ROOT / "runs") -> list[dict]:
    """Every run folder under `root` with its state, newest first."""
    rows = []
    for folder in sorted(Path(root).glob("*/"), key=lambda p: p.stat().st_mtime, reverse=True):
        if not (folder / "config.yaml").is_file() and not (folder / "launch.json").is_file():
            continue
        status = read_status(folder)
        state = status.get("state", "queued")
        if state in ("queued", "running") and not is_alive(folder):
            state = "failed"
            status.setdefault("error", "the training process ended without saying why: see "
                                       "console.log in the run folder")
        rows.append({"name": folder.name, "path": str(folder), "state": state,
                     "step": status.get("step", 0), "total_steps": status.get("total_steps"),
                     "eta_s": status.get("eta_s"), "error": status.get("error", "")
                     if state == "failed" else ""})
    return rows


def tail(path: str | Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            return "\n".join(handle.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---- what the Runs tab shows of a run ----------------------------------------------------------

PLOTTED = ("loss", "eval_loss", "accuracy", "eval_accuracy", "reward", "eval_reward", "kl",
           "value_loss", "response_length")
TIME_SPLIT = ("time_generate_s", "time_score_s", "time_train_s", "time_switch_s")


def runs_table(root: str | Path) -> pd.DataFrame:
    """One row per run under `root`: name, state, progress (step/total), ETA and error."""
    rows = list_runs(root)
    for row in rows:
        total = row["total_steps"] or 0
        row["progress"] = f"{row['step']}/{total}" if total else "-"
        row["eta"] = f"{row['eta_s']:.0f} s" if row["state"] == "running" and row["eta_s"] else ""
    columns = ["name", "state", "progress", "eta", "error"]
    return pd.DataFrame(rows, columns=columns + ["path"])[columns]


def progress_html(row: dict) -> str:
    """A run's state, step of total, ETA and failure reason over a progress bar (HTML)."""
    total, step = row["total_steps"] or 0, row["step"] or 0
    share = 100 if row["state"] == "done" else (100 * step / total if total else 0)
    eta = f", about {row['eta_s']:.0f} s left" if row["state"] == "running" and row["eta_s"] else ""
    failed = f"<p><b>Failed:</b> {html.escape(row['error'])}</p>" if row["error"] else ""
    return (f"<div><b>{html.escape(row['name'])}</b>: {row['state']}, step {step} of "
            f"{total or '?'}{eta}</div>"
            f"<progress max='100' value='{share:.0f}' style='width:100%'></progress>{failed}")


def metric_points(folder: Path | None, keys) -> tuple[pd.DataFrame, list[str]]:
    """(step, value, series) rows of a line plot, typed even when empty, and the series present.
    A plot fixes its colour domain from the first data it draws, so every absent key gets a NaN
    row (not drawn); the legend should list only the series present."""
    metrics = read_metrics(folder) if folder else []
    points = [{"step": m["step"], "value": m[key], "series": key}
              for m in metrics for key in keys if key in m]
    present = [key for key in keys if any(key in m for m in metrics)]
    points += [{"step": 0, "value": float("nan"), "series": key} for key in keys if key not in present]
    frame = pd.DataFrame(points, columns=["step", "value", "series"])
    return frame.astype({"step": float, "value": float, "series": str}), present


def ppo_samples(folder: Path | None, count: int = 8) -> pd.DataFrame:
    """The latest PPO rollouts of a run (samples.jsonl), newest last."""
    rows = []
    for line in tail(folder / "samples.jsonl", count).splitlines() if folder else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by the tail's window or being written
            continue
    return pd.DataFrame(rows, columns=["step", "reward", "prompt", "response"])


def run_view(root: str | Path, name: str | None):
    """(progress HTML, metric points, log tail, time-split points, PPO samples) of one run;
    points as metric_points returns them."""
    empty = metric_points(None, ())
    row = next((r for r in list_runs(root) if r["name"] == name), None) if name else None
    if row is None:
        message = f"No run named {name}." if name else "Pick a run."
        return message, empty, "", empty, ppo_samples(None)
    folder = Path(root) / name
    log = tail(folder / "train.log") or tail(folder / "console.log")
    return (progress_html(row), metric_points(folder, PLOTTED), log,
            metric_points(folder, TIME_SPLIT), ppo_samples(folder))


def resume_run(root: str | Path, name: str | None) -> str:
    """Start a stopped or failed run again from its last checkpoint, with the same options;
    a Markdown line says what happened."""
    folder = Path(root) / (name or "")
    if not name or not (folder / "config.yaml").is_file():
        return "Pick a run to resume."
    step = (folder / "config.yaml").read_text().splitlines()[0].removeprefix("# step:").strip()
    cls = STEPS.get(step)
    if cls is None:
        return f"**{name}** does not say which step it ran: start it again from the Train tab."
    values = load_yaml(folder / "config.yaml", cls)
    if "resume" in values:
        if not (folder / "checkpoints" / "latest").is_file():
            return f"**{name}** has no checkpoint to resume from: start it again from the Train tab."
        values.update(resume=True, overwrite=False)
    start(step, build(cls, values))
    return f"Resuming **{name}** from its last checkpoint."
