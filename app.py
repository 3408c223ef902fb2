"""RLHF Studio web app: layout and wiring only (one build_*_tab function per tab).

Training runs in subprocesses started through train/launch.py; the app only reads run folders.
Run `python app.py` (port 7860; GRADIO_SERVER_PORT overrides).
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import typing
from pathlib import Path

import gradio as gr
import pandas as pd

from train import config, launch
from train.rundir import read_metrics

ROOT = Path(__file__).resolve().parent
RUNS = ROOT / "runs"
PLOTTED = ("loss", "eval_loss", "accuracy", "eval_accuracy", "reward", "eval_reward", "kl")


def data_choices() -> list[str]:
    """Built-in sample sets and, where present, the shared real data sets."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "prompts").glob("*.jsonl"))
    shared = ROOT.parent / "shared" / "data"
    files += sorted(os.path.relpath(p, ROOT) for p in shared.glob("*.json*")) if shared.is_dir() else []
    return files + ["ratings:"]


def field_component(step: str, f: dataclasses.Field, kind, default):
    label, info = f.name, f.metadata["help"]
    if f.name == "output":
        return gr.Textbox(value=default or f"runs/{step}1", label=label, info=info)
    if kind == list[str]:  # data sources: pick built-in files or type any path or dataset name
        return gr.Dropdown(data_choices(), value=default, multiselect=True, allow_custom_value=True,
                           label=label, info=info)
    if "choices" in f.metadata:
        return gr.Dropdown(list(f.metadata["choices"]), value=default, label=label, info=info)
    if kind is bool:
        return gr.Checkbox(value=default, label=label, info=info)
    if kind in (int, float):
        return gr.Number(value=default, label=label, info=info, precision=0 if kind is int else None)
    return gr.Textbox(value=default, label=label, info=info)


def config_form(step: str) -> dict[str, gr.components.Component]:
    """One input per option of the step, with the option's default and help text."""
    cls = config.STEPS[step]
    types = typing.get_type_hints(cls)
    components = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        components[f.name] = field_component(step, f, types[f.name], default)
    return components


def form_config(step: str, names: list[str], values: tuple):
    """The config the form describes; bad values raise ConfigError naming the field."""
    return config.build(config.STEPS[step], dict(zip(names, values)))


def build_train_tab(step: str = "sft"):
    cls = config.STEPS[step]
    gr.Markdown(f"### {cls.__doc__.splitlines()[0]}\nFill the form, check the command, start. "
                "The run appears in the Runs tab.")
    with gr.Row():
        show = gr.Button("Show command")
        start = gr.Button("Start", variant="primary")
    message = gr.Markdown()
    command_box = gr.Code(label="command", language="shell", interactive=False)
    with gr.Accordion("options", open=True):
        form = config_form(step)
    names, inputs = list(form), list(form.values())

    def on_show(*values):
        try:
            return shlex.join(launch.command(step, form_config(step, names, values))), ""
        except config.ConfigError as err:
            return "", f"**Cannot build the command:** {err}"

    def on_start(*values):
        try:
            cfg = form_config(step, names, values)
            launch.start(step, cfg)
            return shlex.join(launch.command(step, cfg)), f"Started **{cfg.output}**: see the Runs tab."
        except config.ConfigError as err:
            return "", f"**Not started:** {err}"

    show.click(on_show, inputs, [command_box, message])
    start.click(on_start, inputs, [command_box, message])


def runs_table() -> pd.DataFrame:
    rows = launch.list_runs(RUNS)
    for row in rows:
        total = row["total_steps"] or 0
        row["progress"] = f"{row['step']}/{total}" if total else "-"
        row["eta"] = f"{row['eta_s']:.0f} s" if row["state"] == "running" and row["eta_s"] else ""
    columns = ["name", "state", "progress", "eta", "error"]
    return pd.DataFrame(rows, columns=columns + ["path"])[columns]


def run_view(name: str | None):
    """Progress line, loss plot data and log tail of one run."""
    if not name:
        return "Pick a run.", pd.DataFrame({"step": [], "value": [], "series": []}), ""
    folder = RUNS / name
    row = next((r for r in launch.list_runs(RUNS) if r["name"] == name), None)
    if row is None:
        return f"No run named {name}.", pd.DataFrame({"step": [], "value": [], "series": []}), ""
    total = row["total_steps"] or "?"
    eta = f", about {row['eta_s']:.0f} s left" if row["state"] == "running" and row["eta_s"] else ""
    progress = f"**{name}**: {row['state']}, step {row['step']} of {total}{eta}."
    if row["error"]:
        progress += f"\n\n**Failed:** {row['error']}"
    points = [{"step": m["step"], "value": m[key], "series": key}
              for m in read_metrics(folder) for key in PLOTTED if key in m]
    log = launch.tail(folder / "train.log") or launch.tail(folder / "console.log")
    return progress, pd.DataFrame(points, columns=["step", "value", "series"]), log


def build_runs_tab():
    table = gr.Dataframe(runs_table(), label="runs", interactive=False)
    with gr.Row():
        pick = gr.Dropdown([r["name"] for r in launch.list_runs(RUNS)], label="run", scale=3)
        stop = gr.Button("Stop", scale=1)
    progress = gr.Markdown()
    plot = gr.LinePlot(x="step", y="value", color="series", label="loss", height=300)
    log = gr.Textbox(label="train.log (tail)", lines=12, max_lines=12, autoscroll=True)

    def refresh(name):
        names = [r["name"] for r in launch.list_runs(RUNS)]
        return (runs_table(), gr.update(choices=names), *run_view(name))

    def on_stop(name):
        if name and launch.stop(RUNS / name):
            return f"Asked **{name}** to stop: it saves a checkpoint first (resume with --resume)."
        return "Nothing to stop."

    gr.Timer(2.0).tick(refresh, pick, [table, pick, progress, plot, log])
    pick.change(run_view, pick, [progress, plot, log])
    stop.click(on_stop, pick, progress)


def build_app() -> gr.Blocks:
    with gr.Blocks(title="RLHF Studio") as app:
        gr.Markdown("# RLHF Studio\nSFT, reward model and PPO through DeepSpeed, on the built-in "
                    "SmolLM2-135M-Instruct or any chat model.")
        with gr.Tab("Train"):
            for step, title in (("sft", "SFT"), ("rm", "Reward model"), ("ppo", "PPO"),
                                ("all", "All three")):
                with gr.Tab(title):
                    build_train_tab(step)
        with gr.Tab("Runs"):
            build_runs_tab()
    return app


def main() -> None:
    port = int(os.environ.get("GRADIO_SERVER_PORT", 7860))
    try:
        build_app().launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                           server_port=port)
    except OSError as err:
        raise SystemExit(f"error: cannot serve on port {port} ({err}): stop what uses it or set "
                         "GRADIO_SERVER_PORT to a free port.") from None


if __name__ == "__main__":
    main()
