"""The process group: joined under a launcher (deepspeed, torchrun), a group of one without.

Training (train/ds.py) and DeepSpeed-Inference serving (serving/engines.py) both need a group;
this is the one place that makes it. Also `free_port()`, for groups and servers on loopback.
Imports torch and DeepSpeed only when a group is made.

DeepSpeed's CPU backend JIT-loads a C++ op (`deepspeed_shm_comm`, in torch's extensions folder:
$TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions) whenever a group is made, under torch's
build lock, a `lock` file that torch waits on with no time limit. A process killed while it
held the lock (the app's Stop during start-up) used to leave it behind, and every later
DeepSpeed process then waited forever. So `load_comm_op` loads the op first: a lock that no
process holds open is removed, one held too long ends in one sentence naming it, and SIGTERM
and SIGINT wait until the lock is released. `make setup` builds the op once
(`python -m core.distributed`), so runs only load it.
"""
from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from core.errors import UserError

SOLO_MARKER = "RLHF_SOLO_GROUP_PID"
LOCK_WAIT_S = 900  # a build of the op takes 1-2 minutes on 2 busy cores; this is far longer
POLL_S = 0.5


class OpBuildLocked(UserError):
    """The lock of DeepSpeed's op build stays taken."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Join (or, without a launcher, start) the process group; returns (rank, world size)."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    from core.hardware import hardware

    # A plain `python -m train ...`: a group of one. The variables we set are inherited by any
    # process this one starts (a server, a run from the app); the marker tells such a child that
    # they are its parent's solo group, not a launcher's, so it makes its own (fresh port).
    inherited_solo = os.environ.get(SOLO_MARKER, str(os.getpid())) != str(os.getpid())
    if "RANK" not in os.environ or (inherited_solo and os.environ.get("WORLD_SIZE") == "1"):
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()), **{SOLO_MARKER: str(os.getpid())})
    if not torch.distributed.is_initialized():
        load_comm_op()  # DeepSpeed then finds it loaded
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   verbose=False)
    if hardware().device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


# ---- DeepSpeed's shared-memory op -----------------------------------------------------------------

def load_comm_op(wait_s: float = LOCK_WAIT_S) -> Path | None:
    """Load (building it if needed) the op DeepSpeed's communication backend loads when a group
    is made; returns its build folder, or None where DeepSpeed needs no such op (a GPU, an op
    installed with DeepSpeed, not Linux)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder.builder import OpBuilder
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False) \
            or installed_ops.get(builder.NAME, False) or builder.NAME in OpBuilder._loaded_ops:
        return None
    folder = Path(_get_build_directory(builder.NAME, verbose=False))
    wait_for_build_lock(folder / "lock", wait_s)
    with signals_held():
        builder.load(verbose=False)
    return folder


def wait_for_build_lock(lock: Path, wait_s: float = LOCK_WAIT_S) -> None:
    """Return once torch's build `lock` is gone. A lock no process holds open (its builder was
    killed: torch keeps the file open while it builds) is removed once it has been seen so
    twice; one held for over `wait_s` is an OpBuildLocked sentence, and stays."""
    deadline, unheld = time.monotonic() + wait_s, None
    while True:
        identity = _identity(lock)
        if identity is None:
            return
        holders = _holders(lock)
        if holders == [] and unheld == identity:  # torch releases in microseconds: it is stale
            _remove_stale(lock, identity)
            continue
        unheld = identity if holders == [] else None
        if time.monotonic() > deadline:
            who = f"process {', '.join(map(str, holders))}" if holders else "a process this user cannot see"
            raise OpBuildLocked(
                f"DeepSpeed's CPU op has been locked by {who} for over {wait_s:.0f} s ({lock}): "
                "wait for that build to end, or, if no DeepSpeed process is building it, remove "
                f"the lock (rm {lock}) and start again.")
        time.sleep(POLL_S)


def _identity(lock: Path) -> tuple | None:
    try:
        info = os.lstat(lock)
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_mtime_ns


def _holders(lock: Path) -> list[int] | None:
    """The processes that hold `lock` open, or None when it is gone or some process that could
    hold it (one of the lock's owner: its creator is) does not let us read its open files."""
    try:
        owner, target = os.lstat(lock).st_uid, os.path.realpath(lock)
    except FileNotFoundError:
        return None
    holders = []
    for process in os.scandir("/proc"):
        try:
            if not process.name.isdigit() or process.stat().st_uid != owner:
                continue
            files = list(os.scandir(f"/proc/{process.name}/fd"))
        except FileNotFoundError:  # it has just ended
            continue
        except PermissionError:
            return None
        for file in files:
            try:
                if os.readlink(file.path) == target:
                    holders.append(int(process.name))
                    break
            except OSError:  # closed meanwhile
                continue
    return holders


def _remove_stale(lock: Path, identity: tuple) -> None:
    """Remove `lock` if it is still the stale one, one cleaner at a time (torch itself creates
    a lock only once this one is gone, so nothing else can slip in between)."""
    with open(lock.with_name(".lock-cleanup"), "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if _identity(lock) == identity and _holders(lock) == []:
            lock.unlink(missing_ok=True)
            print(f"removed {lock}, left by a DeepSpeed op build that was killed", file=sys.stderr)


@contextmanager
def signals_held():
    """SIGTERM and SIGINT (the app's Stop, Ctrl-C) take effect when the block ends, so torch
    releases its build lock first (a build's compiler in the same process group still stops at
    once, which ends the build). In the main thread only: others cannot set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {sig: signal.signal(sig, lambda number, _frame: caught.append(number))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


def main() -> int:
    """`python -m core.distributed` (make setup): build DeepSpeed's CPU op once."""
    from core.process import tune_process

    tune_process()
    try:
        folder = load_comm_op()
    except Exception as err:  # noqa: BLE001  a build error is many lines of compiler output
        print(f"error: DeepSpeed's CPU op could not be built ({type(err).__name__}: "
              f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''}): runs will try "
              "again when they start.", file=sys.stderr)
        return 1
    print(f"DeepSpeed's CPU op is ready in {folder}" if folder else "DeepSpeed needs no CPU op here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
