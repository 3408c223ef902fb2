"""What every peer driver in this folder shares: its command line and its step timer. The drivers
run as scripts (possibly with another venv's python), so they import this as a sibling module.
`--precision` is the peer's best precision on this machine (bench/common.py): bf16 turns on TRL's
`bf16=True` autocast, fp32 leaves it off."""
import argparse
import time

PATHS = ("--model", "--data", "--output", "--result")


def driver_parser(*int_options: str) -> argparse.ArgumentParser:
    """The four paths every driver takes, plus its required integer options."""
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
