"""One PPO step's time, split into generate / score / train / switch: our hybrid engine beside
the same PPO step with Hugging Face `generate` rollouts (what DeepSpeed-Chat and TRL use on a
CPU), same model, prompts, batch and lengths, in one run.

    python bench/ppo.py [--steps 4] [--rollout-batch-size 16] [--max-new-tokens 64]

Both runs are the normal command line (`python -m train ppo ... --generation hybrid|hf`); the
reward model is the built-in model with a fresh value head (its scores do not matter for
timing). The first step of each run is a warm-up and is not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("time_generate_s", "time_score_s", "time_train_s", "time_switch_s", "step_time_s")


def run(generation: str, args, folder: Path) -> dict:
    cmd = [sys.executable, "-m", "train", "ppo", "--actor", "default", "--reward", "default",
           "--data", "prompts/prompts.jsonl", "--output", str(folder), "--overwrite",
           "--max-steps", str(args.steps + 1), "--rollout-batch-size", str(args.rollout_batch_size),
           "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
           "--temperature", "1.0", "--max-eval-samples", "0", "--save-every", "0", "--no-tensorboard",
           "--generation", generation, "--seed", "7"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "reward" in r][1:]  # drop the warm-up step
    result = {key: statistics.fmean(r[key] for r in timed) for key in PHASES}
    result["gen_tokens_per_s"] = statistics.fmean(r["gen_tokens_per_s"] for r in timed)
    result["response_length"] = statistics.fmean(r["response_length"] for r in timed)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed PPO steps per system")
    parser.add_argument("--rollout-batch-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    import torch

    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.backends.cpu.get_cpu_capability()}, {platform.processor() or platform.machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        results = {"ours (hybrid engine)": run("hybrid", args, Path(tmp) / "hybrid"),
                   "HF generate rollouts": run("hf", args, Path(tmp) / "hf")}
    print(f"\nPPO step, default model, {args.rollout_batch_size} prompts x <= {args.max_new_tokens} "
          f"new tokens, minibatch {args.batch_size}, mean of {args.steps} steps")
    print(f"{'system':<22}" + "".join(f"{p.replace('time_', '').replace('_s', ''):>10}" for p in PHASES)
          + f"{'gen tok/s':>11}{'resp len':>10}")
    for name, row in results.items():
        print(f"{name:<22}" + "".join(f"{row[p]:>9.2f}s" for p in PHASES)
              + f"{row['gen_tokens_per_s']:>11.1f}{row['response_length']:>10.1f}")
    ours, baseline = results["ours (hybrid engine)"], results["HF generate rollouts"]
    print(f"\nratio HF/ours: step {baseline['step_time_s'] / ours['step_time_s']:.2f}x, "
          f"generate {baseline['time_generate_s'] / ours['time_generate_s']:.2f}x")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ppo.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
