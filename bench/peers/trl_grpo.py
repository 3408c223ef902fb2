"""Peer driver for bench/grpo.py: TRL's GRPOTrainer as a user would run it on this machine, with
each generation cycle (one GRPO step of ours) timed.

Started by bench/grpo.py with bench/.peer-trl's python (current TRL, its own venv), never
imported. Set up as TRL's GRPO documentation does: the policy is --model as a causal LM with fp32
weights (`use_cpu=True`; `bf16=True`, autocast, only with --precision bf16, which bench/grpo.py
passes where the CPU computes bf16 natively), the reward model the same
weights as a sequence classifier with one label (a fresh head: its scores do not matter for
timing, and it costs what ours costs), prompts in chat form (TRL applies the chat template).

One GRPO step of ours = one TRL generation cycle: --prompts prompts x --group-size completions
generated in one batch (`num_generations`, `generation_batch_size`), then optimizer steps on
minibatches of --batch-size completions (`steps_per_generation`, no accumulation), one pass
(`num_iterations=1`), clip 0.2, KL coefficient `beta` = --kl-coef (so TRL loads and runs the
reference model as ours does), token-level loss (TRL's default "dapo"), rewards scaled by the
group's std (TRL's default), sampling at --temperature up to --max-new-tokens, stopping at the
end-of-turn token. Everything else stays at TRL's defaults, but gradient checkpointing is off (driver.BEST).

Timing: a cycle's wall time runs from the start of one `_generate_and_score_completions` (TRL's
rollout and scoring) to the start of the next (the last cycle ends at the last `on_step_end`), so
the whole loop body counts. Generation is timed by wrapping `_generate_single_turn` (which also
gives response lengths, end-of-turn token included as ours counts it); scoring is the rest of
`_generate_and_score_completions`; training is the rest of the cycle.
"""
import json
import time

import torch
from driver import BEST, driver_parser, read_records


def parse_args():
    parser = driver_parser("--steps", "--prompts", "--group-size", "--batch-size", "--max-new-tokens",
                           "--seed", "--threads")
    parser.add_argument("--temperature", type=float, required=True)
    parser.add_argument("--kl-coef", type=float, required=True)
    parser.add_argument("--learning-rate", type=float, required=True)
    args = parser.parse_args()
    if (args.prompts * args.group_size) % args.batch_size:
        parser.error("TRL splits a generation batch into equal minibatches: make --prompts x "
                     "--group-size a multiple of --batch-size")
    return args


def timed(trainer, name: str, seconds: list, after=None):
    """Wrap the trainer's method `name`: append each call's seconds (and pass results to `after`)."""
    method = getattr(trainer, name)

    def wrapper(*args, **kwargs):
        tic = time.perf_counter()
        result = method(*args, **kwargs)
        seconds.append((tic, time.perf_counter() - tic))
        if after is not None:
            after(result)
        return result

    setattr(trainer, name, wrapper)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepEnds(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter())

    dataset = Dataset.from_list([{"prompt": row["prompt"]} for row in read_records(args.data)])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1,
                                                                      dtype=torch.float32)
    completions = args.prompts * args.group_size
    cycle = completions // args.batch_size  # optimizer steps per generation cycle
    config = GRPOConfig(
        **BEST, output_dir=args.output, use_cpu=True, bf16=args.precision == "bf16", seed=args.seed,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        steps_per_generation=cycle, num_generations=args.group_size, num_iterations=1,
        max_completion_length=args.max_new_tokens, temperature=args.temperature,
        beta=args.kl_coef, learning_rate=args.learning_rate, max_steps=args.steps * cycle,
        report_to="none", save_strategy="no", logging_steps=1, dataloader_num_workers=0,
    )  # everything else stays at TRL's defaults but `BEST`
    ends = StepEnds()
    trainer = GRPOTrainer(model=policy, reward_funcs=reward_model, args=config, train_dataset=dataset,
                          processing_class=tokenizer, reward_processing_classes=tokenizer,
                          callbacks=[ends])
    generate_s, rollout_s, lengths = [], [], []
    timed(trainer, "_generate_single_turn", generate_s,
          after=lambda result: lengths.append([len(ids) for ids in result[0]]))
    timed(trainer, "_generate_and_score_completions", rollout_s)
    trainer.train()

    starts = [tic for tic, _ in rollout_s] + [ends.times[-1]]
    if len(rollout_s) != args.steps or len(generate_s) != args.steps:
        raise SystemExit(f"TRL ran {len(rollout_s)} generation cycles, not the {args.steps} asked for")
    with open(args.result, "w", encoding="utf-8") as handle:
        json.dump({"trl": trl.__version__, "transformers": transformers.__version__,
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "mixed_precision": trainer.accelerator.mixed_precision,
                   "loss_type": config.loss_type, "scale_rewards": config.scale_rewards,
                   "gradient_checkpointing": bool(policy.is_gradient_checkpointing),
                   "step_time_s": [b - a for a, b in zip(starts, starts[1:])],
                   "time_generate_s": [s for _, s in generate_s],
                   "time_score_s": [r - g for (_, r), (_, g) in zip(rollout_s, generate_s)],
                   "response_lengths": lengths}, handle)


if __name__ == "__main__":
    main()
