"""The app's wiring: every tab builds, the Train form covers every option and turns into the
CLI command, and the Runs tab's views become plot updates."""
import dataclasses
import json

import gradio as gr

import app
from core import ratings
from train import config


def test_app_builds_with_every_tab():
    blocks = app.build_app()
    assert isinstance(blocks, gr.Blocks)
    labels = {getattr(block, "label", None) for block in blocks.blocks.values()}
    assert {"Train", "Runs", "Chat", "Compare", "Ratings"} <= labels
    assert blocks.pool.status() == []  # building the app starts no server


def test_form_has_one_input_per_option_with_its_default_and_help():
    with gr.Blocks():
        form = app.config_form("sft")
    fields = {f.name: f for f in dataclasses.fields(config.SFTConfig)}
    assert set(form) == set(fields)
    assert form["zero_stage"].value == 0 and form["precision"].value == "auto"
    assert form["learning_rate"].info == fields["learning_rate"].metadata["help"]


def test_form_values_become_the_exact_command():
    names = ["output", "data", "zero_stage", "offload", "batch_size"]
    cfg = app.form_config("sft", names, ("runs/x", ["prompts/sft.jsonl"], 2.0, True, 4))
    argv = app.launch.command("sft", cfg)
    assert argv[1:4] == ["-m", "train", "sft"]
    assert argv[4:] == ["--output=runs/x", "--zero-stage=2", "--offload", "--batch-size=4"]


def test_more_than_one_process_goes_through_the_deepspeed_launcher():
    cfg = config.SFTConfig(output="runs/x", num_procs=2, zero_stage=3)
    argv = app.launch.command("sft", cfg)
    assert argv[1:6] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--module"]
    assert "--num-procs=2" in argv  # the ranks see the same config


def test_every_step_has_a_form_and_a_command():
    for step, cls in config.STAGES.items():
        if step == "eval-rm":
            continue
        with gr.Blocks():
            form = app.config_form(step)
        values = tuple(c.value for c in form.values())
        cfg = app.form_config(step, list(form), values)
        assert cfg == cls(**{"output": form["output"].value} if "output" in form else {})
        assert app.launch.command(step, cfg)[3] == step


def test_run_view_turns_points_into_plot_updates():
    progress, points, log, time_split, samples = app.run_view("no-such-run")
    assert "No run named" in progress and log == "" and samples["value"].empty
    assert points["value"]["value"].isna().all() and points["colors_in_legend"] == []
    assert time_split["colors_in_legend"] == []


def test_run_view_shows_the_ppo_views_only_for_a_ppo_run(tmp_path, monkeypatch):
    write_run(tmp_path / "sft1", {"state": "done"}, [{"step": 1, "loss": 2.0}], step="sft")
    write_run(tmp_path / "ppo1", {"state": "done"}, [{"step": 1, "reward": 0.5, "time_generate_s": 3.0,
                                                     "time_score_s": 1.0, "time_train_s": 2.0}])
    monkeypatch.setattr(app, "RUNS", tmp_path)
    *_, sft_time_split, sft_samples = app.run_view("sft1")
    *_, ppo_time_split, ppo_samples = app.run_view("ppo1")
    assert sft_time_split["visible"] is False and sft_samples["visible"] is False
    assert ppo_time_split["visible"] is True and ppo_samples["visible"] is True
    assert ppo_time_split["colors_in_legend"] == ["time_generate_s", "time_score_s", "time_train_s"]


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
    progress, (frame, present), _, (time_frame, _), samples = app.runs_view(tmp_path, "ppo1")
    assert "step 2 of 2" in progress and "value='100'" in progress
    drawn = frame.dropna()
    assert set(drawn["series"]) == {"reward", "kl"} and len(drawn) == 4
    assert present == ["reward", "kl"]  # the legend lists the series present
    assert set(frame["series"]) == set(app.PLOTTED)  # a fixed colour domain
    assert list(time_frame["value"].dropna()) == [2.0, 1.5]
    assert samples.iloc[0]["response"] == "Hello"


def test_run_view_of_a_missing_run_says_so(tmp_path):
    progress, (frame, present), log, _, samples = app.runs_view(tmp_path, "no-such-run")
    assert "No run named no-such-run" in progress and frame.empty and present == []
    assert log == "" and samples.empty
    assert app.runs_view(tmp_path, None)[0] == "Pick a run."


def test_a_failed_run_shows_why(tmp_path):
    write_run(tmp_path / "bad", {"state": "failed", "step": 0, "error": "data file x.jsonl does not "
                                 "exist: check the path."})
    progress = app.runs_view(tmp_path, "bad")[0]
    assert "Failed:" in progress and "x.jsonl does not exist" in progress
    assert app.runs_table(tmp_path).iloc[0]["state"] == "failed"


def test_ratings_overview_counts_votes_and_ranks_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path))
    prompt = [{"role": "user", "content": "Hi"}]
    for verdict in ("A", "A", "A", "B", "tie"):
        ratings.add_comparison(prompt, "Hello!", "Go away.", "runs/ppo1/ema", "runs/sft1/final", verdict)
    ratings.add_thumb(prompt, "Hello!", "runs/ppo1/ema", up=True)
    line, table, board = app.ratings_overview()
    assert line.startswith("6 votes: 3 A, 1 B, 1 tie, 0 both_bad, 1 up, 0 down; 4 exportable")
    assert len(table) == 6 and table.iloc[0]["verdict"] == "up"
    assert list(board["model"]) == ["runs/ppo1/ema", "runs/sft1/final"]
    assert board.iloc[0]["games"] == 5 and board.iloc[0]["wins"] == 3.5
