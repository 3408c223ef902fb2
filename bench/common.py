"""What every benchmark prints and decides the same way: the machine it ran on and the precision
each side runs in. The benchmarks import this as a sibling module (`python bench/x.py` puts
bench/ first on the path); it makes the repository importable for them, so that no script has to.

The peer runs at its own best precision for this machine, which is ours too
(`core.hardware.resolve_precision("auto")`): bf16 where the CPU computes it natively
(AVX512-BF16, AMX) or on a CUDA GPU, fp32 on a CPU that only emulates bf16.
"""
from __future__ import annotations

import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # core/ and train/ import from any working directory


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's name elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int) -> dict:
    """The machine a figure was measured on: kind, CPU model, threads, library versions."""
    import torch
    import transformers

    from core.hardware import hardware

    return {"hardware": hardware().describe(), "cpu": cpu_model(), "threads": threads,
            "torch": torch.__version__, "transformers": transformers.__version__}


def best_precision() -> str:
    """bf16 where this machine computes it natively, else fp32 (what `--precision auto` picks)."""
    from core.hardware import resolve_precision

    return resolve_precision("auto").name


def print_machine(info: dict, precisions: dict[str, str]) -> None:
    """The header every benchmark prints: the machine, then the precision each side ran in."""
    print(f"machine: {info['hardware']}; {info['cpu']}; {info['threads']} threads; "
          f"torch {info['torch']}, transformers {info['transformers']}")
    print("precision: " + ", ".join(f"{side} {name}" for side, name in precisions.items()), flush=True)
