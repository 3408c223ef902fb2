"""What every benchmark does the same way: the machine it ran on and the precision each side runs
in, the environment and process tuning both systems run under, running one system while watching
what else the machine does, and the python that runs TRL. The benchmarks import this as a sibling
module (`python bench/x.py` puts bench/ first on the path); it makes the repository importable for
them, so that no script has to.

The peer runs at its own best precision for this machine, which is ours too
(`core.hardware.resolve_precision("auto")`): bf16 where the CPU computes it natively
(AVX512-BF16, AMX) or on a CUDA GPU, fp32 on a CPU that only emulates bf16.

Left out: what only the trainer benchmarks share (bench/trainer_bench.py) and TRL 1.12, which
bench/ppo.py sets up for itself (the newest TRL with PPO, beside current TRL).
"""
from __future__ import annotations

import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # core/ and train/ import from any working directory

TRL_VERSION = "1.16.0"  # keep in step with requirements-peers.txt
PEERS = ROOT / "bench" / "requirements-peers.txt"
PEER_VENV = ROOT / "bench" / ".peer-trl"
OLD_PEER_VENV = ROOT / "bench" / ".peer-venv"  # where bench/sft.py and bench/rm.py once set TRL up
TORCH_PIN = "torch==2.13.0"  # the CPU wheel on disk; a bare `torch` pulls gigabytes of CUDA


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


def bench_env() -> tuple[int, dict]:
    """(threads, environment) for both systems' subprocesses: all cores, offline, same cache.
    Also tunes this process as every entry point does (core.process), before torch allocates:
    every benchmark calls this before it imports torch."""
    from core.process import tune_process

    tune_process()
    threads = len(os.sched_getaffinity(0))  # the cores this process may use
    os.environ.setdefault("RLHF_HOME", str(Path.home() / ".rlhf-studio"))  # resolve_model and both
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return threads, env


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by every process on the machine (Linux /proc/stat), and by this
    process with its finished children."""
    user, nice, system, _idle, _iowait, irq, softirq = map(
        int, Path("/proc/stat").read_text().split()[1:8])
    own = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                resource.getrusage(resource.RUSAGE_CHILDREN)))
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK"), own


def run(cmd: list[str], env: dict, what: str, cores: int) -> float:
    """Run one system; returns the share of the cores that other processes took meanwhile."""
    print(f"\nbench: running {what}", flush=True)
    (all0, own0), tic = cpu_seconds(), time.time()
    if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0:
        sys.exit(f"bench: {what} failed (output above)")
    (all1, own1), wall = cpu_seconds(), time.time() - tic
    others = max(0.0, (all1 - all0) - (own1 - own0)) / (wall * cores)
    if others > 0.05:  # a shared machine: say so rather than report a skewed number
        print(f"bench: WARNING: other processes took {others:.0%} of the CPU during {what}: "
              "its timings are low; rerun on an idle machine", flush=True)
    return round(others, 3)


def trl_version(python) -> str | None:
    """The TRL version `python` imports, or None."""
    probe = "import importlib.metadata as m; print(m.version('trl'))"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def peer_python() -> str:
    """The python that runs TRL TRL_VERSION: ours if it has it, else bench/.peer-trl's (or an
    older setup's), set up there on first use with torch pinned to our CPU build."""
    venv_python = PEER_VENV / "bin" / "python"
    for python in (Path(sys.executable), venv_python, OLD_PEER_VENV / "bin" / "python"):
        if python.exists() and trl_version(python) == TRL_VERSION:
            return str(python)
    where = os.path.relpath(PEER_VENV, ROOT)
    print(f"bench: setting up TRL {TRL_VERSION} once in {where}", flush=True)
    created = not PEER_VENV.exists()
    steps = ([sys.executable, "-m", "venv", str(PEER_VENV)],
             [str(venv_python), "-m", "pip", "install", TORCH_PIN, "-r", str(PEERS)])
    if all(subprocess.run(step).returncode == 0 for step in steps):
        return str(venv_python)
    if created:  # a half-made venv would only be found, probed and rebuilt next time
        shutil.rmtree(PEER_VENV, ignore_errors=True)
    sys.exit(f"bench: could not set up TRL {TRL_VERSION} in {where} (pip's "
             f"output above); make pip reach a package index, or create that venv by hand with "
             f"{TORCH_PIN} and bench/requirements-peers.txt")
