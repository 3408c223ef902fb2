"""Runs started as subprocesses, watched through their folders, stopped by signal."""
import time

import pytest

from train import launch
from train.config import ConfigError, SFTConfig


def wait_for(predicate, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def state_of(root, name):
    return next((r for r in launch.list_runs(root) if r["name"] == name), {}).get("state")


def test_started_run_reaches_done_and_is_listed(tmp_path, tiny_model, sft_file):
    cfg = SFTConfig(model=str(tiny_model), data=[str(sft_file)], output=str(tmp_path / "a"),
                    max_steps=3, batch_size=4, max_seq_len=64, tensorboard=False, save_every=0)
    launch.start("sft", cfg)
    assert wait_for(lambda: state_of(tmp_path, "a") == "done")
    row = launch.list_runs(tmp_path)[0]
    assert (row["step"], row["total_steps"]) == (3, 3)
    assert "saved" in launch.tail(tmp_path / "a" / "train.log")


def test_stop_leaves_a_resumable_run(tmp_path, tiny_model, sft_file):
    cfg = SFTConfig(model=str(tiny_model), data=[str(sft_file)], output=str(tmp_path / "b"),
                    max_steps=400, batch_size=4, max_seq_len=64, tensorboard=False, save_every=0)
    launch.start("sft", cfg)
    assert wait_for(lambda: (launch.list_runs(tmp_path) or [{}])[0].get("step", 0) >= 2)
    assert launch.stop(tmp_path / "b")
    assert wait_for(lambda: state_of(tmp_path, "b") == "stopped")
    assert (tmp_path / "b" / "checkpoints" / "latest").is_file()


def test_a_crashed_run_is_reported_failed_with_a_reason(tmp_path, tiny_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    cfg = SFTConfig(model=str(tiny_model), data=[str(bad)], output=str(tmp_path / "c"), max_steps=2)
    launch.start("sft", cfg)
    assert wait_for(lambda: state_of(tmp_path, "c") == "failed")
    row = launch.list_runs(tmp_path)[0]
    assert "bad.jsonl, line 1: invalid JSON" in row["error"]


def test_a_run_without_output_is_refused():
    with pytest.raises(ConfigError, match="output is required"):
        launch.start("sft", SFTConfig(output=""))
