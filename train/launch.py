"""Starting, watching and stopping runs as subprocesses (what the app's Train and Runs tabs use).

A run is started as the normal command line (`python -m train STEP ...`, or the deepspeed
launcher when more than one process is asked for), never through a shell. Everything about a
run lives in its folder, so a reloaded page, or another process, sees the same runs.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from train.config import ConfigError, to_argv
from train.rundir import read_status, write_json_atomic

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
