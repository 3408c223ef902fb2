"""One PPO step's time, split into generate / score / train / switch: our hybrid engine beside
two peers on the same model, prompts, batch and lengths, in one run: the same PPO step of ours
with Hugging Face `generate` rollouts (what DeepSpeed-Chat and TRL use on a CPU), and TRL
1.12's PPOTrainer (`trl.experimental.ppo`, the newest TRL release that ships PPO).

    python bench/ppo.py [--steps 4] [--rollout-batch-size 16] [--batch-size 8]
                        [--max-new-tokens 64] [--peers hf,trl]

The issue's full size (64 built-in prompts per step, up to 128 sampled tokens; slow on 2 cores):

    python bench/ppo.py --steps 3 --rollout-batch-size 64 --batch-size 8 --max-new-tokens 128

Ours and the HF-rollout peer are the normal command line (`python -m train ppo ...
--rollout-engine fused|hf`); the reward model is the built-in model with a fresh value head (its
scores do not matter for timing). TRL runs through bench/peers/trl_ppo.py (how it is set up is
said there): one TRL update is one PPO step of ours, with the same rollouts per step, minibatch,
PPO epochs (our default), prompt length limit, response length, temperature 1.0 and stop at the
end-of-turn token. TRL 1.12 is installed on first use with `pip --no-deps` into
bench/.peer-trl112 and imported from there by our venv's python (which holds TRL 1.16, without
PPO, for the other benchmarks). The first step of each system is a warm-up and is not counted.
TRL interleaves scoring and training in one loop: its table row shows only generate and step.
Every system runs at the best precision for this machine (`--precision auto` for ours; TRL's
bf16 autocast only where bf16 is native: bench/common.py). Writes bench/results/ppo.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# common makes core/ and train/ importable
from common import ROOT, bench_env, best_precision, machine, print_machine, run
from train.config import PPOConfig

PHASES = ("time_generate_s", "time_score_s", "time_train_s", "time_switch_s", "step_time_s")
PEERS = ("hf", "trl")
TRL_PPO_VERSION = "1.12.0"
TRL_TARGET = ROOT / "bench" / ".peer-trl112"
TRL_DRIVER = ROOT / "bench" / "peers" / "trl_ppo.py"
PROMPTS = "prompts/prompts.jsonl"
RESULTS = ROOT / "bench" / "results" / "ppo.json"
OURS_DEFAULTS = {name: PPOConfig.__dataclass_fields__[name].default
                 for name in ("ppo_epochs", "max_prompt_len")}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed PPO steps per system")
    parser.add_argument("--rollout-batch-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8, help="PPO minibatch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--peers", default=",".join(PEERS),
                        help="comma-separated peers to run after ours: hf (our step with HF "
                             "generate rollouts), trl (TRL 1.12 PPOTrainer); empty runs ours only")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1 (a warm-up step runs before the timed ones)")
    args.peers = [p for p in args.peers.split(",") if p]
    if set(args.peers) - set(PEERS):
        parser.error(f"--peers takes a comma-separated subset of {','.join(PEERS)}")
    if "trl" in args.peers and args.rollout_batch_size % args.batch_size:
        parser.error("TRL splits each rollout batch into equal minibatches: make "
                     "--rollout-batch-size a multiple of --batch-size, or leave trl out of --peers")
    return args


def run_ours(rollout_engine: str, args, folder: Path, env: dict, threads: int) -> dict:
    cmd = [sys.executable, "-m", "train", "ppo", "--actor", "default", "--reward", "default",
           "--data", PROMPTS, "--output", str(folder), "--overwrite",
           "--max-steps", str(args.steps + 1), "--rollout-batch-size", str(args.rollout_batch_size),
           "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
           "--temperature", "1.0", "--max-eval-samples", "0", "--save-every", "0", "--no-tensorboard",
           f"--rollout-engine={rollout_engine}", "--seed", "7"]
    others = run(cmd, env, f"python -m train ppo --rollout-engine {rollout_engine}", threads)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "reward" in r][1:]  # drop the warm-up step
    result = {key: statistics.fmean(r[key] for r in timed) for key in PHASES}
    result["gen_tokens_per_s"] = statistics.fmean(r["gen_tokens_per_s"] for r in timed)
    result["response_length"] = statistics.fmean(r["response_length"] for r in timed)
    result["cpu_share_of_other_processes"] = others
    return result


def trl_ppo_target() -> Path:
    """The folder that holds TRL 1.12, installing it there on first use."""
    if not (TRL_TARGET / f"trl-{TRL_PPO_VERSION}.dist-info").is_dir():
        print(f"bench: installing TRL {TRL_PPO_VERSION} (the newest TRL with PPO) into "
              f"{TRL_TARGET.relative_to(ROOT)}; its dependencies come from our venv", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target",
                        str(TRL_TARGET), f"trl=={TRL_PPO_VERSION}"], check=True)
    return TRL_TARGET


def run_trl(args, model_path: str, folder: Path, env: dict, threads: int) -> dict:
    target = trl_ppo_target()
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")])),
           "TRL_EXPERIMENTAL_SILENCE": "1"}
    result_file = folder / "trl.json"
    cmd = [sys.executable, str(TRL_DRIVER), "--model", model_path, "--data", str(ROOT / PROMPTS),
           "--output", str(folder / "trl"), "--result", str(result_file),
           "--steps", str(args.steps + 1), "--rollout-batch-size", str(args.rollout_batch_size),
           "--batch-size", str(args.batch_size), "--ppo-epochs", str(OURS_DEFAULTS["ppo_epochs"]),
           "--max-prompt-len", str(OURS_DEFAULTS["max_prompt_len"]),
           "--max-new-tokens", str(args.max_new_tokens), "--temperature", "1.0",
           "--seed", "7", "--threads", str(threads), "--precision", best_precision()]
    others = run(cmd, env, f"TRL {TRL_PPO_VERSION} PPOTrainer", threads)
    peer = json.loads(result_file.read_text())
    steps = list(zip(peer["step_time_s"], peer["time_generate_s"], peer["response_lengths"]))[1:]
    return {"step_time_s": round(statistics.fmean(s for s, _, _ in steps), 3),
            "time_generate_s": round(statistics.fmean(g for _, g, _ in steps), 3),
            "gen_tokens_per_s": round(statistics.fmean(sum(n) / g for _, g, n in steps), 1),
            "response_length": round(statistics.fmean(statistics.fmean(n) for _, _, n in steps), 1),
            "cpu_share_of_other_processes": others,
            "setup": {k: peer[k] for k in ("trl", "transformers", "torch", "threads",
                                           "mixed_precision", "gradient_checkpointing")}}


def print_table(results: dict, args) -> None:
    print(f"\nPPO step, default model, {args.rollout_batch_size} prompts x <= {args.max_new_tokens} "
          f"new tokens, minibatch {args.batch_size}, {OURS_DEFAULTS['ppo_epochs']} PPO epoch(s), "
          f"mean of {args.steps} steps")
    print(f"{'system':<24}" + "".join(f"{p.replace('time_', '').replace('_s', ''):>10}" for p in PHASES)
          + f"{'gen tok/s':>11}{'resp len':>10}")
    for name, row in results.items():
        cells = "".join(f"{row[p]:>9.2f}s" if p in row else f"{'-':>10}" for p in PHASES)
        print(f"{name:<24}{cells}{row['gen_tokens_per_s']:>11.1f}{row['response_length']:>10.1f}")
    ours = results["ours (hybrid engine)"]
    for name, label in (("HF generate rollouts", "HF-rollouts/ours"),
                        (f"TRL {TRL_PPO_VERSION} PPOTrainer", "TRL/ours")):
        if name in results:
            peer = results[name]
            print(f"ratio {label}: step {peer['step_time_s'] / ours['step_time_s']:.2f}x, "
                  f"generate {peer['time_generate_s'] / ours['time_generate_s']:.2f}x")


def main() -> None:
    args = parse_args()
    threads, env = bench_env()
    from core import models

    info, precision = machine(threads), best_precision()
    sides = {"ours": precision, "HF rollouts": precision}
    print_machine(info, sides | ({f"TRL {TRL_PPO_VERSION}": precision} if "trl" in args.peers else {}))
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        results["ours (hybrid engine)"] = run_ours("fused", args, Path(tmp) / "fused", env, threads)
        if "hf" in args.peers:
            results["HF generate rollouts"] = run_ours("hf", args, Path(tmp) / "hf", env, threads)
        if "trl" in args.peers:
            results[f"TRL {TRL_PPO_VERSION} PPOTrainer"] = run_trl(
                args, models.resolve_model("default"), Path(tmp), env, threads)
    print_table(results, args)
    trl = results.get(f"TRL {TRL_PPO_VERSION} PPOTrainer")
    if trl:
        setup = trl["setup"]
        print(f"TRL {setup['trl']} (transformers {setup['transformers']}): fp32 weights, "
              f"mixed precision {setup['mixed_precision']} (autocast in its training forward only; "
              f"rollouts and scoring run in fp32), gradient checkpointing {setup['gradient_checkpointing']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": info, "precision": precision, "args": vars(args),
                                   "ours_defaults": OURS_DEFAULTS,
                                   "results": results}, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
