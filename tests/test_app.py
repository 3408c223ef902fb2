"""The app's wiring: every tab builds, the Train form covers every option and turns into the
CLI command, and the Runs tab's views become plot updates."""
import dataclasses

import gradio as gr

import app
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
    assert form["zero_stage"].value == 0 and form["precision"].value == "bf16"
    assert form["learning_rate"].info == fields["learning_rate"].metadata["help"]


def test_form_values_become_the_exact_command():
    names = ["output", "data", "zero_stage", "offload", "batch_size"]
    cfg = app.form_config("sft", names, ("runs/x", ["prompts/sft.jsonl"], 2.0, True, 4))
    argv = app.launch.command("sft", cfg)
    assert argv[1:4] == ["-m", "train", "sft"]
    assert argv[4:] == ["--output", "runs/x", "--zero-stage", "2", "--offload", "--batch-size", "4"]


def test_more_than_one_process_goes_through_the_deepspeed_launcher():
    cfg = config.SFTConfig(output="runs/x", num_procs=2, zero_stage=3)
    argv = app.launch.command("sft", cfg)
    assert argv[1:6] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--module"]
    assert "--num-procs" in argv  # the ranks see the same config


def test_every_step_has_a_form_and_a_command():
    for step, cls in config.STEPS.items():
        if step == "eval-rm":
            continue
        with gr.Blocks():
            form = app.config_form(step)
        values = tuple(c.value for c in form.values())
        cfg = app.form_config(step, list(form), values)
        assert cfg == cls(**{"output": f"runs/{step}1"} if "output" in form else {})
        assert app.launch.command(step, cfg)[3] == step


def test_run_view_turns_points_into_plot_updates():
    progress, points, log, time_split, samples = app.run_view("no-such-run")
    assert "No run named" in progress and log == "" and samples["value"].empty
    assert points["value"]["value"].isna().all() and points["colors_in_legend"] == []
    assert time_split["colors_in_legend"] == []


def test_run_view_shows_the_ppo_views_only_for_a_ppo_run(tmp_path, monkeypatch):
    (tmp_path / "sft1").mkdir()
    (tmp_path / "sft1" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (tmp_path / "ppo1").mkdir()
    (tmp_path / "ppo1" / "metrics.jsonl").write_text(
        '{"step": 1, "reward": 0.5, "time_generate_s": 3.0, "time_score_s": 1.0, "time_train_s": 2.0}\n')
    monkeypatch.setattr(app, "RUNS", str(tmp_path))
    monkeypatch.setattr(app.launch, "list_runs", lambda root: [{"name": "sft1"}, {"name": "ppo1"}])
    monkeypatch.setattr(app.launch, "progress_html", lambda row: row["name"])
    *_, sft_time_split, sft_samples = app.run_view("sft1")
    *_, ppo_time_split, ppo_samples = app.run_view("ppo1")
    assert sft_time_split["visible"] is False and sft_samples["visible"] is False
    assert ppo_time_split["visible"] is True and ppo_samples["visible"] is True
    assert ppo_time_split["colors_in_legend"] == ["time_generate_s", "time_score_s", "time_train_s"]
