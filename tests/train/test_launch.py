"""Runs started as subprocesses, watched through their folders, stopped by signal, resumed."""
import json
import os
import time

import pytest

from core.options import ConfigError, to_yaml
from core.runs import RunInfo, list_runs
from train import launch
from train.config import SFTConfig


def wait_for(predicate, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def state_of(root, name):
    run = RunInfo.load(root / name)
    return run.state if run else None


def test_started_run_reaches_done_and_is_listed(tmp_path, tiny_model, sft_file):
    cfg = SFTConfig(model=str(tiny_model), data=[str(sft_file)], output=str(tmp_path / "a"),
                    max_steps=3, batch_size=4, max_seq_len=64, tensorboard=False, save_every=0)
    launch.start("sft", cfg)
    assert wait_for(lambda: state_of(tmp_path, "a") == "done")
    status = list_runs(tmp_path)[0].status
    assert (status["step"], status["total_steps"]) == (3, 3)
    assert "saved" in launch.tail(tmp_path / "a" / "train.log")


def test_stop_leaves_a_resumable_run(tmp_path, tiny_model, sft_file):
    cfg = SFTConfig(model=str(tiny_model), data=[str(sft_file)], output=str(tmp_path / "b"),
                    max_steps=400, batch_size=4, max_seq_len=64, tensorboard=False, save_every=0)
    launch.start("sft", cfg)
    assert wait_for(lambda: RunInfo.load(tmp_path / "b") and RunInfo.load(tmp_path / "b").status.get("step", 0) >= 2)
    assert launch.stop(tmp_path / "b")
    assert wait_for(lambda: state_of(tmp_path, "b") == "stopped")
    assert (tmp_path / "b" / "checkpoints" / "latest").is_file()


def test_a_crashed_run_is_reported_failed_with_a_reason(tmp_path, tiny_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    cfg = SFTConfig(model=str(tiny_model), data=[str(bad)], output=str(tmp_path / "c"), max_steps=2)
    launch.start("sft", cfg)
    assert wait_for(lambda: state_of(tmp_path, "c") == "failed")
    assert "bad.jsonl, line 1: invalid JSON" in list_runs(tmp_path)[0].error


def test_a_run_without_output_is_refused():
    with pytest.raises(ConfigError, match="output is required"):
        launch.start("sft", SFTConfig(output=""))


def test_resume_without_a_checkpoint_says_so(tmp_path):
    folder = tmp_path / "sft1"
    folder.mkdir()
    (folder / "config.yaml").write_text("# step: sft\n" + to_yaml(SFTConfig(output="x")))
    (folder / "status.json").write_text(json.dumps({"state": "stopped", "step": 3}))
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        launch.resume(folder)


def test_a_run_started_by_a_process_with_its_own_deepspeed_group_makes_a_new_one(tiny_model, sft_file, tmp_path):
    """The parent's solo group variables (its port is taken) are inherited; the child must not
    try to join that group."""
    import socket
    import subprocess
    import sys

    from tests.conftest import ROOT
    from core.distributed import SOLO_MARKER

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(taken.getsockname()[1]), SOLO_MARKER: "1"}
        done = subprocess.run([sys.executable, "-m", "train", "sft", "--model", str(tiny_model), "--data",
                               str(sft_file), "--output", str(tmp_path / "run"), "--max-steps", "1",
                               "--batch-size", "2", "--no-tensorboard"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
