"""What every peer driver in this folder shares: its command line, its step timer, the records it
reads, the settings of a fixed-step TRL trainer, a preference trainer's run and the result it
writes. The drivers run as scripts (possibly with another venv's python), so they import this as
a sibling module; it needs only the standard library until a function imports what it uses.
`--precision` is the peer's best precision on this machine (bench/common.py): bf16 turns on
TRL's `bf16=True` autocast, fp32 leaves it off."""
import argparse
import json
import time

PATHS = ("--model", "--data", "--output", "--result")
# The peer's best settings on this hardware beyond precision: TRL turns gradient checkpointing on
# by default, which recomputes every layer's forward in the backward (about a third more work) to
# save memory that a 135M model on a CPU with gigabytes free does not need. Ours never recomputes.
BEST = dict(gradient_checkpointing=False)


def driver_parser(*int_options: str) -> argparse.ArgumentParser:
    """The four paths every driver takes, --precision, plus its required integer options."""
    parser = argparse.ArgumentParser()
    for name in PATHS:
        parser.add_argument(name, required=True)
    for name in int_options:
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--precision", choices=("bf16", "fp32"), required=True)
    return parser


def step_timer():
    """A transformers TrainerCallback whose `times` holds each optimizer step's wall time."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._tic = [], 0.0

        def on_step_begin(self, *_, **__):
            self._tic = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self._tic)

    return StepTimer()


def read_records(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def fixed_steps(args: argparse.Namespace) -> dict:
    """The TRL config fields of a trainer that runs --steps optimizer steps of --batch-size on the
    CPU at --precision, with fp32 weights (with bf16=True the trainer runs forward under bf16
    autocast, as users get where bf16 is native; where it is emulated the peer's best is plain
    fp32), no gradient checkpointing (`BEST`), and neither saves, evaluates nor reports.
    Everything else stays at TRL's defaults."""
    return dict(**BEST, output_dir=args.output, bf16=args.precision == "bf16", use_cpu=True,
                per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
                max_length=args.max_seq_len, max_steps=args.steps, report_to="none",
                save_strategy="no", eval_strategy="no", logging_steps=1,
                dataloader_num_workers=0, seed=args.seed)


def train_pairs(args: argparse.Namespace, trainer_class, config, model, tokenizer) -> None:
    """Train TRL's `trainer_class` on --data's preference pairs with each step timed, after
    checking it kept every pair (the benchmark sends only pairs that fit), and write --result."""
    from datasets import Dataset

    records = read_records(args.data)
    timer = step_timer()
    trainer = trainer_class(model=model, args=config, train_dataset=Dataset.from_list(records),
                            processing_class=tokenizer, callbacks=[timer])
    if len(trainer.train_dataset) != len(records):
        raise SystemExit(f"TRL kept {len(trainer.train_dataset)} of {len(records)} pairs")
    trainer.train()
    write_result(args, config, timer.times)


def write_result(args: argparse.Namespace, config, step_times: list[float], **more) -> None:
    """--result: the versions that ran, the threads, whether gradient checkpointing was on (off:
    `BEST`), each step's seconds and whatever else the driver measured."""
    import torch
    import transformers
    import trl

    with open(args.result, "w", encoding="utf-8") as handle:
        json.dump({"trl": trl.__version__, "transformers": transformers.__version__,
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "gradient_checkpointing": config.gradient_checkpointing,
                   "step_time_s": step_times, **more}, handle)
