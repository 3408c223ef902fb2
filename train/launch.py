"""Starting, watching and stopping runs as subprocesses (what the app's Train and Runs tabs use).

A run is started as the normal command line (`python -m train STAGE ...`, or the deepspeed
launcher when more than one process is asked for), never through a shell, with every value
inside its flag (`--data=VALUE`), so no value can turn into an option. Everything about a run
lives in its folder (core/runs.py reads it), so a reloaded page, or another process, sees the
same runs.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from core.options import ConfigError, build, load_yaml, to_argv
from core.runs import RunInfo, read_json, write_json_atomic
from train.config import STAGES

ROOT = Path(__file__).resolve().parents[1]


def command(stage: str, cfg) -> list[str]:
    """The exact argv that runs `cfg`: what "show command" displays and "start" executes."""
    args = [stage, *to_argv(cfg)]
    if getattr(cfg, "num_procs", 1) > 1:
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(cfg.num_procs),
                "--module", "train", *args]
    return [sys.executable, "-m", "train", *args]


def start(stage: str, cfg) -> subprocess.Popen:
    """Start a run in the background; its console output goes to <output>/console.log."""
    if not cfg.output:
        raise ConfigError("output is required: name the run folder, e.g. runs/sft1.")
    folder = Path(cfg.output)
    if not folder.is_absolute():
        folder = ROOT / folder
    run = RunInfo.load(folder)
    if run is not None and run.alive:
        raise ConfigError(f"{cfg.output} is already running: stop it first or choose another output.")
    folder.mkdir(parents=True, exist_ok=True)
    argv = command(stage, cfg)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(folder / "console.log", "ab") as console:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=console, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    write_json_atomic(folder / "launch.json", {"pid": proc.pid, "argv": argv, "stage": stage,
                                               "started_at": time.time()})
    return proc


def stop(folder: str | Path) -> bool:
    """Ask a run to stop: its processes get SIGTERM, save a checkpoint and end as `stopped`."""
    pid = read_json(Path(folder) / "launch.json").get("pid")
    try:
        if pid is not None:
            os.killpg(int(pid), signal.SIGTERM)  # the launcher's whole group: every rank
        else:
            os.kill(int(RunInfo.load(folder).status["pid"]), signal.SIGTERM)
        return True
    except (OSError, KeyError, TypeError, ValueError, AttributeError):
        return False


def resume(folder: str | Path) -> subprocess.Popen:
    """Start a stopped or failed run again from its last checkpoint, with the same options."""
    folder = Path(folder)
    run = RunInfo.load(folder)
    if run is None or not (folder / "config.yaml").is_file():
        raise ConfigError(f"{folder.name} holds no run configuration: start it again from the Train tab.")
    cls = STAGES.get(run.stage)
    if cls is None:
        raise ConfigError(f"{folder.name} does not say which stage it ran: start it again from the "
                          "Train tab.")
    if run.alive:
        raise ConfigError(f"{folder.name} is still running: nothing to resume.")
    values = load_yaml(folder / "config.yaml", cls)
    if "resume" in values:
        if not run.has_checkpoint():
            raise ConfigError(f"{folder.name} has no checkpoint to resume from: start it again from "
                              "the Train tab.")
        values.update(resume=True, overwrite=False)
    return start(run.stage, build(cls, values))


def tail(path: str | Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            return "\n".join(handle.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
