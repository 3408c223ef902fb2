"""The app through its handlers, in-process: forms built from the option definitions and groups,
checks before Start in the form's words, run names that stay names, a preview that reads only
what a run may read, starts that cannot double, state-driven buttons, readable runs, a chat that
queues and stops, a Compare tab that streams both sides and reveals names on the panels, undo
of a vote, and what the console says."""
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import gradio as gr
import pytest

import app
from chat.conversation import ArenaSession, ChatSession
from core import ratings
from core.options import opt, to_yaml
from core.runs import RunInfo
from tests.conftest import read_jsonl
from train import config, launch


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """An empty runs folder and $RLHF_HOME for the app."""
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(app, "RUNS", tmp_path / "runs")
    (tmp_path / "runs").mkdir()
    return tmp_path / "runs"


def form_of(step):
    with gr.Blocks():
        return app.build_train_tab(step)


def values_of(form, **changes):
    return tuple(changes.get(name, component.value) for name, component in form.fields.items())


def info_of(updates, form, name):
    """The help line (or problem) a handler's field updates give option `name`."""
    return updates[form.names.index(name)]["info"]


def write_run(folder, status: dict, metrics=(), stage="ppo", config_values=None, checkpoint=False):
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"stage": stage, "precision": "fp32",
                                                 "precision_reason": "this CPU has no native bf16"}))
    cls = config.STAGES[stage]
    (folder / "config.yaml").write_text(to_yaml(cls(**{"output": str(folder), **(config_values or {})})))
    (folder / "status.json").write_text(json.dumps(status))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if checkpoint:
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "latest").write_text("step3")
    return folder


def finished_model(folder, stage):
    write_run(folder, {"state": "done"}, stage=stage)
    (folder / "final").mkdir()
    (folder / "final" / "config.json").write_text("{}")
    (folder / "final" / "model.safetensors").write_text("")
    return folder / "final"


# ---- forms ----------------------------------------------------------------------------------------

def test_app_builds_with_every_tab(runs):
    blocks = app.build_app()
    labels = {getattr(block, "label", None) for block in blocks.blocks.values()}
    assert {"Train", "Runs", "Chat", "Compare", "Ratings"} <= labels
    assert blocks.pool.status() == []  # building the app starts no server


def test_form_leads_with_model_and_data_then_collapsed_groups(runs):
    sections = [group for group, _ in app.form_sections(config.PPOConfig)]
    assert sections[:4] == ["model", "data", "run", "main"]
    assert {"training", "lora", "deepspeed", "rl", "evaluation"} <= set(sections[4:])
    form = form_of("ppo")
    fields = {f.name for f in dataclasses.fields(config.PPOConfig)} - set(app.HIDDEN_FIELDS)
    assert set(form.fields) == fields
    learning_rate = form.fields["learning_rate"]
    assert learning_rate.label == "Learning rate" and learning_rate.info.endswith("· --learning-rate")
    assert form.fields["kl_coef"].label == "KL penalty"
    assert form.fields["output"].value == "ppo1"  # a name, not a path


def test_options_without_a_group_still_get_a_place(runs):
    @dataclasses.dataclass
    class NewStage(config.SFTConfig):
        """A stage another branch adds."""
        beta: float = opt(0.1, "a new knob")                       # no group at all
        data: list[str] = opt(["prompts/sft.jsonl"], "redefined without a group")

    sections = dict(app.form_sections(NewStage))
    assert [f.name for f in sections["other"]] == ["beta"]
    assert "data" in [f.name for f in sections["data"]]  # the base class's group


def test_form_values_become_the_exact_command_in_the_runs_folder(runs):
    names = ["output", "data", "zero_stage", "offload", "batch_size"]
    cfg = app.form_config("sft", names, ("x", ["prompts/sft.jsonl"], 2.0, True, 4))
    argv = launch.command("sft", cfg)
    assert argv[1:4] == ["-m", "train", "sft"]
    assert argv[4:] == [f"--output={runs / 'x'}", "--zero-stage=2", "--offload", "--batch-size=4"]


def test_every_step_has_a_form_and_a_command(runs):
    for step in app.TRAIN_TABS:
        if step not in config.STAGES:
            continue
        form = form_of(step)
        cfg = app.form_config(step, form.names, values_of(form))
        assert cfg.output == str(runs / form.fields["output"].value)
        assert launch.command(step, cfg)[3] == step


def test_max_steps_2_7_is_refused_beside_the_field_in_words(runs):
    form = form_of("sft")
    command, message, *updates = app.show_command(form, values_of(form, max_steps=2.7))
    assert "fix the fields marked in red" in message
    assert info_of(updates, form, "max_steps") == "⚠ 2.7 is not a whole number."
    assert updates[form.names.index("max_steps")]["elem_classes"] == ["field-error"]
    assert "--" not in info_of(updates, form, "max_steps")  # the option's words, not its flag
    assert info_of(updates, form, "batch_size") == form.infos["batch_size"]
    message, *_ = app.start_run(form, values_of(form, zero_stage=9))
    assert message == app.NOT_STARTED and not any(runs.iterdir())


def test_show_command_keeps_the_preview(runs):
    form = form_of("sft")
    command, message, *updates = app.show_command(form, values_of(form, max_steps=3))
    assert "--max-steps=3" in command["value"] and command["visible"]
    assert len(updates) == len(form.names)  # outputs: command, message, fields; never the preview


@pytest.mark.parametrize("name", ["../elsewhere", "/tmp/abs", "a/b", ".hidden", "a\\b", ""])
def test_a_run_name_that_is_not_a_name_is_refused(runs, name):
    form = form_of("sft")
    message, _, _, _, *updates = app.start_run(form, values_of(form, output=name))
    assert message == app.NOT_STARTED
    problem = info_of(updates, form, "output")
    assert problem.startswith("⚠ ") and "name" in problem
    assert problem.endswith(".") and ". " not in problem and "\n" not in problem  # one sentence
    assert list(runs.iterdir()) == [] and not (runs.parent / "elsewhere").exists()


def test_a_data_entry_that_looks_like_an_option_is_refused_not_run(runs, tmp_path):
    """Issue 14 item 1 through the form: nothing starts, nothing elsewhere is touched."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    form = form_of("sft")
    injected = ["prompts/sft.jsonl", "--output", str(victim), "--overwrite"]
    message, _, _, _, *updates = app.start_run(form, values_of(form, data=injected))
    assert message == app.NOT_STARTED
    assert info_of(updates, form, "data").startswith("⚠ '--output' looks like an option")
    assert (victim / "keep.txt").read_text() == "mine" and list(runs.iterdir()) == []
    cfg = app.form_config("sft", ["output", "data"], ("x", ["./--odd.jsonl"]))
    assert launch.command("sft", cfg)[-1] == "--data=./--odd.jsonl"  # a value rides in its flag


def test_option_like_text_inside_a_value_is_shown_as_typed(runs):
    """Probe 7, F11: the model `--output=/x` was reported as "Run name=/x does not exist" and the
    data `ratings:--x` as "Ratings:X is outside ...": only an option's own flag becomes its label."""
    form = form_of("sft")
    _, problems = app.check_form("sft", form.names, values_of(form, model="--output=/tmp/x-victim"))
    assert problems["model"].startswith("--output=/tmp/x-victim does not exist")
    _, problems = app.check_form("sft", form.names, values_of(form, data=["ratings:--x"]))
    assert problems["data"].startswith("ratings:--x is outside the folders the app reads data from")
    assert app.in_words("pass --overwrite to replace it, or choose another --output.") == \
        "Pass Overwrite to replace it, or choose another Run name."


def test_ppo_checks_its_models_before_starting(runs):
    form = form_of("ppo")
    sft = finished_model(runs / "sft1", "sft")
    _, _, _, _, *updates = app.start_run(form, values_of(form, reward=""))
    assert info_of(updates, form, "reward") == "⚠ Required: pick one from the list."
    _, _, _, _, *updates = app.start_run(form, values_of(form, reward=str(sft)))
    assert "not a reward model" in info_of(updates, form, "reward")
    rm = finished_model(runs / "rm1", "rm")
    _, _, _, _, *updates = app.start_run(form, values_of(form, reward=str(rm), actor=str(rm)))
    assert "is a reward model" in info_of(updates, form, "actor")
    (runs / "rm1" / "status.json").write_text(json.dumps({"state": "running", "pid": os.getpid()}))
    _, _, _, _, *updates = app.start_run(form, values_of(form, reward=str(rm)))
    assert "still running" in info_of(updates, form, "reward")
    assert not (runs / "ppo1").exists()


def test_data_must_exist_and_lie_where_runs_may_read(runs, tmp_path):
    form = form_of("sft")
    outside = tmp_path / "secret.jsonl"
    outside.write_text('{"prompt": [{"role": "user", "content": "x"}], "response": "y"}\n')
    _, _, _, _, *updates = app.start_run(form, values_of(form, data=[str(outside)]))
    assert "outside the folders the app reads data from" in info_of(updates, form, "data")
    _, _, _, _, *updates = app.start_run(form, values_of(form, data=["prompts/none.jsonl"]))
    assert "does not exist" in info_of(updates, form, "data")


def test_preview_reads_only_what_a_run_may_read(runs, tmp_path):
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"prompt": [{"role": "user", "content": "TOP SECRET"}], "response": "y"}\n')
    refused = app.preview_data([str(secret)], "", 0)
    assert refused.startswith("**Cannot preview:**") and "TOP SECRET" not in refused
    assert "TOP SECRET" not in app.preview_data(["/etc/passwd"], "", 0)
    # probe 5 (N3): ratings:PATH now reads PATH, so it lies where runs may read too
    other_store = tmp_path / "someone.db"
    ratings.add_comparison([{"role": "user", "content": "Hi"}], "TOP SECRET", "No.", "m", "n", "A",
                           path=other_store)
    refused = app.preview_data([f"ratings:{other_store}"], "", 0)
    assert "outside the folders the app reads" in refused and "TOP SECRET" not in refused
    form = form_of("rm")
    _, _, _, _, *updates = app.start_run(form, values_of(form, data=[f"ratings:{other_store}"]))
    assert "outside the folders the app reads data from" in info_of(updates, form, "data")
    assert "hub dataset" in app.preview_data(["someone/dataset"], "", 0)
    shown = app.preview_data(["prompts/sft.jsonl"], "", 0)
    assert "prompts/sft.jsonl" in shown and "records" in shown
    # probe 7, F11: a seed no run takes raised OverflowError (1e400 is infinity)
    for seed in (1e400, -1, 2.5):
        assert app.preview_data(["prompts/sft.jsonl"], "1,1,1", seed).startswith("**Cannot preview:** Seed ")


def test_summary_says_what_will_run(runs):
    form = form_of("sft")
    line = app.summary_line("sft", form.names, values_of(form, max_steps=0, batch_size=5))
    records = len([l for l in (app.ROOT / "prompts" / "sft.jsonl").read_text().splitlines() if l.strip()])
    held_out = max(1, int(records * 0.05))
    assert line.startswith(f"**SFT** of **default** on **{records - held_out} records**, ~**"
                           f"{(records - held_out) // 5} steps**")
    assert "on this machine (a guess until a run here measures it)" in line


def test_the_estimate_uses_a_speed_measured_here(runs):
    write_run(runs / "sft0", {"state": "done"}, [{"step": 1, "tokens_per_s": 100.0}], stage="sft")
    form = form_of("sft")
    slow = app.summary_line("sft", form.names, values_of(form, max_steps=10, batch_size=8))
    assert "(measured by sft0)" in slow
    (runs / "sft0" / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens_per_s": 10_000.0}))
    fast = app.summary_line("sft", form.names, values_of(form, max_steps=10, batch_size=8))
    assert "about" in slow and "under a minute" in fast


def test_an_output_holding_a_run_offers_resume_or_overwrite(runs):
    form = form_of("sft")
    write_run(runs / "sft1", {"state": "stopped", "step": 3, "total_steps": 10}, stage="sft",
              checkpoint=True)
    message, _, offer, resume, *_ = app.start_run(form, values_of(form, output="sft1"))
    assert "already holds a run (stopped, step 3 of 10)" in message
    assert offer["visible"] is True and resume["interactive"] is True
    (runs / "sft1" / "status.json").write_text(json.dumps({"state": "done"}))
    message, _, offer, resume, *_ = app.start_run(form, values_of(form, output="sft1"))
    assert offer["visible"] is True and resume["interactive"] is False  # nothing to resume
    assert "finished: nothing to resume" in app.resume_offered("sft1")[0]


def test_resume_of_a_finished_run_changes_nothing_and_says_what_start_over_deletes(runs):
    """Fourth probe, finding 3: the app must never resume a finished run, and its hint must say
    that starting over replaces final/."""
    finished_model(runs / "sft1", "sft")
    (runs / "sft1" / "checkpoints").mkdir()
    (runs / "sft1" / "checkpoints" / "latest").write_text("step3")
    before = {p.name: p.read_bytes() for p in (runs / "sft1").iterdir() if p.is_file()}
    for note in (app.resume_run("sft1")[0], app.resume_offered("sft1")[0]):
        assert note.startswith("**Not resumed:** sft1 has finished: nothing to resume")
        assert "its final/ stays as it is" in note and "replace its final/" in note
    assert {p.name: p.read_bytes() for p in (runs / "sft1").iterdir() if p.is_file()} == before


def test_overwrite_refuses_a_folder_of_other_files(runs):
    """Second probe: "Overwrite it" launched into a folder of the user's files."""
    form = form_of("sft")
    (runs / "userstuff" / "final").mkdir(parents=True)
    (runs / "userstuff" / "final" / "w.bin").write_text("weights")
    message, *_ = app.overwrite_run(form, values_of(form, output="userstuff"))
    assert message == app.NOT_STARTED
    assert sorted(p.name for p in (runs / "userstuff").rglob("*")) == ["final", "w.bin"]


def test_precision_shows_what_auto_means_here():
    answer = {"labels": {"auto": "auto (fp32: this CPU has no native bf16)"}, "errors": {}}
    assert app.precision_choices(answer)[0] == ("auto (fp32: this CPU has no native bf16)", "auto")


def test_pickers_offer_what_exists(runs, monkeypatch, tmp_path):
    sft = finished_model(runs / "sft1", "sft")
    rm = finished_model(runs / "rm1", "rm")
    write_run(runs / "sft2", {"state": "running", "pid": os.getpid()}, stage="sft")
    (tmp_path / "home" / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "home" / "models" / "tiny" / "config.json").write_text("{}")
    chat = dict((value, label) for label, value in app.model_choices("chat"))
    assert list(chat)[0] == "default" and str(sft) in chat and str(rm) not in chat
    assert chat[str(tmp_path / "home" / "models" / "tiny")] == "tiny (models folder)"
    assert [value for _, value in app.model_choices("reward")] == [str(rm)]
    assert app.model_choices("critic")[0] == ("the reward model", "")
    assert not any("sft2" in value for value in chat)  # still training


# ---- runs: starting, stopping, resuming -----------------------------------------------------------

@pytest.fixture
def sleeper(monkeypatch):
    """Runs whose command is a sleep (a live process without training)."""
    argv = [sys.executable, "-c", "import signal, sys, time\n"  # ends 1 s after SIGTERM, as a
            "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1), sys.exit(0)))\n"  # run saving
            "print('ready', flush=True)\n"  # into console.log: its handler is set from here on
            "time.sleep(60)"]
    monkeypatch.setattr(launch, "command", lambda stage, cfg: list(argv))
    started = []
    yield started
    for folder in started:
        launch.stop(folder)


def wait_for(predicate, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_resume_clicked_twice_starts_one_process(runs, sleeper):
    folder = write_run(runs / "sft1", {"state": "stopped", "step": 3, "total_steps": 9}, stage="sft",
                       checkpoint=True)
    sleeper.append(folder)
    note, *_ = app.resume_run("sft1")
    assert note == "**sft1** resumed."
    second, *_ = app.resume_run("sft1")
    assert second.startswith("**Not resumed:**") and "sft1 is" in second
    with launch.launching(folder), pytest.raises(launch.ConfigError, match="being started already"):
        launch.start("sft", config.SFTConfig(output=str(folder)))  # a click while one is made


def test_resume_writes_nothing_through_a_link_in_the_run(runs, sleeper, tmp_path):
    """Probe 7, F3: Resume of a run whose console.log links elsewhere appended the launcher's
    output to the link's target before the run itself refused the link."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    folder = write_run(runs / "linked", {"state": "stopped", "step": 3, "total_steps": 9}, stage="sft",
                       checkpoint=True)
    (folder / "console.log").symlink_to(victim)
    sleeper.append(folder)
    note, *_ = app.resume_run("linked")
    assert note.startswith("**Not resumed:**") and "is a link to" in note, note
    assert victim.read_text() == "keep me\n"
    assert RunInfo.load(folder).status.get("state") == "stopped"


def test_a_run_being_started_by_another_click_reads_as_starting_without_the_offer(runs, sleeper):
    """Probe 7, F12: of 3 concurrent Start clicks on a new name, a loser that looked while the
    winner had written run.json but not yet its pid was told the run had failed (process gone)
    and offered Resume/Overwrite; one that looked before run.json, "holds files that are not a run"."""
    form = form_of("sft")
    folder = runs / "dup1"
    folder.mkdir()
    with launch.launching(folder):  # the winner, deciding and making its start
        for marker in (False, True):
            if marker:  # the moment of the probe's loser: run.json written, no pid yet
                (folder / "run.json").write_text(json.dumps({"stage": "sft", "created_at": time.time()}))
            for handler in (app.start_run, app.overwrite_run):
                message, _, offer, *rest = handler(form, values_of(form, output="dup1"))
                assert message == app.NOT_STARTED and offer["visible"] is False
                assert info_of(rest[-len(form.names):], form, "output") == \
                    "⚠ dup1 is being started: follow it in the Runs tab or choose another name."
    assert sorted(p.name for p in folder.iterdir()) == ["run.json"]  # nothing started, nothing removed
    # the clicks themselves: one starts, no other is offered Resume/Overwrite
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: app.start_run(form, values_of(form, output="dup2")), range(3)))
    sleeper.append(runs / "dup2")
    assert sum(a[0].startswith("Started **dup2**") for a in answers) == 1, [a[0] for a in answers]
    assert all(a[2]["visible"] is False for a in answers), [a[0] for a in answers]


def test_the_report_view_makes_and_shows_a_finished_runs_report(runs, monkeypatch):
    """Issue 17: Report in the Runs tab runs `python -m train report` on a finished run (here a
    stand-in command, as fast as the view needs) and shows its report.md, or why it failed."""
    done = write_run(runs / "d1", {"state": "done"}, stage="dpo")
    write_run(runs / "s1", {"state": "done"}, stage="sft")
    script = ("import pathlib, sys, time; time.sleep(0.5); folder = pathlib.Path(sys.argv[1])\n"
              "if folder.name == 'bad': sys.exit('error: the judge has another tokenizer')\n"
              "(folder / 'report.md').write_text('# Report: ' + folder.name)")
    monkeypatch.setattr(app.run_report, "report_command", lambda run: [sys.executable, "-c", script, run])
    *_, button, view = app.run_view("d1")
    assert button["interactive"] is True and view["visible"] is False
    with ThreadPoolExecutor(3) as pool:  # three clicks at once start one report (probe 8, N6)
        notes = [answer[0] for answer in pool.map(app.report_run, ["d1"] * 3)]
    assert sorted(n.startswith("**d1** reported on: the report appears below") for n in notes) == \
        [False, False, True], notes
    assert all(n.startswith("**Not reported on:**") for n in notes if not n.startswith("**d1**"))
    *_, button, view = app.run_view("d1")
    assert button["interactive"] is False and "being made" in view["value"]
    assert wait_for(lambda: (done / "report.md").is_file() and not app.reporting(done))
    *_, button, view = app.run_view("d1")
    assert view["value"] == "# Report: d1" and view["visible"] is True and button["interactive"] is True
    note, *_, button, view = app.report_run("s1")
    assert note.startswith("**Not ") and "not a finished PPO" in note and button["interactive"] is False
    write_run(runs / "bad", {"state": "done"}, stage="ppo")
    app.report_run("bad")
    assert wait_for(lambda: not app.reporting(runs / "bad"))
    view = app.run_view("bad")[-1]
    assert view["value"].startswith("**The report failed:** error: the judge has another tokenizer")
    # the view shows a run's own report.md only: not a link's target, nor a FIFO (a read would
    # block the app), and at most REPORT_BYTES of it (probe 8, N3 and N5)
    secret = runs.parent / "secret.txt"
    secret.write_text("SECRET")
    for name, plant in (("linked", lambda f: f.symlink_to(secret)), ("fifo", lambda f: os.mkfifo(f)),
                        ("huge", lambda f: f.write_text("x" * (app.REPORT_BYTES * 4)))):
        plant(write_run(runs / name, {"state": "done"}, stage="dpo") / "report.md")
        view = app.run_view(name)[-1]
        assert "SECRET" not in view["value"] and len(view["value"]) <= app.REPORT_BYTES, name


def test_resume_and_start_over_queue_in_the_runs_folder_not_where_a_file_says(runs, sleeper, tmp_path):
    """Issue 14 (third probe, F5): Resume followed the queue path of an edited launch.json and
    made /tmp/x/victim/.slots/0.lock."""
    victim = tmp_path / "x" / "victim"
    write_run(runs / "sft1", {"state": "stopped", "step": 3, "total_steps": 9}, stage="sft",
              checkpoint=True)
    for name in ("copied", "copied2"):
        shutil.copytree(runs / "sft1", runs / name)
        (runs / name / "launch.json").write_text(json.dumps(
            {"pid": 999998, "stage": "sft", "queue": str(victim), "started_at": 1}))
        sleeper.append(runs / name)
    assert app.resume_run("copied")[0] == "**copied** resumed."
    assert app.start_over_run("copied2")[0] == "**copied2** started over."
    assert wait_for(lambda: (runs / ".slots" / "0.lock").is_file())
    assert wait_for(lambda: {RunInfo.load(runs / n).status.get("state") for n in ("copied", "copied2")}
                    == {"running", "queued"})
    assert not (tmp_path / "x").exists()
    assert "queue" not in json.loads((runs / "copied" / "launch.json").read_text())


def test_a_link_in_the_runs_folder_never_takes_a_run_outside_it(runs, sleeper, tmp_path):
    """Issue 14 (third probe, F6): Start with the name of a link in the runs folder wrote the
    run where the link pointed."""
    target = tmp_path / "x" / "emptyout"
    target.mkdir(parents=True)
    os.symlink(target, runs / "lnout")
    form = form_of("sft")
    for handler in (app.start_run, app.overwrite_run):
        message, *rest = handler(form, values_of(form, output="lnout"))
        assert message == app.NOT_STARTED
        problem = info_of(rest[-len(form.names):], form, "output")
        assert "is a link to" in problem and problem.endswith(".") and "\n" not in problem
    assert app.resume_offered("lnout")[0].startswith("**Not resumed:**")
    assert list(target.iterdir()) == []


def test_start_over_never_removes_a_run_inside_the_run(runs, sleeper):
    """Issue 14 (third probe, F3 in the app): Start over removes final/ and checkpoints/, with
    any run someone put inside them."""
    outer = write_run(runs / "outer", {"state": "failed"}, stage="sft", checkpoint=True)
    sleeper.append(outer)
    (outer / "final" / "nested").mkdir(parents=True)
    (outer / "final" / "nested" / "run.json").write_text('{"stage": "sft"}')
    note, *_ = app.start_over_run("outer")
    assert note.startswith("**Not started over:**") and "holds another run in" in note
    assert (outer / "final" / "nested" / "run.json").is_file()
    assert (outer / "checkpoints" / "latest").is_file()  # nothing was removed


def test_a_killed_run_is_failed_process_gone_and_can_be_resumed_or_started_over(runs):
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait()
    write_run(runs / "sft1", {"state": "running", "step": 3, "total_steps": 9, "pid": dead.pid},
              stage="sft", checkpoint=True)
    progress, _, _, _, _, stop, resume, start_over, *_ = app.run_view("sft1")
    assert "failed (process gone)" in progress
    assert stop["interactive"] is False and resume["interactive"] is True
    assert start_over["interactive"] is True
    assert app.runs_table(runs).iloc[0]["state"] == "failed (process gone)"


def test_stop_shows_stopping_at_once_and_buttons_follow_the_state(runs, sleeper):
    form = form_of("sft")
    message, *_ = app.start_run(form, values_of(form, output="s1"))
    sleeper.append(runs / "s1")
    assert message.startswith("Started **s1**")
    assert wait_for(lambda: RunInfo.load(runs / "s1").status.get("state") == "running")
    assert wait_for(lambda: "ready" in (runs / "s1" / "console.log").read_text())
    progress, _, _, _, _, stop, resume, start_over, *_ = app.run_view("s1")
    assert stop["interactive"] is True and resume["interactive"] is False
    assert start_over["interactive"] is False
    note, progress, *_ = app.stop_run("s1")
    assert "asked to stop" in note and "stopping…" in progress
    assert json.loads((runs / "s1" / "status.json").read_text())["state"] == "stopping"
    assert RunInfo.load(runs / "s1").state in ("stopping", "failed")  # live until it ends


def test_runs_queue_one_at_a_time_and_show_their_place(runs, sleeper):
    form = form_of("sft")
    for name in ("q1", "q2", "q3"):
        assert app.start_run(form, values_of(form, output=name))[0].startswith(f"Started **{name}**")
        sleeper.append(runs / name)
    assert wait_for(lambda: [r.name for r in launch.queued(runs)] == ["q2", "q3"])
    table = app.runs_table(runs).set_index("name")
    assert table.loc["q2", "state"] == "queued (1st in line)"
    assert table.loc["q3", "state"] == "queued (2nd in line)"
    assert "waiting: q2, q3" in app.queue_text(runs)
    note, *_ = app.stop_run("q2")  # a queued run leaves the line at once
    assert wait_for(lambda: RunInfo.load(runs / "q2").state == "stopped")
    assert [r.name for r in launch.queued(runs)] == ["q3"]
    assert app.resume_run("q2")[0] == "**q2** resumed."  # stopped while queued: back in line
    assert wait_for(lambda: [r.name for r in launch.queued(runs)] == ["q3", "q2"])


# ---- runs: what the tab shows ---------------------------------------------------------------------

def test_a_run_is_readable(runs):
    write_run(runs / "ppo1", {"state": "running", "step": 2, "total_steps": 40, "eta_s": 4000,
                              "pid": os.getpid()},
              [{"step": 0, "eval_reward": 0.1},
               {"step": 1, "reward": 0.5, "kl": 0.1, "response_length": 50, "time_generate_s": 2.0},
               {"step": 2, "reward": 0.7, "kl": 0.2, "response_length": 48, "time_generate_s": 1.5}])
    (runs / "ppo1" / "samples.jsonl").write_text(json.dumps(
        {"step": 2, "prompt": "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi there"
                              "<|im_end|>\n<|im_start|>assistant\n", "response": "Hello!", "reward": 1.25}) + "\n")
    progress, plots, steps, _, samples, *_ = app.run_view("ppo1")
    assert "step 2 of 40, about 1 h 07 min left" in progress
    assert "precision: fp32 (this CPU has no native bf16)" in progress
    for metric in ("reward", "kl", "response_length", "time per step (s)"):
        assert f"data-metric='{metric}'" in plots  # one small plot per metric
    reward_plot = plots.split("data-metric='reward'")[1].split("</svg>")[0]
    assert "<polyline" in reward_plot and reward_plot.count("<circle") == 1  # the step-0 eval point
    assert steps.splitlines()[0] == "step 0/40 held-out: reward 0.1"
    assert steps.splitlines()[-1].startswith("step 2/40: reward 0.7, kl 0.2")
    assert samples["visible"] and "<i>Hi there</i> → Hello!" in samples["value"]
    assert "reward 1.25" in samples["value"] and "im_start" not in samples["value"]


def test_a_failed_run_says_why_from_its_console(runs):
    write_run(runs / "bad", {"state": "failed", "step": 0}, stage="sft")
    (runs / "bad" / "console.log").write_text("loading\nerror: data file x.jsonl does not exist: check the path.\n")
    progress = app.run_view("bad")[0]
    assert "Failed:</b> error: data file x.jsonl does not exist" in progress


def test_refresh_sends_only_what_changed_and_slows_down_when_idle(runs):
    write_run(runs / "sft1", {"state": "done", "step": 3, "total_steps": 3}, [{"step": 1, "loss": 2.0}],
              stage="sft")
    with gr.Blocks():
        tab = app.build_runs_tab(gr.BrowserState(""))
    first = tab.refresh("sft1", None)
    *views, seen, timer = first
    assert "sft1" in views[3] and timer.value == 10.0  # nothing live: every 10 s
    again = tab.refresh("sft1", seen)
    assert all(update == gr.skip() for update in again[:-2])
    (runs / "sft1" / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 1.0}) + "\n")
    os.utime(runs / "sft1" / "metrics.jsonl", (time.time() + 5, time.time() + 5))
    changed = tab.refresh("sft1", again[-2])
    assert changed[0] == gr.skip() and "loss" in changed[4]  # the plots, not the table


def test_the_picked_run_survives_a_reload(runs):
    write_run(runs / "sft1", {"state": "done"}, stage="sft")
    assert app.restore_pick("sft1")["value"] == "sft1"
    assert app.restore_pick("gone")["value"] is None


def test_opening_the_runs_tab_after_a_reload_shows_the_kept_run_even_before_the_restore(runs):
    for name in ("sft1", "rm2"):
        write_run(runs / name, {"state": "done", "step": 2, "total_steps": 2}, stage="sft")
    with gr.Blocks():
        tab = app.build_runs_tab(gr.BrowserState(""))
    shown = tab.show(None, "rm2")  # nothing picked yet, the browser kept rm2
    assert shown[1]["value"] == "rm2" and "rm2" in shown[3]
    assert tab.show("sft1", "rm2")[1]["value"] == "sft1"  # a run picked now wins
    assert tab.show(None, "gone")[1]["value"] is None  # a kept run that was deleted


# ---- chat and compare -----------------------------------------------------------------------------

class SlowClient:
    """Streams `pieces` one by one, waiting on `gate` before each; ends with `finish`."""

    def __init__(self, model, pieces, gate=None, finish="stop"):
        self.model, self.pieces, self.gate, self.finish = model, pieces, gate, finish

    def stream(self, messages, finish=None, **sampling):
        for piece in self.pieces:
            if self.gate is not None:
                assert self.gate.wait(10), "the other side never streamed"
            yield piece
        if finish is not None:
            finish["reason"] = self.finish


class FakePool:
    def __init__(self, make_client):
        self.make_client, self.leased = make_client, []

    @contextlib.contextmanager
    def lease(self, model):
        self.leased.append(model)
        yield self.make_client(model)


def test_chat_queues_a_message_sent_while_answering_and_keeps_the_input(runs):
    pool = FakePool(lambda model: SlowClient(model, ["one ", "two"]))
    chat = ChatSession()
    answering = app.chat_send(pool, "first", chat, "default", "", 0.7, 0.9, 16)
    session, history, note, text, send, stop = next(answering)
    assert text == "" and send["value"] == "Queue" and stop["interactive"] is True
    streamed = next(answering)
    assert streamed[3] == gr.skip()  # pieces never touch the input box
    queued = list(app.chat_send(pool, "second", chat, "default", "", 0.7, 0.9, 16))
    assert queued[0][2].startswith("Queued (1 waiting)") and queued[0][3] == ""
    *_, last = list(answering)
    assert [t["content"] for t in chat.turns] == ["first", "one two", "second", "one two"]
    assert last[4]["value"] == "Send" and last[5]["interactive"] is False


def test_chat_stop_ends_the_answer_and_marks_it(runs):
    pool = FakePool(lambda model: SlowClient(model, ["a", "b", "c", "d"]))
    chat = ChatSession()
    answering = app.chat_send(pool, "hi", chat, "default", "", 0.7, 0.9, 16)
    next(answering), next(answering)
    assert app.chat_stop(chat) == "Stopping…"
    *_, last = list(answering)
    assert chat.turns[-1]["content"] in ("a", "ab") and "(stopped)" in last[2]
    assert chat.history()[-1]["content"].endswith("*[stopped]*")


def test_a_cut_off_answer_is_marked(runs):
    pool = FakePool(lambda model: SlowClient(model, ["long answer"], finish="length"))
    chat = ChatSession()
    *_, last = list(app.chat_send(pool, "hi", chat, "default", "", 0.7, 0.9, 2))
    assert "cut off at the token limit" in last[2]
    assert chat.history()[-1]["content"] == "long answer\n\n*[cut off at the token limit]*"
    assert chat.rated(1)["answer"] == "long answer"  # a vote stores the text, not the mark


def test_chat_refuses_a_reward_model(runs):
    rm = finished_model(runs / "rm1", "rm")
    [update] = list(app.chat_send(FakePool(None), "hi", ChatSession(), str(rm), "", 0.7, 0.9, 16))
    assert "is a reward model" in update[2]


def test_compare_streams_both_sides_at_once_then_reveals_names_and_locks_votes(runs, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(runs.parent / "home"))
    both = threading.Barrier(2)
    gate = threading.Event()

    def client(model):  # each side waits until both have started: a one-after-the-other
        class Client(SlowClient):  # Compare would time out here
            def stream(self, messages, finish=None, **sampling):
                both.wait(10)
                gate.set()
                yield from super().stream(messages, finish, **sampling)
        return Client(model, ["x", "y"], gate)

    arena = ArenaSession()
    updates = list(app.compare_send(FakePool(client), "hi", arena, app.ARENA_MODES[0], "default",
                                    "default", "", 0.7, 0.9, 16))
    *_, last = updates
    assert [b["interactive"] for b in last[7:]] == [True] * 4  # votes open once both ended
    assert last[1]["label"] == "A" and last[2]["label"] == "B"  # anonymous until the vote
    voted = app.compare_vote("A", arena)
    assert voted[1]["label"].startswith("A: default (seed ") and voted[2]["label"].startswith("B: default")
    assert [b["interactive"] for b in voted[7:]] == [False] * 4
    assert ratings.counts()["A"] == 1


def test_a_vote_can_be_undone_and_the_table_shows_the_answers(runs):
    prompt = [{"role": "user", "content": "Hi"}]
    first = ratings.add_comparison(prompt, "Hello!", "Go away.", "m1", "m2", "A")
    ratings.add_comparison(prompt, "Hey.", "No.", "m1", "m2", "B")
    line, table, _ = app.ratings_overview()
    assert list(table.iloc[1][["answer A", "answer B"]]) == ["Hello!", "Go away."]
    assert app.undo_vote(first).startswith(f"Vote #{first} undone")
    assert ratings.counts()["total"] == 1 and ratings.counts()["A"] == 0
    assert "not in the store" in app.undo_vote(first)
    # what the API can send: one sentence each, the store intact (probe 5: int() read "1_0" as
    # vote 10, "٣" as 3 and 2.9 as 2, and removed those)
    for bad in ("abc", 10**30, -3, "1_0", "٣", 2.9, True, f" {first + 1}.0"):
        assert app.undo_vote(bad).startswith("**Not undone:**")
    assert ratings.counts()["total"] == 1
    assert app.undo_vote(f" {first + 1} ").startswith(f"Vote #{first + 1} undone")
    assert ratings.counts()["total"] == 0


def test_ratings_overview_counts_votes_and_ranks_checkpoints(runs):
    prompt = [{"role": "user", "content": "Hi"}]
    for verdict in ("A", "A", "A", "B", "tie"):
        ratings.add_comparison(prompt, "Hello!", "Go away.", "runs/ppo1/ema", "runs/sft1/final", verdict)
    ratings.add_thumb(prompt, "Hello!", "runs/ppo1/ema", up=True)
    line, table, board = app.ratings_overview()
    assert line.startswith("6 votes: 3 A, 1 B, 1 tie, 0 both_bad, 1 up, 0 down; 4 exportable")
    assert len(table) == 6 and table.iloc[0]["verdict"] == "up"
    assert list(board["model"]) == ["runs/ppo1/ema", "runs/sft1/final"]
    assert board.iloc[0]["games"] == 5 and board.iloc[0]["wins"] == 3.5


def test_rows_another_tool_wrote_badly_are_skipped_and_counted_in_the_ratings_tab(runs):
    """Issue 14 (fourth probe, finding 5): a row with created_at 'notafloat' (or an A verdict
    without answer B) made the Ratings tab a bare TypeError and the preview of ratings: fail."""
    prompt = [{"role": "user", "content": "Hi"}]
    ratings.add_comparison(prompt, "Hello!", "Go away.", "runs/ppo1/ema", "runs/sft1/final", "A")
    conn = ratings.connect()
    with conn:
        conn.execute("INSERT INTO ratings (kind, created_at, conversation, answer_a, answer_b, model_a, "
                     "model_b, verdict) VALUES ('comparison', 'notafloat', ?, 'a', 'b', 'm1', 'm2', 'A')",
                     (json.dumps(prompt),))
        conn.execute("INSERT INTO ratings (kind, created_at, conversation, answer_a, answer_b, model_a, "
                     "model_b, verdict) VALUES ('comparison', 0, ?, 'a', NULL, 'm1', 'm2', 'A')",
                     (json.dumps(prompt),))
        # probe 5 (N9): a round that is not a number broke the tab's rounds (TypeError in sorted)
        conn.execute("INSERT INTO ratings (kind, created_at, conversation, answer_a, answer_b, model_a, "
                     "model_b, verdict, round) VALUES ('comparison', 0, ?, 'a', 'b', 'm1', 'm2', 'A', "
                     "'abc')", (json.dumps(prompt),))
    conn.close()
    line, table, board, *_ = app.safe_ratings_view()
    assert line.startswith("1 vote: 1 A") and "3 malformed rows (written by another tool?) skipped" in line
    assert len(table) == 1 and list(board["games"]) == [1, 1]
    assert list(ratings.round_counts()) == [0]  # the round that is not a number is in none
    assert ratings.latest_round() == 0 and app.round_run_name() == "round0-dpo"
    preview = app.preview_data(["ratings:"], "", 0)
    assert "1 records (skipped: 3 malformed ratings rows)" in preview


def test_two_exports_in_the_same_millisecond_write_two_files(runs, monkeypatch):
    """Issue 14 (fourth probe, finding 7): the export's name had one-second resolution, so a
    second click failed with the command line's wording ("pass --overwrite")."""
    ratings.add_comparison([{"role": "user", "content": "Hi"}], "Hello!", "Go away.", "m1", "m2", "A")
    monkeypatch.setattr(app.time, "time", lambda: 1_790_000_000.25)
    first, second = app.export_votes(), app.export_votes()
    assert first[1].startswith("Wrote 1 preference records") and second[1].startswith("Wrote 1")
    assert first[0]["value"] != second[0]["value"]
    files = sorted((runs.parent / "home" / "exports").iterdir())
    assert len(files) == 2 and all(len(read_jsonl(f)) == 1 for f in files)


# ---- the console ----------------------------------------------------------------------------------

def test_the_console_says_what_the_app_does(runs, sleeper, capsys):
    watcher = app.ConsoleWatcher()
    watcher.changes()
    form = form_of("sft")
    app.start_run(form, values_of(form, output="c1"))
    sleeper.append(runs / "c1")
    assert f"run c1 started (sft): {runs / 'c1'}" in capsys.readouterr().out
    assert wait_for(lambda: RunInfo.load(runs / "c1").state == "running")
    watcher.changes()
    write = runs / "c1" / "status.json"
    write.write_text(json.dumps({**json.loads(write.read_text()), "state": "failed",
                                 "error": "out of memory"}))
    assert watcher.changes() == [f"run c1 failed: out of memory ({runs / 'c1'})"]


# ---- rounds: sample, vote, train DPO on the votes, swap the result in ------------------------------

def waiting_line(view) -> str:
    return view[2]  # (note, pending id, waiting line, panel A, panel B, vote buttons...)


def test_a_round_samples_through_the_pool_and_each_vote_keeps_round_and_provenance(runs, tiny_model,
                                                                                   tmp_path):
    pool = app.ServerPool(size=1, log_dir=tmp_path / "logs", startup_timeout=300)
    try:
        updates = list(app.sample_next_round(pool, str(tiny_model), "builtin", "", 3, 8))
    finally:
        pool.stop_all()
    notes = [update[0] for update in updates]
    assert notes[0].startswith("Round 1: getting an inference server for ")
    assert [n for n in notes if "prompts answered twice" in n][-1] == "Round 1: 3 of 3 prompts answered twice…"
    last = updates[-1]
    queued = len(ratings.pending())
    assert queued >= 2 and last[0].startswith(f"Round 1: {queued} pairs from ")
    assert f"waiting: {queued}" in waiting_line(last) and all(b["interactive"] for b in last[5:])
    shown = ratings.next_pending()
    assert last[1] == shown["id"] and last[3][-1]["content"] == shown["answer_a"]
    assert last[3][:-1] == shown["conversation"]  # the panels show the prompt, then one answer each
    verdicts = ["A", "B", "both_bad", "tie"][:queued]
    for left, verdict in enumerate(verdicts, 1):
        pending_id = ratings.next_pending()["id"]
        view = app.round_vote(verdict, pending_id)
        assert view[0] == f"Vote saved ({verdict})."
        assert f"waiting: {queued - left}" in waiting_line(view)
    assert view[1] is None and not any(b["interactive"] for b in view[5:])
    assert app.round_vote("A", pending_id)[0].startswith("**Vote not saved:** comparison")
    assert app.round_vote("A", None)[0] == "Nothing to vote on: sample a round first."
    votes = sorted(ratings.rows(), key=lambda r: r["id"])
    assert [v["verdict"] for v in votes] == verdicts and {v["round"] for v in votes} == {1}
    for vote in votes:  # provenance: the round's checkpoint on both sides, each with its own seed
        assert vote["model_a"] == vote["model_b"] == str(tiny_model)
        assert vote["sampling_a"]["max_tokens"] == 8
        assert vote["sampling_a"]["seed"] != vote["sampling_b"]["seed"]
    assert app.rounds_overview(ratings.rows())[0] == f"Round 1: {queued} votes."


class FailingPool:
    @contextlib.contextmanager
    def lease(self, model):
        raise app.ServerError(f"the inference server for {model} exited: out of memory.")
        yield


def test_bad_round_input_gets_one_sentence_and_queues_nothing(runs, tmp_path):
    rm = finished_model(runs / "rm1", "rm")
    data = tmp_path / "home" / "data"
    data.mkdir(parents=True)
    (data / "broken.jsonl").write_text("{\n")
    (tmp_path / "outside.txt").write_text("Hi?\n")
    cases = {("", "builtin", "", 4, 16): "Pick a checkpoint first.",
             (str(rm), "builtin", "", 4, 16): "is a reward model",
             ("default", "builtin", "", 0, 16): "The number of prompts must be a whole number from 1",
             ("default", "builtin", "", 2.5, 16): "The number of prompts must be a whole number",
             ("default", "builtin", "", "many", 16): "The number of prompts must be a whole number",
             ("default", "builtin", "", 4, 0): "The longest answer must be a whole number",
             ("default", "chat", "", 4, 16): "the prompt set 'chat' is empty",
             ("default", "file", " ", 4, 16): "type the prompt file's path",
             ("default", "file", str(tmp_path / "outside.txt"), 4, 16): "is outside the folders the app reads",
             ("default", "file", str(data / "nope.txt"), 4, 16): "does not exist",
             ("default", "file", str(data / "broken.jsonl"), 4, 16): "is not valid JSON",
             ("default", "file", str(data), 4, 16): "cannot be read"}
    for values, reason in cases.items():
        [update] = list(app.sample_next_round(FailingPool(), *values))  # never reaches the pool
        assert update[0].startswith("**Not sampled:** ") and reason in update[0], (values, update[0])
        assert "\n" not in update[0] and "Traceback" not in update[0]
    *_, last = list(app.sample_next_round(FailingPool(), "default", "builtin", "", 4, 16))
    assert last[0] == ("**Round 1 stopped:** the inference server for default exited: out of "
                       "memory. (pairs queued before stay queued)")
    assert ratings.pending() == [] and ratings.latest_round() == 0


def test_a_prompt_file_where_runs_may_read_gives_a_round_its_prompts(runs, tmp_path):
    data = tmp_path / "home" / "data"
    data.mkdir(parents=True)
    (data / "mine.txt").write_text("First?\n\nSecond?\nThird?\n")
    conversations, name = app.round_prompts("file", str(data / "mine.txt"), 2, seed=1)
    assert len(conversations) == 2 and name == str(data / "mine.txt")
    assert {c[0]["content"] for c in conversations} < {"First?", "Second?", "Third?"}
    builtin, name = app.round_prompts("builtin", "", 3, seed=1)
    assert len(builtin) == 3 and name == "builtin"
    assert app.round_prompts("builtin", "", 3, seed=2)[0] != builtin  # each round new prompts


def decisive_round_vote(verdict="A", round_number=1):
    prompt = [{"role": "user", "content": "Hi"}]
    pending_id = ratings.add_pending(prompt, "Hello!", "Go away.", "default", "default",
                                     {"seed": 1}, {"seed": 2}, round=round_number)
    return ratings.vote_pending(pending_id, verdict)


def test_a_vote_on_a_pair_id_no_pair_has_is_one_sentence(runs):
    """Probe 7, F11: round_vote("A", 10**30) raised OverflowError, ("A", "abc") ValueError (the
    id comes from a gr.State: only a direct call reaches it); 2.9 would have voted on pair 2."""
    prompt = [{"role": "user", "content": "Hi"}]
    pending_id = ratings.add_pending(prompt, "Hello!", "Go away.", "default", "default",
                                     {"seed": 1}, {"seed": 2}, round=1)
    for bad in (10**30, "abc", -1, True, pending_id + 0.9, "1_0"):
        assert app.round_vote("A", bad)[0].startswith("**Vote not saved:**"), bad
    assert ratings.counts()["total"] == 0
    assert app.round_vote("A", str(pending_id))[0] == "Vote saved (A)."


def test_training_on_the_votes_starts_one_dpo_run_on_the_checkpoint(runs, sleeper):
    names = list(app.ROUND_TRAIN_FIELDS)
    small = (2, 2, 128, 1e-5)  # steps, batch size, longest sequence, learning rate
    note, *_ = app.train_on_votes(names, "default", {}, *small)
    assert note.startswith("**Not started:** no decisive votes yet")
    decisive_round_vote("tie")
    assert app.train_on_votes(names, "default", {}, *small)[0].startswith("**Not started:** no decisive")
    decisive_round_vote("A")
    note, *_ = app.train_on_votes(names, "default", {}, 2.7, 2, 128, 1e-5)
    assert note == "**Not started:** Steps (0: as many as the epochs make): 2.7 is not a whole number."
    assert app.train_on_votes(names, "", {}, *small)[0] == "**Not started:** Pick a checkpoint first."
    assert not any(runs.iterdir())
    note, view, watch, timer = app.train_on_votes(names, "default", {}, *small)
    sleeper.append(runs / "round1-dpo")
    assert note.startswith("Started **round1-dpo**") and "on 1 preference pair (every round's votes)" in note
    assert watch == {"run": "round1-dpo"} and timer.active and "round1-dpo" in view
    stage, values = launch.saved_config(runs / "round1-dpo")  # the typed config it was started with
    assert stage == "dpo" and values["data"] == ["ratings:"] and values["model"] == "default"
    assert (values["max_steps"], values["batch_size"], values["max_seq_len"]) == (2, 2, 128)
    again, *_ = app.train_on_votes(names, "default", {}, *small)
    assert again.startswith("**Not started:** round1-dpo is already training on the votes")
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith(".")) == ["round1-dpo"]


def test_a_finished_round_run_is_swapped_into_chat_and_compare(runs):
    final = finished_model(runs / "round1-dpo", "dpo")
    note, view, chat, compare, round_model, watch, timer = app.swap_in({"run": "round1-dpo"})
    assert note.startswith("**round1-dpo** is done: **") and "done" in view
    value = str(final.resolve())
    for picker in (chat, compare, round_model):
        assert picker["value"] == value and value in [v for _, v in picker["choices"]]
    for picker in (chat, compare, round_model):  # as Gradio applies them: it pops each value
        assert gr.blocks.postprocess_update_dict(gr.Dropdown(allow_custom_value=True), picker)["value"] == value
    assert watch == {} and not timer.active
    assert app.swap_in(watch)[:5] == (gr.skip(),) * 5  # swapped once: a later pick stays
    write_run(runs / "round2-dpo", {"state": "running", "pid": os.getpid(), "step": 1,
                                    "total_steps": 4}, stage="dpo")
    note, view, *pickers, watch, timer = app.swap_in({"run": "round2-dpo"})
    assert "step 1 of 4" in view and timer.active and pickers == [gr.skip()] * 3
    write_run(runs / "round3-dpo", {"state": "failed", "error": "out of memory"}, stage="dpo")
    note, view, *pickers, watch, timer = app.swap_in({"run": "round3-dpo"})
    assert note == "**round3-dpo** failed: out of memory. The checkpoints stay as they were."
    assert pickers == [gr.skip()] * 3 and not timer.active


def test_the_leaderboard_shows_rounds_side_by_side(runs):
    prompt = [{"role": "user", "content": "Hi"}]
    for verdict in ("A", "A", "B"):  # round 0: Compare's votes before any round
        ratings.add_comparison(prompt, "Hello!", "No.", "runs/sft1/final", "default", verdict)
    decisive_round_vote("A")  # a round's own pair: one checkpoint, so it ranks nothing
    ratings.add_comparison(prompt, "Hey!", "No.", "runs/round1-dpo/final", "runs/sft1/final", "A",
                           round=1)
    ratings.add_pending(prompt, "x", "y", "default", "default", round=1)
    line, table = app.rounds_overview(ratings.rows())
    assert line == "Round 0: 3 votes · round 1: 2 votes, 1 waiting."
    assert list(table.columns) == ["model", "round 0", "round 1"]
    by_model = table.set_index("model")
    assert by_model.loc["runs/sft1/final", "round 0"].endswith("· 3 games")
    assert by_model.loc["runs/sft1/final", "round 1"].endswith("· 1 game")
    assert by_model.loc["runs/round1-dpo/final", "round 0"] == ""
    assert by_model.loc["default", "round 1"] == ""  # its round-1 pair was one checkpoint's
    strength = float(by_model.loc["runs/sft1/final", "round 0"].split()[0])
    assert strength > 0  # 2 wins of 3 against default


def test_compare_votes_count_in_the_latest_round(runs):
    def vote():
        arena = ArenaSession()
        arena.start_round("Hi", ("m1", "m2"), app.new_sampling(0.7, 0.9, 16), "")
        app.compare_vote("A", arena)
        return ratings.rows(limit=1)[0]["round"]

    assert vote() == 0
    ratings.add_pending([{"role": "user", "content": "Hi"}], "a", "b", "m1", "m1", round=2)
    assert vote() == 2


def test_the_app_has_a_rounds_section_and_rounds_on_the_leaderboard(runs):
    blocks = app.build_app()
    ids = {getattr(block, "elem_id", None) for block in blocks.blocks.values()}
    assert {"rounds-model", "rounds-sample", "rounds-vote-A", "rounds-train", "rounds-max_steps",
            "ratings-rounds"} <= ids
