"""Benchmark: our SFT step against TRL's SFTTrainer, in one run, on the same model (the built-in
SmolLM2-135M-Instruct), examples, batch size, max length and precision: the best for this
machine (bf16 where the CPU computes it natively, else fp32: bench/common.py).

    python bench/sft.py [--steps 20] [--batch-size 8] [--max-seq-len 256]

Both systems run as subprocesses, one after the other, each with the machine's cores as threads.
Prints s/step and non-padding tokens/s (mean over the steps after the first 2, which warm up),
the ratio ours/TRL, and writes the same to bench/results/sft.json. On first run it installs TRL
(bench/requirements-peers.txt): into our venv when that changes none of our packages, otherwise
into its own venv, bench/.peer-venv. RLHF_HOME is honoured as by `python -m train`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from statistics import mean

from common import ROOT, best_precision, machine, print_machine  # makes core/ and train/ importable
from core.process import tune_process  # noqa: E402

tune_process()  # the memory settings every entry point makes, before torch allocates

DATA = ROOT.parent / "shared" / "data" / "llamafactory_alpaca_en_demo.json"
PEERS = ROOT / "bench" / "requirements-peers.txt"
PEER_VENV = ROOT / "bench" / ".peer-venv"
TRL_DRIVER = ROOT / "bench" / "peers" / "trl_sft.py"
RESULTS = ROOT / "bench" / "results" / "sft.json"
TRL_VERSION = "1.16.0"  # keep in step with requirements-peers.txt
TORCH_PIN = "torch==2.13.0"  # the CPU wheel on disk; a bare `torch` pulls gigabytes of CUDA
WARMUP = 2  # steps dropped from the means on both sides


def trl_version(python) -> str | None:
    probe = "import importlib.metadata as m; print(m.version('trl'))"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def changes_to_ours(pip: list[str], requirements: Path) -> list[str]:
    """Packages of our venv that installing `requirements` would replace (pip's dry run)."""
    dry = subprocess.run(pip + ["--dry-run", "--quiet", "--report", "-", "-r", str(requirements)],
                         check=True, capture_output=True, text=True)
    changes = []
    for item in json.loads(dry.stdout)["install"]:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        try:
            if metadata.version(name) != version:
                changes.append(f"{name} {metadata.version(name)} -> {version}")
        except metadata.PackageNotFoundError:
            pass  # new to our venv: changes nothing of ours
    return changes


def peer_python() -> str:
    """The python that runs TRL, installing TRL on first use."""
    venv_python = PEER_VENV / "bin" / "python"
    for python in (sys.executable, venv_python):
        if Path(python).exists() and trl_version(python) == TRL_VERSION:
            return str(python)
    pip = [sys.executable, "-m", "pip", "install"]
    clashes = changes_to_ours(pip, PEERS)
    if not clashes:
        print(f"bench: installing TRL {TRL_VERSION} into our venv (it changes none of our "
              f"packages) from {PEERS.relative_to(ROOT)}", flush=True)
        subprocess.run(pip + ["-r", str(PEERS)], check=True)
        return sys.executable
    print(f"bench: TRL {TRL_VERSION} would change our packages ({', '.join(clashes)}); "
          f"setting it up once in {PEER_VENV.relative_to(ROOT)}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    subprocess.run([str(venv_python), "-m", "pip", "install", TORCH_PIN, "-r", str(PEERS)],
                   check=True)
    return str(venv_python)


def shared_examples(tokenizer, max_seq_len: int) -> tuple[list[dict], int]:
    """SFT records of the demo set that both sides take whole (no truncation on either side)."""
    from train import data, tokens

    records = data.phase_records(data.read_source(str(DATA)).records, "sft")
    kept = []
    for record in records:
        prompt, response = record["prompt"], record["response"]
        example, note = tokens.encode_chat(tokenizer, prompt, response, max_seq_len)
        # TRL tokenises the whole rendered chat, which ends with a newline after the end-of-turn
        # token that ours drops: that rendering must fit too, or TRL would cut the example.
        full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}],
                                             tokenize=True, return_dict=False)
        if example is not None and note is None and len(full) <= max_seq_len:
            kept.append({"prompt": prompt, "response": response})
    return kept, len(records)


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return path


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


def summary(system: str, times: list[float], rates: list[float]) -> dict:
    timed, rated = times[WARMUP:], rates[WARMUP:]
    return {"system": system, "steps_timed": len(timed), "s_per_step": round(mean(timed), 3),
            "tokens_per_s": round(mean(rated), 1),
            "every_step": [{"s": round(t, 3), "tokens_per_s": round(r, 1)}  # warm-up included
                           for t, r in zip(times, rates)]}


def parse_args(doc: str, default_steps: int) -> argparse.Namespace:
    """The options every trainer benchmark shares (bench/sft.py, bench/rm.py)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--steps", type=int, default=default_steps, help="optimizer steps per system")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    if args.steps <= WARMUP:
        parser.error(f"--steps must exceed the {WARMUP} warm-up steps")
    return args


def bench_env() -> tuple[int, dict]:
    """(threads, environment) for both systems' subprocesses: all cores, offline, same cache."""
    threads = len(os.sched_getaffinity(0))  # the cores this process may use
    os.environ.setdefault("RLHF_HOME", str(Path.home() / ".rlhf-studio"))  # resolve_model and both
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return threads, env


def main() -> None:
    args = parse_args(__doc__, default_steps=20)
    threads, env = bench_env()
    trl_python = peer_python()

    from core import models

    model_path = models.resolve_model("default")
    precision = best_precision()
    examples, total = shared_examples(models.load_tokenizer(model_path), args.max_seq_len)
    print(f"bench: {len(examples)} of {total} SFT records of {DATA.name} fit "
          f"{args.max_seq_len} tokens whole; both systems train on exactly these", flush=True)
    common = ["--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
              "--seed", str(args.seed), "--precision", precision]

    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
        work = Path(tmp)
        ours_data = write_jsonl(work / "ours.jsonl", examples)
        trl_data = write_jsonl(work / "trl.jsonl", (
            {"prompt": e["prompt"], "completion": [{"role": "assistant", "content": e["response"]}]}
            for e in examples))

        ours_cmd = [sys.executable, "-m", "train", "sft", "--model", "default",
                    "--data", str(ours_data), "--output", str(work / "ours"),
                    "--max-steps", str(args.steps), "--eval-fraction", "0",
                    "--save-every", "0", "--log-every", "1", "--overwrite", *common]
        ours_others = run(ours_cmd, env, "ours (python -m train sft)", threads)
        rows = [json.loads(line) for line in open(work / "ours" / "metrics.jsonl")]
        rows = [row for row in rows if "tokens_per_s" in row]
        ours = summary("ours", [r["step_time_s"] for r in rows], [r["tokens_per_s"] for r in rows])
        ours["cpu_share_of_other_processes"] = ours_others

        trl_cmd = [trl_python, str(TRL_DRIVER), "--model", model_path, "--data", str(trl_data),
                   "--output", str(work / "trl"), "--result", str(work / "trl.json"),
                   "--steps", str(args.steps), "--threads", str(threads), *common]
        trl_others = run(trl_cmd, env, f"TRL {TRL_VERSION} SFTTrainer ({trl_python})", threads)
        peer = json.loads((work / "trl.json").read_text())
        trl = summary(f"TRL {peer['trl']}", peer["step_time_s"],
                      [n / t for n, t in zip(peer["tokens"], peer["step_time_s"])])
        trl["cpu_share_of_other_processes"] = trl_others

    info = machine(threads)
    ratio = round(ours["tokens_per_s"] / trl["tokens_per_s"], 2)
    print()
    print_machine(info, {"ours": precision, f"TRL {peer['trl']}": precision})
    print(f"TRL {peer['trl']} (transformers {peer['transformers']}, torch {peer['torch']}, "
          f"gradient checkpointing {peer['gradient_checkpointing']}: its default)")
    print(f"model {Path(model_path).name}, {precision}, batch {args.batch_size}, max length "
          f"{args.max_seq_len}, {len(examples)} shared records, first {WARMUP} steps dropped\n")
    print(f"{'system':<10} | {'steps timed':>11} | {'s/step':>7} | {'tokens/s':>8}")
    for row in (ours, trl):
        print(f"{row['system']:<10} | {row['steps_timed']:>11} | {row['s_per_step']:>7.3f} | "
              f"{row['tokens_per_s']:>8.1f}")
    print(f"ratio ours/TRL: {ratio:.2f}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": info, "model": Path(model_path).name, "precision": precision,
        "batch_size": args.batch_size, "max_seq_len": args.max_seq_len, "steps": args.steps,
        "warmup_steps_dropped": WARMUP, "seed": args.seed, "records": len(examples),
        "trl": {k: peer[k] for k in ("trl", "transformers", "torch", "gradient_checkpointing")},
        "systems": [ours, trl], "ratio_ours_over_trl": ratio}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
