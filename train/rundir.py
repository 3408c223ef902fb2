"""Writing the run folder of DESIGN.md: run.json (the marker), config.yaml, status.json,
metrics.jsonl, train.log, checkpoints/, final/. Every stage writes through this; the launcher
and the app read it through core/runs.py. --overwrite never empties a folder that is not a run
of ours, and removes only what a run writes, after the new run's inputs have been validated.
--resume continues a stopped or failed run with the options its checkpoint was made with
(never a finished one), and writes nothing until that checkpoint has loaded.

Only rank 0 writes; other ranks get an object whose writes do nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from core.hardware import HardwareError, resolve_precision
from core.options import ConfigError, flag_name, to_yaml
from core.runs import (MARKER, PIPELINE_STEPS, RunInfo, enclosing_run, pid_alive, read_json,
                       read_status, runs_inside, stage_of, write_json_atomic)


def _ancestry() -> set[int]:
    """This process and every process above it (a rank's launchers)."""
    pids, pid = {os.getpid()}, os.getppid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# What a run writes, and so all that --overwrite removes: nothing else in the folder is touched.
RUN_FILES = (MARKER, "config.yaml", "status.json", "metrics.jsonl", "train.log", "samples.jsonl",
             "summary.json", "report.json", "report.md", "report.log")
RUN_FOLDERS = ("checkpoints", "final", "ema", "tensorboard", "final.tmp", "ema.tmp")


# What a checkpoint holds the state of (the model, its LoRA, its optimizer's layout, the EMA
# and critic beside it): a resume takes them as the run started; other options may change.
CHECKPOINT_OPTIONS = ("model", "actor", "critic", "algorithm", "ema", "lora_dim", "lora_alpha",
                      "lora_targets", "zero_stage", "offload", "precision")


def _as_flag(name: str, value) -> str:
    if isinstance(value, bool):
        return flag_name(name) if value else "--no-" + name.replace("_", "-")
    return f"{flag_name(name)} {value}"


def _same(saved, new) -> bool:
    """Equal values, or two spellings of one path."""
    if saved == new:
        return True
    return isinstance(saved, str) and isinstance(new, str) and bool(saved) and bool(new) \
        and Path(saved).expanduser().resolve() == Path(new).expanduser().resolve()


def refuse_replacing(run: RunInfo) -> None:
    """A run already in the folder, and neither flag: offer only what would work on it (a
    finished run is never resumed, see refuse_resume)."""
    if run.state == "done":
        raise ConfigError(f"{run.path} already holds a finished run: pass --overwrite to replace it "
                          "(this deletes its final/), or choose another --output.")
    resume = ", --resume to continue it" if run.has_checkpoint() else ""
    raise ConfigError(f"{run.path} already holds a run (state: {run.state}): pass --overwrite to "
                      f"replace it{resume}, or choose another --output.")


def refuse_resume(run: RunInfo, cfg, stage: str) -> None:
    """--resume continues a run that stopped or failed, of this stage, with the options its
    checkpoint was made with; anything else is refused before a byte is written."""
    if run.state == "done":
        raise ConfigError(f"{run.path} holds a finished run: nothing to resume, and its final/ "
                          f"stays as it is; to train further, start a new run from "
                          f"{run.path / 'final'} with another --output (--overwrite instead of "
                          "--resume would train it again from the start and delete its final/).")
    if run.stage and run.stage != stage:
        raise ConfigError(f"{run.path} holds a {run.stage} run, not {stage}: resume it with "
                          f"`python -m train {run.stage} ... --resume`, or choose another --output.")
    refuse_links(run.path)
    saved = run.config()
    refuse_other_precision(run, saved, cfg)
    for name in CHECKPOINT_OPTIONS:
        if name == "precision":
            continue  # compared as trained, just above
        if name in saved and hasattr(cfg, name) and not _same(saved[name], getattr(cfg, name)):
            raise ConfigError(f"{run.path} was started with {_as_flag(name, saved[name])}, not "
                              f"{_as_flag(name, getattr(cfg, name))}: its checkpoint holds that "
                              f"state, so resume with {_as_flag(name, saved[name])} (config.yaml "
                              "lists every option it started with), or choose another --output.")


def refuse_links(folder: Path, doing: str = "resuming") -> None:
    """Refuse a run folder holding a link (see first_link): `doing` appends to and rewrites
    its files, which would change what the link points to."""
    link = first_link(folder)
    if link is not None:
        target = os.readlink(link) if link.is_symlink() else "a file of another folder (a hard link)"
        raise ConfigError(f"{link} is a link to {target}: {doing} writes into the run's files, "
                          "which would change what the link points to; copy the run "
                          "without links (cp -a, not cp -s or cp -l) or start a new run.")


def first_link(folder: Path) -> Path | None:
    """The first symbolic link inside `folder` (files and folders, never followed), or file
    with another hard link (a copy made with cp -al shares its files), or None."""
    for top, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            path = Path(top) / name
            if path.is_symlink() or (name in files and path.stat().st_nlink > 1):
                return path
    return None


def _resolved(asked) -> str:
    """The precision `asked` (auto, bf16, ...) trains in on this machine, or itself if unknown."""
    try:
        return resolve_precision(str(asked)).name
    except HardwareError:
        return str(asked)


def refuse_other_precision(run: RunInfo, saved: dict, cfg) -> None:
    """A checkpoint holds the precision the run trained in (run.json), however it was asked
    for: `auto` that chose fp32 resumes with `--precision fp32` and the other way round."""
    if not hasattr(cfg, "precision") or "precision" not in saved:
        return
    trained = read_json(run.path / MARKER).get("precision") or _resolved(saved["precision"])
    new = _resolved(cfg.precision)
    if new != trained:
        raise ConfigError(f"{run.path} trained in {trained} (started with --precision "
                          f"{saved['precision']}), and --precision {cfg.precision} means {new} "
                          f"here: its checkpoint holds {trained} state, so resume with "
                          f"--precision {trained}, or choose another --output.")


def refuse_foreign(folder: Path, why: str) -> None:
    """Refuse a folder that holds files but no run of ours (`why` says what would not happen)."""
    if folder.is_dir() and any(folder.iterdir()) and RunInfo.load(folder) is None:
        raise ConfigError(f"{folder} is not a run folder (no {MARKER}) and holds files, so "
                          f"{why}: choose another --output, or clear it yourself.")


def refuse_nesting(folder: Path, overwrite: bool = False) -> None:
    """A run never goes inside another run's folder (that run's --overwrite or Start over would
    delete it), except a `train all` step in its pipeline's folder; and --overwrite never
    removes a folder that holds another run."""
    outer = enclosing_run(folder)
    pipeline_step = outer == folder.resolve().parent and stage_of(outer) == "all" \
        and folder.name in PIPELINE_STEPS
    if outer is not None and not pipeline_step:
        raise ConfigError(f"{folder} lies inside the run folder {outer}, whose --overwrite would "
                          "delete it: choose an --output outside every run folder.")
    inside = [p for name in RUN_FOLDERS if overwrite and (folder / name).is_dir()
              and not (folder / name).is_symlink() for p in runs_inside(folder / name)]
    if inside:
        raise ConfigError(f"{folder} holds another run in {inside[0]}, which --overwrite would "
                          "delete: move that run out first, or choose another --output.")


class RunDir:
    """A run folder being written. `prepare` only checks; nothing is written or removed until
    `start`, which a stage calls once its data and model have been validated, so a run that
    fails validation leaves the folder (and any earlier run in it) as it was. On --resume
    `start` writes nothing either: `resumed` does, once the checkpoint has loaded, so a
    checkpoint that cannot be loaded leaves config.yaml and status.json as they were. Lines
    logged before are kept and written then."""

    def __init__(self, folder: str | Path, writer: bool = True):
        self.path = Path(folder)
        self.writer = writer
        self.checkpoints = self.path / "checkpoints"
        self.final = self.path / "final"
        self.started = time.time()
        self._pending: list[str] | None = None  # log lines before start()
        self._plan: tuple | None = None          # (cfg, stage, precision) until start()

    @classmethod
    def prepare(cls, cfg, stage: str, rank: int) -> "RunDir":
        """Check the output folder against --overwrite/--resume and any live run in it."""
        if not cfg.output:
            raise ConfigError("--output is required: name the run folder, e.g. --output runs/sft1.")
        run = cls(cfg.output, writer=rank == 0)
        existing = RunInfo.load(run.path)
        ours = _ancestry()  # this rank and the launchers above it
        if existing is not None and any(pid_alive(p) for p in existing.pids if int(p) not in ours):
            raise ConfigError(f"{run.path} is in use by a run that is still going: stop it first, "
                              "or choose another --output.")
        # the launcher above this process wrote the status (queued, then running): this is that run
        launched = existing is not None and bool(existing.pids) and all(int(p) in ours for p in existing.pids)
        if existing is None:  # someone's files: a run would write over config.yaml, final/...
            refuse_foreign(run.path, "there is no run of ours to resume in it" if cfg.resume else
                           "--overwrite will not empty it" if cfg.overwrite else "no run writes into it")
        refuse_nesting(run.path, cfg.overwrite and existing is not None)
        if cfg.resume:
            if existing is not None:
                refuse_resume(existing, cfg, stage)
            if not (run.checkpoints / "latest").is_file():
                raise ConfigError(f"{run.path} has no checkpoint to resume from: start it again "
                                  "without --resume.")
        elif existing is not None and existing.status and not cfg.overwrite and not launched:
            refuse_replacing(existing)
        run._pending, run._plan = [], (cfg, stage, resolve_precision(getattr(cfg, "precision", "fp32")))
        return run

    def start(self) -> None:
        """Write the run (on --resume: wait for `resumed`)."""
        if not self._plan[0].resume:
            self._write_start(step=0)

    def resumed(self, step: int) -> None:
        """The checkpoint of optimizer step `step` has loaded (every rank calls this): write the
        run as `start` does, continuing at `step`."""
        self._write_start(step)
        self.log(f"resumed from step {step}")

    def _write_start(self, step: int) -> None:
        """On --overwrite remove what the earlier run wrote (only that), then write the marker,
        config.yaml (with the precision and why), the held log lines, status running."""
        cfg, stage, precision = self._plan
        _barrier()  # every rank has validated before rank 0 changes the folder
        if self.writer:
            if cfg.overwrite:
                for name in RUN_FILES:
                    (self.path / name).unlink(missing_ok=True)
                for name in RUN_FOLDERS:
                    if (self.path / name).is_symlink():  # the link goes, never what it points to
                        (self.path / name).unlink()
                    shutil.rmtree(self.path / name, ignore_errors=True)
                for leftover in self.path.glob(".*.tmp"):  # an interrupted save (core.paths)
                    if leftover.is_dir() and not leftover.is_symlink():
                        shutil.rmtree(leftover, ignore_errors=True)
                    else:
                        leftover.unlink(missing_ok=True)
            self.path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path / MARKER, {"stage": stage, "created_at": time.time(),
                                                   "precision": precision.name,
                                                   "precision_reason": precision.reason})
            (self.path / "config.yaml").write_text(
                to_yaml(cfg) + f"# precision {precision.describe()}\n")
        _barrier()
        pending, self._pending = self._pending or [], None
        for line in pending:
            self._write_log(line)
        self.log(f"precision: {precision.describe()}")
        if precision.warning:
            self.log(f"warning: {precision.warning}")
        self.status("running", step=step)

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
        if self._pending is not None:
            self._pending.append(line)
        else:
            self._write_log(line)
        if echo:
            print(text, flush=True)

    def _write_log(self, line: str) -> None:
        with open(self.path / "train.log", "a") as handle:
            handle.write(line + "\n")
