"""Writing the run folder of DESIGN.md: run.json (the marker), config.yaml, status.json,
metrics.jsonl, train.log, checkpoints/, final/. Every stage writes through this; the launcher
and the app read it through core/runs.py.

Only rank 0 writes; other ranks get an object whose writes do nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from core.hardware import resolve_precision
from core.options import ConfigError, to_yaml
from core.runs import MARKER, read_status, write_json_atomic


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class RunDir:
    def __init__(self, folder: str | Path, writer: bool = True):
        self.path = Path(folder)
        self.writer = writer
        self.checkpoints = self.path / "checkpoints"
        self.final = self.path / "final"
        self.started = time.time()

    @classmethod
    def prepare(cls, cfg, stage: str, rank: int) -> "RunDir":
        """Check the output folder against --overwrite/--resume; rank 0 creates it, writes its
        marker and config, and logs the precision the run uses and why."""
        if not cfg.output:
            raise ConfigError("--output is required: name the run folder, e.g. --output runs/sft1.")
        precision = resolve_precision(getattr(cfg, "precision", "fp32"))
        run = cls(cfg.output, writer=rank == 0)
        status = read_status(run.path)
        holds_run = (run.path / "config.yaml").is_file()
        if cfg.resume:
            if not (run.checkpoints / "latest").is_file():
                raise ConfigError(f"{run.path} has no checkpoint to resume from: start it again "
                                  "without --resume.")
        elif holds_run and not cfg.overwrite:
            state = status.get("state", "unknown")
            what = "a finished run" if state == "done" else f"a run (state: {state})"
            raise ConfigError(f"{run.path} already holds {what}: pass --overwrite to replace it, "
                              "--resume to continue it, or choose another --output.")
        _barrier()  # every rank has checked the folder before rank 0 changes it
        if run.writer:
            if cfg.overwrite and run.path.exists():
                shutil.rmtree(run.path)
            run.path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(run.path / MARKER, {"stage": stage, "created_at": time.time(),
                                                  "precision": precision.name,
                                                  "precision_reason": precision.reason})
            (run.path / "config.yaml").write_text(
                to_yaml(cfg) + f"# precision {precision.describe()}\n")
        _barrier()
        run.log(f"precision: {precision.describe()}")
        if precision.warning:
            run.log(f"warning: {precision.warning}")
        return run

    def status(self, state: str, **fields) -> None:
        if not self.writer:
            return
        current = read_status(self.path)
        current.update(fields, state=state, pid=os.getpid(), updated_at=time.time())
        write_json_atomic(self.path / "status.json", current)

    def progress(self, step: int, total_steps: int, first_step: int = 0) -> None:
        """status.json with step, total and an ETA from this process's pace."""
        elapsed = time.time() - self.started
        done_here = max(step - first_step, 1)
        eta = elapsed / done_here * (total_steps - step)
        self.status("running", step=step, total_steps=total_steps, eta_s=round(eta, 1))

    def metrics(self, row: dict) -> None:
        if self.writer:
            with open(self.path / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(row) + "\n")

    def log(self, text: str, echo: bool = True) -> None:
        if not self.writer:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}"
        with open(self.path / "train.log", "a") as handle:
            handle.write(line + "\n")
        if echo:
            print(text, flush=True)
