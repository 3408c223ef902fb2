"""Starting, queueing, watching and stopping runs as subprocesses (what the app's Train and Runs
tabs use). train/plan.py checks a run's options before it starts.

A run is started as the normal command line (`python -m train STAGE ...`, or the deepspeed
launcher when more than one process is asked for), never through a shell, with every value
inside its flag (`--data=VALUE`), so no value can turn into an option. Everything about a run
lives in its folder (core/runs.py reads it), so a reloaded page, a restarted app or another
process sees the same runs.

The queue: `start` marks the run `queued` (with the time of the click: its place in line) and
starts `python -m train.launch wait FOLDER QUEUE -- ARGV`, a small torch-free process that waits
until its run is first in line among the queued runs of the QUEUE folder (the folder the run
lies in: the app's runs folder; always derived, never read from a file) and a slot is free,
then replaces itself with the run's command (same pid, so `launch.json` stays right). A slot is an exclusive `flock` on
`QUEUE/.slots/N.lock`, held across the exec until the run ends, however it ends (a killed run
frees its slot). `QUEUE/queue.json` says how many runs may hold a slot at once (default 1: on a
CPU two runs only slow each other down). Waiting processes live in their own sessions, so the
queue survives the app; inference servers never queue. Left out: priorities, moving runs within
the line (stop one and resume it to send it to the back).

Starting is atomic per folder (an O_EXCL lock file), so a double click starts one process, and
a folder whose run is alive (core.runs.RunInfo.alive) is never started again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from core.options import ConfigError, build, load_yaml, to_argv, to_dict
from core.runs import (LIVE_STATES, MARKER, PIPELINE_STEPS, RunInfo, enclosing_run, is_run_folder,
                       pid_alive, read_json, read_status, runs_inside, write_json_atomic)
from train.config import STAGES
from train.rundir import RUN_FILES, RUN_FOLDERS, refuse_links

ROOT = Path(__file__).resolve().parents[1]
QUEUE_FILE, SLOTS = "queue.json", ".slots"
POLL_S = 1.0
# what a run (rundir's lists, one definition with --overwrite's) or its launcher writes into its
# folder: Start over removes these and nothing else
RUN_ENTRIES = (*RUN_FILES, *RUN_FOLDERS, "console.log", "launch.json")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def command(stage: str, cfg) -> list[str]:
    """The exact argv that runs `cfg`: what "show command" displays and "start" executes."""
    args = [stage, *to_argv(cfg)]
    if getattr(cfg, "num_procs", 1) > 1:
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(cfg.num_procs),
                "--module", "train", *args]
    return [sys.executable, "-m", "train", *args]


def run_folder(name: str, root: str | Path) -> Path:
    """The folder of the run called `name` directly under `root`; a path, or a link that leads
    anywhere else (even elsewhere in `root`), is refused."""
    name = (name or "").strip()
    if not name:
        raise ConfigError("a run needs a name, such as sft1: it becomes its folder in the runs folder.")
    if not NAME.fullmatch(name):
        raise ConfigError(f"run name {name!r} is not a plain name: use letters, digits, '.', '_' "
                          "and '-' (no slashes, no leading dot), such as sft1.")
    folder = Path(root) / name
    if folder.is_symlink() or folder.resolve() != Path(root).resolve() / name:
        raise ConfigError(f"{folder} is a link to {folder.resolve()}: a run's folder is a folder "
                          "of its own in the runs folder, so choose another name.")
    return folder


def _folder(cfg) -> Path:
    if not cfg.output:
        raise ConfigError("output is required: name the run folder, e.g. runs/sft1.")
    folder = Path(cfg.output)
    return folder if folder.is_absolute() else ROOT / folder


@contextlib.contextmanager
def launching(folder: Path):
    """Hold `folder/.launching` (created with O_EXCL) while a start is decided and made."""
    lock = folder / ".launching"
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            if attempt or being_started(folder):
                raise ConfigError(f"{folder.name} is being started already: look at the Runs tab.") from None
            lock.unlink(missing_ok=True)  # its holder is gone
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


def being_started(folder: str | Path) -> bool:
    """Whether a start of `folder` is being decided and made now: its .launching is held by a
    live process (or was created under a minute ago and its holder has not written its pid
    yet). The run may then already have run.json but no pid: it is starting, not failed."""
    lock = Path(folder) / ".launching"
    try:
        holder, age = lock.read_text().strip(), time.time() - lock.stat().st_mtime
    except OSError:  # no lock: nobody is starting it
        return False
    return age <= 60 and (not holder.isdigit() or _pid_exists(int(holder)))


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (OSError, OverflowError):
        return False


def start(stage: str, cfg, replace: bool = False) -> subprocess.Popen:
    """Queue a run in the background; it starts when first in line (see the module docstring)
    among the runs of the folder it lies in (its queue: derived, never read from a file).
    With `replace`, the run already in the folder is cleared first (clear_run). Its console
    output goes to <output>/console.log."""
    folder = _folder(cfg)
    outer = enclosing_run(folder)
    if outer is not None:
        raise ConfigError(f"{folder} lies inside the run folder {outer}, whose Start over would "
                          "delete it: choose another name.")
    folder.mkdir(parents=True, exist_ok=True)
    with launching(folder):
        run = RunInfo.load(folder)
        if run is not None and run.alive:
            raise ConfigError(f"{folder.name} is already {run.state}: stop it first or choose "
                              "another name.")
        if run is None and any(p.name != ".launching" for p in folder.iterdir()):
            raise ConfigError(f"{folder} holds files that are not a run: choose another name.")
        if getattr(cfg, "resume", False):  # the run would refuse links, after console.log was opened
            refuse_links(folder)
        if replace and run is not None:
            clear_run(folder)
        elif (folder / "config.yaml").is_file() and not getattr(cfg, "resume", False):  # it ran
            raise ConfigError(f"{folder.name} already holds a run"
                              f"{f' ({run.state})' if run else ''}: resume it, start it over, or "
                              "choose another name.")
        argv = command(stage, cfg)
        if not (folder / MARKER).is_file():
            write_json_atomic(folder / MARKER, {"stage": stage, "created_at": time.time()})
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        queued_at = time.time()  # its place in line: the time of the click
        waiter = [sys.executable, "-m", "train.launch", "wait", str(folder), str(folder.parent), "--"]
        with open(folder / "console.log", "ab") as console:
            proc = subprocess.Popen(waiter + argv, cwd=ROOT, env=env, stdout=console,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        write_json_atomic(folder / "launch.json", {"pid": proc.pid, "argv": argv, "stage": stage,
                                                   "config": to_dict(cfg),
                                                   "started_at": queued_at})
        # in line before this returns: a run started next cannot overtake it
        _update_status(folder, state="queued", pid=proc.pid, queued_at=queued_at)
    return proc


def stop_requested(folder: str | Path) -> bool:
    """Whether Stop was asked of the run now in `folder` (shown as stopping until it ends)."""
    record = read_json(Path(folder) / "launch.json")
    return record.get("stop_requested_at", 0) > record.get("started_at", 0)


def stop(folder: str | Path) -> bool:
    """Ask a live run to stop: its state becomes `stopping` at once; its processes get SIGTERM,
    save a checkpoint and end as `stopped` (a queued run just leaves the line)."""
    folder = Path(folder)
    run = RunInfo.load(folder)
    if run is None or not run.alive:
        return False
    record = read_json(folder / "launch.json")
    if record:
        write_json_atomic(folder / "launch.json", {**record, "stop_requested_at": time.time()})
    waiting = run.status.get("state") == "queued"
    if run.status.get("state") in LIVE_STATES:
        write_json_atomic(folder / "status.json", {**read_status(folder), "state": "stopping"})
    try:
        if record.get("pid") is not None and pid_alive(record["pid"]):
            os.killpg(int(record["pid"]), signal.SIGTERM)  # the launcher's whole group: every rank
        else:
            os.kill(int(run.status["pid"]), signal.SIGTERM)
    except (OSError, KeyError, TypeError, ValueError):
        return False
    if waiting:  # nothing to save: out of the line as soon as its process is gone (a waiter
        deadline = time.time() + 5  # stopped before its handler was set would not say so itself)
        while run.alive and time.time() < deadline:
            time.sleep(0.05)
        _update_status(folder, state="stopped")
    return True


def saved_config(folder: Path) -> tuple[str, dict]:
    """(stage, option values) a run was started with: its config.yaml, or, for a run stopped
    while still queued, the launch record."""
    run = RunInfo.load(folder)
    record = read_json(folder / "launch.json")
    stage = (run.stage if run else None) or record.get("stage")
    cls = STAGES.get(stage)
    if run is None or cls is None:
        raise ConfigError(f"{folder.name} does not say which stage it ran: start it again from "
                          "the Train tab.")
    # the run continues in the folder it is in now, whatever folder it was started in (a copied
    # or renamed run must never write into the one it was copied from)
    if (folder / "config.yaml").is_file():
        return stage, {**load_yaml(folder / "config.yaml", cls), "output": str(folder)}
    if isinstance(record.get("config"), dict):
        return stage, {**record["config"], "output": str(folder)}
    raise ConfigError(f"{folder.name} holds no run configuration: start it again from the Train tab.")


def resume(folder: str | Path) -> subprocess.Popen:
    """Start a stopped or failed run again from its last checkpoint, with the same options (a
    pipeline reuses its finished steps; a run stopped while queued starts from the beginning)."""
    folder = Path(folder)
    run = RunInfo.load(folder)
    if run is not None and run.alive:
        raise ConfigError(f"{folder.name} is {run.state}: nothing to resume.")
    if run is not None and run.state == "done":
        raise ConfigError(f"{folder.name} has finished: nothing to resume, and its final/ stays "
                          "as it is (Start over would train it again from the beginning and "
                          "replace its final/).")
    stage, values = saved_config(folder)
    fields = {f.name for f in dataclasses.fields(STAGES[stage])}
    if "resume" in fields:
        started = (folder / "config.yaml").is_file()
        if started and not run.has_checkpoint():
            raise ConfigError(f"{folder.name} ended before its first checkpoint: nothing to resume "
                              "(Start over trains it again from the beginning).")
        values.update(resume=started, overwrite=False)
    elif "overwrite" in fields:
        values.update(overwrite=False)
    return start(stage, build(STAGES[stage], values))  # queued among the runs beside it


def restartable(folder: str | Path) -> bool:
    """Whether the run in `folder` says how it was started (so Start over can repeat it)."""
    try:
        saved_config(Path(folder))
        return True
    except ConfigError:
        return False


def resumable(folder: str | Path) -> bool:
    """Whether Resume applies: a stopped or failed run with a checkpoint (a pipeline, or a run
    stopped while queued, needs none)."""
    folder = Path(folder)
    run = RunInfo.load(folder)
    if run is None or run.alive or run.state not in ("stopped", "failed") or not restartable(folder):
        return False
    fields = {f.name for f in dataclasses.fields(STAGES[saved_config(folder)[0]])}
    return "resume" not in fields or not (folder / "config.yaml").is_file() or run.has_checkpoint()


def clear_run(folder: str | Path) -> None:
    """Remove what a run wrote into `folder` (RUN_ENTRIES, a pipeline's step runs), nothing
    else; only in a folder that holds a run of ours, never while it is alive, and never when
    another run lies inside what it would remove (nothing is removed then)."""
    folder = Path(folder)
    run = RunInfo.load(folder)
    if run is None:
        raise ConfigError(f"{folder} holds no run of ours: nothing was deleted.")
    if run.alive:
        raise ConfigError(f"{folder.name} is {run.state}: stop it before replacing it.")
    steps = [e for e in folder.iterdir()
             if run.stage == "all" and e.name in PIPELINE_STEPS and is_run_folder(e)]
    entries = steps + [e for e in folder.iterdir() if e.name in RUN_ENTRIES
                       or (e.name.startswith(".") and e.name.endswith(".tmp"))]
    # a run someone put inside (final/x, sft/final/x) is not this run's to remove
    nested = [p for e in entries if e.is_dir() and not e.is_symlink()
              for p in runs_inside(e) if not (p == e and e in steps)]
    if nested:
        raise ConfigError(f"{folder.name} holds another run in {nested[0]}: move that run out "
                          "first; nothing was deleted.")
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def start_over(folder: str | Path, stage: str | None = None, cfg=None) -> subprocess.Popen:
    """Replace the run in `folder`: with `cfg` when given, else with the options it ran with."""
    folder = Path(folder)
    if cfg is None:
        stage, values = saved_config(folder)
        cfg = build(STAGES[stage], values)
    fresh = dataclasses.replace(cfg, **{k: False for k in ("resume", "overwrite") if hasattr(cfg, k)})
    return start(stage, fresh, replace=True)


# ---- the queue ---------------------------------------------------------------------------------

def max_running(root: str | Path) -> int:
    """How many runs of the queue in `root` may run at once (default 1)."""
    value = read_json(Path(root) / QUEUE_FILE).get("max_running", 1)
    return value if isinstance(value, int) and value >= 1 else 1


def set_max_running(root: str | Path, count) -> int:
    try:
        count = int(count)
    except (TypeError, ValueError):
        count = 0
    if not 1 <= count <= 64:
        raise ConfigError("runs at once must be a whole number from 1 to 64.")
    Path(root).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(root) / QUEUE_FILE, {**read_json(Path(root) / QUEUE_FILE),
                                                "max_running": count})
    return count


def queued(root: str | Path) -> list[RunInfo]:
    """The runs waiting in the queue of `root`, first in line first."""
    root = Path(root)
    runs = [RunInfo.load(folder) for folder in root.iterdir() if folder.is_dir()] if root.is_dir() else []
    waiting = [r for r in runs if r is not None and r.status.get("state") == "queued" and r.alive]
    return sorted(waiting, key=lambda r: (r.status.get("queued_at", 0), r.name))


def _update_status(folder: Path, **fields) -> None:
    status = {k: v for k, v in read_status(folder).items()
              if k not in ("error", "eta_s", "current")}
    write_json_atomic(folder / "status.json", {**status, **fields, "updated_at": time.time()})


def _take_slot(root: Path) -> int | None:
    """An open descriptor holding a free slot's lock, or None when every slot is taken."""
    slots = root / SLOTS
    slots.mkdir(parents=True, exist_ok=True)
    for index in range(max_running(root)):
        fd = os.open(slots / f"{index}.lock", os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            os.close(fd)
    return None


def wait_and_run(folder: Path, root: Path, argv: list[str]) -> None:
    """The queued run's process: wait for its turn and a slot, then become the run."""
    def leave_queue(*_):
        _update_status(folder, state="stopped")
        print("stopped while queued", flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, leave_queue)
    signal.signal(signal.SIGINT, leave_queue)
    slot = None  # start() has put the run in line (state queued, queued_at, this pid)
    while slot is None:
        line = [r.path.resolve() for r in queued(root)]
        if not line or line[0] == folder.resolve() or folder.resolve() not in line:
            slot = _take_slot(root)
        if slot is None:
            time.sleep(POLL_S)
    os.set_inheritable(slot, True)  # the run holds the slot until it ends
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _update_status(folder, state="running", pid=os.getpid())
    os.execv(argv[0], argv)


def read_own(path: str | Path, max_bytes: int, end: bool = False) -> str:
    """At most `max_bytes` of a run's own file (its start, or with `end` its end), as text; ""
    for a link (never followed: the view would show what it points at), a FIFO or device (a
    read would block the app), or a missing file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
            return ""
        if end:
            handle.seek(max(0, info.st_size - max_bytes))
        return handle.read(max_bytes).decode(errors="replace")


def tail(path: str | Path, lines: int = 40) -> str:
    return "\n".join(read_own(path, 64 * 1024, end=True).splitlines()[-lines:])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 5 or argv[0] != "wait" or argv[3] != "--":
        print("usage: python -m train.launch wait FOLDER QUEUE_FOLDER -- COMMAND...", file=sys.stderr)
        return 2
    wait_and_run(Path(argv[1]), Path(argv[2]), argv[4:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
