"""Peer driver for bench/sft.py: TRL's SFTTrainer as a user would run it, with each step timed.

Started by bench/sft.py (possibly with another venv's python), never imported. Reads
prompt-completion records from --data, trains --steps optimizer steps on the CPU at --precision (bf16:
TRL's bf16 autocast) and otherwise TRL's defaults, and writes per-step times and non-padding token counts
to --result as JSON.
"""
import time

import torch
from driver import driver_parser, fixed_steps, read_records, write_result


def main() -> None:
    args = driver_parser("--steps", "--batch-size", "--max-seq-len", "--seed", "--threads").parse_args()
    torch.set_num_threads(args.threads)

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class StepTimer(TrainerCallback):
        """Wall time and non-padding tokens of each optimizer step (one micro-batch each)."""

        def __init__(self):
            self.times, self.tokens, self._tokens, self._tic = [], [], 0, 0.0

        def count(self, module, _args, kwargs):
            # A forward pre-hook sees the batch the model really gets; counting in the collator
            # would not, since the dataloader fetches batches ahead of the step that uses them.
            if module.training and kwargs.get("attention_mask") is not None:
                self._tokens += int(kwargs["attention_mask"].sum())

        def on_step_begin(self, *_, **__):
            self._tokens, self._tic = 0, time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self._tic)
            self.tokens.append(self._tokens)

    records = read_records(args.data)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    timer = StepTimer()
    model.register_forward_pre_hook(timer.count, with_kwargs=True)
    config = SFTConfig(**fixed_steps(args), learning_rate=2e-5, lr_scheduler_type="cosine",
                       warmup_steps=0.05)  # transformers 5: a float < 1 is a ratio
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(records),
                         processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    write_result(args, config, timer.times, tokens=timer.tokens)


if __name__ == "__main__":
    main()
