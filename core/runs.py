"""Reading a run folder (DESIGN.md): the one reader the launcher, the app and the chat use.

A run folder holds `run.json` (the marker: which stage made it, and when), `config.yaml`,
`status.json` (state, step, total_steps, eta_s, error, pid), `metrics.jsonl`, `train.log`,
`checkpoints/`, `final/` (and `ema/`). `RunInfo.load(folder)` reads them into one record whose
`state` also checks the process: a run whose status says running but whose process is gone is
reported failed. Writing is train/rundir.py's job. Torch-free.

Older runs have no run.json; their stage is the `# step: NAME` line that used to head config.yaml.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from core.paths import atomic_write

MARKER = "run.json"
PIPELINE_STEPS = ("sft", "rm", "judge", "ppo", "grpo", "dpo")  # run folders inside a `train all` one
LIVE_STATES = ("queued", "running", "stopping")


def read_json(path: Path) -> dict:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def read_status(folder: str | Path) -> dict:
    return read_json(Path(folder) / "status.json")


def read_metrics(folder: str | Path) -> list[dict]:
    rows = []
    try:
        with open(Path(folder) / "metrics.jsonl") as handle:
            for line in handle:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line being written right now
                    break
    except OSError:
        pass
    return rows


def write_json_atomic(path: Path, value) -> None:
    """Readers never see half a file: write beside it, then rename over it."""
    with atomic_write(path) as handle:
        handle.write(json.dumps(value, indent=1))


def pid_alive(pid) -> bool:
    """Whether process `pid` runs (a finished child of ours, a zombie, counts as gone)."""
    try:
        pid = int(pid)
        os.kill(pid, 0)
    except (OSError, TypeError, ValueError, OverflowError):
        return False
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == 0
    except ChildProcessError:  # not our child: os.kill already said it lives
        pass
    try:  # a recycled pid: some other program now holds it
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return True
    return any(word in cmdline for word in (b"train", b"deepspeed", b"pytest"))


def stage_of(folder: Path) -> str | None:
    stage = read_json(folder / MARKER).get("stage")
    if stage:
        return stage
    try:
        with open(folder / "config.yaml") as handle:
            first = handle.readline()
    except (OSError, UnicodeDecodeError):
        return None
    return first.removeprefix("# step:").strip() or None if first.startswith("# step:") else None


@dataclass
class RunInfo:
    path: Path
    stage: str | None                           # sft, rm, ppo, dpo, all, ... ; None if unknown
    status: dict = field(default_factory=dict)  # status.json as written by the run
    pids: tuple = ()                            # the run's process and the launcher that started it

    @classmethod
    def load(cls, folder: str | Path) -> "RunInfo | None":
        """The run in `folder`, or None when the folder holds no run of ours."""
        folder = Path(folder)
        if not is_run_folder(folder):
            return None
        status = read_status(folder)
        launch = read_json(folder / "launch.json")
        pids = tuple(p for p in (status.get("pid"), launch.get("pid")) if p is not None)
        return cls(folder, stage_of(folder), status, pids)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def alive(self) -> bool:
        return any(pid_alive(pid) for pid in self.pids)

    @property
    def state(self) -> str:
        """The status's state, except that a live state whose process is gone is `failed`."""
        state = self.status.get("state", "queued")
        if state in LIVE_STATES and not self.alive:
            return "failed"
        return state

    @property
    def error(self) -> str:
        if self.state != "failed":
            return ""
        if self.status.get("error"):
            return self.status["error"]
        return "the training process is gone without saying why (killed?): see console.log"

    def config(self) -> dict:
        """config.yaml as a mapping ({} when absent or unreadable, or not UTF-8)."""
        import yaml

        try:
            values = yaml.safe_load((self.path / "config.yaml").read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return {}
        return values if isinstance(values, dict) else {}

    def has_checkpoint(self) -> bool:
        return (self.path / "checkpoints" / "latest").is_file()


def is_run_folder(folder: Path) -> bool:
    """A folder one of our runs made: its marker, or (older runs) config.yaml starting with our
    stage line, or the app's launch record. A config.yaml and status.json alone are not enough:
    anyone's experiment folder may hold those, and --overwrite must never empty it."""
    folder = Path(folder)
    return (folder / MARKER).is_file() or stage_of(folder) is not None \
        or (folder / "launch.json").is_file()


def enclosing_run(folder: str | Path) -> Path | None:
    """The nearest run folder of ours that `folder` lies inside (not `folder` itself), or None:
    a run written there would be deleted by that run's --overwrite or Start over."""
    for parent in Path(folder).resolve().parents:
        if is_run_folder(parent):
            return parent
    return None


def runs_inside(folder: str | Path) -> list[Path]:
    """Run folders of ours within `folder`, itself included (links are not followed): what
    removing `folder` would take with it."""
    found = []
    for top, dirs, files in os.walk(folder):
        if {MARKER, "launch.json", "config.yaml"} & set(files) and is_run_folder(Path(top)):
            found.append(Path(top))
    return found


def list_runs(root: str | Path) -> list[RunInfo]:
    """Every run folder directly under `root`, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [RunInfo.load(folder) for folder in root.iterdir() if folder.is_dir()]
    return sorted((r for r in runs if r is not None), key=lambda r: r.path.stat().st_mtime,
                  reverse=True)
