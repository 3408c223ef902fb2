"""RLHF Studio web app: layout, wiring and UI formatting, one section per tab.

Sections: shared helpers (console lines, labels, pickers), Train (forms generated from the option
definitions and groups of train/config.py), Runs, Chat, Compare, Rounds (a section of the Compare
tab: sample pairs from a checkpoint through chat/rounds.py, vote on them, train DPO on the votes,
swap the result into Chat and Compare), Ratings (with the rounds side by side), then the app
itself. A further tab (a report) is one more section and one more `with gr.Tab`.

Training runs in subprocesses started and queued through train/launch.py (train/plan.py checks
a form before it starts); the app only reads run folders. Every run the app starts lives in the
runs folder (core.paths.runs_dir(): RLHF_RUNS_DIR, else $RLHF_HOME/runs) under a plain name,
and reads data only from `data_roots()`: the built-in prompts/, ../shared/data, the runs folder,
$RLHF_HOME/data and $RLHF_HOME/exports (plus `ratings:` and Hugging Face dataset names).
Chat goes over HTTP to inference servers (`python -m serving`) that chat/server.py starts and
switches; the app never loads model weights. Votes go to the ratings store (core/ratings.py).
Chat state lives per browser session in `gr.State`; the server pool is shared.
Run `python app.py` (port 7860; GRADIO_SERVER_PORT overrides; RLHF_CHAT_ENGINE picks the
serving engine, default auto). What the app does (runs started, finished or failed, servers
started) is printed on its console.
"""
from __future__ import annotations

import dataclasses
import functools
import html
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path
from queue import SimpleQueue

import gradio as gr
import pandas as pd

from chat import rounds
from chat.client import ServerError
from chat.conversation import (ArenaSession, ChatSession, chat_checkpoints, new_sampling,
                               stream_answer, stream_round)
from chat.server import ServerPool
from core import leaderboard, ratings
from core.hardware import PRECISIONS
from core.models import DEFAULT_NAME
from core.options import ConfigError, build, flag_name
from core.paths import models_dir, rlhf_home, runs_dir
from core.runs import LIVE_STATES, RunInfo, list_runs, read_json, read_metrics
from train import config, data, launch, plan
from train import report as run_report
from train.rundir import refuse_links

ROOT = Path(__file__).resolve().parent
RUNS = runs_dir()
TRAIN_TABS = {"sft": "SFT", "rm": "Reward model", "ppo": "PPO", "dpo": "DPO", "all": "All three"}
VERDICTS = (("A is better", "A"), ("B is better", "B"), ("Tie", "tie"), ("Both are bad", "both_bad"))
ARENA_MODES = ("two samples of one checkpoint", "two checkpoints")
CSS = """
.field-error .info, .field-error [data-testid='block-info'] + div, .field-error span.info { color: #b91c1c !important; }
.field-error { border: 1px solid #dc2626 !important; border-radius: 6px; }
.metric-grid { display: flex; flex-wrap: wrap; gap: 8px; }
.metric-grid > div { border: 1px solid #e5e7eb; border-radius: 6px; padding: 2px; }
.samples > div { border-bottom: 1px solid #e5e7eb; padding: 4px 0; }
"""


def say(message: str) -> None:
    """One line on the app's console: what the app did."""
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def data_roots() -> list[Path]:
    """The folders whose files the app's runs (and its data preview) may read."""
    return [ROOT / "prompts", ROOT.parent / "shared" / "data", RUNS, rlhf_home() / "data",
            rlhf_home() / "exports"]


def shown_path(path: str | Path) -> str:
    """A model or run path as the app names it: relative to the runs folder, the models folder
    or the project (`default` stays `default`)."""
    if str(path) in ("default", ""):
        return str(path)
    full = Path(os.path.abspath(path if Path(path).is_absolute() else ROOT / path))
    for root in (RUNS, models_dir(), ROOT):  # as named: a model folder may be a link
        root = Path(os.path.abspath(root))
        if full.is_relative_to(root):
            return str(full.relative_to(root))
    return str(path)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return "under a minute"
    minutes = round(seconds / 60)
    return f"about {minutes} min" if minutes < 60 else f"about {minutes // 60} h {minutes % 60:02d} min"


def fmt_num(value: float) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return str(value)
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


# ---- pickers: what exists to choose from ----------------------------------------------------------

def model_choices(kind: str) -> list[tuple[str, str]]:
    """(label, value) pairs of models to pick: `chat` (the built-in model, models in the models
    folder, finished SFT/PPO runs' final/ and ema/), `reward` (finished reward-model runs),
    `any` (both), `critic` (reward models, or empty for "the reward model")."""
    chat = [("default (built-in SmolLM2-135M-Instruct)", "default")]
    folder = models_dir()
    if folder.is_dir():
        chat += [(f"{p.name} (models folder)", str(p)) for p in sorted(folder.iterdir())
                 if p.name != DEFAULT_NAME and (p / "config.json").is_file()]
    chat += [(f"{shown_path(p)} (finished run)", p) for p in chat_checkpoints(RUNS, ROOT)[1:]]
    reward = [(f"{shown_path(p)} (reward model)", p)
              for p in chat_checkpoints(RUNS, ROOT, stages=("rm",))]
    return {"chat": chat, "reward": reward, "any": chat + reward,
            "critic": [("the reward model", "")] + reward}[kind]


def picker_kind(stage: str, name: str) -> str | None:
    if name in plan.REWARD_FIELDS:
        return "critic" if name in plan.OPTIONAL else "reward"
    if name in plan.CHAT_FIELDS:
        return "any" if stage == "rm" or name == "reward_model" else "chat"
    return None


def data_choices() -> list[str]:
    """Data sources to pick: built-in sets, ../shared/data, ratings:, files in $RLHF_HOME/data
    and the newest exports of the Ratings tab."""
    mine = sorted((rlhf_home() / "data").glob("*.json*")) if (rlhf_home() / "data").is_dir() else []
    exports = sorted((rlhf_home() / "exports").glob("*.jsonl"), reverse=True)[:5] \
        if (rlhf_home() / "exports").is_dir() else []
    return data.known_sources(ROOT) + [str(p) for p in mine + exports]


PRECISION_PROBE = """
import json
from core.hardware import HardwareError, resolve_precision
labels, errors = {}, {}
for asked in ("auto", "bf16", "fp16", "fp32"):
    try:
        p = resolve_precision(asked)
        labels[asked] = (f"auto ({p.name}: {p.reason})" if asked == "auto" else
                         f"{asked} (emulated on this CPU: slower than fp32)" if p.warning else asked)
    except HardwareError as err:
        labels[asked], errors[asked] = f"{asked} (not on this machine)", str(err)
print(json.dumps({"labels": labels, "errors": errors}))
"""


@functools.lru_cache(maxsize=1)
def precision_answer() -> dict:
    """What each precision means on this machine, from core.hardware.resolve_precision, asked
    once in a subprocess (the app itself stays torch-free)."""
    try:
        done = subprocess.run([sys.executable, "-c", PRECISION_PROBE], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return {"labels": {}, "errors": {}}


def precision_choices(answer: dict | None = None) -> list[tuple[str, str]]:
    labels = (answer or {}).get("labels", {})
    return [(labels.get(p, p), p) for p in PRECISIONS]


def next_free_name(step: str) -> str:
    base = {"all": "pipeline"}.get(step, step)
    return next(f"{base}{n}" for n in range(1, 10_000) if not (RUNS / f"{base}{n}").exists())


# ---- Train tab: forms generated from the option definitions -------------------------------------

GROUPS = {"model": "Model", "data": "Data", "run": "Run", "main": "Main settings",
          "training": "Training", "lora": "LoRA", "deepspeed": "DeepSpeed", "rl": "RL (PPO)",
          "evaluation": "Evaluation and saving"}
OPEN_GROUPS = ("model", "data", "run", "main")
HIDDEN_FIELDS = ("overwrite", "resume")  # the Resume / Overwrite offer sets these
LABELS = {"output": "Run name", "actor": "Actor (the model PPO trains)", "reward": "Reward model",
          "critic": "Critic starts from", "data_split": "Data split (SFT, RM, PPO weights)",
          "ptx_data": "Pretraining-mix data", "ptx_coef": "Pretraining-mix weight",
          "lora_dim": "LoRA rank", "lora_alpha": "LoRA alpha", "lora_dropout": "LoRA dropout",
          "lora_targets": "LoRA targets", "zero_stage": "ZeRO stage", "kl_coef": "KL penalty",
          "kl_target": "KL target", "kl_horizon": "KL horizon", "adaptive_kl": "Adaptive KL",
          "top_p": "Top-p", "ema": "Keep an EMA of the actor", "ema_beta": "EMA decay",
          "max_seq_len": "Longest sequence (tokens)", "num_procs": "Processes",
          "lr_scheduler": "Learning-rate schedule", "ppo_epochs": "PPO epochs",
          "lam": "GAE lambda", "gamma": "GAE discount", "max_new_tokens": "Longest answer (tokens)",
          "max_prompt_len": "Longest prompt (tokens)", "rollout_batch_size": "Prompts per PPO step",
          "actor_model": "SFT base model", "reward_model": "Reward-model backbone",
          "sft_max_steps": "SFT steps", "rm_max_steps": "Reward-model steps",
          "ppo_max_steps": "PPO steps", "sft_config": "More SFT options (YAML file)",
          "rm_config": "More reward-model options (YAML file)",
          "ppo_config": "More PPO options (YAML file)", "cliprange": "Policy clip range",
          "cliprange_value": "Value clip range", "stats_samples": "Pairs for reward statistics",
          "num_epochs": "Epochs", "max_steps": "Steps (0: as many as the epochs make)"}
MAIN_ORDER = ("max_steps", "num_epochs", "sft_max_steps", "rm_max_steps", "ppo_max_steps",
              "batch_size", "learning_rate", "rollout_batch_size", "max_new_tokens", "kl_coef", "ema")


def label_of(name: str) -> str:
    return LABELS.get(name) or name.replace("_", " ").capitalize()


def group_of(cls, f: dataclasses.Field) -> str:
    """A field's form group: its own, else the one a base class gives the same option, else
    "other" (options added without a group still get a place)."""
    if f.metadata.get("group"):
        return f.metadata["group"]
    for base in cls.__mro__[1:]:
        inherited = getattr(base, "__dataclass_fields__", {}).get(f.name)
        if inherited is not None and inherited.metadata.get("group"):
            return inherited.metadata["group"]
    return "other"


def form_sections(cls) -> list[tuple[str, list[dataclasses.Field]]]:
    """(group, fields) in the form's order: known groups, then new ones, then "other"."""
    sections: dict[str, list] = {}
    for f in dataclasses.fields(cls):
        if f.name not in HIDDEN_FIELDS:
            sections.setdefault(group_of(cls, f), []).append(f)
    order = list(GROUPS) + sorted(set(sections) - set(GROUPS) - {"other"}) + ["other"]
    first = {name: index for index, name in enumerate(MAIN_ORDER)}
    sections.get("main", []).sort(key=lambda f: first.get(f.name, len(first)))
    return [(group, sections[group]) for group in order if group in sections]


@dataclasses.dataclass
class Form:
    """One step's form: option name -> input, with each input's help line (shown again when a
    problem marked on it is fixed)."""
    step: str
    fields: dict = dataclasses.field(default_factory=dict)
    infos: dict = dataclasses.field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.fields)

    @property
    def inputs(self) -> list:
        return list(self.fields.values())


def field_component(form: Form, f: dataclasses.Field, kind, default):
    step, name = form.step, f.name
    info = f"{f.metadata['help']} · {flag_name(name)}"
    if name == "output":
        info = f"a plain name: the run's folder in {RUNS} · {flag_name(name)}"
        default = next_free_name(step)
    common = {"label": label_of(name), "info": info, "elem_id": f"{step}-{name}"}
    picker = picker_kind(step, name)
    if picker:
        component = gr.Dropdown(model_choices(picker), value=default, allow_custom_value=True,
                                **common)
    elif kind == list[str]:  # data sources: pick what exists, or type a path or dataset name
        component = gr.Dropdown(data_choices(), value=default, multiselect=True,
                                allow_custom_value=True, **common)
    elif name == "precision":
        component = gr.Dropdown(precision_choices(), value=default, **common)
    elif "choices" in f.metadata:
        component = gr.Dropdown(list(f.metadata["choices"]), value=default, **common)
    elif kind is bool:
        component = gr.Checkbox(value=default, **common)
    elif kind in (int, float):  # no rounding here: 2.7 steps is refused, never made 3
        component = gr.Number(value=default, precision=None, step=1 if kind is int else 0.0001,
                              **common)
    else:
        component = gr.Textbox(value=default, **common)
    form.fields[name], form.infos[name] = component, info
    return component


def render_fields(form: Form, cls, fields: list, per_row: int) -> None:
    types = typing.get_type_hints(cls)
    for start in range(0, len(fields), per_row):
        with gr.Row():
            for f in fields[start:start + per_row]:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                field_component(form, f, types[f.name], default)


# an option's flag as a word of its own (--data-split, "pass --overwrite."), not text inside a
# value such as --output=/x, ratings:--x or '--x'
FLAG_IN_WORDS = re.compile(r"(?<![^\s(])--([a-z0-9]+(?:-[a-z0-9]+)*)(?=$|[\s,;:)]|\.(?!\w))")
OPTION_NAMES = {f.name for cls in config.STAGES.values() for f in dataclasses.fields(cls)}


def in_words(message: str, field: str | None = None) -> str:
    """A ConfigError in the form's words: option labels instead of flags, no type names; the
    field the message sits beside is not named again."""
    if field and message.startswith(flag_name(field) + " "):
        message = message[len(flag_name(field)) + 1:]
    message = FLAG_IN_WORDS.sub(lambda m: label_of(m.group(1).replace("-", "_"))
                                if m.group(1).replace("-", "_") in OPTION_NAMES else m.group(0), message)
    message = message.replace("a valid int.", "a whole number.").replace("a valid float.", "a number.")
    # a sentence, not a value it starts with (ratings:--x, prompts/a.jsonl), gets its capital
    return message[:1].upper() + message[1:] if re.match(r"[a-z]+[,;:.]?(\s|$)", message) else message


def field_of(message: str, names) -> str | None:
    """The option a CLI message names first (`--data-split ...` -> data_split)."""
    for flag in re.findall(r"--([a-z0-9-]+)", message):
        if flag.replace("-", "_") in names:
            return flag.replace("-", "_")
    return None


def form_config(step: str, names: list[str], values: tuple):
    """The config the form describes: the run name becomes its folder in the runs folder.
    Raises ConfigError (a bad name, a value out of range ...)."""
    chosen = dict(zip(names, values))
    if "output" in chosen:
        chosen["output"] = str(launch.run_folder(chosen["output"], RUNS))
    return build(config.STAGES[step], chosen)


def check_form(step: str, names: list[str], values: tuple) -> tuple[object | None, dict[str, str]]:
    """(config or None, option -> problem in words): each value alone through the CLI's own
    checks (type, range, choices), then the whole config, then what would fail at once
    (train/plan.py: models, data, option files) and a precision this machine cannot run."""
    cls, chosen, errors = config.STAGES[step], dict(zip(names, values)), {}
    for name, value in chosen.items():
        try:
            if name == "output":
                launch.run_folder(value, RUNS)
            else:
                build(cls, {name: value})
        except ConfigError as err:
            errors[name] = in_words(str(err), name)
    if errors:
        return None, errors
    try:
        cfg = form_config(step, names, values)
    except ConfigError as err:
        where = field_of(str(err), names) or "output"
        return None, {where: in_words(str(err), where)}
    errors = {name: in_words(why, name) for name, why in plan.problems(step, cfg, data_roots()).items()}
    refused = precision_answer()["errors"].get(getattr(cfg, "precision", "auto")) \
        if getattr(cfg, "precision", "auto") != "auto" else None
    if refused:
        errors["precision"] = refused
    return cfg, errors


def field_updates(form: Form, errors: dict[str, str]) -> list:
    """Each input's help line, or its problem (marked red) in the help line's place."""
    return [gr.update(info=f"⚠ {errors[name]}" if name in errors else form.infos[name],
                      elem_classes=["field-error"] if name in errors else [])
            for name in form.names]


def summary_line(step: str, names: list[str], values: tuple) -> str:
    """One line saying what Start will run: stage, model, records, steps and minutes."""
    try:
        cfg = form_config(step, names, values)
    except ConfigError:
        return "*Fix the values marked in red to see what will run.*"
    title = TRAIN_TABS.get(step, step.upper())
    model = getattr(cfg, "actor", None) or getattr(cfg, "actor_model", None) or getattr(cfg, "model", "")
    what = f"**{title}** of **{shown_path(model)}**"
    if getattr(cfg, "reward", ""):
        what += f" against **{shown_path(cfg.reward)}**"
    try:
        found = plan.estimate(step, cfg, RUNS)
    except (data.DataError, ConfigError) as err:
        return f"{what}. **Data:** {err}"
    if found.records is None:
        return f"{what} on data read only when the run starts (a hub dataset)."
    unit = "prompts" if step == "ppo" else "records"
    line = f"{what} on **{found.records} {unit}**, ~**{found.steps} steps**"
    if found.seconds is not None:
        line += f", **{fmt_duration(found.seconds)}** on this machine ({found.basis})"
    return line + "."


def offer_text(run: RunInfo) -> str:
    status = run.status
    where = f", step {status.get('step', 0)} of {status['total_steps']}" if status.get("total_steps") else ""
    return (f"**{run.name}** already holds a run ({state_label(run)}{where}). **Resume it** "
            "continues it, **Overwrite it** replaces it with these settings, or choose another name.")


def build_train_tab(step: str) -> Form:
    cls = config.STAGES[step]
    doc = " ".join(cls.__doc__.split("\n\n")[0].split())
    gr.Markdown(f"### {doc}\nPick a model and data, name the run, check the summary, Start. "
                "Everything else has a sensible default in the closed sections below.")
    form = Form(step)
    sections = form_sections(cls)
    with gr.Row():
        for group, fields in sections:
            if group in ("model", "data"):
                with gr.Column():
                    gr.Markdown(f"**{GROUPS[group]}**")
                    render_fields(form, cls, fields, per_row=1)
    for group, fields in sections:
        if group in ("run", "main"):
            gr.Markdown(f"**{GROUPS[group]}**")
            render_fields(form, cls, fields, per_row=4)
    summary = gr.Markdown(elem_id=f"{step}-summary")
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id=f"{step}-start")
        show = gr.Button("Show command", elem_id=f"{step}-show")
        preview = gr.Button("Preview data", elem_id=f"{step}-preview")
    message = gr.Markdown(elem_id=f"{step}-message")
    with gr.Row(visible=False) as offer:
        resume = gr.Button("Resume it", elem_id=f"{step}-resume")
        overwrite = gr.Button("Overwrite it", variant="stop", elem_id=f"{step}-overwrite")
    command_box = gr.Code(label="command", language="shell", interactive=False, visible=False,
                          elem_id=f"{step}-command")
    preview_box = gr.Markdown(elem_id=f"{step}-preview-box")
    for group, fields in sections:
        if group not in OPEN_GROUPS:
            with gr.Accordion(GROUPS.get(group, group.capitalize() if group != "other"
                                         else "Other options"), open=False):
                render_fields(form, cls, fields, per_row=3)
    wire_train_tab(form, summary, start, show, preview, message, offer, resume, overwrite,
                   command_box, preview_box)
    return form


HIDDEN = {"visible": False}
NOT_STARTED = "**Not started:** fix the fields marked in red."


def show_command(form: Form, values: tuple) -> tuple:
    """Show command: (command box, message, each field's help or problem); the data preview
    stays as it is."""
    cfg, errors = check_form(form.step, form.names, values)
    if cfg is None:
        return (gr.skip(), "**Cannot build the command:** fix the fields marked in red.",
                *field_updates(form, errors))
    note = "**Would not start yet:** fix the fields marked in red." if errors else ""
    command = gr.update(value=shlex.join(launch.command(form.step, cfg)), visible=True)
    return command, note, *field_updates(form, errors)


def start_run(form: Form, values: tuple) -> tuple:
    """Start: (message, command box, the Resume/Overwrite offer, its Resume button, fields).
    Nothing starts while a field has a problem; a folder holding a run gets the offer."""
    cfg, errors = check_form(form.step, form.names, values)
    run = output_problems(cfg, errors)
    if errors:
        return (NOT_STARTED, gr.skip(), gr.update(**HIDDEN), gr.skip(), *field_updates(form, errors))
    if run is not None:
        return (offer_text(run), gr.skip(), gr.update(visible=True),
                gr.update(interactive=launch.resumable(run.path)), *field_updates(form, {}))
    return (*started(form.step, cfg), gr.update(**HIDDEN), gr.skip(), *field_updates(form, {}))


def output_problems(cfg, errors: dict) -> RunInfo | None:
    """The run in the form's output folder, if any; a live run or a folder of other files
    there is an error of the output field (never started into, never overwritten)."""
    folder = Path(cfg.output) if cfg is not None else None
    run = RunInfo.load(folder) if folder else None
    if folder is not None and (run is None or not run.alive):
        if launch.being_started(folder):  # by another click: run.json may be there, its pid not yet
            errors["output"] = f"{folder.name} is being started: follow it in the Runs tab or choose another name."
            return None
        run = RunInfo.load(folder)  # a start that ended meanwhile wrote its pid before it did
    if run is not None and run.alive:
        errors["output"] = f"{run.name} is {state_label(run)}: stop it in the Runs tab or choose another name."
    elif folder is not None and run is None and folder.is_dir() and any(folder.iterdir()):
        errors["output"] = f"{folder} holds files that are not a run: choose another name."
    return run


def overwrite_run(form: Form, values: tuple) -> tuple:
    """Overwrite it: replace the run in the form's folder with the form's settings."""
    cfg, errors = check_form(form.step, form.names, values)
    output_problems(cfg, errors)
    if errors:
        return NOT_STARTED, gr.skip(), gr.update(**HIDDEN), *field_updates(form, errors)
    return (*started(form.step, cfg, replace=True), gr.update(**HIDDEN), *field_updates(form, {}))


def resume_offered(name: str) -> tuple:
    """Resume it: continue the run the form's name points at, with its own saved options."""
    try:
        launch.resume(launch.run_folder(name, RUNS))
    except ConfigError as err:
        return f"**Not resumed:** {err}", gr.update(**HIDDEN)
    say(f"run {name} resumed: {RUNS / name}")
    return f"Resuming **{name}**: follow it in the Runs tab.", gr.update(**HIDDEN)


def preview_data(sources, split, seed) -> str:
    """Preview data: counts and first records, of local sources inside data_roots() only."""
    refused = [why for spec in sources or [] if (why := plan.check_source(spec, data_roots()))]
    refused += [f"{spec} is a hub dataset: the preview reads local files and ratings: only."
                for spec in sources or [] if not spec.startswith("ratings:") and not plan.is_local(spec)]
    if refused:
        return f"**Cannot preview:** {refused[0]}"
    try:  # the seed as a run takes it (1e400 is no whole number)
        seed = build(config.RunConfig, {"seed": seed or 0}).seed
    except ConfigError as err:
        return f"**Cannot preview:** {in_words(str(err))}"
    try:
        weights = config.parse_split(split) if split else None
        local = [s if s.startswith("ratings:") or Path(s).is_absolute() else str(ROOT / s)
                 for s in sources or []]
        return data.preview(local, weights, seed)
    except (ConfigError, data.DataError, ValueError, TypeError) as err:
        return f"**Cannot read the data:** {err}"


def wire_train_tab(form: Form, summary, start, show, preview, message, offer, resume, overwrite,
                   command_box, preview_box) -> None:
    names, inputs = form.names, form.inputs
    show.click(lambda *values: show_command(form, values), inputs, [command_box, message, *inputs])
    start.click(lambda *values: start_run(form, values), inputs,
                [message, command_box, offer, resume, *inputs])
    overwrite.click(lambda *values: overwrite_run(form, values), inputs,
                    [message, command_box, offer, *inputs])
    resume.click(resume_offered, form.fields["output"], [message, offer])
    preview.click(preview_data, [form.fields.get("data", gr.State([])),
                                 form.fields.get("data_split", gr.State("")),
                                 form.fields.get("seed", gr.State(0))], preview_box)
    gr.on(None, lambda *values: summary_line(form.step, names, values), inputs, summary,
          trigger_mode="always_last", show_progress="hidden")


def started(step: str, cfg, replace: bool = False) -> tuple:
    """Start (or replace) a run; (message, the command box's update)."""
    name, argv = Path(cfg.output).name, launch.command(step, cfg)
    try:
        launch.start(step, cfg, replace=replace)  # its folder is in RUNS: RUNS is its queue
    except ConfigError as err:
        return f"**Not started:** {err}", gr.skip()
    ahead = [r for r in list_runs(RUNS) if r.name != name and r.alive]
    say(f"run {name} started ({step}): {cfg.output}")
    wait = (f" It waits for {len(ahead)} run(s) ahead of it ({launch.max_running(RUNS)} at once: "
            "change it in the Runs tab)." if len(ahead) >= launch.max_running(RUNS) else "")
    return (f"Started **{name}** ({'replacing the old run, ' if replace else ''}folder "
            f"`{cfg.output}`): follow it in the Runs tab.{wait}",
            gr.update(value=shlex.join(argv), visible=True))


def refresh_forms(forms: dict[str, Form]) -> tuple[list, list]:
    """(inputs, updates): fresh picker choices of every form (whenever the Train tab shows)."""
    answer = precision_answer()
    inputs, updates = [], []
    for step, form in forms.items():
        for name, component in form.fields.items():
            kind = picker_kind(step, name)
            if kind:
                update = gr.update(choices=model_choices(kind))
            elif name == "precision":
                update = gr.update(choices=precision_choices(answer))
            elif isinstance(component, gr.Dropdown) and component.multiselect:
                update = gr.update(choices=data_choices())
            else:
                continue
            inputs.append(component)
            updates.append(update)
    return inputs, updates


def refreshed_name(step: str, current: str):
    """A default name (sft1, sft2 ...) moves on once a run holds it; a typed name stays."""
    base = {"all": "pipeline"}.get(step, step)
    if re.fullmatch(rf"{base}\d+", current or "") and (RUNS / current).exists():
        return next_free_name(step)
    return gr.skip()


# ---- Runs tab: one run's state, metrics, log and samples ----------------------------------------

def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def state_label(run: RunInfo, line: list[str] | None = None) -> str:
    """The run's state in words: queued with its place in line, stopping as soon as Stop was
    pressed, finishing once the last step is done, failed (process gone) when killed."""
    raw, state = run.status.get("state", "queued"), run.state
    if state == "failed" and raw in LIVE_STATES:
        return "failed (process gone)"
    if run.alive and launch.stop_requested(run.path):
        return "stopping…"
    if state == "queued":
        line = launch_line() if line is None else line
        return f"queued ({ordinal(line.index(run.name) + 1)} in line)" if run.name in line else "queued"
    total, step = run.status.get("total_steps"), run.status.get("step", 0)
    if state == "running" and run.status.get("current"):
        return f"running ({run.status['current']})"
    if state == "running" and total and step >= total:
        return "finishing (final evaluation and save)"
    return state


def launch_line() -> list[str]:
    return [r.name for r in launch.queued(RUNS)]


def failure_reason(run: RunInfo) -> str:
    """Why a run failed: its status, else the last error line of its console."""
    if run.state != "failed":
        return ""
    if run.status.get("error"):
        return run.status["error"]
    lines = [l.strip() for l in launch.tail(run.path / "console.log", 200).splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error:") or re.match(r"\w+(Error|Exception)\b", l)]
    if errors:
        return errors[-1]
    return "the process is gone without saying why (killed?): Resume or Start over."


def run_precision(run: RunInfo) -> str:
    marker = read_json(run.path / "run.json")
    if not marker.get("precision"):
        return ""
    reason = f" ({marker['precision_reason']})" if marker.get("precision_reason") else ""
    return f"{marker['precision']}{reason}"


def run_row(run: RunInfo, line: list[str]) -> dict:
    status, total = run.status, run.status.get("total_steps") or 0
    live = run.state in LIVE_STATES
    return {"name": run.name, "stage": run.stage or "?", "state": state_label(run, line),
            "progress": f"{status.get('step', 0) or 0}/{total}" if total else "-",
            "ETA": fmt_duration(status.get("eta_s")) if live and status.get("eta_s") else "",
            "precision": (read_json(run.path / "run.json").get("precision") or ""),
            "error": failure_reason(run)[:160]}


def runs_table(root: str | Path) -> pd.DataFrame:
    """One row per run under `root`: name, stage, state, progress, ETA, precision, error."""
    line = [r.name for r in launch.queued(root)]
    rows = [run_row(run, line) for run in list_runs(root)]
    return pd.DataFrame(rows, columns=["name", "stage", "state", "progress", "ETA", "precision", "error"])


def queue_text(root: Path) -> str:
    line = [r.name for r in launch.queued(root)]
    running = [r.name for r in list_runs(root) if r.state in ("running", "stopping")]
    now = f"running: {', '.join(running)}" if running else "nothing running"
    waiting = f"; waiting: {', '.join(line)}" if line else "; nobody waiting"
    return f"**Queue** ({launch.max_running(root)} at once): {now}{waiting}."


def progress_html(run: RunInfo) -> str:
    """A run's state, step of total, ETA, precision and failure reason over a progress bar."""
    status, state = run.status, run.state
    total, step = status.get("total_steps") or 0, status.get("step", 0) or 0
    share = 100 if state == "done" else (100 * step / total if total else 0)
    eta = status.get("eta_s") if state in LIVE_STATES else None
    eta_text = f", {fmt_duration(eta)} left" if eta else ""
    precision = run_precision(run)
    failed = f"<p><b>Failed:</b> {html.escape(failure_reason(run))}</p>" if state == "failed" else ""
    return (f"<div><b>{html.escape(run.name)}</b> ({html.escape(run.stage or '?')}): "
            f"{html.escape(state_label(run))}, step {step} of {total or '?'}{eta_text}</div>"
            f"<progress max='100' value='{share:.0f}' style='width:100%'></progress>"
            + (f"<div>precision: {html.escape(precision)}</div>" if precision else "")
            + f"<div style='color:#6b7280'>folder: {html.escape(str(run.path))}</div>{failed}")


FIRST_METRICS = ("reward", "kl", "loss", "accuracy", "margin", "score", "pg_loss", "vf_loss",
                 "value_loss", "policy_loss", "response_length")
COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2")


def metric_panels(rows: list[dict]) -> list[tuple[str, list[tuple[str, list, str]]]]:
    """(title, [(series, [(step, value)], "line" | "dots")]) per small plot: one per metric, its
    held-out twin (eval_X) drawn as dots on the same plot, PPO's time split on one plot."""
    keys = []
    for row in rows:
        keys += [k for k, v in row.items() if k not in ("step", "epoch") and k not in keys
                 and isinstance(v, (int, float)) and not isinstance(v, bool)]

    def points(key):
        return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))
                and math.isfinite(r[key]) and "step" in r]

    timing = [k for k in keys if k.startswith("time_") and k.endswith("_s")]
    base = [k for k in keys if not k.startswith("eval_") and k not in timing]
    base.sort(key=lambda k: (FIRST_METRICS.index(k) if k in FIRST_METRICS else len(FIRST_METRICS),
                             keys.index(k)))
    panels = [(k, [(k, points(k), "line")] + ([(f"eval_{k}", points(f"eval_{k}"), "dots")]
                                              if f"eval_{k}" in keys else [])) for k in base]
    panels += [(k, [(k, points(k), "dots")]) for k in keys
               if k.startswith("eval_") and k.removeprefix("eval_") not in base]
    if timing:
        panels.append(("time per step (s)", [(k.removeprefix("time_").removesuffix("_s"),
                                              points(k), "line") for k in timing]))
    return panels


def svg_panel(title: str, series: list) -> str:
    """One small plot as inline SVG: lines for training series, dots for held-out points (a
    single point is always a dot), the last value in the title."""
    width, height, left, right, bottom = 240, 130, 44, 8, 18
    top = 32 if len(series) > 1 else 22  # room for a legend line under the title
    values = [(x, y) for _, pts, _ in series for x, y in pts]
    if not values:
        return ""
    xs, ys = [x for x, _ in values], [y for _, y in values]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    pad = (max(ys) - min(ys)) * 0.08 or abs(ys[0]) * 0.1 or 1.0
    y0, y1 = min(ys) - pad, max(ys) + pad

    def sx(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y):
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    parts = [f"<rect x='{left}' y='{top}' width='{width - left - right}' "
             f"height='{height - top - bottom}' fill='#f9fafb'/>"]
    for index, (name, pts, style) in enumerate(series):
        color = COLORS[index % len(COLORS)]
        if style == "line" and len(pts) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(f"<polyline points='{path}' fill='none' stroke='{color}' stroke-width='1.5'/>")
        else:
            parts += [f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='3' fill='{color}'/>"
                      for x, y in pts[-80:]]
    last = next((pts[-1][1] for _, pts, _ in series if pts), None)
    legend = " ".join(f"<tspan fill='{COLORS[i % len(COLORS)]}'>{html.escape(n)}</tspan>"
                      for i, (n, pts, _) in enumerate(series) if pts) if len(series) > 1 else ""
    parts += [f"<text x='4' y='14' font-size='12' font-weight='bold'>{html.escape(title)}"
              f"<tspan font-weight='normal'> {fmt_num(last)}</tspan></text>",
              f"<text x='{left - 3}' y='{top + 8}' font-size='9' text-anchor='end'>{fmt_num(y1 - pad)}</text>",
              f"<text x='{left - 3}' y='{height - bottom}' font-size='9' text-anchor='end'>{fmt_num(y0 + pad)}</text>",
              f"<text x='{left}' y='{height - 4}' font-size='9'>step {fmt_num(x0)}</text>",
              f"<text x='{width - right}' y='{height - 4}' font-size='9' text-anchor='end'>{fmt_num(max(xs))}</text>"]
    if legend:
        parts.append(f"<text x='4' y='26' font-size='9'>{legend}</text>")
    return (f"<div><svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
            f"data-metric='{html.escape(title)}'>{''.join(parts)}</svg></div>")


def metrics_html(folder: Path | None) -> str:
    rows = read_metrics(folder) if folder else []
    if not rows:
        return "<p style='color:#6b7280'>No metrics yet.</p>"
    return f"<div class='metric-grid'>{''.join(svg_panel(t, s) for t, s in metric_panels(rows))}</div>"


def step_lines(rows: list[dict], total, count: int = 14) -> str:
    """The latest metric rows as log lines, one per logged step (held-out rows marked)."""
    lines = []
    for row in rows[-count:]:
        shown = [(k, v) for k, v in row.items() if k not in ("step", "epoch")
                 and not k.startswith("time_") and isinstance(v, (int, float))]
        held_out = all(k.startswith("eval_") for k, _ in shown)
        values = ", ".join(f"{k.removeprefix('eval_') if held_out else k} {fmt_num(v)}" for k, v in shown)
        lines.append(f"step {row.get('step', '?')}/{total or '?'}{' held-out' if held_out else ''}: {values}")
    return "\n".join(lines)


TEMPLATE_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|$)|"
                           r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\s*(.*?)(?:<\|eot_id\|>|$)", re.S)


def prompt_text(prompt: str) -> str:
    """The last user turn of a chat-template prompt (ChatML or Llama 3), else the text without
    special tokens."""
    users = [(m.group(2) or m.group(4) or "").strip() for m in TEMPLATE_TURN.finditer(prompt)
             if (m.group(1) or m.group(3)) == "user"]
    return users[-1] if users else re.sub(r"<\|[^|>]*\|>", " ", prompt).strip()


def samples_html(folder: Path | None, count: int = 6) -> str:
    """The latest PPO rollouts (samples.jsonl) as 'prompt -> response' with their reward."""
    rows = []
    for line in launch.tail(folder / "samples.jsonl", count).splitlines() if folder else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by the tail's window or being written
            continue
    if not rows:
        return ""
    items = "".join(
        f"<div><b>step {r.get('step')}</b> · reward {fmt_num(r.get('reward', float('nan')))}<br>"
        f"<i>{html.escape(prompt_text(r.get('prompt', '')))}</i> → {html.escape(r.get('response', ''))}</div>"
        for r in reversed(rows))
    return f"<div><b>Latest PPO samples</b> (prompt → response, reward)</div><div class='samples'>{items}</div>"


def run_view(name: str | None) -> tuple:
    """The Runs tab's outputs for one run: progress, plots, step lines, log, samples, the
    Stop / Resume / Start over / Report buttons enabled only where they apply, and the report."""
    run = RunInfo.load(RUNS / name) if name and launch.NAME.fullmatch(name) else None
    if run is None:
        off = gr.update(interactive=False)
        return (f"No run named {name}." if name else "Pick a run.", "", "", "",
                gr.update(value="", visible=False), off, off, off, off, gr.update(value="", visible=False))
    rows = read_metrics(run.path)
    log = launch.tail(run.path / "train.log", 30) or launch.tail(run.path / "console.log", 30)
    samples = samples_html(run.path)
    report = report_text(run)
    return (progress_html(run), metrics_html(run.path),
            step_lines(rows, run.status.get("total_steps")), log,
            gr.update(value=samples, visible=bool(samples)),
            gr.update(interactive=run.alive and run.state in LIVE_STATES
                      and not launch.stop_requested(run.path)),
            gr.update(interactive=launch.resumable(run.path)),
            gr.update(interactive=not run.alive and launch.restartable(run.path)),
            gr.update(interactive=reportable(run) and not reporting(run.path)),
            gr.update(value=report, visible=bool(report)))


# ---- the Report view: `python -m train report` on a finished run, as a subprocess ------------------

REPORTS: dict[Path, subprocess.Popen] = {}  # run folder -> its report process (this app's)
REPORTS_LOCK = threading.Lock()  # a click's check and start, one at a time
REPORT_BYTES = 256 * 1024  # a report.md is a few kB; never send a planted huge file to the browser


def reportable(run: RunInfo) -> bool:
    return run.state == "done" and run.stage in ("ppo", "dpo", "rm", "all")


def reporting(folder: Path) -> bool:
    process = REPORTS.get(folder)
    return process is not None and process.poll() is None


def report_folder(run: RunInfo) -> Path:
    """Where the run's report is written: the run, or a pipeline's last PPO/DPO step."""
    try:
        return run_report.find_run(str(run.path)).path if run.stage == "all" else run.path
    except ConfigError:
        return run.path


def report_text(run: RunInfo) -> str:
    """The run's report.md; while one is made, a line saying so; after a failed one, its error."""
    folder = report_folder(run)
    if reporting(run.path):
        return "*A report is being made: it appears here when done (a few minutes).*"
    text = launch.read_own(folder / run_report.REPORT_MD, REPORT_BYTES)
    if text:
        return text
    failed = REPORTS.get(run.path)
    if failed is not None and failed.returncode:
        last = (launch.tail(run.path / "report.log", 1) or "").strip()
        return f"**The report failed:** {last or f'exit {failed.returncode}'} (report.log in the run folder)."
    return ""


def _report(folder: Path) -> None:
    run = RunInfo.load(folder)
    if run is None or not reportable(run):
        raise ConfigError(f"{folder.name} is not a finished PPO, GRPO, RLOO, DPO, reward-model or "
                          "pipeline run: a report compares a finished run with its start.")
    refuse_links(folder, "writing a report")  # report.log is written inside the run
    with REPORTS_LOCK:
        if reporting(folder):
            raise ConfigError(f"a report on {folder.name} is being made already.")
        with open(folder / "report.log", "wb") as log:
            REPORTS[folder] = subprocess.Popen(run_report.report_command(str(folder)), cwd=ROOT,
                                               stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True)


def run_signature(name: str | None) -> tuple:
    """What a run's view depends on: its files' change times and whether it is alive."""
    if not name or not launch.NAME.fullmatch(name):
        return (name,)
    folder = RUNS / name
    stamps = tuple((folder / f).stat().st_mtime if (folder / f).exists() else None
                   for f in ("status.json", "metrics.jsonl", "train.log", "console.log",
                             "samples.jsonl", "launch.json", "report.log"))
    run = RunInfo.load(folder)
    return (name, stamps, run.alive if run else None, reporting(folder))


def listing_signature() -> tuple:
    runs = list_runs(RUNS)
    return (tuple((r.name, r.status.get("updated_at"), r.status.get("state"), r.alive,
                   launch.stop_requested(r.path)) for r in runs),
            launch.max_running(RUNS), len(launch.queued(RUNS)))


def run_action(action, verb: str, then: str = ""):
    """A Runs-tab button: (note, the run's view) after `action` on the picked run's folder;
    `then` follows the note when it worked."""
    def handler(name):
        if not name:
            return "Pick a run first.", *run_view(name)
        try:
            action(launch.run_folder(name, RUNS))
        except ConfigError as err:
            return f"**Not {verb}:** {err}", *run_view(name)
        say(f"run {name} {verb}: {RUNS / name}")
        return f"**{name}** {verb}{then}.", *run_view(name)
    return handler


def _stop(folder: Path) -> None:
    if not launch.stop(folder):
        raise ConfigError(f"{folder.name} is not running.")


stop_run = run_action(_stop, "asked to stop: it saves a checkpoint first")
resume_run = run_action(launch.resume, "resumed")
start_over_run = run_action(launch.start_over, "started over")
report_run = run_action(_report, "reported on", ": the report appears below when done")


@dataclasses.dataclass
class RunsTab:
    pick: gr.Dropdown
    timer: gr.Timer
    remember: gr.BrowserState
    refresh_outputs: list
    refresh: typing.Callable
    show: typing.Callable


def build_runs_tab(remember: gr.BrowserState) -> RunsTab:
    """The Runs tab; `remember` (outside the tabs, so it is read at page load) keeps the picked
    run in the browser."""
    gr.Markdown(f"Runs live in `{RUNS}` (RLHF_RUNS_DIR). Training runs take turns: the queue "
                "starts the next one when a slot is free.")
    table = gr.Dataframe(runs_table(RUNS), label="runs", interactive=False, elem_id="runs-table")
    with gr.Row():
        queue = gr.Markdown(queue_text(RUNS), elem_id="runs-queue")
        at_once = gr.Number(launch.max_running(RUNS), label="runs at once", precision=None,
                            scale=0, min_width=140, elem_id="runs-at-once")
    with gr.Row():
        pick = gr.Dropdown([r.name for r in list_runs(RUNS)], label="run", scale=3,
                           elem_id="runs-pick")
        stop = gr.Button("Stop", scale=1, interactive=False, elem_id="runs-stop")
        resume = gr.Button("Resume", scale=1, interactive=False, elem_id="runs-resume")
        start_over = gr.Button("Start over", scale=1, interactive=False, elem_id="runs-start-over")
        report = gr.Button("Report", scale=1, interactive=False, elem_id="runs-report")
    note = gr.Markdown(elem_id="runs-note")
    progress = gr.HTML(elem_id="runs-progress")
    plots = gr.HTML(elem_id="runs-plots")
    with gr.Row():
        steps = gr.Textbox(label="steps (latest)", lines=10, max_lines=10, elem_id="runs-steps")
        log = gr.Textbox(label="train.log (tail)", lines=10, max_lines=10, autoscroll=True,
                         elem_id="runs-log")
    samples = gr.HTML(visible=False, elem_id="runs-samples")
    report_view = gr.Markdown(visible=False, elem_id="runs-report-view")
    timer = gr.Timer(2.0, active=False)
    seen = gr.State(None)
    view_outputs = [progress, plots, steps, log, samples, stop, resume, start_over, report, report_view]
    outputs = [table, pick, queue, *view_outputs, seen, timer]

    def refresh(name, last=None):
        """Only what changed since `last`; the timer slows down when nothing is live."""
        listing, one = listing_signature(), run_signature(name)
        last = last or (None, None)
        live = any(state in LIVE_STATES for (_, _, state, alive, _) in listing[0] if alive)
        listed = (runs_table(RUNS), gr.update(choices=[r.name for r in list_runs(RUNS)]),
                  queue_text(RUNS)) if listing != last[0] else (gr.skip(),) * 3
        viewed = run_view(name) if one != last[1] else (gr.skip(),) * len(view_outputs)
        return (*listed, *viewed, (listing, one), gr.Timer(2.0 if live else 10.0, active=True))

    def show(name, saved):
        """The tab opened: the picked run, or else the one kept in the browser (the page-load
        restore can arrive after the tab is opened, or read the browser's store too early)."""
        names = [r.name for r in list_runs(RUNS)]
        name = name or (saved if saved in names else None)
        shown = list(refresh(name))
        shown[1] = gr.update(choices=names, value=name)
        return tuple(shown)

    def on_pick(name):
        return (*run_view(name), name or "")

    def on_at_once(count):
        try:
            return f"Up to {launch.set_max_running(RUNS, count)} run(s) at once.", queue_text(RUNS)
        except ConfigError as err:
            return f"**Not changed:** {err}", gr.skip()

    timer.tick(refresh, [pick, seen], outputs, show_progress="hidden")
    pick.change(on_pick, pick, [*view_outputs, remember], show_progress="hidden")
    stop.click(stop_run, pick, [note, *view_outputs])
    resume.click(resume_run, pick, [note, *view_outputs])
    start_over.click(start_over_run, pick, [note, *view_outputs])
    report.click(report_run, pick, [note, *view_outputs])
    at_once.submit(on_at_once, at_once, [note, queue])
    at_once.blur(on_at_once, at_once, [note, queue])
    return RunsTab(pick, timer, remember, outputs, refresh, show)


# ---- Chat tab -------------------------------------------------------------------------------------

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
    return gr.Dropdown(model_choices("chat"), value="default", label=label,
                       allow_custom_value=True, elem_id=elem_id)


def checkpoint_problem(model: str) -> str | None:
    """Why `model` cannot chat (a reward model, a run still training, nothing there), or None."""
    why = plan.check_model(model or "", "chat")
    return why if model else "Pick a checkpoint first."


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
    return f"Saved thumbs {'up' if like.liked else 'down'} for the answer of **{shown_path(rated['model'])}**."


def busy_buttons(busy: bool):
    """Send queues while an answer streams (its label says so); Stop only then."""
    return (gr.update(value="Queue" if busy else "Send"), gr.update(interactive=busy))


def answer_loop(pool, chat: ChatSession, model, system, temperature, top_p, max_tokens):
    """Answer the last user turn, then every message queued meanwhile, yielding the history;
    returns the closing note."""
    while True:
        sampling = new_sampling(temperature, top_p, max_tokens)
        for _ in stream_answer(pool, chat, model, sampling, system):
            yield chat.history()
        if chat.stop or not chat.queued:
            break
        chat.ask(chat.queued.pop(0))
        yield chat.history()
    finish = chat.turns[-1].get("finish") if chat.turns else None
    ended = {"length": " (cut off at the token limit: raise max_tokens for longer answers)",
             "stopped": " (stopped)"}.get(finish or "", "")
    return f"Answered by **{shown_path(model)}** (seed {sampling['seed']}){ended}."


SKIP = gr.skip()
UPDATE_S = 0.1  # streamed answers reach the page at most 10 times a second (each is a re-render)


def chat_answers(pool, chat: ChatSession, values):
    """Stream the answer (then the queued messages' answers): the Chat outputs (session,
    chatbot, note, input, Send, Stop) per piece; the input is never touched, so typing goes on."""
    chat.streaming, chat.stop = True, False
    yield (chat, chat.history(), "Answering… (type on: Send queues your next message)", SKIP,
           *busy_buttons(True))
    try:
        loop, shown_at = answer_loop(pool, chat, *values), 0.0
        while True:
            try:
                history = next(loop)
            except StopIteration as done:
                closing = done.value
                break
            if time.monotonic() - shown_at >= UPDATE_S:
                shown_at = time.monotonic()
                yield chat, history, SKIP, SKIP, SKIP, SKIP
    except ServerError as err:
        closing = f"**No answer:** {err}"
        chat.queued.clear()
    finally:
        chat.streaming = False
    yield chat, chat.history(), closing, SKIP, *busy_buttons(False)


def chat_send(pool, message: str, chat: ChatSession, *values):
    """Send (or Enter): answer now, or queue the message while an answer streams."""
    if not message.strip():
        yield chat, SKIP, "Type a message first.", SKIP, SKIP, SKIP
        return
    if chat.streaming:
        chat.queued.append(message)
        yield chat, SKIP, f"Queued ({len(chat.queued)} waiting): sent when this answer ends.", "", SKIP, SKIP
        return
    if problem := checkpoint_problem(values[0]):
        yield chat, SKIP, f"**Cannot chat:** {problem}", SKIP, SKIP, SKIP
        return
    chat.ask(message)
    first = True
    for update in chat_answers(pool, chat, values):
        yield (*update[:3], "" if first else SKIP, *update[4:])
        first = False


def chat_regenerate(pool, chat: ChatSession, *values):
    if chat.streaming:
        yield chat, SKIP, "Wait for the answer to end (or Stop it) first.", SKIP, SKIP, SKIP
        return
    if not chat.drop_last_answer() and not chat.last_user_text():
        yield chat, SKIP, "Nothing to regenerate yet.", SKIP, SKIP, SKIP
        return
    yield from chat_answers(pool, chat, values)


def chat_stop(chat: ChatSession) -> str:
    """Stop: the answer ends at its next piece (marked stopped); queued messages are dropped."""
    dropped = len(chat.queued)
    chat.stop = True
    chat.queued.clear()
    return "Stopping…" + (f" ({dropped} queued message(s) dropped)" if dropped else "")


def chat_load(pool, model: str) -> str:
    if problem := checkpoint_problem(model):
        return f"**Cannot serve {model}:** {problem}"
    try:
        with pool.lease(model) as client:
            health = client.health()
        return f"Serving **{shown_path(model)}** (engine {health.get('engine', '?')})."
    except ServerError as err:
        return f"**Cannot serve {model}:** {err}"


def build_chat_tab(pool: ServerPool) -> gr.Dropdown:
    session = gr.State(ChatSession())
    with gr.Row():
        model = checkpoint_dropdown("checkpoint: the base model or a finished run's final/ or ema/",
                                    "chat-model")
        load = gr.Button("Load", scale=0, elem_id="chat-load")
    system, temperature, top_p, max_tokens = sampling_controls("chat")
    chatbot = gr.Chatbot(label="chat", height=420, elem_id="chat-bot")
    with gr.Row():
        text = gr.Textbox(placeholder="Message (Enter sends; while an answer streams it queues)",
                          show_label=False, scale=5, elem_id="chat-input")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        stop = gr.Button("Stop", scale=1, interactive=False, elem_id="chat-stop")
    with gr.Row():
        regenerate = gr.Button("Regenerate")
        clear = gr.Button("Clear")
    note = gr.Markdown(elem_id="chat-note")
    settings = [model, system, temperature, top_p, max_tokens]
    outputs = [session, chatbot, note, text, send, stop]
    streaming = {"concurrency_limit": None, "show_progress": "hidden"}
    send.click(functools.partial(chat_send, pool), [text, session, *settings], outputs, **streaming)
    text.submit(functools.partial(chat_send, pool), [text, session, *settings], outputs, **streaming)
    regenerate.click(functools.partial(chat_regenerate, pool), [session, *settings], outputs,
                     **streaming)
    stop.click(chat_stop, session, note, concurrency_limit=None, show_progress="hidden")
    clear.click(lambda: (ChatSession(), [], ""), None, [session, chatbot, note])
    load.click(functools.partial(chat_load, pool), model, note)
    chatbot.like(save_thumb, session, note)
    chatbot.clear(lambda: (ChatSession(), ""), None, [session, note])
    return model


# ---- Compare tab ----------------------------------------------------------------------------------

def arena_panels(arena: ArenaSession):
    """The two Chatbots: their messages, and their labels (the model names once voted on)."""
    left, right = arena.views()
    names = [f"{shown_path(arena.round[side]['model'])} (seed {arena.round[side]['sampling'].get('seed')})"
             if arena.revealed(side) else None for side in "AB"]
    return tuple(gr.update(value=view, label=f"{side}: {name}" if name else side)
                 for view, side, name in zip((left, right), "AB", names))


def vote_buttons(arena: ArenaSession):
    """Vote buttons are live only while a finished round waits for its vote."""
    ready = arena.waiting_for_vote() and not arena.streaming
    return [gr.update(interactive=ready) for _ in VERDICTS]


def arena_view(arena: ArenaSession, message: str, text_value=SKIP, busy: bool = False) -> tuple:
    """The Compare outputs: session, panels A and B, note, input, Send, Stop, the vote buttons."""
    return (arena, *arena_panels(arena), message, text_value, gr.update(interactive=not busy),
            gr.update(interactive=busy), *vote_buttons(arena))


def compare_send(pool, message: str, arena: ArenaSession, mode, first, second, system,
                 temperature, top_p, max_tokens):
    """Send: both answers stream at the same time; votes open when both have ended."""
    if arena.streaming:
        yield arena_view(arena, "Both answers are still coming: wait, or Stop them.", busy=True)
        return
    if arena.waiting_for_vote() or not message.strip():
        yield arena_view(arena, "Vote on this round first." if message.strip() else "Type a message first.")
        return
    models = (first, first) if mode == ARENA_MODES[0] else (first, second)
    if problem := next(filter(None, map(checkpoint_problem, models)), None):
        yield arena_view(arena, f"**Cannot compare:** {problem}")
        return
    arena.start_round(message, models, new_sampling(temperature, top_p, max_tokens), system)
    arena.streaming, arena.stop = True, False
    yield arena_view(arena, "Both answers are coming…", "", busy=True)
    try:
        shown_at = 0.0
        for _ in stream_round(pool, arena):
            if time.monotonic() - shown_at >= UPDATE_S:
                shown_at = time.monotonic()
                yield (arena, *arena.views(), *(SKIP,) * (4 + len(VERDICTS)))
    except ServerError as err:
        arena.streaming = False
        yield arena_view(arena, f"**No answer:** {err}", message)
        return
    arena.streaming = False
    yield arena_view(arena, "Which answer is better? The names show after the vote.")


def compare_vote(verdict: str, arena: ArenaSession, session: str = "") -> tuple:
    """A vote: stored with its provenance; the panels then show the names, the buttons lock."""
    if not arena.waiting_for_vote() or arena.streaming:
        return arena_view(arena, "Nothing to vote on: send a message first.")
    comparison = arena.vote(verdict)
    try:  # cast in the latest round: how its checkpoints fare shows in that round's leaderboard
        ratings.add_comparison(**comparison, session=session, round=ratings.latest_round())
    except ratings.RatingsError as err:
        arena.undo_vote()
        return arena_view(arena, f"**Vote not saved:** {err}")
    say(f"vote {verdict}: A {comparison['model_a']}, B {comparison['model_b']}")
    return arena_view(arena, f"Vote saved ({verdict}). A was **{shown_path(comparison['model_a'])}**, "
                             f"B was **{shown_path(comparison['model_b'])}** (names on the panels).")


def compare_stop(arena: ArenaSession) -> str:
    arena.stop = True
    return "Stopping both answers…"


def build_compare_tab(pool: ServerPool) -> list:
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
        stop = gr.Button("Stop", scale=1, interactive=False, elem_id="compare-stop")
    with gr.Row():
        votes = [gr.Button(label, elem_id=f"vote-{verdict}", interactive=False)
                 for label, verdict in VERDICTS]
    clear = gr.Button("New conversation")
    note = gr.Markdown(elem_id="compare-note")
    inputs = [text, session, mode, first, second, system, temperature, top_p, max_tokens]
    outputs = [session, bot_a, bot_b, note, text, send, stop, *votes]
    streaming = {"concurrency_limit": None, "show_progress": "hidden"}
    send.click(functools.partial(compare_send, pool), inputs, outputs, **streaming)
    text.submit(functools.partial(compare_send, pool), inputs, outputs, **streaming)
    stop.click(compare_stop, session, note, concurrency_limit=None, show_progress="hidden")
    for button, (_, verdict) in zip(votes, VERDICTS):
        button.click(_voter(verdict), session, outputs)
    for reset in (clear.click, bot_a.clear, bot_b.clear):
        reset(lambda: arena_view(ArenaSession(), ""), None, outputs)
    return [first, second]


def _voter(verdict: str):
    """The click handler of one vote button (a closure per verdict)."""
    def vote(arena: ArenaSession, request: gr.Request):
        return compare_vote(verdict, arena, request.session_hash or "")
    return vote


# ---- Rounds: a section of the Compare tab ------------------------------------------------------

ROUND_SOURCES = (("built-in prompts", "builtin"), ("prompts typed in Chat and Compare", "chat"),
                 ("a prompt file", "file"))
ROUND_TRAIN_FIELDS = ("max_steps", "batch_size", "max_seq_len", "learning_rate")


def whole_number(value, what: str, low: int, high: int) -> int:
    """`value` as a whole number from `low` to `high`; ValueError with one sentence if not."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (number.is_integer() and low <= number <= high):
        raise ValueError(f"{what} must be a whole number from {low} to {high}.")
    return int(number)


def round_prompts(source: str, file: str, count, seed: int) -> tuple[list, str]:
    """(conversations, the prompt set's name) of a round; a file must lie where runs may read
    (data_roots(), as Preview data). ValueError or RatingsError say why not."""
    limit = whole_number(count, "The number of prompts", 1, 1000)
    if source != "file":
        return rounds.prompt_set(source, limit, seed), source
    if not (file or "").strip():
        raise ValueError("type the prompt file's path (.txt, .jsonl or .json), or pick another "
                         "prompt set.")
    path = Path(file.strip()).expanduser()
    path = path if path.is_absolute() else ROOT / path
    if why := plan.check_source(str(path), data_roots()):
        raise ValueError(why)
    return rounds.prompt_set(str(path), limit, seed), shown_path(path)


def pair_view() -> tuple:
    """The pair waiting longest for a vote: its id, the waiting line, panels A and B (the
    conversation and one answer each), the vote buttons (live only while a pair waits)."""
    try:
        waiting = ratings.pending()
    except ratings.RatingsError as err:
        waiting, error = [], f"**Cannot read the ratings store:** {err}"
    else:
        error = ""
    if not waiting:
        line = error or "waiting: 0. Sample a round to vote on, or train DPO on the votes."
        return None, line, [], [], *(gr.update(interactive=False) for _ in VERDICTS)
    first = waiting[0]
    asked = [m for m in first["conversation"] if m["role"] != "system"]
    seeds = (first["sampling_a"] or {}).get("seed"), (first["sampling_b"] or {}).get("seed")
    line = (f"Round {first['round']} · waiting: {len(waiting)} · both answers by "
            f"**{shown_path(first['model_a'])}** (seeds {seeds[0]} and {seeds[1]}): which is better?")
    panels = [asked + [{"role": "assistant", "content": first[f"answer_{side}"]}] for side in "ab"]
    return first["id"], line, *panels, *(gr.update(interactive=True) for _ in VERDICTS)


def sample_next_round(pool, model, source, file, count, max_tokens):
    """Sample next round: two answers per prompt from `model`, through the server pool, queued
    for votes (chat/rounds.py); yields (note, *pair_view()) with the progress."""
    try:
        if problem := checkpoint_problem(model):
            raise ValueError(problem)
        tokens = whole_number(max_tokens, "The longest answer", 1, 4096)
        number = ratings.latest_round() + 1
        conversations, label = round_prompts(source, file, count, seed=number)  # new prompts each round
    except (ValueError, ratings.RatingsError) as err:
        yield f"**Not sampled:** {err}", *pair_view()
        return
    news = SimpleQueue()  # (done, total) lines, then the result or the error, then None

    def work():
        try:
            with pool.lease(model) as client:
                news.put((0, len(conversations)))
                news.put(rounds.sample_round(client.base_url, conversations, model=model,
                                             round=number, max_tokens=tokens, seed=number,
                                             source=label, progress=lambda *done: news.put(done)))
        except (ServerError, ratings.RatingsError) as err:
            news.put(err)
        finally:
            news.put(None)

    threading.Thread(target=work, daemon=True).start()
    quiet = (SKIP,) * (4 + len(VERDICTS))
    yield f"Round {number}: getting an inference server for **{shown_path(model)}** ready…", *quiet
    while isinstance(item := news.get(), tuple):
        yield f"Round {number}: {item[0]} of {item[1]} prompts answered twice…", *quiet
    if isinstance(item, Exception):
        note = f"**Round {number} stopped:** {item} (pairs queued before stay queued)"
    elif item is None:
        note = f"**Round {number} stopped:** an unexpected error (see the app's console)."
    else:
        same = f"; {item['identical']} prompt(s) got the same answer twice and were left out" \
            if item["identical"] else ""
        note = (f"Round {number}: {item['queued']} pairs from **{shown_path(model)}** wait for "
                f"your votes{same}.")
        say(f"round {number} sampled: {item['queued']} pairs from {model} ({label})")
    yield note, *pair_view()


def round_vote(verdict: str, pending_id, session: str = "") -> tuple:
    """A vote on the shown pair: stored with its round and provenance; the next pair shows."""
    if pending_id is None:
        return "Nothing to vote on: sample a round first.", *pair_view()
    number = row_number(pending_id)
    if number is None or not 0 < number < 2**63:  # SQLite's integers have 64 bits
        return f"**Vote not saved:** {str(pending_id)[:40]!r} is not a pair shown here: vote on " \
               "the one shown.", *pair_view()
    try:
        ratings.vote_pending(number, verdict, session=session)
        note = f"Vote saved ({verdict})."
    except ratings.RatingsError as err:
        note = f"**Vote not saved:** {err}"
    return note, *pair_view()


def _round_voter(verdict: str):
    def vote(pending_id, request: gr.Request):
        return round_vote(verdict, pending_id, request.session_hash or "")
    return vote


def round_run_alive() -> RunInfo | None:
    """A live run training on the votes (a DPO run reading ratings:), if any."""
    for run in list_runs(RUNS):
        data_sources = (read_json(run.path / "launch.json").get("config") or {}).get("data") or []
        if run.alive and run.stage == "dpo" and "ratings:" in data_sources:
            return run
    return None


def round_run_name() -> str:
    base = f"round{ratings.latest_round()}-dpo"
    return next(name for name in (base, *(f"{base}-{n}" for n in range(2, 10_000)))
                if not (RUNS / name).exists())


def train_on_votes(names: list[str], model, watch: dict, *values) -> tuple:
    """Train DPO on the votes: a DPO run of `model` on every round's votes (`ratings:`), with
    the section's settings (option `names`), started as the Train tab starts runs; (note, the
    run's view, what to watch, the watch timer)."""
    kept = (SKIP, watch, SKIP)
    try:
        if (busy := round_run_alive()) is not None:
            raise ValueError(f"{busy.name} is already training on the votes ({state_label(busy)}): "
                             "wait for it in the Runs tab, or stop it there.")
        if problem := checkpoint_problem(model):
            raise ValueError(problem)
        pairs = len(ratings.export_records())
        if not pairs:
            raise ValueError("no decisive votes yet: vote A or B on some pairs first (ties and "
                             "both-bad votes make no pairs).")
    except (ValueError, ratings.RatingsError) as err:
        return f"**Not started:** {err}", *kept
    cfg, errors = check_form("dpo", ["model", "data", "output", *names],
                             (model, ["ratings:"], round_run_name(), *values))
    if errors:
        name, why = next(iter(errors.items()))
        return f"**Not started:** {label_of(name)}: {why}", *kept
    note, _ = started("dpo", cfg)
    if note.startswith("**Not started"):
        return note, *kept
    run = RunInfo.load(Path(cfg.output))
    return (f"{note} It trains **{shown_path(model)}** on {pairs} preference "
            f"pair{'' if pairs == 1 else 's'} (every round's votes); once it is done, its final weights become the checkpoint of Chat, Compare "
            "and the next round.", progress_html(run), {"run": run.name}, gr.Timer(active=True))


def checkpoint_value(folder: Path) -> str | None:
    """The chat pickers' value of the checkpoint in `folder`, or None when they do not list it."""
    def full(value):
        return (Path(value) if Path(value).is_absolute() else ROOT / value).resolve()
    return next((value for _, value in model_choices("chat")
                 if value != "default" and full(value) == folder.resolve()), None)


def swap_in(watch: dict) -> tuple:
    """Follow the round's DPO run: (note, its view, the pickers of Chat, Compare and the round,
    what to watch, the timer); once it is done, its final weights are picked in all three."""
    name, idle = (watch or {}).get("run"), gr.Timer(active=False)
    run = RunInfo.load(RUNS / name) if name and launch.NAME.fullmatch(name) else None
    if run is None:
        return (*(SKIP,) * 5, watch, idle)
    if run.alive:
        return SKIP, progress_html(run), SKIP, SKIP, SKIP, watch, gr.Timer(active=True)
    value = checkpoint_value(run.path / "final") if run.state == "done" else None
    if value is None:
        why = failure_reason(run) or "it ended without final weights"
        return (f"**{name}** {state_label(run)}: {why}. The checkpoints stay as they were.",
                progress_html(run), SKIP, SKIP, SKIP, {}, idle)
    say(f"run {name} swapped into Chat and Compare: {value}")
    # one update per picker: Gradio pops the value out of an update as it applies it
    picked = [gr.update(choices=model_choices("chat"), value=value) for _ in range(3)]
    return (f"**{name}** is done: **{shown_path(value)}** is now the checkpoint of Chat, Compare "
            "and the next round.", progress_html(run), *picked, {}, idle)


@dataclasses.dataclass
class RoundsSection:
    model: gr.Dropdown
    watch: gr.State
    timer: gr.Timer
    views: list   # swap_in's outputs before the pickers: note, run view
    pair: list    # pair_view()'s outputs


def build_rounds_section(pool: ServerPool) -> RoundsSection:
    gr.Markdown("### Rounds\nTwo answers per prompt from one checkpoint, voted on here one pair at "
                "a time; then DPO on every round's votes, whose result becomes the checkpoint of "
                "Chat, Compare and the next round. Votes above (two checkpoints) count in the "
                "latest round's leaderboard (Ratings tab).")
    with gr.Row():
        model = checkpoint_dropdown("checkpoint of the round", "rounds-model")
        source = gr.Radio(list(ROUND_SOURCES), value="builtin", label="prompts",
                          elem_id="rounds-source")
    with gr.Row():
        file = gr.Textbox(label="prompt file (.txt, .jsonl or .json, where runs may read data)",
                          scale=3, elem_id="rounds-file")
        count = gr.Number(8, label="prompts", precision=None, elem_id="rounds-count")
        max_tokens = gr.Number(128, label="longest answer (tokens)", precision=None,
                               elem_id="rounds-max-tokens")
        sample = gr.Button("Sample next round", variant="primary", elem_id="rounds-sample")
    note = gr.Markdown(elem_id="rounds-note")
    waiting = gr.Markdown(elem_id="rounds-waiting")
    with gr.Row():
        bot_a, bot_b = (gr.Chatbot(label=side, height=260, elem_id=f"rounds-{side.lower()}",
                                   feedback_options=None, buttons=["copy"]) for side in "AB")
    with gr.Row():
        votes = [gr.Button(label, elem_id=f"rounds-vote-{verdict}", interactive=False)
                 for label, verdict in VERDICTS]
    form = Form("rounds")  # the DPO options a round needs, from their one definition
    fields = {f.name: f for f in dataclasses.fields(config.DPOConfig)}
    render_fields(form, config.DPOConfig, [fields[name] for name in ROUND_TRAIN_FIELDS], per_row=4)
    train = gr.Button("Train DPO on the votes", variant="primary", elem_id="rounds-train")
    train_note = gr.Markdown(elem_id="rounds-train-note")
    run_view = gr.HTML(elem_id="rounds-run")
    shown, watch, timer = gr.State(None), gr.State({}), gr.Timer(2.0, active=False)
    pair = [shown, waiting, bot_a, bot_b, *votes]
    sample.click(functools.partial(sample_next_round, pool), [model, source, file, count, max_tokens],
                 [note, *pair])
    for button, (_, verdict) in zip(votes, VERDICTS):
        button.click(_round_voter(verdict), shown, [note, *pair])
    for panel in (bot_a, bot_b):  # its clear button shows the waiting pair again
        panel.clear(pair_view, None, pair)
    train.click(functools.partial(train_on_votes, form.names), [model, watch, *form.inputs],
                [train_note, run_view, watch, timer])
    return RoundsSection(model, watch, timer, [train_note, run_view], pair)


def wire_rounds(section: RoundsSection, chat_model, compare_model, chat_tab, compare_tab) -> None:
    """The round's run swapped in as soon as it is done (the timer, or Chat or Compare shown);
    the waiting pair fresh whenever Compare is shown."""
    outputs = [*section.views, chat_model, compare_model, section.model, section.watch, section.timer]
    section.timer.tick(swap_in, section.watch, outputs, show_progress="hidden")
    for tab in (chat_tab, compare_tab):
        tab.select(swap_in, section.watch, outputs, show_progress="hidden")
    compare_tab.select(pair_view, None, section.pair, show_progress="hidden")


# ---- Ratings tab ----------------------------------------------------------------------------------

def ratings_overview(path=None, latest: int = 500):
    """What the app's Ratings tab shows: (a line counting votes by verdict, a table of the latest
    votes with both answers, the leaderboard table of core/leaderboard.py)."""
    stored = ratings.rows(path)
    tally = ratings.counts(path)
    line = (f"{tally['total']} vote{'' if tally['total'] == 1 else 's'}: "
            + ", ".join(f"{tally[v]} {v}" for v in ratings.COMPARISON_VERDICTS + ratings.THUMB_VERDICTS)
            + f"; {tally['exportable']} exportable preference pairs."
            + (f" {tally['malformed']} malformed row{'' if tally['malformed'] == 1 else 's'} "
               "(written by another tool?) skipped." if tally["malformed"] else ""))
    columns = ["id", "verdict", "last user turn", "answer A", "answer B", "model A", "model B", "time"]
    table = pd.DataFrame([(r["id"], r["verdict"], r["conversation"][-1]["content"][:200],
                           r["answer_a"][:400], (r["answer_b"] or "")[:400], shown_path(r["model_a"]),
                           shown_path(r["model_b"] or ""),
                           time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"])))
                          for r in stored[:latest]], columns=columns)
    board = pd.DataFrame(leaderboard.leaderboard(leaderboard.votes_from_ratings(stored)),
                         columns=["model", "strength", "ci_low", "ci_high", "games", "wins"])
    board["model"] = board["model"].map(shown_path)
    return line, table, board.round(3)


def rounds_overview(stored: list[dict], path=None) -> tuple[str, pd.DataFrame]:
    """The rounds side by side: (a line with each round's votes and waiting pairs, a table with a
    column per round: each checkpoint's strength [95% interval] · games in that round's votes)."""
    tally = ratings.round_counts(path)
    line = " · ".join(f"round {number}: {c['votes']} vote{'' if c['votes'] == 1 else 's'}"
                      + (f", {c['waiting']} waiting" if c["waiting"] else "")
                      for number, c in tally.items())
    cells: dict[str, dict] = {}
    for number in tally:
        for row in leaderboard.leaderboard(leaderboard.votes_from_ratings(stored, rounds={number})):
            cells.setdefault(shown_path(row["model"]), {})[f"round {number}"] = (
                f"{row['strength']:+.2f} [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}] · "
                f"{fmt_num(row['games'])} game{'' if row['games'] == 1 else 's'}")
    columns = ["model", *(f"round {number}" for number in tally)]
    table = pd.DataFrame([{"model": model, **by_round} for model, by_round in cells.items()],
                         columns=columns).fillna("")
    return (line.capitalize() + "." if line else "No votes yet."), table


def vote_choices(path=None, latest: int = 50) -> list[tuple[str, int]]:
    return [(f"#{r['id']} {r['verdict']}: {r['conversation'][-1]['content'][:60]}", r["id"])
            for r in ratings.rows(path, limit=latest)]


def safe_ratings_view():
    try:
        line, table, board = ratings_overview()
        choices = vote_choices()
        return (line, table, board, gr.update(choices=choices, value=choices[0][1] if choices else None),
                *rounds_overview(ratings.rows()))
    except ratings.RatingsError as err:
        return f"**Cannot read the ratings store:** {err}", None, None, gr.update(choices=[]), "", None


def row_number(value) -> int | None:
    """`value` as a table or a state holds a row's number, or None: int() would also read "1_0"
    as 10, "٣" as 3, 2.9 as 2, True as 1."""
    plain = isinstance(value, int) and not isinstance(value, bool) or \
        isinstance(value, str) and value.strip().isascii() and value.strip().isdigit()
    return int(value) if plain else None


def undo_vote(rating_id):
    """Remove one vote from the store (the Ratings tab's undo)."""
    if rating_id in (None, ""):
        return "Pick a vote to undo."
    number = row_number(rating_id)
    if number is None:
        return f"**Not undone:** {str(rating_id)[:40]!r} is not a vote number: pick one from the table."
    if not 0 < number < 2**63:
        return f"**Not undone:** there is no vote #{number}: pick one from the table."
    try:
        removed = ratings.delete(number)
    except ratings.RatingsError as err:
        return f"**Not undone:** {err}"
    if not removed:
        return f"Vote #{number} is not in the store (already undone?)."
    say(f"vote #{number} undone")
    return f"Vote #{number} undone: it no longer counts, nor is it exported."


def export_votes() -> tuple:
    """Export: the votes as preference records in a new file of $RLHF_HOME/exports, named by the
    time to the millisecond (and numbered if a click in the same millisecond took that name);
    returns (the file's update, a note)."""
    now = time.time()
    name = f"preferences-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}-{int(now * 1000) % 1000:03d}"
    for number in range(1, 100):
        out = rlhf_home() / "exports" / f"{name}{f'-{number}' if number > 1 else ''}.jsonl"
        try:
            written = ratings.export(out)
            break
        except ratings.ExportExists:  # never replaced: the next number
            continue
        except ratings.RatingsError as err:
            return gr.update(visible=False), f"**Not exported:** {err}"
    else:
        return gr.update(visible=False), "**Not exported:** too many exports at once: click Export again."
    say(f"exported {written} preference records to {out}")
    return gr.update(value=str(out), visible=True), f"Wrote {written} preference records to `{out}` (ties, both-bad votes " \
                     "and thumbs without an opposite thumb on the same turn are left out)."


def build_ratings_tab(rm_form: Form, tabs: gr.Tabs, train_tabs: gr.Tabs, ratings_tab: gr.Tab):
    counts = gr.Markdown(elem_id="ratings-counts")
    with gr.Row():
        refresh = gr.Button("Refresh")
        export = gr.Button("Export preference records", elem_id="ratings-export")
        train_rm = gr.Button("Train a reward model on these", variant="primary",
                             elem_id="ratings-train-rm")
    exported = gr.File(label="exported preference records (JSONL)", visible=False,
                       elem_id="ratings-file")
    note = gr.Markdown(elem_id="ratings-note")
    gr.Markdown("### Leaderboard\nBradley-Terry strengths (log odds, centred) from A/B votes "
                "between different checkpoints; ties and both-bad votes count half a win each; 95% "
                "bootstrap intervals.")
    board = gr.Dataframe(label="leaderboard", interactive=False, elem_id="ratings-board")
    gr.Markdown("### Rounds side by side\nEach round's own board, from the votes between different "
                "checkpoints cast in it (a round's sampled pairs come from one checkpoint: they "
                "train it, they do not rank it; Compare's votes count in the latest round).")
    rounds_line = gr.Markdown(elem_id="ratings-rounds-line")
    rounds_board = gr.Dataframe(label="leaderboard by round", interactive=False,
                                elem_id="ratings-rounds")
    with gr.Row():
        pick_vote = gr.Dropdown([], label="a vote", scale=4, elem_id="ratings-vote")
        undo = gr.Button("Undo this vote", scale=1, elem_id="ratings-undo")
    table = gr.Dataframe(label="votes (newest first)", interactive=False, wrap=True,
                         column_widths=["5%", "6%", "17%", "24%", "24%", "9%", "9%", "6%"],
                         elem_id="ratings-table")
    views = [counts, table, board, pick_vote, rounds_line, rounds_board]

    def on_train_rm(current_data):
        base = [d for d in current_data or [] if d != "ratings:"] or ["prompts/preferences.jsonl"]
        return (gr.update(value=["ratings:", *base]), gr.update(value=next_free_name("rm")),
                gr.Tabs(selected="train"), gr.Tabs(selected="train-rm"),
                "The reward-model form now reads `ratings:` plus a base data set: check it and Start.")

    def on_undo(rating_id):
        return undo_vote(rating_id), *safe_ratings_view()

    refresh.click(safe_ratings_view, None, views)
    ratings_tab.select(safe_ratings_view, None, views)
    export.click(export_votes, None, [exported, note])
    undo.click(on_undo, pick_vote, [note, *views])
    train_rm.click(on_train_rm, rm_form.fields["data"],
                   [rm_form.fields["data"], rm_form.fields["output"], tabs, train_tabs, note])


# ---- the app --------------------------------------------------------------------------------------

def build_app(pool: ServerPool | None = None) -> gr.Blocks:
    pool = pool or ServerPool(engine=os.environ.get("RLHF_CHAT_ENGINE", "auto"), notify=say)
    with gr.Blocks(title="RLHF Studio") as app:
        gr.Markdown("# RLHF Studio\nSFT, reward model, then PPO, GRPO, RLOO or DPO through DeepSpeed, "
                    "on the built-in SmolLM2-135M-Instruct or any chat model; chat with the result, "
                    "rate it, and train the next round on the votes.")
        remember = gr.BrowserState("", storage_key="rlhf-studio-run")
        with gr.Tabs() as tabs:
            with gr.Tab("Train", id="train") as train_tab:
                forms = {}
                with gr.Tabs() as train_tabs:
                    for step, title in TRAIN_TABS.items():
                        if step in config.STAGES:
                            with gr.Tab(title, id=f"train-{step}") as step_tab:
                                forms[step] = build_train_tab(step)
                            step_tab.select(*form_refresh(forms, step))
            with gr.Tab("Runs", id="runs") as runs_tab:
                runs = build_runs_tab(remember)
            with gr.Tab("Chat", id="chat") as chat_tab:
                chat_model = build_chat_tab(pool)
            with gr.Tab("Compare", id="compare") as compare_tab:
                compare_models = build_compare_tab(pool)
                round_section = build_rounds_section(pool)
            with gr.Tab("Ratings", id="ratings") as ratings_tab:
                build_ratings_tab(forms["rm"], tabs, train_tabs, ratings_tab)
        wire_app(app, forms, runs, train_tab, runs_tab, chat_tab, compare_tab, ratings_tab,
                 [chat_model, *compare_models, round_section.model])
        wire_rounds(round_section, chat_model, compare_models[0], chat_tab, compare_tab)
    app.pool = pool
    return app


def form_refresh(forms: dict[str, Form], only: str | None = None):
    """(handler, inputs, outputs) that refresh the pickers and default run names of the forms."""
    chosen = {step: form for step, form in forms.items() if only in (None, step)}
    pickers = refresh_forms(chosen)[0]
    names = [form.fields["output"] for form in chosen.values()]

    def handler(*current):
        return (*refresh_forms(chosen)[1], *(refreshed_name(step, value)
                                             for step, value in zip(chosen, current)))
    return handler, names, pickers + names


def wire_app(app, forms, runs: RunsTab, train_tab, runs_tab, chat_tab, compare_tab, ratings_tab,
             checkpoints) -> None:
    """Events that span tabs: refresh what a tab shows when it is shown, run the Runs timer only
    while its tab is open, and restore the picked run after a reload."""
    train_tab.select(*form_refresh(forms))
    for tab in (chat_tab, compare_tab):
        tab.select(lambda: [gr.update(choices=model_choices("chat"))] * len(checkpoints), None,
                   checkpoints)
    runs_tab.select(runs.show, [runs.pick, runs.remember], runs.refresh_outputs,
                    show_progress="hidden")
    for tab in (train_tab, chat_tab, compare_tab, ratings_tab):
        tab.select(lambda: gr.Timer(active=False), None, runs.timer)
    handler, names, outputs = form_refresh(forms)
    app.load(handler, names, outputs)
    app.load(restore_pick, runs.remember, runs.pick)


def restore_pick(saved: str | None):
    """The run picked before the page was reloaded (kept in the browser), if it still exists."""
    names = [r.name for r in list_runs(RUNS)]
    return gr.update(choices=names, value=saved if saved in names else None)


class ConsoleWatcher(threading.Thread):
    """Prints each run's state changes (queued, running, done, failed: why) on the console."""

    def __init__(self, every: float = 3.0):
        super().__init__(daemon=True)
        self.every, self.seen = every, {}

    def changes(self) -> list[str]:
        lines, now = [], {}
        for run in list_runs(RUNS):
            label = state_label(run)
            now[run.name] = label.split(" (")[0]
            if run.name in self.seen and self.seen[run.name] != now[run.name]:
                why = f": {failure_reason(run)}" if run.state == "failed" else ""
                result = f", {run.path / 'final'}" if run.state == "done" and (run.path / "final").is_dir() else ""
                lines.append(f"run {run.name} {label}{why} ({run.path}{result})")
        self.seen = now
        return lines

    def run(self) -> None:
        self.changes()
        while True:
            time.sleep(self.every)
            for line in self.changes():
                say(line)


def main() -> None:
    port = int(os.environ.get("GRADIO_SERVER_PORT", 7860))
    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    threading.Thread(target=precision_answer, daemon=True).start()
    app = build_app()
    # SIGTERM ends the app like Ctrl-C does, so the inference servers it started stop with it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    say(f"RLHF Studio on http://{host}:{port}: runs in {RUNS}, ratings in {ratings.db_path()}, "
        f"{launch.max_running(RUNS)} training run(s) at once")
    ConsoleWatcher().start()
    try:
        app.launch(server_name=host, server_port=port, quiet=True, css=CSS)
    except OSError as err:
        raise SystemExit(f"error: cannot serve on port {port} ({err}): stop what uses it or set "
                         "GRADIO_SERVER_PORT to a free port.") from None
    finally:
        app.pool.stop_all()


if __name__ == "__main__":
    main()
