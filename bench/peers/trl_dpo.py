"""Peer driver for bench/dpo.py: TRL's DPOTrainer as a user would run it, with each step timed.

Started by bench/dpo.py with the python that has current TRL (bench/common.py), never imported.
Reads conversational preference records (prompt, chosen, rejected as messages) from --data,
trains --steps optimizer steps on the CPU in --precision (bf16 autocast where the CPU computes
bf16 natively, else fp32) with the sigmoid loss, a frozen reference model (TRL's default: a
second copy, its log-probs computed every step) and otherwise TRL's defaults, and writes
per-step times to --result as JSON.
"""
import torch
from driver import driver_parser, fixed_steps, train_pairs


def main() -> None:
    parser = driver_parser("--steps", "--batch-size", "--max-seq-len", "--seed", "--threads")
    parser.add_argument("--beta", type=float, required=True)
    parser.add_argument("--learning-rate", type=float, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(**fixed_steps(args), learning_rate=args.learning_rate, beta=args.beta,
                       loss_type=["sigmoid"])
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    train_pairs(args, DPOTrainer, config, model, AutoTokenizer.from_pretrained(args.model))


if __name__ == "__main__":
    main()
