"""Peer driver for bench/dpo.py: TRL's DPOTrainer as a user would run it, with each step timed.

Started by bench/dpo.py with the python of bench/.peer-trl (current TRL), never imported. Reads
conversational preference records (prompt, chosen, rejected as messages) from --data, trains
--steps optimizer steps on the CPU in --precision (bf16 autocast where the CPU computes bf16
natively, else fp32) with the sigmoid loss, a frozen reference model (TRL's default: a second
copy, its log-probs computed every step) and otherwise TRL's defaults, and writes per-step times
to --result as JSON.
"""
import json

import torch
from driver import driver_parser, step_timer


def main() -> None:
    parser = driver_parser("--steps", "--batch-size", "--max-seq-len", "--seed", "--threads")
    parser.add_argument("--beta", type=float, required=True)
    parser.add_argument("--learning-rate", type=float, required=True)
    parser.add_argument("--precision", choices=("bf16", "fp32"), required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    records = [json.loads(line) for line in open(args.data, encoding="utf-8")]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    timer = step_timer()
    config = DPOConfig(
        output_dir=args.output, bf16=args.precision == "bf16", use_cpu=True,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_length=args.max_seq_len, max_steps=args.steps, learning_rate=args.learning_rate,
        beta=args.beta, loss_type=["sigmoid"], report_to="none", save_strategy="no",
        eval_strategy="no", logging_steps=1, dataloader_num_workers=0, seed=args.seed,
    )  # everything else (gradient checkpointing included) stays at TRL's defaults
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(records),
                         processing_class=tokenizer, callbacks=[timer])
    if len(trainer.train_dataset) != len(records):  # bench/dpo.py sends only pairs that fit
        raise SystemExit(f"TRL kept {len(trainer.train_dataset)} of {len(records)} pairs")
    trainer.train()
    with open(args.result, "w", encoding="utf-8") as handle:
        json.dump({"trl": trl.__version__, "transformers": transformers.__version__,
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "gradient_checkpointing": config.gradient_checkpointing,
                   "step_time_s": timer.times}, handle)


if __name__ == "__main__":
    main()
