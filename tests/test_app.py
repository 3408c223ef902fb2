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
    assert "No run named" in progress and log == "" and samples.empty
    assert points["value"]["value"].isna().all() and points["colors_in_legend"] == []
    assert time_split["colors_in_legend"] == []
