"""Runs started as subprocesses, watched through their folders, stopped by signal, resumed; the
queue that runs them one at a time and survives the process that started them."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

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
    with pytest.raises(ConfigError, match="ended before its first checkpoint: nothing to resume"):
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


# ---- the queue (fake runs: a script that marks itself running, sleeps, marks itself done) -------

FAKE_RUN = """import json, os, sys, time
folder = sys.argv[1]
def mark(state):
    path = os.path.join(folder, "status.json")
    status = json.load(open(path)) if os.path.exists(path) else {}
    status.update(state=state, pid=os.getpid())
    json.dump(status, open(path + ".tmp", "w")); os.replace(path + ".tmp", path)
mark("running")
time.sleep(float(sys.argv[2]))
mark("done")
"""


@pytest.fixture
def fake_runs(tmp_path, monkeypatch):
    """launch.start runs `fake_train.py FOLDER SECONDS` (its name says train: a live run)."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_RUN)
    seconds = {}
    monkeypatch.setattr(launch, "command", lambda stage, cfg: [
        sys.executable, str(script), cfg.output, str(seconds.get(Path(cfg.output).name, 2.0))])
    yield seconds


def start_fake(root, name, seconds=None, fake=None):
    if seconds is not None:
        fake[name] = seconds
    return launch.start("sft", SFTConfig(output=str(root / name)))


def test_runs_take_turns_one_at_a_time_by_default(tmp_path, fake_runs):
    root = tmp_path / "runs"
    root.mkdir()
    start_fake(root, "a", 8.0, fake_runs)  # long enough to see b wait on a loaded machine
    start_fake(root, "b", 0.5, fake_runs)
    assert wait_for(lambda: state_of(root, "a") == "running", 60)
    assert wait_for(lambda: [r.name for r in launch.queued(root)] == ["b"], 30)
    assert state_of(root, "b") == "queued"
    assert wait_for(lambda: state_of(root, "b") == "done", 60)
    assert state_of(root, "a") == "done"
    ended_a = (root / "a" / "status.json").stat().st_mtime
    assert json.loads((root / "b" / "status.json").read_text())["queued_at"] < ended_a


def test_more_runs_at_once_when_the_setting_says_so(tmp_path, fake_runs):
    root = tmp_path / "runs"
    root.mkdir()
    assert launch.set_max_running(root, 2) == 2
    start_fake(root, "a", 5.0, fake_runs)
    start_fake(root, "b", 5.0, fake_runs)
    assert wait_for(lambda: state_of(root, "a") == state_of(root, "b") == "running", 60)
    with pytest.raises(ConfigError, match="1 to 64"):
        launch.set_max_running(root, 0)


def test_the_queue_survives_the_process_that_started_it(tmp_path, fake_runs):
    """An app that queues two runs and exits: the runs still take their turns."""
    root = tmp_path / "runs"
    root.mkdir()
    script = tmp_path / "fake_train.py"
    starter = (f"import sys; sys.path.insert(0, {str(Path(launch.ROOT))!r})\n"
               "from train import launch\nfrom train.config import SFTConfig\n"
               f"launch.command = lambda stage, cfg: [sys.executable, {str(script)!r}, cfg.output, '1.5']\n"
               f"for name in ('a', 'b'):\n"
               f"    launch.start('sft', SFTConfig(output={str(root)!r} + '/' + name))\n")
    done = subprocess.run([sys.executable, "-c", starter], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert wait_for(lambda: state_of(root, "a") == state_of(root, "b") == "done", 90)


def test_a_queued_run_leaves_the_line_when_stopped(tmp_path, fake_runs):
    root = tmp_path / "runs"
    root.mkdir()
    start_fake(root, "a", 60.0, fake_runs)
    start_fake(root, "b", 0.5, fake_runs)
    assert wait_for(lambda: [r.name for r in launch.queued(root)] == ["b"], 60)
    assert launch.stop(root / "b")
    assert wait_for(lambda: state_of(root, "b") == "stopped", 30)
    assert launch.queued(root) == [] and wait_for(lambda: launch.resumable(root / "b"), 10)
    assert not (root / "b" / "config.yaml").exists()  # it never ran
    assert launch.stop(root / "a")


def test_a_run_that_is_alive_is_never_started_twice(tmp_path, fake_runs):
    root = tmp_path / "runs"
    root.mkdir()
    start_fake(root, "a", 5.0, fake_runs)
    with pytest.raises(ConfigError, match="a is already"):
        start_fake(root, "a")
    assert wait_for(lambda: state_of(root, "a") == "running", 60)
    with pytest.raises(ConfigError, match="a is running: nothing to resume"):
        launch.resume(root / "a")
    assert launch.stop(root / "a")


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", ".queue", "", "a" * 101])
def test_a_run_name_is_a_name(tmp_path, name):
    with pytest.raises(ConfigError, match="name"):
        launch.run_folder(name, tmp_path)
    assert launch.run_folder("sft-1.b_2", tmp_path) == tmp_path / "sft-1.b_2"


def test_start_over_removes_only_what_a_run_wrote(tmp_path):
    folder = tmp_path / "sft1"
    folder.mkdir()
    (folder / "config.yaml").write_text("# step: sft\n" + to_yaml(SFTConfig(output=str(folder))))
    (folder / "status.json").write_text(json.dumps({"state": "failed"}))
    for name in ("final", "checkpoints", "tensorboard"):
        (folder / name).mkdir()
    for name in ("report.json", "report.md", "report.log"):  # the old run's report (probe 8, N8)
        (folder / name).write_text("of the run being replaced")
    (folder / "notes.txt").write_text("mine")
    launch.clear_run(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    with pytest.raises(ConfigError, match="holds no run of ours"):
        launch.clear_run(tmp_path)


def test_resume_says_why_it_cannot(tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    (done / "config.yaml").write_text("# step: sft\n" + to_yaml(SFTConfig(output=str(done))))
    (done / "status.json").write_text(json.dumps({"state": "done"}))
    with pytest.raises(ConfigError, match="has finished: nothing to resume"):
        launch.resume(done)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "launch.json").write_text(json.dumps({"pid": None}))
    with pytest.raises(ConfigError, match="does not say which stage"):
        launch.resume(bare)


def test_a_run_whose_config_is_not_utf8_is_listed_and_resumed_with_one_sentence(tmp_path):
    """A config.yaml that is not UTF-8 (edited by hand, copied from another system) ended the
    Runs list in a UnicodeDecodeError traceback; resuming it says what is wrong."""
    folder = tmp_path / "sft1"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"stage": "sft"}))
    (folder / "config.yaml").write_bytes(b"# step: sft\nlearning_rate: \xff\xfe\n")
    (folder / "status.json").write_text(json.dumps({"state": "failed"}))
    run = RunInfo.load(folder)
    assert run.stage == "sft" and run.config() == {}
    assert [r.path.name for r in list_runs(tmp_path)] == ["sft1"]
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        launch.resume(folder)


def test_a_copied_run_resumes_in_its_own_folder_never_in_the_one_it_came_from(tmp_path):
    """Second probe: Resume on a copy of a run trained into the original (its saved output)."""
    original, copy = tmp_path / "done1", tmp_path / "failed1"
    original.mkdir()
    (original / "run.json").write_text(json.dumps({"stage": "sft"}))
    (original / "config.yaml").write_text(to_yaml(SFTConfig(output=str(original), max_steps=3)))
    shutil.copytree(original, copy)
    stage, values = launch.saved_config(copy)
    assert stage == "sft" and values["output"] == str(copy) and values["max_steps"] == 3


def test_the_launcher_never_starts_into_a_folder_of_other_files(tmp_path):
    """Second probe: Overwrite in the app launched into a folder of the user's files (and the
    next Overwrite deleted them)."""
    folder = tmp_path / "userstuff"
    (folder / "final").mkdir(parents=True)
    (folder / "final" / "w.bin").write_text("weights")
    (folder / "config.yaml").write_text("mine: true")
    for replace in (False, True):
        with pytest.raises(ConfigError, match="holds files that are not a run"):
            launch.start("sft", SFTConfig(output=str(folder), max_steps=1), replace=replace)
    assert sorted(p.name for p in folder.rglob("*")) == ["config.yaml", "final", "w.bin"]
