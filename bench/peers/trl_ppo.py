"""Peer driver for bench/ppo.py: TRL 1.12's PPOTrainer (`trl.experimental.ppo`, the newest TRL
that ships PPO) as a user would run it on the CPU, with each PPO update timed.

Started by bench/ppo.py with TRL 1.12 first on PYTHONPATH (our venv holds a newer TRL), never
imported. Set up as TRL's PPO example script does: policy and reference are --model as a causal
LM, reward and value models the same weights as a sequence classifier with one label (fresh
heads: the scores do not matter for timing), fp32 weights with `bf16=True, use_cpu=True`
(bf16 autocast where --precision is bf16, which TRL's PPO applies only to its training forward: rollouts, reference,
value and reward passes run in fp32, as they do for TRL's users), prompts through the chat template with left padding and a "[PAD]" token of its own
(the model's pad token is its end-of-turn token, which TRL would mask out of every prompt).
Sampling at --temperature, stopping at the end-of-turn token, up to --max-new-tokens.

One TRL update = one PPO step of ours: --rollout-batch-size rollouts (generated in one batch),
optimizer steps on minibatches of --batch-size, --ppo-epochs passes. Everything else stays at
TRL's defaults. Left out: TRL's debugging sample generations (no evaluation set).

Timing: an update's wall time is the time between consecutive `on_step_end` callbacks (the first
from `on_train_begin`), so every update's whole loop body is counted. Generation is timed by
wrapping the trainer module's `batch_generation` (which also counts response tokens up to and
including the first end-of-turn token, as ours does); TRL interleaves scoring and training in
one loop, so those are not split.
"""
import argparse
import json
import os
import time

import torch
from driver import BEST, driver_parser

TRL_VERSION = "1.12.0"


def parse_args() -> argparse.Namespace:
    parser = driver_parser("--steps", "--rollout-batch-size", "--batch-size", "--ppo-epochs",
                           "--max-prompt-len", "--max-new-tokens", "--seed", "--threads")
    parser.add_argument("--temperature", type=float, required=True)
    args = parser.parse_args()
    if args.rollout_batch_size % args.batch_size:
        parser.error("TRL's PPO needs --rollout-batch-size to be a multiple of --batch-size")
    return args


def timed_generation(ppo_module, eos_token_id: int, timer: dict):
    """Wrap the trainer's rollout generation: time it and measure response lengths."""
    generate = ppo_module.batch_generation

    def batch_generation(model, queries, *args, **kwargs):
        tic = time.perf_counter()
        query_responses, logits = generate(model, queries, *args, **kwargs)
        timer["generate_s"] += time.perf_counter() - tic
        responses = query_responses[:, queries.shape[1]:]
        is_eos = responses == eos_token_id
        lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, responses.shape[1])
        timer["lengths"] += lengths.tolist()
        return query_responses, logits

    ppo_module.batch_generation = batch_generation


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)

    # TRL 1.12's PPOTrainer builds its own Accelerator, which reads the precision from this
    # variable: transformers 4 set it from bf16=True, transformers 5 no longer does (TRL's PPO
    # would run in fp32). `accelerate launch --mixed_precision bf16` sets it the same way.
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if args.precision == "bf16" else "no"
    import transformers
    import trl
    if trl.__version__ != TRL_VERSION:
        raise SystemExit(f"bench/peers/trl_ppo.py needs TRL {TRL_VERSION} but imported "
                         f"{trl.__version__} from {trl.__file__}: put bench/.peer-trl112 first on "
                         "PYTHONPATH (bench/ppo.py does).")
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer, TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    class UpdateTimer(TrainerCallback):
        """Wall time of each PPO update, and its generation time and response lengths."""

        def __init__(self):
            self.times, self.generate_s, self.lengths, self._tic = [], [], [], 0.0
            self.current = {"generate_s": 0.0, "lengths": []}

        def on_train_begin(self, *_, **__):
            self._tic = time.perf_counter()

        def on_step_end(self, *_, **__):
            now = time.perf_counter()
            self.times.append(now - self._tic)
            self.generate_s.append(self.current["generate_s"])
            self.lengths.append(self.current["lengths"])
            self.current.update(generate_s=0.0, lengths=[])
            self._tic = now

    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})  # as TRL's PPO example does
    records = [json.loads(line) for line in open(args.data, encoding="utf-8")]
    prompts = [{"input_ids": tokenizer.apply_chat_template(
        r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False
    )[-args.max_prompt_len:]} for r in records]  # ours keeps the newest tokens too

    # fp32 weights (TRL's ModelConfig default); bf16=True adds autocast where TRL prepares models.
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ref_policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    value_model, reward_model = (AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=1, dtype=torch.float32) for _ in range(2))
    timer = UpdateTimer()
    timed_generation(ppo_module, tokenizer.eos_token_id, timer.current)
    config = PPOConfig(
        **BEST, output_dir=args.output, bf16=args.precision == "bf16", use_cpu=True, seed=args.seed,
        per_device_train_batch_size=args.rollout_batch_size, gradient_accumulation_steps=1,
        num_mini_batches=args.rollout_batch_size // args.batch_size,
        num_ppo_epochs=args.ppo_epochs, local_rollout_forward_batch_size=args.rollout_batch_size,
        total_episodes=args.steps * args.rollout_batch_size, response_length=args.max_new_tokens,
        temperature=args.temperature, stop_token="eos", num_sample_generations=0,
        report_to="none", save_strategy="no", logging_steps=1, dataloader_num_workers=0,
    )  # everything else stays at TRL's defaults but `BEST`
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy,
                         ref_model=ref_policy, reward_model=reward_model, value_model=value_model,
                         train_dataset=Dataset.from_list(prompts), callbacks=[timer])
    trainer.train()
    if len(timer.times) != args.steps:
        raise SystemExit(f"TRL ran {len(timer.times)} PPO updates, not the {args.steps} asked for")
    with open(args.result, "w", encoding="utf-8") as handle:
        json.dump({"trl": trl.__version__, "transformers": transformers.__version__,
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "mixed_precision": trainer.accelerator.mixed_precision,
                   "device": str(trainer.accelerator.device),
                   "gradient_checkpointing": bool(policy.is_gradient_checkpointing),
                   "step_time_s": timer.times, "time_generate_s": timer.generate_s,
                   "response_lengths": timer.lengths}, handle)


if __name__ == "__main__":
    main()
