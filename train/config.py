"""Typed configs of every stage: the one place where options, defaults and help texts live.

The command line (`python -m train sft ...`), YAML files (`--config FILE`) and the app's form
are all built from these dataclasses (core/options.py turns a field into each). Each field
carries its help text, its form group and, where it has one, its allowed range or choices;
`__post_init__` refuses values outside them with a message that names the option. Groups order
the app's form: model, data, run and main (the few settings that matter) open, then training,
lora, deepspeed, rl and evaluation (and saving) closed; a field without one goes under "other".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from core.hardware import PRECISIONS
from core.options import ConfigError, opt, validate



def precision_option(group: str = "main"):
    return opt("auto", "auto: bf16 (fp32 master weights) where the hardware computes it natively, "
                       "else fp32 (fp16 with loss scaling on a GPU without bf16); or force bf16, "
                       "fp16 (CUDA) or fp32", choices=PRECISIONS,
               flags={"--bf16": "bf16", "--fp32": "fp32"}, group=group)


ROLLOUT_ENGINES = ("auto", "deepspeed", "fused", "hf")
RL_ALGORITHMS = ("ppo", "grpo", "rloo")


@dataclass
class RunConfig:
    """Options every training step shares."""

    output: str = opt("", "run folder to create, e.g. runs/sft1", group="run")
    data: list[str] = opt([], "data sources: .json/.jsonl/.jsonl.gz files, Hugging Face dataset "
                              "names or folders, or ratings: (the ratings store); several blend",
                          group="data")
    data_split: str = opt("", "comma-separated weights such as 2,4,4 that cut every source into "
                              "disjoint SFT, RM and PPO parts; empty uses all of it for this step",
                          group="data")
    eval_fraction: float = opt(0.05, "share of this step's data held out for evaluation",
                               range=(0.0, 0.5), group="evaluation")
    max_eval_samples: int = opt(200, "cap on held-out records evaluated", range=(0, 100_000),
                                group="evaluation")
    seed: int = opt(1234, "random seed for data order, splits and initialisation",
                    range=(0, 2**31 - 1), group="training")
    precision: str = precision_option()
    zero_stage: int = opt(0, "DeepSpeed ZeRO stage", range=(0, 3), group="deepspeed")
    offload: bool = opt(False, "offload optimizer state (and, with ZeRO-3, parameters) to CPU memory",
                        group="deepspeed")
    lora_dim: int = opt(0, "LoRA rank; 0 trains all weights. LoRA weights are merged on save",
                        range=(0, 1024), group="lora")
    lora_alpha: float = opt(16.0, "LoRA alpha (scale = alpha / rank)", range=(0.0, 4096.0),
                            group="lora")
    lora_dropout: float = opt(0.0, "dropout on the LoRA branch", range=(0.0, 0.9), group="lora")
    lora_targets: str = opt("all-linear", "modules LoRA wraps: all-linear or comma-separated "
                                          "names such as q_proj,v_proj", group="lora")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory",
                                       group="deepspeed")
    batch_size: int = opt(8, "micro-batch size per process", range=(1, 4096), group="main")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step", range=(1, 1024),
                                           group="training")
    max_seq_len: int = opt(512, "longest tokenised sequence (prompt + response)",
                           range=(16, 32768), group="training")
    learning_rate: float = opt(2e-5, "peak learning rate", range=(0.0, 1.0), group="main")
    weight_decay: float = opt(0.0, "AdamW weight decay", range=(0.0, 1.0), group="training")
    lr_scheduler: str = opt("cosine", "learning-rate schedule after warmup",
                            choices=("cosine", "linear", "constant"), group="training")
    warmup_ratio: float = opt(0.05, "share of steps spent warming the learning rate up",
                              range=(0.0, 1.0), group="training")
    num_epochs: int = opt(1, "passes over the training data", range=(1, 1000), group="main")
    max_steps: int = opt(0, "stop after this many optimizer steps; 0 means num_epochs decides",
                         range=(0, 10_000_000), group="main")
    log_every: int = opt(1, "optimizer steps between metric lines", range=(1, 100_000),
                         group="evaluation")
    eval_every: int = opt(50, "optimizer steps between evaluations; 0 evaluates only at the end",
                          range=(0, 1_000_000), group="evaluation")
    save_every: int = opt(200, "optimizer steps between resumable checkpoints; 0 saves only when "
                               "stopped or finished", range=(0, 1_000_000), group="evaluation")
    keep_checkpoints: int = opt(1, "resumable checkpoints kept (each holds optimizer state)",
                                range=(1, 100), group="evaluation")
    num_procs: int = opt(1, "processes to start through the deepspeed launcher (app and launcher)",
                         range=(1, 1024), group="deepspeed")
    tensorboard: bool = opt(True, "write TensorBoard events to <output>/tensorboard",
                            group="evaluation")
    overwrite: bool = opt(False, "replace an output folder that already holds a run", group="run")
    resume: bool = opt(False, "continue the run in the output folder from its last checkpoint",
                       group="run")

    def __post_init__(self):
        validate(self)
        if self.data_split:
            parse_split(self.data_split)
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: pass only one.")


@dataclass
class SFTConfig(RunConfig):
    """Step 1: supervised fine-tuning on demonstrations."""

    model: str = opt("default", "base model: default (built-in SmolLM2-135M-Instruct), a local "
                                "Hugging Face folder, a .gguf file or a hub name", group="model")
    data: list[str] = opt(["prompts/sft.jsonl"], RunConfig.__dataclass_fields__["data"].metadata["help"],
                          group="data")


@dataclass
class RMConfig(RunConfig):
    """Step 2: a reward model trained on preference pairs (prompt, chosen, rejected)."""

    model: str = opt("default", "backbone to put the value head on: default, a local Hugging Face "
                                "folder (such as an SFT run's final/), a .gguf file or a hub name",
                     group="model")
    data: list[str] = opt(["prompts/preferences.jsonl"],
                          RunConfig.__dataclass_fields__["data"].metadata["help"], group="data")
    learning_rate: float = opt(1e-5, "peak learning rate", range=(0.0, 1.0), group="main")
    margin: float = opt(0.0, "required reward gap: loss is -logsigmoid(r_chosen - r_rejected - margin)",
                        range=(0.0, 100.0), group="training")
    stats_samples: int = opt(256, "training pairs scored after training for the saved reward "
                                  "mean and std (PPO normalises with them)", range=(1, 1_000_000),
                             group="training")


@dataclass
class PPOConfig(RunConfig):
    """Step 3: RL of the SFT model against the reward model (PPO with a critic, or critic-free
    GRPO and RLOO), with a KL penalty to a frozen reference, optional EMA of the actor and
    optional pretraining-mix loss."""

    algorithm: str = opt("ppo", "ppo: clipped policy loss with GAE advantages from a critic "
                                "(trained from the reward model); grpo: no critic, advantages "
                                "are each response's score against its group's mean, over the "
                                "group's std; rloo: no critic, each score minus the mean of the "
                                "other responses to the same prompt", choices=RL_ALGORITHMS, group="main")
    group_size: int = opt(0, "responses sampled per prompt (a group); 0: 1 for ppo, 4 for grpo "
                             "and rloo, which need at least 2", range=(0, 256), group="main")
    kl_penalty: str = opt("auto", "where the KL to the reference goes: reward (-kl_coef x the "
                                  "log-ratio, per token for ppo, summed per response before the "
                                  "group baseline for grpo/rloo) or loss (kl_coef x the k3 "
                                  "estimator per token, added to the policy loss); auto: reward "
                                  "for ppo, loss for grpo and rloo", choices=("auto", "reward", "loss"), group="rl")
    loss_aggregation: str = opt("token", "how per-token policy (and KL) losses are averaged: token "
                                         "(over all response tokens of a minibatch: every token "
                                         "weighs the same) or sequence (within each response, "
                                         "then over responses: every response weighs the same)",
                                choices=("token", "sequence"), group="rl")
    actor: str = opt("default", "actor and reference: an SFT run's final/, default, a folder or hub name", group="model")
    reward: str = opt("", "reward model: an RM run's final/ (required)", group="model")
    critic: str = opt("", "critic initialisation (ppo); empty uses the reward model", group="model")
    data: list[str] = opt(["prompts/prompts.jsonl"], "prompt sources (any record format; only the "
                                                     "prompts are used)", group="data")
    learning_rate: float = opt(2e-6, "actor peak learning rate", range=(0.0, 1.0), group="main")
    critic_learning_rate: float = opt(5e-6, "critic peak learning rate (ppo)", range=(0.0, 1.0), group="rl")
    batch_size: int = opt(8, "rollouts per micro-batch of the policy update, per process; an "
                             "optimizer step takes --gradient-accumulation-steps micro-batches",
                          range=(1, 4096), group="main")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step; must divide the "
                                              "micro-batches of one pass over a step's rollouts "
                                              "(the schedule and the EMA count optimizer steps)",
                                           range=(1, 1024), group="training")
    score_batch_size: int = opt(0, "rollouts per scoring forward (actor, reference, critic, "
                                   "reward model); 0: --batch-size, so that where the actor is "
                                   "scored (--rollout-logprobs) the first update's policy ratio "
                                   "is exactly 1 (same rows, same numerics)",
                                range=(0, 4096), group="training")
    rollout_batch_size: int = opt(16, "prompts generated per step per process (each sampled "
                                      "--group-size times)", range=(1, 4096), group="main")
    ppo_epochs: int = opt(1, "passes over each rollout batch", range=(1, 100), group="rl")
    max_prompt_len: int = opt(256, "longest prompt in tokens (older tokens are cut)", range=(8, 32768), group="rl")
    max_new_tokens: int = opt(64, "longest generated response", range=(1, 8192), group="main")
    temperature: float = opt(1.0, "sampling temperature of rollouts; the actor's and the "
                                  "reference's log-probs are taken at the same temperature",
                             range=(0.01, 10.0), group="rl")
    top_p: float = opt(1.0, "nucleus sampling of rollouts", range=(0.01, 1.0), group="rl")
    kl_coef: float = opt(0.05, "weight of the per-token KL penalty to the reference",
                         range=(0.0, 100.0), group="main")
    adaptive_kl: bool = opt(False, "adapt kl_coef towards kl_target (Ziegler et al.)", group="rl")
    kl_target: float = opt(6.0, "target KL per response for the adaptive controller",
                           range=(0.0, 1000.0), group="rl")
    kl_horizon: int = opt(10000, "horizon of the adaptive KL controller", range=(1, 10**9), group="rl")
    gamma: float = opt(1.0, "discount factor of GAE", range=(0.0, 1.0), group="rl")
    lam: float = opt(0.95, "lambda of GAE", range=(0.0, 1.0), group="rl")
    cliprange: float = opt(0.2, "PPO policy ratio clip", range=(0.0, 10.0), group="rl")
    cliprange_value: float = opt(0.2, "critic value clip", range=(0.0, 100.0), group="rl")
    reward_clip: float = opt(5.0, "clip normalised rewards to +-this", range=(0.0, 1000.0), group="rl")
    normalize_reward: bool = opt(True, "normalise scores with the reward model's saved mean and std", group="rl")
    whiten_advantages: bool = opt(True, "whiten GAE advantages within each rollout batch (ppo)", group="rl")
    ema: bool = opt(False, "keep an exponential moving average of the actor, saved as ema/", group="main")
    ema_beta: float = opt(0.992, "EMA decay per actor optimizer step", range=(0.0, 1.0), group="rl")
    ptx_data: list[str] = opt([], "pretraining/SFT sources mixed into the actor loss", group="rl")
    ptx_coef: float = opt(1.0, "weight of the mixed-in SFT loss (with --ptx-data)", range=(0.0, 1000.0), group="rl")
    rollout_engine: str = opt("auto", "what generates rollouts: deepspeed (DeepSpeed's Hybrid "
                                      "Engine, CUDA and the architectures it supports), fused (our "
                                      "slot decoder), hf (Hugging Face generate, the baseline); "
                                      "auto: deepspeed where it can run, else fused",
                              choices=ROLLOUT_ENGINES, group="rl")
    rollout_logprobs: str = opt("auto", "where the policy ratio's old log-probs come from: auto "
                                        "takes those recorded while sampling where they equal the "
                                        "training forward's (fused rollouts of an actor trained "
                                        "in fp32) and saves that forward, else runs it; forward "
                                        "always runs it (the first update's ratio then is exactly 1)",
                                choices=("auto", "forward"), group="rl")
    # replaced by rollout_engine; still read, with a deprecation line, from the command line and
    # from older runs' config.yaml: old name -> (type, value -> new options)
    RENAMED: ClassVar[dict] = {
        "generation": (str, lambda value: {"rollout_engine": "hf" if value == "hf" else "auto"}),
        "hybrid_engine": (bool, lambda value: {} if value else {"rollout_engine": "fused"}),
    }
    sample_every: int = opt(1, "PPO steps between rollout samples written to samples.jsonl",
                            range=(1, 100_000), group="evaluation")
    max_eval_samples: int = opt(32, "held-out prompts whose reward is measured", range=(0, 100_000),
                                group="evaluation")
    eval_every: int = opt(0, "PPO steps between held-out reward evaluations; 0: start and end",
                          range=(0, 1_000_000), group="evaluation")

    def __post_init__(self):
        super().__post_init__()
        if self.algorithm != "ppo" and self.group_size == 1:
            raise ConfigError(f"--algorithm {self.algorithm} compares responses to the same prompt: "
                              "set --group-size to 2 or more (or 0 for the default, 4).")
        if self.micro_batches_per_pass % self.gradient_accumulation_steps:
            raise ConfigError(f"--gradient-accumulation-steps {self.gradient_accumulation_steps} must "
                              f"divide the {self.micro_batches_per_pass} micro-batches of --batch-size "
                              f"{self.batch_size} in a step's {self.rollouts_per_step} rollouts, so that "
                              "no optimizer step mixes two steps' rollouts: change one of them.")

    @property
    def samples_per_prompt(self) -> int:
        return self.group_size or (1 if self.algorithm == "ppo" else 4)

    @property
    def rollouts_per_step(self) -> int:
        return self.rollout_batch_size * self.samples_per_prompt

    @property
    def micro_batches_per_pass(self) -> int:
        return -(-self.rollouts_per_step // self.batch_size)

    @property
    def optimizer_steps_per_step(self) -> int:
        return self.ppo_epochs * self.micro_batches_per_pass // self.gradient_accumulation_steps

    @property
    def kl_in_loss(self) -> bool:
        return self.kl_penalty == "loss" or (self.kl_penalty == "auto" and self.algorithm != "ppo")


DPO_LOSSES = ("sigmoid", "robust", "ipo", "simpo")


@dataclass
class DPOConfig(RunConfig):
    """Direct preference optimisation: the chat model learns from preference pairs against a frozen
    reference, without a reward model (Rafailov et al. 2023; IPO, robust DPO and SimPO variants)."""

    model: str = opt("default", "model to train: an SFT run's final/, default, a folder, a .gguf "
                                "file or a hub name")
    reference: str = opt("", "frozen reference; empty: the starting --model (with LoRA: --model "
                             "with its adapters disabled, no second copy). Unused by simpo")
    data: list[str] = opt(["prompts/preferences.jsonl"], "preference sources (files, datasets, "
                          "ratings:); with --data-split DPO takes the third (step-3) part of each, "
                          "disjoint from the SFT and reward-model parts. Ties and both-bad votes "
                          "are never pairs: the ratings export leaves them out")
    eval_data: list[str] = opt([], "held-out preference sources evaluated instead of an "
                                   "--eval-fraction share of --data (at most --max-eval-samples)")
    loss: str = opt("sigmoid", "sigmoid: DPO; robust: robust DPO, unbiased under labels flipped "
                               "with probability --label-smoothing; ipo: IPO on length-averaged "
                               "log-probs; simpo: SimPO, reference-free and length-normalised",
                    choices=DPO_LOSSES)
    beta: float = opt(0.1, "strength of the implicit KL to the reference: lower moves further "
                           "from it (for simpo the reward scale, typically 2)", range=(1e-4, 100.0))
    label_smoothing: float = opt(0.0, "assumed share of flipped labels (noisy human votes): "
                                      "conservative DPO for sigmoid and simpo, the correction "
                                      "factor for robust", range=(0.0, 0.49))
    simpo_gamma: float = opt(0.5, "simpo's target margin between chosen and rejected rewards",
                             range=(0.0, 100.0))
    learning_rate: float = opt(1e-6, "peak learning rate", range=(0.0, 1.0))

    def __post_init__(self):
        super().__post_init__()
        if self.loss == "ipo" and self.label_smoothing:
            raise ConfigError("--label-smoothing does not apply to --loss ipo: leave it at 0, or "
                              "use sigmoid, robust or simpo.")


RL_STEPS = ("ppo", "grpo", "dpo")


@dataclass
class AllConfig:
    """SFT, reward model (+ judge), then PPO, GRPO or DPO, then the report, in a row into
    <output>/sft, /rm, /judge, /<rl>; a finished step is reused, a stopped one resumed."""

    output: str = opt("", "pipeline folder, e.g. runs/demo", group="run")
    actor_model: str = opt("default", "base model of SFT (and so of the PPO actor)", group="model")
    reward_model: str = opt("default", "backbone of the reward model", group="model")
    data: list[str] = opt(["prompts/sft.jsonl", "prompts/preferences.jsonl", "prompts/prompts.jsonl"],
                          "sources shared by the three steps; each step uses its part and the "
                          "records it can use", group="data")
    data_split: str = opt("2,4,4", "weights cutting every source into disjoint SFT, RM and PPO parts",
                          group="data")
    seed: int = opt(1234, "random seed of all three steps", range=(0, 2**31 - 1), group="training")
    precision: str = precision_option()
    zero_stage: int = opt(0, "DeepSpeed ZeRO stage of all steps", range=(0, 3), group="deepspeed")
    sft_max_steps: int = opt(0, "SFT optimizer steps; 0: one epoch", range=(0, 10_000_000), group="main")
    rm_max_steps: int = opt(0, "reward-model optimizer steps; 0: one epoch", range=(0, 10_000_000), group="main")
    ppo_max_steps: int = opt(0, "PPO (and GRPO) steps; 0: one pass over the prompts",
                             range=(0, 10_000_000), group="main")
    rl: str = opt("ppo", "the third step: ppo, grpo (the PPO step with --algorithm grpo) or dpo "
                         "(on the preference pairs of the third part)", choices=RL_STEPS, group="main")
    judge: bool = opt(True, "train a judge reward model on the second half of the reward-model part "
                            "(the reward model takes the first half) for the report", group="main")
    report: bool = opt(True, "end with the report of the third step (python -m train report)", group="main")
    dpo_max_steps: int = opt(0, "DPO optimizer steps; 0: one epoch", range=(0, 10_000_000), group="main")
    sft_config: str = opt("", "YAML file with more SFT options", group="training")
    rm_config: str = opt("", "YAML file with more reward-model options (the judge's too)", group="training")
    ppo_config: str = opt("", "YAML file with more PPO (and GRPO) options (e.g. ema: true)", group="training")
    dpo_config: str = opt("", "YAML file with more DPO options (e.g. beta: 0.2)", group="training")
    report_config: str = opt("", "YAML file with more report options (e.g. max_samples: 32)", group="training")
    overwrite: bool = opt(False, "run every step again, replacing finished ones", group="run")

    def __post_init__(self):
        validate(self)
        parse_split(self.data_split)


@dataclass
class EvalRMConfig:
    """Score preference pairs with a reward model; prints accuracy and margins as JSON."""

    reward: str = opt("", "reward-model folder (an RM run's final/)", group="model")
    data: list[str] = opt([], "preference sources (files, datasets, ratings:)", group="data")
    per_source: bool = opt(False, "also break the figures down by source", group="main")
    batch_size: int = opt(8, "pairs scored at once", range=(1, 4096), group="main")
    max_seq_len: int = opt(512, "longest tokenised sequence (prompt + answer)", range=(16, 32768),
                           group="main")
    max_samples: int = opt(0, "score at most this many pairs per source; 0 scores all",
                           range=(0, 10_000_000), group="main")
    precision: str = precision_option()

    def __post_init__(self):
        validate(self)


@dataclass
class ReportConfig:
    """Evidence that a run made its model better: before and after on held-out data, a judge, alarms."""

    POSITIONAL: ClassVar[str] = "run"  # python -m train report RUN
    run: str = opt("", "run folder to report on (a PPO, DPO or reward-model run, or a `train all` "
                       "folder); the report goes to report.json and report.md inside it")
    judge: str = opt("", "judge reward model, trained on data disjoint from the run's; empty: the "
                         "judge/ of the `train all` folder the run sits in, if any, else no judge")
    proxy: str = opt("", "reward model of the proxy reward; empty: the run's own (PPO's --reward, "
                         "or for DPO its implicit reward beta * log(pi / pi_ref))")
    checkpoint: str = opt("final", "the run's checkpoint compared with its start", choices=("final", "ema"))
    data: list[str] = opt([], "held-out sources (prompts, or pairs for a reward model); empty: the "
                              "records the run itself held out")
    max_samples: int = opt(64, "held-out prompts (pairs for a reward model) evaluated",
                           range=(1, 100_000))
    max_new_tokens: int = opt(64, "longest answer generated per prompt (greedy)", range=(1, 8192))
    max_prompt_len: int = opt(256, "longest prompt in tokens (older tokens are cut)", range=(8, 32768))
    batch_size: int = opt(16, "prompts answered (or pairs scored) at once", range=(1, 4096))
    bootstrap: int = opt(2000, "bootstrap resamples behind each interval", range=(100, 1_000_000))
    seed: int = opt(0, "seed of the bootstrap", range=(0, 2**31 - 1))
    samples: int = opt(8, "side-by-side samples shown", range=(0, 1000))
    length_ratio: float = opt(1.5, "alarm when answers grow longer than this many times the "
                                   "start's", range=(1.0, 100.0))
    chosen_logp_drop: float = opt(0.5, "alarm when a DPO run's held-out chosen log-prob falls by "
                                       "more than this many nats per token", range=(0.0, 100.0))
    precision: str = precision_option()

    def __post_init__(self):
        validate(self)


STAGES: dict[str, type] = {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig, "dpo": DPOConfig,
                           "all": AllConfig, "eval-rm": EvalRMConfig, "report": ReportConfig}


def parse_split(text: str) -> list[float]:
    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        parts = []
    # nan passes every comparison and inf makes every share nan, so both are refused here.
    if len(parts) != 3 or not all(math.isfinite(p) and p >= 0 for p in parts) or sum(parts) <= 0:
        raise ConfigError(f"--data-split {text!r} must be three finite non-negative weights for SFT, "
                          "RM and PPO, not all zero, such as 2,4,4.")
    return parts
