"""Peer driver for bench/rm.py: TRL's RewardTrainer as a user would run it, with each step timed.

Started by bench/rm.py (possibly with another venv's python), never imported. Reads
conversational preference records from --data, trains --steps optimizer steps on the CPU at
--precision (bf16: TRL's bf16 autocast) and otherwise TRL's defaults, and writes per-step times
to --result as JSON.
"""
import torch
from driver import driver_parser, fixed_steps, train_pairs


def main() -> None:
    args = driver_parser("--steps", "--batch-size", "--max-seq-len", "--seed", "--threads").parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1,
                                                               dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    train_pairs(args, RewardTrainer, RewardConfig(**fixed_steps(args), learning_rate=1e-5),
                model, tokenizer)


if __name__ == "__main__":
    main()
