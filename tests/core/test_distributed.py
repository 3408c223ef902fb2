"""DeepSpeed's CPU op and torch's build lock (core/distributed.py): a lock left by a killed build
never makes a later process wait forever, and a stop during a build leaves no lock (issue 14,
fourth probe, finding 6). Every test uses its own TORCH_EXTENSIONS_DIR, never the real cache,
where other processes may be building."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

OP = "deepspeed_shm_comm"
MAKE_GROUP = ("from core.process import tune_process; tune_process(); "
              "from core.distributed import init_distributed; print('group', init_distributed(), flush=True)")


def hold(lock):
    """A process holding `lock` open as torch's FileBaton does while it builds."""
    code = "import os, sys, time; os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); print('held', flush=True); time.sleep(300)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_lock_no_process_holds_is_removed(tmp_path):
    from core.distributed import wait_for_build_lock

    lock = tmp_path / "lock"
    lock.write_bytes(b"")  # what a build killed with SIGKILL leaves
    started = time.monotonic()
    wait_for_build_lock(lock, wait_s=60)
    assert not lock.exists() and time.monotonic() - started < 10


def test_a_held_lock_is_waited_for_then_one_sentence_and_left_alone(tmp_path):
    from core.distributed import OpBuildLocked, wait_for_build_lock

    lock = tmp_path / "lock"
    holder = hold(lock)
    try:
        with pytest.raises(OpBuildLocked) as refused:
            wait_for_build_lock(lock, wait_s=1.5)
        message = str(refused.value)
        assert f"locked by process {holder.pid} for over 2 s ({lock})" in message
        assert f"rm {lock}" in message and "\n" not in message
        assert lock.exists()
    finally:
        holder.kill()
        holder.wait()
    wait_for_build_lock(lock, wait_s=60)  # its holder is gone: the lock is stale now
    assert not lock.exists()


def extensions_dir(tmp_path):
    """An empty TORCH_EXTENSIONS_DIR, and the op's folder in it."""
    ext = tmp_path / "torch_extensions"
    ext.mkdir()
    return ext, ext / OP


def make_group(ext, **popen):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)}
    return subprocess.Popen([sys.executable, "-c", MAKE_GROUP], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_a_stale_lock_never_makes_a_run_wait_forever(tmp_path, monkeypatch):
    """What every `python -m train` and ds-inference server did after a stop during the op's
    build: wait on ~/.cache/torch_extensions/py311_cpu/deepspeed_shm_comm/lock forever."""
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    built = _get_build_directory(OP, verbose=False)  # `make setup` built it there: copy, not build
    ext, folder = extensions_dir(tmp_path)
    if os.path.isfile(os.path.join(built, f"{OP}.so")):
        shutil.copytree(built, folder, ignore=shutil.ignore_patterns("lock", ".lock-cleanup"))
    folder.mkdir(exist_ok=True)
    (folder / "lock").write_bytes(b"")
    group = make_group(ext)
    try:
        out, err = group.communicate(timeout=600)  # a build from scratch takes 1-2 minutes here
    except subprocess.TimeoutExpired:
        group.kill()
        pytest.fail("the process waited on the stale lock")
    assert group.returncode == 0, err[-2000:]
    assert "group (0, 1)" in out and f"removed {folder / 'lock'}" in err
    assert not (folder / "lock").exists()


def test_a_stop_during_the_op_build_leaves_no_lock(tmp_path, monkeypatch):
    """The app's Stop (SIGTERM to the run's process group) while the op was being built left
    torch's lock behind."""
    ext, folder = extensions_dir(tmp_path)
    group = make_group(ext, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not ((folder / "lock").exists() and (folder / "build.ninja").exists()):
            assert group.poll() is None, group.stderr.read()[-2000:]
            time.sleep(0.05)
        assert (folder / "lock").exists(), "the build never started"
        time.sleep(1)  # the compiler is running
        os.killpg(group.pid, signal.SIGTERM)
        group.wait(timeout=300)
    finally:
        if group.poll() is None:
            os.killpg(group.pid, signal.SIGKILL)
    assert group.returncode == -signal.SIGTERM  # it stopped as asked, once the lock was released
    assert not (folder / "lock").exists()
