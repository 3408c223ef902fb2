"""Benchmark: our DPO step against TRL's DPOTrainer, in one run, on the same model (the built-in
SmolLM2-135M-Instruct), preference pairs, batch size, max length, beta, learning rate and
precision (each at its best on this machine: bf16 where the CPU computes it natively, else fp32).

    python bench/dpo.py [--steps 8] [--batch-size 8] [--max-seq-len 256]

Works as bench/rm.py does: both systems run as subprocesses, one after the other, on the HH
harmless pairs that both take whole; the first 2 steps of each are dropped (ours skips the
reference pass before its first optimizer step, when the policy still is the reference).
Both compute the reference log-probs every step (TRL's default; ours computes each pair's once,
which is every step in a first epoch). Prints s/step, pairs/s, the ratio ours/TRL and the
machine kind, and writes the same to bench/results/dpo.json. On first run it sets up current
TRL in its own venv, bench/.peer-trl (torch pinned to our CPU build).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `bench.*` and `train` import from any working directory
from bench.rm import DATA, pair_files, shared_pairs, summary  # noqa: E402
from bench.sft import TORCH_PIN, WARMUP, bench_env, parse_args, run, trl_version  # noqa: E402

TRL_VERSION = "1.16.0"  # current TRL on PyPI when this benchmark was written
PEER_VENV = ROOT / "bench" / ".peer-trl"
TRL_DRIVER = ROOT / "bench" / "peers" / "trl_dpo.py"
RESULTS = ROOT / "bench" / "results" / "dpo.json"
BETA, LEARNING_RATE = 0.1, 1e-6  # TRL's defaults, and ours


def peer_python() -> str:
    """bench/.peer-trl's python, with TRL installed there on first use."""
    python = PEER_VENV / "bin" / "python"
    if python.exists() and trl_version(python) == TRL_VERSION:
        return str(python)
    print(f"bench: setting up TRL {TRL_VERSION} in {PEER_VENV.relative_to(ROOT)}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", TORCH_PIN, f"trl=={TRL_VERSION}"], check=True)
    return str(python)


def main() -> None:
    args = parse_args(__doc__, default_steps=8)
    threads, env = bench_env()
    trl_python = peer_python()

    import torch
    from core import models
    from core.hardware import hardware, resolve_precision

    precision = resolve_precision("auto").name
    model_path = models.resolve_model("default")
    pairs, total = shared_pairs(models.load_tokenizer(model_path), args.max_seq_len)
    print(f"bench: {len(pairs)} of {total} preference pairs of {DATA.name} fit "
          f"{args.max_seq_len} tokens whole; both systems train on exactly these", flush=True)
    common = ["--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
              "--seed", str(args.seed)]
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        work = Path(tmp)
        ours_data, trl_data = pair_files(work, pairs)
        ours_cmd = [sys.executable, "-m", "train", "dpo", "--model", "default",
                    "--data", str(ours_data), "--output", str(work / "ours"),
                    "--max-steps", str(args.steps), "--precision", precision, "--eval-fraction", "0",
                    "--beta", str(BETA), "--learning-rate", str(LEARNING_RATE),
                    "--save-every", "0", "--log-every", "1", "--overwrite", "--no-tensorboard", *common]
        ours_others = run(ours_cmd, env, "ours (python -m train dpo)", threads)
        rows = [json.loads(line) for line in open(work / "ours" / "metrics.jsonl")]
        ours = summary("ours", [r["step_time_s"] for r in rows if "step_time_s" in r], args.batch_size)
        ours["cpu_share_of_other_processes"] = ours_others

        trl_cmd = [trl_python, str(TRL_DRIVER), "--model", model_path, "--data", str(trl_data),
                   "--output", str(work / "trl"), "--result", str(work / "trl.json"),
                   "--steps", str(args.steps), "--threads", str(threads), "--beta", str(BETA),
                   "--learning-rate", str(LEARNING_RATE), "--precision", precision, *common]
        trl_others = run(trl_cmd, env, f"TRL {TRL_VERSION} DPOTrainer ({trl_python})", threads)
        peer = json.loads((work / "trl.json").read_text())
        trl = summary(f"TRL {peer['trl']}", peer["step_time_s"], args.batch_size)
        trl["cpu_share_of_other_processes"] = trl_others

    machine = {"kind": hardware().describe(), "cores": threads, "torch": torch.__version__,
               "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    ratio = round(ours["pairs_per_s"] / trl["pairs_per_s"], 2)
    print(f"\nmachine: {machine['kind']}, {threads} cores, torch {torch.__version__}")
    print(f"TRL {peer['trl']} (transformers {peer['transformers']}, torch {peer['torch']}, "
          f"gradient checkpointing {peer['gradient_checkpointing']}: its default)")
    print(f"model {Path(model_path).name}, {precision}, batch {args.batch_size} pairs, max length "
          f"{args.max_seq_len}, beta {BETA}, lr {LEARNING_RATE}, {len(pairs)} shared pairs, "
          f"first {WARMUP} steps dropped\n")
    print(f"{'system':<10} | {'steps timed':>11} | {'s/step':>7} | {'pairs/s':>7}")
    for row in (ours, trl):
        print(f"{row['system']:<10} | {row['steps_timed']:>11} | {row['s_per_step']:>7.3f} | "
              f"{row['pairs_per_s']:>7.2f}")
    print(f"ratio ours/TRL: {ratio:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": machine, "model": Path(model_path).name, "precision": precision,
        "batch_size": args.batch_size, "max_seq_len": args.max_seq_len, "steps": args.steps,
        "beta": BETA, "learning_rate": LEARNING_RATE, "warmup_steps_dropped": WARMUP,
        "seed": args.seed, "pairs": len(pairs),
        "trl": {k: peer[k] for k in ("trl", "transformers", "torch", "gradient_checkpointing")},
        "systems": [ours, trl], "ratio_ours_over_trl": ratio}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
