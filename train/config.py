"""Typed configs for every step: the one place where options, defaults and help texts live.

The command line (`python -m train sft ...`), YAML files (`--config FILE`) and the app's form
are all built from these dataclasses. Each field carries its help text and, where it has one,
its allowed range or choices in `metadata`; `__post_init__` refuses values outside them with a
message that names the option.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A user-supplied option is invalid; the message names the option and the fix."""


def opt(default, help: str, *, range=None, choices=None, flags=None):
    """A config field with its help text and validation rules in one place."""
    meta = {"help": help}
    if range is not None:
        meta["range"] = range
    if choices is not None:
        meta["choices"] = tuple(choices)
    if flags is not None:
        meta["flags"] = flags  # extra spellings, e.g. {"--bf16": "bf16"} for a choice field
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """Options every training step shares."""

    output: str = opt("", "run folder to create, e.g. runs/sft1")
    data: list[str] = opt([], "data sources: .json/.jsonl/.jsonl.gz files, Hugging Face dataset "
                              "names or folders, or ratings: (the ratings store); several blend")
    data_split: str = opt("", "comma-separated weights such as 2,4,4 that cut every source into "
                              "disjoint SFT, RM and PPO parts; empty uses all of it for this step")
    eval_fraction: float = opt(0.05, "share of this step's data held out for evaluation",
                               range=(0.0, 0.5))
    max_eval_samples: int = opt(200, "cap on held-out records evaluated", range=(0, 100_000))
    seed: int = opt(1234, "random seed for data order, splits and initialisation",
                    range=(0, 2**31 - 1))
    precision: str = opt("bf16", "bf16 (fp32 master weights) or fp32 throughout",
                         choices=("bf16", "fp32"), flags={"--bf16": "bf16", "--fp32": "fp32"})
    zero_stage: int = opt(0, "DeepSpeed ZeRO stage", range=(0, 3))
    offload: bool = opt(False, "offload optimizer state (and, with ZeRO-3, parameters) to CPU memory")
    lora_dim: int = opt(0, "LoRA rank; 0 trains all weights. LoRA weights are merged on save",
                        range=(0, 1024))
    lora_alpha: float = opt(16.0, "LoRA alpha (scale = alpha / rank)", range=(0.0, 4096.0))
    lora_dropout: float = opt(0.0, "dropout on the LoRA branch", range=(0.0, 0.9))
    lora_targets: str = opt("all-linear", "modules LoRA wraps: all-linear or comma-separated "
                                          "names such as q_proj,v_proj")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    batch_size: int = opt(8, "micro-batch size per process", range=(1, 4096))
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step", range=(1, 1024))
    max_seq_len: int = opt(512, "longest tokenised sequence (prompt + response)",
                           range=(16, 32768))
    learning_rate: float = opt(2e-5, "peak learning rate", range=(0.0, 1.0))
    weight_decay: float = opt(0.0, "AdamW weight decay", range=(0.0, 1.0))
    lr_scheduler: str = opt("cosine", "learning-rate schedule after warmup",
                            choices=("cosine", "linear", "constant"))
    warmup_ratio: float = opt(0.05, "share of steps spent warming the learning rate up",
                              range=(0.0, 1.0))
    num_epochs: int = opt(1, "passes over the training data", range=(1, 1000))
    max_steps: int = opt(0, "stop after this many optimizer steps; 0 means num_epochs decides",
                         range=(0, 10_000_000))
    log_every: int = opt(1, "optimizer steps between metric lines", range=(1, 100_000))
    eval_every: int = opt(50, "optimizer steps between evaluations; 0 evaluates only at the end",
                          range=(0, 1_000_000))
    save_every: int = opt(200, "optimizer steps between resumable checkpoints; 0 saves only when "
                               "stopped or finished", range=(0, 1_000_000))
    keep_checkpoints: int = opt(1, "resumable checkpoints kept (each holds optimizer state)",
                                range=(1, 100))
    num_procs: int = opt(1, "processes to start through the deepspeed launcher (app and launcher)",
                         range=(1, 1024))
    tensorboard: bool = opt(True, "write TensorBoard events to <output>/tensorboard")
    overwrite: bool = opt(False, "replace an output folder that already holds a run")
    resume: bool = opt(False, "continue the run in the output folder from its last checkpoint")

    def __post_init__(self):
        validate(self)


@dataclass
class SFTConfig(RunConfig):
    """Step 1: supervised fine-tuning on demonstrations."""

    model: str = opt("default", "base model: default (built-in SmolLM2-135M-Instruct), a local "
                                "Hugging Face folder, a .gguf file or a hub name")
    data: list[str] = opt(["prompts/sft.jsonl"], RunConfig.__dataclass_fields__["data"].metadata["help"])


@dataclass
class RMConfig(RunConfig):
    """Step 2: a reward model trained on preference pairs (prompt, chosen, rejected)."""

    model: str = opt("default", "backbone to put the value head on: default, a local Hugging Face "
                                "folder (such as an SFT run's final/), a .gguf file or a hub name")
    data: list[str] = opt(["prompts/preferences.jsonl"],
                          RunConfig.__dataclass_fields__["data"].metadata["help"])
    learning_rate: float = opt(1e-5, "peak learning rate", range=(0.0, 1.0))
    margin: float = opt(0.0, "required reward gap: loss is -logsigmoid(r_chosen - r_rejected - margin)",
                        range=(0.0, 100.0))
    stats_samples: int = opt(256, "training pairs scored after training for the saved reward "
                                  "mean and std (PPO normalises with them)", range=(1, 1_000_000))


@dataclass
class PPOConfig(RunConfig):
    """Step 3: PPO of the SFT model against the reward model, with a KL penalty to a frozen
    reference, optional EMA of the actor and optional pretraining-mix loss."""

    actor: str = opt("default", "actor and reference: an SFT run's final/, default, a folder or hub name")
    reward: str = opt("", "reward model: an RM run's final/ (required)")
    critic: str = opt("", "critic initialisation; empty uses the reward model")
    data: list[str] = opt(["prompts/prompts.jsonl"], "prompt sources (any record format; only the "
                                                     "prompts are used)")
    learning_rate: float = opt(2e-6, "actor peak learning rate", range=(0.0, 1.0))
    critic_learning_rate: float = opt(5e-6, "critic peak learning rate", range=(0.0, 1.0))
    batch_size: int = opt(8, "PPO minibatch size per process (rollouts per optimizer step)",
                          range=(1, 4096))
    rollout_batch_size: int = opt(16, "prompts generated per PPO step per process", range=(1, 4096))
    ppo_epochs: int = opt(1, "passes over each rollout batch", range=(1, 100))
    max_prompt_len: int = opt(256, "longest prompt in tokens (older tokens are cut)", range=(8, 32768))
    max_new_tokens: int = opt(64, "longest generated response", range=(1, 8192))
    temperature: float = opt(1.0, "sampling temperature of rollouts", range=(0.01, 10.0))
    top_p: float = opt(1.0, "nucleus sampling of rollouts", range=(0.01, 1.0))
    kl_coef: float = opt(0.05, "weight of the per-token KL penalty to the reference",
                         range=(0.0, 100.0))
    adaptive_kl: bool = opt(False, "adapt kl_coef towards kl_target (Ziegler et al.)")
    kl_target: float = opt(6.0, "target KL per response for the adaptive controller",
                           range=(0.0, 1000.0))
    kl_horizon: int = opt(10000, "horizon of the adaptive KL controller", range=(1, 10**9))
    gamma: float = opt(1.0, "discount factor of GAE", range=(0.0, 1.0))
    lam: float = opt(0.95, "lambda of GAE", range=(0.0, 1.0))
    cliprange: float = opt(0.2, "PPO policy ratio clip", range=(0.0, 10.0))
    cliprange_value: float = opt(0.2, "critic value clip", range=(0.0, 100.0))
    reward_clip: float = opt(5.0, "clip normalised rewards to +-this", range=(0.0, 1000.0))
    normalize_reward: bool = opt(True, "normalise scores with the reward model's saved mean and std")
    whiten_advantages: bool = opt(True, "whiten advantages within each rollout batch")
    ema: bool = opt(False, "keep an exponential moving average of the actor, saved as ema/")
    ema_beta: float = opt(0.992, "EMA decay per actor step", range=(0.0, 1.0))
    ptx_data: list[str] = opt([], "pretraining/SFT sources mixed into the actor loss")
    ptx_coef: float = opt(1.0, "weight of the mixed-in SFT loss (with --ptx-data)", range=(0.0, 1000.0))
    generation: str = opt("hybrid", "rollout generation: hybrid (the hybrid engine) or hf "
                                    "(Hugging Face generate, the baseline)", choices=("hybrid", "hf"))
    hybrid_engine: bool = opt(True, "on CUDA, use DeepSpeed's Hybrid Engine for rollouts where it "
                                    "supports the architecture (else the project's own path)")
    sample_every: int = opt(1, "PPO steps between rollout samples written to samples.jsonl",
                            range=(1, 100_000))
    max_eval_samples: int = opt(32, "held-out prompts whose reward is measured", range=(0, 100_000))
    eval_every: int = opt(0, "PPO steps between held-out reward evaluations; 0: start and end",
                          range=(0, 1_000_000))


@dataclass
class AllConfig:
    """SFT, reward model and PPO in a row into <output>/sft, /rm and /ppo; a step whose folder
    already holds a finished result is reused, a stopped one resumed."""

    output: str = opt("", "pipeline folder, e.g. runs/demo")
    actor_model: str = opt("default", "base model of SFT (and so of the PPO actor)")
    reward_model: str = opt("default", "backbone of the reward model")
    data: list[str] = opt(["prompts/sft.jsonl", "prompts/preferences.jsonl", "prompts/prompts.jsonl"],
                          "sources shared by the three steps; each step uses its part and the "
                          "records it can use")
    data_split: str = opt("2,4,4", "weights cutting every source into disjoint SFT, RM and PPO parts")
    seed: int = opt(1234, "random seed of all three steps", range=(0, 2**31 - 1))
    precision: str = opt("bf16", "bf16 (fp32 master weights) or fp32 throughout",
                         choices=("bf16", "fp32"), flags={"--bf16": "bf16", "--fp32": "fp32"})
    zero_stage: int = opt(0, "DeepSpeed ZeRO stage of all steps", range=(0, 3))
    sft_max_steps: int = opt(0, "SFT optimizer steps; 0: one epoch", range=(0, 10_000_000))
    rm_max_steps: int = opt(0, "reward-model optimizer steps; 0: one epoch", range=(0, 10_000_000))
    ppo_max_steps: int = opt(0, "PPO steps; 0: one pass over the prompts", range=(0, 10_000_000))
    sft_config: str = opt("", "YAML file with more SFT options")
    rm_config: str = opt("", "YAML file with more reward-model options")
    ppo_config: str = opt("", "YAML file with more PPO options (e.g. ema: true)")
    overwrite: bool = opt(False, "run every step again, replacing finished ones")

    def __post_init__(self):
        validate(self)


@dataclass
class EvalRMConfig:
    """Score preference pairs with a reward model; prints accuracy and margins as JSON."""

    reward: str = opt("", "reward-model folder (an RM run's final/)")
    data: list[str] = opt([], "preference sources (files, datasets, ratings:)")
    per_source: bool = opt(False, "also break the figures down by source")
    batch_size: int = opt(8, "pairs scored at once", range=(1, 4096))
    max_seq_len: int = opt(512, "longest tokenised sequence (prompt + answer)", range=(16, 32768))
    max_samples: int = opt(0, "score at most this many pairs per source; 0 scores all",
                           range=(0, 10_000_000))
    precision: str = opt("bf16", "bf16 or fp32 inference", choices=("bf16", "fp32"),
                         flags={"--bf16": "bf16", "--fp32": "fp32"})

    def __post_init__(self):
        validate(self)


STEPS: dict[str, type] = {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig, "all": AllConfig,
                          "eval-rm": EvalRMConfig}


# ---- validation ---------------------------------------------------------------------------

def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(cfg) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        lo_hi = f.metadata.get("range")
        if lo_hi is not None and not (lo_hi[0] <= value <= lo_hi[1]):
            raise ConfigError(f"{flag_name(f.name)} {value} is out of range: allowed "
                              f"{lo_hi[0]} to {lo_hi[1]}.")
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{flag_name(f.name)} {value!r} is not one of {', '.join(choices)}.")
    if getattr(cfg, "data_split", ""):
        parse_split(cfg.data_split)
    if hasattr(cfg, "resume") and cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: pass only one.")


def parse_split(text: str) -> list[float]:
    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ConfigError(f"--data-split {text!r} must be three non-negative weights for SFT, RM "
                          "and PPO, such as 2,4,4.")
    return parts


# ---- command line and YAML ------------------------------------------------------------------

def _field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one option per config field; defaults stay in the dataclass (SUPPRESS here)."""
    types = _field_types(cls)
    parser.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file; "
                        "options given on the command line win")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    for f in dataclasses.fields(cls):
        kind = types[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} (default: {default})"
        if kind is bool:
            parser.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif kind == list[str]:
            parser.add_argument(flag_name(f.name), nargs="+", default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(flag_name(f.name), type=kind, default=argparse.SUPPRESS,
                                metavar=f.name.upper(), help=help_text)
        for spelling, value in f.metadata.get("flags", {}).items():
            parser.add_argument(spelling, dest=f.name, action="store_const", const=value,
                                default=argparse.SUPPRESS, help=f"same as {flag_name(f.name)} {value}")


def load_yaml(path: str | Path, cls) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass the path of a YAML file.")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML ({err.__class__.__name__}): "
                          "fix its syntax.") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value.")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"config file {path} has unknown option(s) {', '.join(unknown)}: "
                          "see --help for the options of this step.")
    return values


def from_namespace(cls, namespace: argparse.Namespace):
    """Build a config from parsed args: dataclass defaults < YAML file < explicit flags."""
    explicit = {k: v for k, v in vars(namespace).items()
                if k not in ("config", "local_rank", "step")}
    values = load_yaml(namespace.config, cls) if getattr(namespace, "config", None) else {}
    values.update(explicit)
    return build(cls, values)


def build(cls, values: dict):
    """Construct a config from plain values, coercing YAML/form types and naming bad ones."""
    types = _field_types(cls)
    coerced = {}
    for name, value in values.items():
        kind = types.get(name)
        if kind is None:
            raise ConfigError(f"unknown option {flag_name(name)}.")
        coerced[name] = _coerce(name, kind, value)
    return cls(**coerced)


def _coerce(name, kind, value):
    try:
        if kind == list[str]:
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        if kind is bool:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag_name(name)} {value!r} is not a valid {kind.__name__}.") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def to_argv(step: str, cfg) -> list[str]:
    """The command-line arguments that reproduce `cfg` (options left at default are omitted)."""
    defaults = type(cfg)()
    argv = [step]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value == getattr(defaults, f.name):
            continue
        if isinstance(value, bool):
            argv.append(flag_name(f.name) if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, list):
            argv += [flag_name(f.name), *map(str, value)]
        else:
            argv += [flag_name(f.name), str(value)]
    return argv
