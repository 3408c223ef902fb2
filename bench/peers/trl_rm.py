"""Peer driver for bench/rm.py: TRL's RewardTrainer as a user would run it, with each step timed.

Started by bench/rm.py (possibly with another venv's python), never imported. Reads
conversational preference records from --data, trains --steps optimizer steps on the CPU at
--precision (bf16: TRL's bf16 autocast) and otherwise TRL's defaults, and writes per-step times to --result as JSON.
"""
import json

import torch
from driver import driver_parser, step_timer


def main() -> None:
    args = driver_parser("--steps", "--batch-size", "--max-seq-len", "--seed", "--threads").parse_args()
    torch.set_num_threads(args.threads)

    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    records = [json.loads(line) for line in open(args.data, encoding="utf-8")]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # fp32 weights: with bf16=True the trainer runs forward under bf16 autocast, as users get
    # where bf16 is native; where it is emulated the peer's best is plain fp32.
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1,
                                                               dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    timer = step_timer()
    config = RewardConfig(
        output_dir=args.output, bf16=args.precision == "bf16", use_cpu=True,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_length=args.max_seq_len, max_steps=args.steps, learning_rate=1e-5,
        report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1,
        dataloader_num_workers=0, seed=args.seed,
    )  # everything else (gradient checkpointing included) stays at TRL's defaults
    trainer = RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(records),
                            processing_class=tokenizer, callbacks=[timer])
    if len(trainer.train_dataset) != len(records):  # bench/rm.py sends only pairs that fit
        raise SystemExit(f"TRL kept {len(trainer.train_dataset)} of {len(records)} pairs")
    trainer.train()
    with open(args.result, "w", encoding="utf-8") as handle:
        json.dump({"trl": trl.__version__, "transformers": transformers.__version__,
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "gradient_checkpointing": config.gradient_checkpointing,
                   "step_time_s": timer.times}, handle)


if __name__ == "__main__":
    main()
