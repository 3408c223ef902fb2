"""Runs started as subprocesses, watched through their folders, stopped by signal; what the
Runs tab shows of a run folder (progress, metric points, samples) and resuming it."""
import json
import os
import time

import pytest

from train import launch
from train.config import ConfigError, SFTConfig, to_yaml


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


def write_run(folder, status: dict, metrics=(), step="ppo"):
    folder.mkdir()
    (folder / "config.yaml").write_text(f"# step: {step}\noutput: {folder}\n")
    (folder / "status.json").write_text(json.dumps(status))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def test_run_view_plots_metrics_and_shows_progress_and_samples(tmp_path):
    write_run(tmp_path / "ppo1", {"state": "done", "step": 2, "total_steps": 2},
              [{"step": 1, "reward": 0.5, "kl": 0.1, "time_generate_s": 2.0},
               {"step": 2, "reward": 0.7, "kl": 0.2, "time_generate_s": 1.5}])
    (tmp_path / "ppo1" / "samples.jsonl").write_text(
        json.dumps({"step": 2, "prompt": "Hi", "response": "Hello", "reward": 1.2}) + "\n")
    progress, (frame, present), _, (time_frame, _), samples = launch.run_view(tmp_path, "ppo1")
    assert "step 2 of 2" in progress and "value='100'" in progress
    drawn = frame.dropna()
    assert set(drawn["series"]) == {"reward", "kl"} and len(drawn) == 4
    assert present == ["reward", "kl"]  # the legend lists the series present
    assert set(frame["series"]) == set(launch.PLOTTED)  # a fixed colour domain
    assert list(time_frame["value"].dropna()) == [2.0, 1.5]
    assert samples.iloc[0]["response"] == "Hello"


def test_run_view_of_a_missing_run_says_so(tmp_path):
    progress, (frame, present), log, _, samples = launch.run_view(tmp_path, "no-such-run")
    assert "No run named no-such-run" in progress and frame.empty and present == []
    assert log == "" and samples.empty
    assert launch.run_view(tmp_path, None)[0] == "Pick a run."


def test_a_failed_run_shows_why(tmp_path):
    write_run(tmp_path / "bad", {"state": "failed", "step": 0, "error": "data file x.jsonl does not "
                                 "exist: check the path."})
    progress = launch.run_view(tmp_path, "bad")[0]
    assert "Failed:" in progress and "x.jsonl does not exist" in progress
    assert launch.runs_table(tmp_path).iloc[0]["state"] == "failed"


def test_resume_without_a_checkpoint_says_so(tmp_path):
    write_run(tmp_path / "sft1", {"state": "stopped", "step": 3}, step="sft")
    (tmp_path / "sft1" / "config.yaml").write_text("# step: sft\n" + to_yaml(SFTConfig(output="x")))
    assert "no checkpoint to resume from" in launch.resume_run(tmp_path, "sft1")
    assert launch.resume_run(tmp_path, None) == "Pick a run to resume."


def test_a_run_started_by_a_process_with_its_own_deepspeed_group_makes_a_new_one(tiny_model, sft_file, tmp_path):
    """The parent's solo group variables (its port is taken) are inherited; the child must not
    try to join that group."""
    import socket
    import subprocess
    import sys

    from tests.conftest import ROOT
    from train.ds import SOLO_MARKER

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
