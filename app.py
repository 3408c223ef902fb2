"""RLHF Studio web app: layout and wiring only (one build_*_tab function per tab).

Training runs in subprocesses started through train/launch.py; the app only reads run folders.
Chat goes over HTTP to inference servers (`python -m serving`) that chat/server.py starts and
switches; the app never loads model weights. Votes go to the ratings store (chat/ratings.py).
Chat state lives per browser session in `gr.State`; the server pool is shared.
Run `python app.py` (port 7860; GRADIO_SERVER_PORT overrides; RLHF_RUNS_DIR moves the run
folders; RLHF_CHAT_ENGINE picks the serving engine, default auto).
"""
from __future__ import annotations

import dataclasses
import html
import json
import os
import shlex
import signal
import sys
import time
import typing
from pathlib import Path

import gradio as gr
import pandas as pd

from chat.client import ServerError
from chat.conversation import (ArenaSession, ChatSession, chat_checkpoints, new_sampling,
                               stream_answer, stream_round)
from chat.server import ServerPool
from core import leaderboard, ratings
from core.options import ConfigError, build
from core.paths import rlhf_home, runs_dir
from core.runs import RunInfo, list_runs, read_metrics
from train import config, data, launch

ROOT = Path(__file__).resolve().parent
RUNS = runs_dir()
VERDICTS = (("A is better", "A"), ("B is better", "B"), ("Tie", "tie"), ("Both are bad", "both_bad"))
ARENA_MODES = ("two samples of one checkpoint", "two checkpoints")


def shown_path(path: Path) -> str:
    """A path relative to the project where it lies inside it (as commands are written)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def field_component(step: str, f: dataclasses.Field, kind, default):
    label, info, elem_id = f.name, f.metadata["help"], f"{step}-{f.name}"
    if f.name == "output":
        return gr.Textbox(value=default or shown_path(RUNS / f"{step}1"), label=label, info=info,
                          elem_id=elem_id)
    if kind == list[str]:  # data sources: pick built-in files or type any path or dataset name
        return gr.Dropdown(data.known_sources(ROOT), value=default, multiselect=True,
                           allow_custom_value=True, label=label, info=info, elem_id=elem_id)
    if "choices" in f.metadata:
        return gr.Dropdown(list(f.metadata["choices"]), value=default, label=label, info=info,
                           elem_id=elem_id)
    if kind is bool:
        return gr.Checkbox(value=default, label=label, info=info, elem_id=elem_id)
    if kind in (int, float):
        return gr.Number(value=default, label=label, info=info, precision=0 if kind is int else None,
                         elem_id=elem_id)
    return gr.Textbox(value=default, label=label, info=info, elem_id=elem_id)


def config_form(step: str) -> dict[str, gr.components.Component]:
    """One input per option of the step, with the option's default and help text."""
    cls = config.STAGES[step]
    types = typing.get_type_hints(cls)
    components = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        components[f.name] = field_component(step, f, types[f.name], default)
    return components


def form_config(step: str, names: list[str], values: tuple):
    """The config the form describes; bad values raise ConfigError naming the field."""
    return build(config.STAGES[step], dict(zip(names, values)))


def build_train_tab(step: str = "sft") -> dict[str, gr.components.Component]:
    cls = config.STAGES[step]
    gr.Markdown(f"### {cls.__doc__.splitlines()[0]}\nFill the form, check the command, start. "
                "The run appears in the Runs tab.")
    with gr.Row():
        show = gr.Button("Show command")
        preview = gr.Button("Preview data")
        start = gr.Button("Start", variant="primary", elem_id=f"{step}-start")
    message = gr.Markdown(elem_id=f"{step}-message")
    command_box = gr.Code(label="command", language="shell", interactive=False)
    with gr.Accordion("options", open=True):
        form = config_form(step)
    names, inputs = list(form), list(form.values())

    def on_show(*values):
        try:
            return shlex.join(launch.command(step, form_config(step, names, values))), ""
        except ConfigError as err:
            return "", f"**Cannot build the command:** {err}"

    def on_start(*values):
        try:
            cfg = form_config(step, names, values)
            launch.start(step, cfg)
            return shlex.join(launch.command(step, cfg)), f"Started **{cfg.output}**: see the Runs tab."
        except ConfigError as err:
            return "", f"**Not started:** {err}"

    def on_preview(*values):
        chosen = dict(zip(names, values))
        try:
            weights = config.parse_split(chosen["data_split"]) if chosen.get("data_split") else None
            return data.preview(chosen.get("data") or [], weights, chosen.get("seed"))
        except (config.ConfigError, data.DataError) as err:
            return f"**Cannot read the data:** {err}"

    show.click(on_show, inputs, [command_box, message])
    start.click(on_start, inputs, [command_box, message])
    preview.click(on_preview, inputs, message)
    return form


# ---- the Runs tab's views of a run folder ----------------------------------------------------

PLOTTED = ("loss", "eval_loss", "accuracy", "eval_accuracy", "reward", "eval_reward", "kl",
           "value_loss", "response_length")
TIME_SPLIT = ("time_generate_s", "time_score_s", "time_train_s", "time_switch_s")


def run_row(run: RunInfo) -> dict:
    """What the runs table and the progress bar show of one run."""
    status = run.status
    return {"name": run.name, "stage": run.stage or "?", "state": run.state,
            "step": status.get("step", 0) or 0, "total_steps": status.get("total_steps") or 0,
            "eta_s": status.get("eta_s"), "error": run.error}


def runs_table(root: str | Path) -> pd.DataFrame:
    """One row per run under `root`: name, stage, state, progress (step/total), ETA and error."""
    rows = [run_row(run) for run in list_runs(root)]
    for row in rows:
        total = row["total_steps"]
        row["progress"] = f"{row['step']}/{total}" if total else "-"
        row["eta"] = f"{row['eta_s']:.0f} s" if row["state"] == "running" and row["eta_s"] else ""
    columns = ["name", "stage", "state", "progress", "eta", "error"]
    return pd.DataFrame(rows, columns=columns)


def progress_html(row: dict) -> str:
    """A run's state, step of total, ETA and failure reason over a progress bar (HTML)."""
    total, step = row["total_steps"], row["step"]
    share = 100 if row["state"] == "done" else (100 * step / total if total else 0)
    eta = f", about {row['eta_s']:.0f} s left" if row["state"] == "running" and row["eta_s"] else ""
    failed = f"<p><b>Failed:</b> {html.escape(row['error'])}</p>" if row["error"] else ""
    return (f"<div><b>{html.escape(row['name'])}</b>: {row['state']}, step {step} of "
            f"{total or '?'}{eta}</div>"
            f"<progress max='100' value='{share:.0f}' style='width:100%'></progress>{failed}")


PLOTTED = ("loss", "eval_loss", "accuracy", "eval_accuracy", "reward", "eval_reward", "kl",
           "value_loss", "response_length")
TIME_SPLIT = ("time_generate_s", "time_score_s", "time_train_s", "time_switch_s")


def metric_points(folder: Path | None, keys) -> tuple[pd.DataFrame, list[str]]:
    """(step, value, series) rows of a line plot, typed even when empty, and the series present.
    A plot fixes its colour domain from the first data it draws, so every absent key gets a NaN
    row (not drawn); the legend should list only the series present."""
    metrics = read_metrics(folder) if folder else []
    points = [{"step": m["step"], "value": m[key], "series": key}
              for m in metrics for key in keys if key in m]
    present = [key for key in keys if any(key in m for m in metrics)]
    points += [{"step": 0, "value": float("nan"), "series": key} for key in keys if key not in present]
    frame = pd.DataFrame(points, columns=["step", "value", "series"])
    return frame.astype({"step": float, "value": float, "series": str}), present


def ppo_samples(folder: Path | None, count: int = 8) -> pd.DataFrame:
    """The latest PPO rollouts of a run (samples.jsonl), newest last."""
    rows = []
    for line in launch.tail(folder / "samples.jsonl", count).splitlines() if folder else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by the tail's window or being written
            continue
    return pd.DataFrame(rows, columns=["step", "reward", "prompt", "response"])


def runs_view(root: str | Path, name: str | None):
    """(progress HTML, metric points, log tail, time-split points, PPO samples) of one run;
    points as metric_points returns them."""
    empty = metric_points(None, ())
    run = RunInfo.load(Path(root) / name) if name else None
    if run is None:
        message = f"No run named {name}." if name else "Pick a run."
        return message, empty, "", empty, ppo_samples(None)
    log = launch.tail(run.path / "train.log") or launch.tail(run.path / "console.log")
    return (progress_html(run_row(run)), metric_points(run.path, PLOTTED), log,
            metric_points(run.path, TIME_SPLIT), ppo_samples(run.path))


def plot_update(points: tuple[pd.DataFrame, list[str]], visible: bool = True) -> dict:
    """A line plot's update from launch.metric_points: its rows, and a legend of the series present."""
    frame, present = points
    return gr.update(value=frame, colors_in_legend=present, visible=visible)


def run_view(name: str | None):
    """The Runs tab's outputs for one run: progress, metrics plot, log, time-split plot, samples.
    The two PPO views are shown only for a run that has PPO steps."""
    progress, metrics, log, time_split, samples = runs_view(RUNS, name)
    ppo = bool(time_split[1])
    return (progress, plot_update(metrics), log, plot_update(time_split, visible=ppo),
            gr.update(value=samples, visible=ppo))


def build_runs_tab():
    table = gr.Dataframe(runs_table(RUNS), label="runs", interactive=False)
    with gr.Row():
        pick = gr.Dropdown([r.name for r in list_runs(RUNS)], label="run", scale=3,
                           elem_id="runs-pick")
        stop = gr.Button("Stop", scale=1)
        resume = gr.Button("Resume", scale=1)
    progress = gr.HTML(elem_id="runs-progress")
    note = gr.Markdown()
    with gr.Row():
        plot = gr.LinePlot(x="step", y="value", color="series", label="metrics", elem_id="runs-plot")
        time_plot = gr.LinePlot(x="step", y="value", color="series", label="PPO time split (s)")
    samples = gr.Dataframe(label="PPO samples (latest)", interactive=False, wrap=True)
    log = gr.Textbox(label="train.log (tail)", lines=12, max_lines=12, autoscroll=True)
    outputs = [progress, plot, log, time_plot, samples]

    def refresh(name):
        names = [r.name for r in list_runs(RUNS)]
        return (runs_table(RUNS), gr.update(choices=names), *run_view(name))

    def on_stop(name):
        if name and launch.stop(RUNS / name):
            return f"Asked **{name}** to stop: it saves a checkpoint first (resume with Resume)."
        return "Nothing to stop."

    def on_resume(name):
        if not name:
            return "Pick a run to resume."
        try:
            launch.resume(RUNS / name)
        except ConfigError as err:
            return f"**Not resumed:** {err}"
        return f"Resuming **{name}** from its last checkpoint."

    gr.Timer(2.0).tick(refresh, pick, [table, pick, *outputs])
    pick.change(run_view, pick, outputs)
    stop.click(on_stop, pick, note)
    resume.click(on_resume, pick, note)


def sampling_controls(prefix: str):
    """System prompt and sampling sliders: (system, temperature, top_p, max_tokens)."""
    system_file = ROOT / "prompts" / "system.txt"
    system = gr.Textbox(system_file.read_text().strip() if system_file.is_file() else "",
                        label="system prompt", lines=2, elem_id=f"{prefix}-system")
    with gr.Accordion("sampling", open=False):
        with gr.Row():
            temperature = gr.Slider(0.0, 2.0, 0.7, step=0.05, label="temperature")
            top_p = gr.Slider(0.05, 1.0, 0.9, step=0.05, label="top_p")
            max_tokens = gr.Slider(1, 1024, 128, step=1, label="max_tokens",
                                   elem_id=f"{prefix}-max-tokens")
    return system, temperature, top_p, max_tokens


def checkpoint_dropdown(label: str, elem_id: str) -> gr.Dropdown:
    return gr.Dropdown(chat_checkpoints(RUNS, ROOT), value="default", label=label,
                       allow_custom_value=True, elem_id=elem_id)


def save_thumb(chat: ChatSession, like: gr.LikeData, request: gr.Request) -> str:
    """A thumbs up or down on one answer goes to the ratings store with its provenance."""
    index = like.index[0] if isinstance(like.index, (list, tuple)) else like.index
    rated = chat.rated(int(index))
    if rated is None or like.liked not in (True, False):
        return "Only answers can be rated."
    try:
        ratings.add_thumb(rated["conversation"], rated["answer"], rated["model"], like.liked,
                          rated["sampling"], session=request.session_hash or "")
    except ratings.RatingsError as err:
        return f"**Thumb not saved:** {err}"
    return f"Saved thumbs {'up' if like.liked else 'down'} for the answer of **{rated['model']}**."


def build_chat_tab(pool: ServerPool):
    session = gr.State(ChatSession())
    with gr.Row():
        model = checkpoint_dropdown("checkpoint: the base model or a finished run's final/ or ema/",
                                    "chat-model")
        refresh = gr.Button("Refresh list", scale=0)
        load = gr.Button("Load", scale=0, elem_id="chat-load")
    system, temperature, top_p, max_tokens = sampling_controls("chat")
    chatbot = gr.Chatbot(label="chat", height=420, elem_id="chat-bot")
    with gr.Row():
        text = gr.Textbox(placeholder="Message (Enter sends)", show_label=False, scale=5,
                          elem_id="chat-input")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
    with gr.Row():
        regenerate = gr.Button("Regenerate")
        clear = gr.Button("Clear")
    note = gr.Markdown(elem_id="chat-note")
    settings = [model, system, temperature, top_p, max_tokens]

    def answer(chat: ChatSession, model, system, temperature, top_p, max_tokens):
        sampling = new_sampling(temperature, top_p, max_tokens)
        try:
            for _ in stream_answer(pool, chat, model, sampling, system):
                yield chat, chat.history(), ""
        except ServerError as err:
            yield chat, chat.history(), f"**No answer:** {err}"
            return
        yield chat, chat.history(), f"Answered by **{model}** (seed {sampling['seed']})."

    def on_send(message, chat, *values):
        if not message.strip():
            yield chat, chat.history(), "Type a message first.", message
            return
        chat.ask(message)
        for state, history, status in answer(chat, *values):
            yield state, history, status, ""

    def on_regenerate(chat, *values):
        if not chat.drop_last_answer() and not chat.last_user_text():
            yield chat, chat.history(), "Nothing to regenerate yet."
            return
        yield from answer(chat, *values)

    def on_load(model):
        try:
            with pool.lease(model) as client:
                health = client.health()
            return f"Serving **{health.get('model', model)}** (engine {health.get('engine', '?')})."
        except ServerError as err:
            return f"**Cannot serve {model}:** {err}"

    send_outputs = [session, chatbot, note, text]
    send.click(on_send, [text, session, *settings], send_outputs)
    text.submit(on_send, [text, session, *settings], send_outputs)
    regenerate.click(on_regenerate, [session, *settings], [session, chatbot, note])
    clear.click(lambda: (ChatSession(), [], ""), None, [session, chatbot, note])
    refresh.click(lambda: gr.update(choices=chat_checkpoints(RUNS, ROOT)), None, model)
    load.click(on_load, model, note)
    chatbot.like(save_thumb, session, note)
    chatbot.clear(lambda: (ChatSession(), ""), None, [session, note])


def build_compare_tab(pool: ServerPool):
    session = gr.State(ArenaSession())
    mode = gr.Radio(list(ARENA_MODES), value=ARENA_MODES[0], label="compare",
                    elem_id="compare-mode")
    with gr.Row():
        first = checkpoint_dropdown("checkpoint", "compare-model-1")
        second = checkpoint_dropdown("second checkpoint (two checkpoints)", "compare-model-2")
    system, temperature, top_p, max_tokens = sampling_controls("compare")
    with gr.Row():
        bot_a, bot_b = (gr.Chatbot(label=side, height=360, elem_id=f"compare-{side.lower()}",
                                   feedback_options=None, buttons=["copy"]) for side in "AB")
    with gr.Row():
        text = gr.Textbox(placeholder="Message for both", show_label=False, scale=5,
                          elem_id="compare-input")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="compare-send")
    with gr.Row():
        votes = [gr.Button(label, elem_id=f"vote-{verdict}") for label, verdict in VERDICTS]
    clear = gr.Button("New conversation")
    note = gr.Markdown(elem_id="compare-note")

    def on_send(message, arena: ArenaSession, mode, first, second, system, temperature, top_p,
                max_tokens):
        if arena.waiting_for_vote() or not message.strip():
            reason = "Vote on this round first." if message.strip() else "Type a message first."
            yield arena, *arena.views(), reason, message
            return
        models = (first, first) if mode == ARENA_MODES[0] else (first, second)
        arena.start_round(message, models, new_sampling(temperature, top_p, max_tokens), system)
        try:
            for side in stream_round(pool, arena):
                yield arena, *arena.views(), f"Answering {side}...", ""
        except ServerError as err:
            yield arena, *arena.views(), f"**No answer:** {err}", message
            return
        yield arena, *arena.views(), "Which answer is better? The names show after the vote.", ""

    def on_vote(verdict, arena: ArenaSession, request: gr.Request):
        if not arena.waiting_for_vote():
            return arena, *arena.views(), "Nothing to vote on: send a message first."
        comparison = arena.vote(verdict)
        try:
            ratings.add_comparison(**comparison, session=request.session_hash or "")
        except ratings.RatingsError as err:
            arena.undo_vote()
            return arena, *arena.views(), f"**Vote not saved:** {err}"
        return arena, *arena.views(), f"Vote saved ({verdict}). {arena.reveal()}"

    inputs = [text, session, mode, first, second, system, temperature, top_p, max_tokens]
    outputs = [session, bot_a, bot_b, note]
    send.click(on_send, inputs, outputs + [text])
    text.submit(on_send, inputs, outputs + [text])
    for button, (_, verdict) in zip(votes, VERDICTS):
        button.click(_voter(on_vote, verdict), session, outputs)
    for reset in (clear.click, bot_a.clear, bot_b.clear):
        reset(lambda: (ArenaSession(), [], [], ""), None, outputs)


def _voter(on_vote, verdict: str):
    """The click handler of one vote button (a closure per verdict)."""
    def vote(arena: ArenaSession, request: gr.Request):
        return on_vote(verdict, arena, request)
    return vote


def ratings_overview(path=None, latest: int = 500):
    """What the app's Ratings tab shows: (a line counting votes by verdict, a table of the latest
    votes, the leaderboard table of core/leaderboard.py); the tables are pandas DataFrames."""
    stored = ratings.rows(path)
    tally = ratings.counts(path)
    line = (f"{tally['total']} votes: "
            + ", ".join(f"{tally[v]} {v}" for v in ratings.COMPARISON_VERDICTS + ratings.THUMB_VERDICTS)
            + f"; {tally['exportable']} exportable preference pairs.")
    columns = ["id", "time", "verdict", "model A", "model B", "last user turn", "answer A", "answer B"]
    table = pd.DataFrame([(r["id"], time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"])),
                           r["verdict"], r["model_a"], r["model_b"] or "",
                           r["conversation"][-1]["content"][:120], r["answer_a"][:200],
                           (r["answer_b"] or "")[:200]) for r in stored[:latest]], columns=columns)
    board = pd.DataFrame(leaderboard.leaderboard(leaderboard.votes_from_ratings(stored)),
                         columns=["model", "strength", "ci_low", "ci_high", "games", "wins"])
    return line, table, board.round(3)


def safe_ratings_view():
    try:
        return ratings_overview()
    except ratings.RatingsError as err:
        return f"**Cannot read the ratings store:** {err}", None, None


def build_ratings_tab(rm_form: dict, tabs: gr.Tabs, train_tabs: gr.Tabs, ratings_tab: gr.Tab):
    counts = gr.Markdown(elem_id="ratings-counts")
    with gr.Row():
        refresh = gr.Button("Refresh")
        export = gr.Button("Export preference records", elem_id="ratings-export")
        train_rm = gr.Button("Train a reward model on these", variant="primary")
    exported = gr.File(label="exported preference records (JSONL)", elem_id="ratings-file")
    note = gr.Markdown(elem_id="ratings-note")
    gr.Markdown("### Leaderboard\nBradley-Terry strengths (log odds, centred) from A/B votes "
                "between different checkpoints; ties and both-bad votes count half a win each; 95% "
                "bootstrap intervals.")
    board = gr.Dataframe(label="leaderboard", interactive=False, elem_id="ratings-board")
    table = gr.Dataframe(label="votes (newest first)", interactive=False, wrap=True)

    def on_export():
        out = rlhf_home() / "exports" / f"preferences-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        try:
            written = ratings.export(out)
        except ratings.RatingsError as err:
            return None, f"**Not exported:** {err}"
        return str(out), f"Wrote {written} preference records to `{out}` (ties, both-bad votes " \
                         "and thumbs without an opposite thumb on the same turn are left out)."

    def on_train_rm(current_data):
        base = [d for d in current_data or [] if d != "ratings:"] or ["prompts/preferences.jsonl"]
        return (gr.update(value=["ratings:", *base]), gr.update(value=shown_path(RUNS / "rm-ratings")),
                gr.Tabs(selected="train"), gr.Tabs(selected="train-rm"),
                "The reward-model form now reads `ratings:` plus a base data set: check it and Start.")

    refresh.click(safe_ratings_view, None, [counts, table, board])
    ratings_tab.select(safe_ratings_view, None, [counts, table, board])
    export.click(on_export, None, [exported, note])
    train_rm.click(on_train_rm, rm_form["data"],
                   [rm_form["data"], rm_form["output"], tabs, train_tabs, note])


def build_app(pool: ServerPool | None = None) -> gr.Blocks:
    pool = pool or ServerPool(engine=os.environ.get("RLHF_CHAT_ENGINE", "auto"))
    with gr.Blocks(title="RLHF Studio") as app:
        gr.Markdown("# RLHF Studio\nSFT, reward model and PPO through DeepSpeed, on the built-in "
                    "SmolLM2-135M-Instruct or any chat model; chat with the result and rate it.")
        with gr.Tabs() as tabs:
            with gr.Tab("Train", id="train"):
                forms = {}
                with gr.Tabs() as train_tabs:
                    for step, title in (("sft", "SFT"), ("rm", "Reward model"), ("ppo", "PPO"),
                                        ("all", "All three")):
                        with gr.Tab(title, id=f"train-{step}"):
                            forms[step] = build_train_tab(step)
            with gr.Tab("Runs", id="runs"):
                build_runs_tab()
            with gr.Tab("Chat", id="chat"):
                build_chat_tab(pool)
            with gr.Tab("Compare", id="compare"):
                build_compare_tab(pool)
            with gr.Tab("Ratings", id="ratings") as ratings_tab:
                build_ratings_tab(forms["rm"], tabs, train_tabs, ratings_tab)
    app.pool = pool
    return app


def main() -> None:
    port = int(os.environ.get("GRADIO_SERVER_PORT", 7860))
    app = build_app()
    # SIGTERM ends the app like Ctrl-C does, so the inference servers it started stop with it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        app.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), server_port=port)
    except OSError as err:
        raise SystemExit(f"error: cannot serve on port {port} ({err}): stop what uses it or set "
                         "GRADIO_SERVER_PORT to a free port.") from None
    finally:
        app.pool.stop_all()


if __name__ == "__main__":
    main()
