"""Before a run starts: the checks the command line would make (so the app can name the field
at fault before "Started"), and what the run will cost (records, steps, minutes).

`problems(stage, cfg, roots)` maps option names to one sentence each: a required model left
empty, a model that is not there or of the wrong kind (a reward model where a chat model
belongs, a run still training), data that is not there or, for the app, outside the folders it
may read, option files that do not load. `records(stage, cfg)` reads the data as the run would
(train/data.py), raising its DataError. `estimate(...)` turns records into steps and minutes from
a speed measured by finished runs in the runs folder (tokens/s of SFT and RM steps, seconds per
PPO step), scaled by model size; before any run has finished here it says it guesses.
Torch-free: the app imports it.
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from pathlib import Path

from core.models import DEFAULT_NAME, ModelError, check_model_folder
from core.options import ConfigError, load_yaml
from core.paths import models_dir, rlhf_home
from core.runs import RunInfo, list_runs, read_json, read_metrics
from train import data
from train.config import STAGES, AllConfig, PPOConfig, RMConfig, SFTConfig, parse_split

ROOT = Path(__file__).resolve().parents[1]

CHAT_FIELDS = ("model", "actor", "actor_model", "reward_model")  # backbones: chat models
REWARD_FIELDS = ("reward", "critic")
OPTIONAL = ("critic",)  # empty means "use the reward model"


def check_model(value: str, kind: str = "chat") -> str | None:
    """Why `value` cannot serve as a `kind` model (chat, reward or any), or None."""
    if not value:
        return None
    if value == "default":
        return "the built-in model is a chat model, not a reward model: pick a reward-model " \
               "run's final/." if kind == "reward" else None
    path = Path(value).expanduser()
    path = path if path.is_absolute() else ROOT / path  # runs start in the project folder
    if path.suffix == ".gguf":
        return None if path.is_file() else f"model file {path} does not exist: check the path."
    if not path.is_dir():
        if value.count("/") <= 1 and not value.startswith((".", "/", "~")):
            return None  # a hub name: from_pretrained downloads it where the network allows
        return f"{value} does not exist: pick a model from the list."
    try:
        check_model_folder(path)
    except ModelError as err:
        return str(err)
    run = RunInfo.load(path.parent)
    if run is None:
        return None
    if run.alive:
        return f"{run.name} is still {run.state}: wait until it finishes."
    if kind == "reward":
        return not_a_reward_model(value, run)
    if kind == "chat" and run.stage == "rm":
        return f"{value} is a reward model ({run.name}): it scores answers and cannot write " \
               "them; pick default or an SFT or PPO run's final/."
    return None


def not_a_reward_model(value: str, run: RunInfo | None) -> str | None:
    """Why `value`, a model folder inside `run` (its final/ or ema/), is not a reward model, or
    None; `python -m train ppo` asks it too (a chat model scores nothing, yet trains silently)."""
    if run is not None and run.stage != "rm":
        return f"{value} is the {run.stage} run {run.name}, not a reward model: pick a " \
               "reward-model run's final/."
    return None


def is_local(spec: str) -> bool:
    """Whether a data source is read from disk (a file or folder), not a hub dataset name."""
    path = Path(spec).expanduser()
    return path.exists() or (ROOT / path).exists() or spec.endswith((".json", ".jsonl", ".gz")) \
        or spec.startswith((".", "/", "~")) or spec.count("/") > 1


def check_source(spec: str, roots: list[Path] | None) -> str | None:
    """Why the data source `spec` cannot be read, or None; with `roots`, a file must lie under
    one of them (what the app lets a run read); `ratings:PATH`'s PATH is a file as any other."""
    if spec == "ratings:" or not (spec.startswith("ratings:") or is_local(spec)):
        return None  # the ratings store, or a Hugging Face dataset name
    path = Path(spec.removeprefix("ratings:")).expanduser()
    full = (path if path.is_absolute() else ROOT / path).resolve()
    if roots is not None and not any(full.is_relative_to(r.resolve()) for r in roots):
        return (f"{spec} is outside the folders the app reads data from "
                f"({', '.join(str(r) for r in roots)}): copy it into one of them.")
    if not full.exists():
        return f"data file {spec} does not exist: check the path."
    if not (full.is_file() or full.is_dir()):
        return (f"data source {spec} is not a regular file (a device, pipe or socket): pass a "
                "JSON or JSONL file or a folder.")
    return None


def problems(stage: str, cfg, roots: list[Path] | None = None) -> dict[str, str]:
    """Option name -> why the run would fail at once: missing or wrong models, data that is
    not there (or, with `roots`, outside them), option files that do not load."""
    found = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in CHAT_FIELDS + REWARD_FIELDS:
            if not value and f.name not in OPTIONAL:
                found[f.name] = "required: pick one from the list."
            elif why := check_model(value, "reward" if f.name in REWARD_FIELDS else "any"
                                    if stage == "rm" or f.name == "reward_model" else "chat"):
                found[f.name] = why
        elif isinstance(value, list) and f.name.endswith("data"):
            reasons = [why for spec in value if (why := check_source(spec, roots))]
            if reasons:
                found[f.name] = reasons[0]
        elif f.name.endswith("_config") and value:
            cls = STAGES.get(f.name.removesuffix("_config"))
            try:
                if why := check_source(value, roots):
                    raise ConfigError(why)
                load_yaml(value if Path(value).is_absolute() else ROOT / value, cls)
            except ConfigError as err:
                found[f.name] = str(err)
    if not cfg.data and "data" in {f.name for f in dataclasses.fields(cfg)}:
        found["data"] = "no data sources: pick at least one."
    return found


# ---- records, steps, minutes ------------------------------------------------------------------

PHASE = {"sft": "sft", "rm": "rm", "ppo": "ppo"}
GUESS_TOKENS_PER_S = 300.0    # SFT of the 135M built-in model on a 2-core CPU (bench/README.md)
GUESS_PARAMS = 135e6
PPO_TOKEN_COST = 7.0          # a PPO rollout token costs ~7 SFT tokens (bench/README.md)
STARTUP_S = 20.0              # imports, model load, first evaluation
_cache: dict = {}


def _signature(sources: list[str]) -> tuple:
    """The sources and their files' change times (the ratings store: its database and log)."""
    stamps = []
    for spec in sources:
        paths = [rlhf_home() / "ratings.db", rlhf_home() / "ratings.db-wal"] \
            if spec.startswith("ratings:") else [Path(spec) if Path(spec).is_absolute() else ROOT / spec]
        stamps += [p.stat().st_mtime if p.exists() else None for p in paths]
    return tuple(sources), tuple(stamps)


def records(stage: str, cfg) -> list[dict] | None:
    """The records the run would train on (its phase of the split, before the held-out share),
    as the run reads them; None when a source is a hub dataset (not read here). Raises DataError
    and ConfigError as the run would."""
    phase = PHASE.get(stage)
    sources = list(getattr(cfg, "data", []))
    if phase is None or not all(s.startswith("ratings:") or is_local(s) for s in sources):
        return None
    weights = parse_split(cfg.data_split) if cfg.data_split else None
    key = (phase, cfg.seed, tuple(weights or ()), _signature(sources))
    if key not in _cache:
        full = [s if Path(s).is_absolute() or s.startswith("ratings:") else str(ROOT / s)
                for s in sources]
        if len(_cache) > 32:
            _cache.clear()
        _cache[key] = data.load_data(full, phase, cfg.seed, weights, log=lambda _: None)
    return _cache[key]


def count_params(model: str) -> float | None:
    """Parameters of a Llama-shaped model from its config.json (None when unknown)."""
    folder = models_dir() / DEFAULT_NAME if model == "default" else Path(model)
    config = read_json(folder / "config.json")
    try:
        hidden, layers = config["hidden_size"], config["num_hidden_layers"]
        heads = config["num_attention_heads"]
        kv = hidden * config.get("num_key_value_heads", heads) // heads
        per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * config["intermediate_size"]
        embeddings = config["vocab_size"] * hidden * (1 if config.get("tie_word_embeddings") else 2)
        return float(layers * per_layer + embeddings)
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def _finished(runs_root: Path) -> list[RunInfo]:
    runs = list_runs(runs_root)
    steps = [RunInfo.load(r.path / s) for r in runs if r.stage == "all" for s in ("sft", "rm", "ppo")]
    return [r for r in runs + steps if r is not None and r.state == "done"]


def speed(stage: str, model: str, runs_root: Path) -> tuple[float, str]:
    """(seconds per token, where that figure comes from): per training token for SFT and RM, per
    rollout token for PPO; measured by the newest finished run here of a model of about the same
    size (a PPO step priced from SFT/RM tokens until a PPO run measures it), else a guess
    scaled by model size."""
    params = count_params(model)
    cost = PPO_TOKEN_COST if stage == "ppo" else 1.0
    fallback = None
    for run in _finished(runs_root):
        config, rows = run.config(), read_metrics(run.path)
        their_model = str(config.get("actor" if run.stage == "ppo" else "model", ""))
        theirs = count_params(their_model)
        same = their_model == model or (params and theirs and 0.5 <= params / theirs <= 2.0)
        if not same:
            continue  # tiny and real models differ in overheads, not only in size
        if stage == "ppo" and run.stage == "ppo":
            times = [r["step_time_s"] for r in rows if r.get("step_time_s")]
            tokens = config.get("rollout_batch_size", 16) * config.get("max_new_tokens", 64)
            if times and tokens:
                return statistics.median(times) / tokens, f"measured by {run.name}"
        elif run.stage in ("sft", "rm") and fallback is None:
            rates = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
            if rates:
                fallback = cost / statistics.median(rates), f"measured by {run.name}"
                if stage != "ppo":
                    return fallback
    return fallback or (cost / GUESS_TOKENS_PER_S * (params or GUESS_PARAMS) / GUESS_PARAMS,
                        "a guess until a run here measures it")


@dataclass
class Estimate:
    records: int | None   # records this step trains on (held-out share removed)
    steps: int | None     # optimizer steps (PPO steps)
    seconds: float | None
    basis: str            # where the speed comes from


def _tokens(record: dict, max_len: int) -> int:
    """A record's length in tokens, roughly (4 characters a token, plus the chat template)."""
    text = sum(len(m["content"]) for m in record["prompt"]) + len(record.get("response") or
                                                                   record.get("chosen") or "")
    return min(max_len, text // 4 + 8 * len(record["prompt"]) + 8)


def estimate(stage: str, cfg, runs_root: str | Path) -> Estimate:
    """Records, steps and minutes of the run `cfg` describes (see the module docstring)."""
    if stage == "all":
        parts = [estimate(step, cls(**values), runs_root) for step, cls, values in _pipeline(cfg)]
        known = all(p.seconds is not None for p in parts)
        return Estimate(sum(p.records or 0 for p in parts), sum(p.steps or 0 for p in parts),
                        sum(p.seconds for p in parts) if known else None, parts[-1].basis)
    found = records(stage, cfg)
    if found is None or stage not in PHASE:
        return Estimate(None, cfg.max_steps or None, None, "")
    held_out = len(data.holdout(found, cfg.eval_fraction, cfg.max_eval_samples)[1])
    train = found[held_out:]
    procs = cfg.num_procs
    if stage == "ppo":
        per_step = cfg.rollout_batch_size * procs
        epoch_steps = len(train) // per_step
        tokens_per_step = per_step * cfg.max_new_tokens
    else:
        batches = -(-len(train) // cfg.batch_size)
        epoch_steps = batches // (procs * cfg.gradient_accumulation_steps)
        mean = statistics.mean(_tokens(r, cfg.max_seq_len) for r in train) if train else 0
        tokens_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * procs * mean
        tokens_per_step *= 2 if stage == "rm" else 1  # chosen and rejected
    steps = cfg.max_steps or epoch_steps * cfg.num_epochs
    per_token, basis = speed(stage, getattr(cfg, "actor", getattr(cfg, "model", "default")),
                             Path(runs_root))
    return Estimate(len(train), steps, STARTUP_S + steps * tokens_per_step * per_token, basis)


def _pipeline(cfg: AllConfig):
    shared = {"data": cfg.data, "data_split": cfg.data_split, "seed": cfg.seed}
    yield "sft", SFTConfig, {**shared, "model": cfg.actor_model, "max_steps": cfg.sft_max_steps}
    yield "rm", RMConfig, {**shared, "model": cfg.reward_model, "max_steps": cfg.rm_max_steps}
    yield "ppo", PPOConfig, {**shared, "actor": cfg.actor_model, "max_steps": cfg.ppo_max_steps}


def step_problem(stage: str, cfg, found: Estimate) -> str | None:
    """The run's own refusal of too little data (no full optimizer step), in its words."""
    if found.records is None or found.steps or stage not in PHASE:
        return None
    if stage == "ppo":
        return (f"{found.records} prompts make no PPO step of {cfg.rollout_batch_size} prompts: "
                "add prompts or lower the rollout batch size.")
    return (f"{found.records} training examples make no full optimizer step with batch size "
            f"{cfg.batch_size}: add data or lower the batch size.")
