"""GRPO: our step against TRL's GRPOTrainer, sampling against training numerics, and GRPO against
our PPO at the same wall-clock budget, in one run.

    python bench/grpo.py [--steps 3] [--prompts 8] [--group-size 4] [--batch-size 8]
                         [--max-new-tokens 64] [--budget-s 600] [--reward RM] [--judge RM]
                         [--skip trl,vs-ppo]

1. Step time. Ours (`python -m train ppo --algorithm grpo`) and TRL's GRPOTrainer
   (bench/peers/trl_grpo.py, current TRL in its own venv, bench/.peer-trl, created on first use
   with torch pinned) on the same model (the built-in one), prompts (prompts/prompts.jsonl),
   prompts per step, group size, minibatch, response length, temperature 1.0, KL coefficient
   (so both run a reference model) and learning rate; each at the precision this machine
   computes fastest (ours: --precision auto; TRL: bf16 where the CPU has it natively, else fp32).
   The reward model on both sides is the built-in model with a fresh scalar head (same cost;
   the scores do not matter for timing). One warm-up step each, then --steps timed.
2. Numerics: the largest difference between the log-probs the fused decoder records for the
   sampled tokens (fp32) and those the training forward gives the same tokens. Within 1e-4 (the
   tests' tolerance; 1.76e-05 in the last run here) these recorded log-probs replace the actor's scoring
   forward (train/rollout.py, --rollout-logprobs auto): ours then runs no such forward.
3. GRPO vs PPO (unless skipped): both from the built-in model against one reward model, the
   proxy (--reward, else one trained here on the first half of HH harmless's RM part), prompts
   from the PPO part, 16 rollouts per step (PPO: 16 prompts; GRPO: 4 prompts x 4), greedy
   held-out proxy reward every --eval-every steps. Each run is stopped (SIGINT: it ends the step
   and stops) once its training time, evaluations excluded, passes --budget-s. Then
   `python -m train report` scores the start and the end on the run's held-out prompts with a
   judge (--judge, else one trained here on the second half of the RM part, as `train all`
   does): the figure is judge reward gained per minute of training, with its interval.
4. Floor: the weight products each of our phases executes, and the seconds they would take at
   this machine's fp32 matmul peak (F.linear timed on the model's own layer shapes): how far
   our step is from the best this machine allows, and the ratio to TRL a step at peak would give.
Writes bench/results/grpo.json.
"""
from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, TRL_VERSION, bench_env, peer_python, run  # makes core/ and train/ importable

TRL_DRIVER = ROOT / "bench" / "peers" / "trl_grpo.py"
PROMPTS = "prompts/prompts.jsonl"
HH = ROOT.parent / "shared" / "data" / "hh_harmless_base_test.jsonl.gz"
RESULTS = ROOT / "bench" / "results" / "grpo.json"
KL_COEF, LEARNING_RATE = 0.05, 2e-6
PHASES = ("time_generate_s", "time_score_s", "time_train_s", "step_time_s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed GRPO steps per system")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="minibatch of completions")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--budget-s", type=float, default=600, help="training seconds of each run in "
                        "the GRPO vs PPO part")
    parser.add_argument("--eval-every", type=int, default=3, help="steps between held-out evaluations "
                        "in the GRPO vs PPO part")
    parser.add_argument("--reward", default="", help="proxy reward model (a final/ folder) for the "
                        "GRPO vs PPO part; empty trains one first")
    parser.add_argument("--judge", default="", help="judge reward model (a final/ folder) for the GRPO "
                        "vs PPO part, trained on data disjoint from the proxy's; empty trains one first")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: trl, vs-ppo")
    args = parser.parse_args()
    args.skip = {part for part in args.skip.split(",") if part}
    if args.skip - {"trl", "vs-ppo"}:
        parser.error("--skip takes a comma-separated subset of trl,vs-ppo")
    if (args.prompts * args.group_size) % args.batch_size:
        parser.error("TRL splits each generation batch into equal minibatches: make --prompts x "
                     "--group-size a multiple of --batch-size")
    return args


# ---- 1. step time ------------------------------------------------------------------------------

def run_ours(args, folder: Path, env: dict, threads: int) -> dict:
    cmd = [sys.executable, "-m", "train", "ppo", "--algorithm", "grpo", "--actor", "default",
           "--reward", "default", "--data", PROMPTS, "--output", str(folder), "--overwrite",
           "--max-steps", str(args.steps + 1), "--rollout-batch-size", str(args.prompts),
           "--group-size", str(args.group_size), "--batch-size", str(args.batch_size),
           "--max-new-tokens", str(args.max_new_tokens), "--temperature", "1.0",
           "--kl-coef", str(KL_COEF), "--learning-rate", str(LEARNING_RATE), "--max-eval-samples", "0",
           "--save-every", "0", "--no-tensorboard", "--seed", "7"]
    others = run(cmd, env, "python -m train ppo --algorithm grpo", threads)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "reward" in r][1:]  # drop the warm-up step
    result = {key: round(statistics.fmean(r[key] for r in timed), 3) for key in PHASES}
    result["gen_tokens_per_s"] = round(statistics.fmean(r["gen_tokens_per_s"] for r in timed), 1)
    result["response_length"] = round(statistics.fmean(r["response_length"] for r in timed), 1)
    result["widths"] = [round(statistics.fmean(r[f"{part}_width"] for r in timed), 1)
                        for part in ("prompt", "response")]
    log = (folder / "train.log").read_text()
    result["actor_scored"] = "old log-probs: from sampling" not in log
    result["cpu_share_of_other_processes"] = others
    return result


def run_trl(args, model_path: str, precision: str, folder: Path, env: dict, threads: int) -> dict:
    result_file = folder / "trl.json"
    cmd = [peer_python(), str(TRL_DRIVER), "--model", model_path, "--data", str(ROOT / PROMPTS),
           "--output", str(folder / "trl"), "--result", str(result_file), "--steps", str(args.steps + 1),
           "--prompts", str(args.prompts), "--group-size", str(args.group_size),
           "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
           "--temperature", "1.0", "--kl-coef", str(KL_COEF), "--learning-rate", str(LEARNING_RATE),
           "--precision", precision, "--seed", "7", "--threads", str(threads)]
    others = run(cmd, env, f"TRL {TRL_VERSION} GRPOTrainer", threads)
    peer = json.loads(result_file.read_text())
    timed = slice(1, None)  # drop the warm-up cycle
    lengths = peer["response_lengths"][timed]
    result = {key: round(statistics.fmean(peer[key][timed]), 3)
              for key in ("step_time_s", "time_generate_s", "time_score_s")}
    result["time_train_s"] = round(result["step_time_s"] - result["time_generate_s"] - result["time_score_s"], 3)
    result["gen_tokens_per_s"] = round(statistics.fmean(
        sum(n) / g for n, g in zip(lengths, peer["time_generate_s"][timed])), 1)
    result["response_length"] = round(statistics.fmean(statistics.fmean(n) for n in lengths), 1)
    result["cpu_share_of_other_processes"] = others
    result["setup"] = {k: peer[k] for k in ("trl", "transformers", "torch", "threads", "mixed_precision",
                                            "loss_type", "scale_rewards", "gradient_checkpointing")}
    return result


# ---- 2. sampling against training numerics -----------------------------------------------------

def logprob_gap(max_new_tokens: int, rows: int = 16) -> dict:
    """Max and mean |log p_sampling - log p_training| over the sampled tokens of `rows` prompts:
    the log-probs decode_batch records while sampling (fp32) against the training forward's."""
    import torch

    from core.decoder import SlotDecoder
    from core.models import load_causal_lm, load_tokenizer, resolve_model
    from core.sampling import Sampling
    from train.experience import response_logprobs
    from train.models import CausalLMWithLoss
    from train.rollout import decode_batch

    path = resolve_model("default")
    tokenizer, lm = load_tokenizer(path), load_causal_lm(path).eval()
    records = [json.loads(line) for line in (ROOT / PROMPTS).read_text().splitlines()][:rows]
    prompts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                             return_dict=False) for r in records]
    torch.manual_seed(0)
    decoder = SlotDecoder(lm, rows, max(map(len, prompts)) + max_new_tokens)
    sampling = Sampling(max_new_tokens, 1.0, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id)
    rollout = decode_batch(decoder, prompts, sampling)
    with torch.no_grad():
        trained, _ = response_logprobs(CausalLMWithLoss(lm),
                                       torch.cat([rollout.prompt_ids, rollout.response_ids], 1),
                                       torch.cat([rollout.prompt_mask, rollout.response_mask], 1),
                                       rollout.prompt_ids.shape[1], 1.0)
    mask = rollout.response_mask
    gap = (rollout.logprobs - trained).abs() * mask
    return {"decoder": "fused" if decoder.fused else decoder.reason,
            "dtype": str(next(lm.parameters()).dtype), "tokens": int(mask.sum()),
            "max_abs_diff": gap.max().item(), "mean_abs_diff": (gap.sum() / mask.sum()).item()}


# ---- 3. GRPO against PPO at the same budget ------------------------------------------------------

def train_reward_model(folder: Path, split: str, role: str, env: dict, threads: int) -> Path:
    """A reward model on one half of HH harmless's RM part (`split`), as tests/conftest.py's
    real_reward_model fixture trains one, twice the steps."""
    cmd = [sys.executable, "-m", "train", "rm", "--model", "default", "--data", str(HH),
           "--data-split", split, "--output", str(folder), "--max-steps", "32", "--batch-size", "8",
           "--max-seq-len", "160", "--learning-rate", "5e-5", "--eval-fraction", "0.15",
           "--max-eval-samples", "120", "--eval-every", "0", "--save-every", "0", "--stats-samples", "64"]
    run(cmd, env, f"python -m train rm (the {role})", threads)
    return folder / "final"


def training_seconds(metrics: Path) -> float:
    if not metrics.is_file():
        return 0.0
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return sum(r["step_time_s"] for r in rows if "step_time_s" in r)


def run_within_budget(algorithm: str, args, reward: Path, judge: Path, folder: Path, env: dict) -> dict:
    """One RL run, stopped once its training time passes the budget: its held-out proxy reward
    curve and the judge's reward gained."""
    shape = (["--rollout-batch-size", "16", "--critic-learning-rate", "1e-5"] if algorithm == "ppo"
             else ["--rollout-batch-size", "4", "--group-size", "4"])
    cmd = [sys.executable, "-m", "train", "ppo", "--algorithm", algorithm, "--actor", "default",
           "--reward", str(reward), "--data", str(HH), "--data-split", "0,5,5", "--output", str(folder),
           "--overwrite", "--max-steps", "1000", *shape, "--batch-size", "8", "--max-new-tokens", "48",
           "--learning-rate", "1e-5" if algorithm == "ppo" else "3e-6", "--kl-coef", str(KL_COEF),
           "--max-eval-samples", "32", "--eval-every", str(args.eval_every), "--save-every", "0",
           "--no-tensorboard", "--seed", "7"]
    print(f"\nbench: running {algorithm} for {args.budget_s:.0f} s of training", flush=True)
    child = subprocess.Popen(cmd, cwd=ROOT, env=env)
    while child.poll() is None:
        time.sleep(5)
        if training_seconds(folder / "metrics.jsonl") >= args.budget_s:
            child.send_signal(signal.SIGINT)  # ends the current step, then stops the run
            break
    if child.wait() != 0:
        sys.exit(f"bench: the {algorithm} run failed (output above)")
    finish(cmd, folder, env)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    elapsed, curve = 0.0, []
    for row in rows:
        elapsed += row.get("step_time_s", 0.0)
        if "eval_reward" in row:
            curve.append({"step": row["step"], "train_s": round(elapsed, 1), "eval_reward": row["eval_reward"]})
    minutes = sum(r.get("step_time_s", 0.0) for r in rows) / 60
    gained = curve[-1]["eval_reward"] - curve[0]["eval_reward"]
    judged = judge_gain(folder, judge, env)
    return {"curve": curve, "steps": max(r["step"] for r in rows), "train_minutes": round(minutes, 2),
            "proxy_gained": round(gained, 4), "judge": judged,
            "judge_per_minute": round(judged["gain"]["value"] / minutes, 4),
            "mean_kl": round(statistics.fmean(r["kl"] for r in rows if "kl" in r), 3)}


def finish(cmd: list[str], folder: Path, env: dict) -> None:
    """A run stopped at the budget, resumed with the step it reached as its last: it saves
    final/ (what the report compares with the start) and trains no further."""
    state = json.loads((folder / "status.json").read_text())
    if state["state"] == "done":
        return
    steps = cmd.index("--max-steps")
    resume = [*cmd[:steps], "--max-steps", str(state["step"]), *cmd[steps + 2:], "--resume"]
    resume.remove("--overwrite")
    if subprocess.run(resume, cwd=ROOT, env=env).returncode != 0:
        sys.exit(f"bench: saving the {folder.name} run's final/ failed (output above)")


def judge_gain(folder: Path, judge: Path, env: dict) -> dict:
    """The judge's reward of the run's start and end on its held-out prompts (train report)."""
    cmd = [sys.executable, "-m", "train", "report", str(folder), "--judge", str(judge),
           "--max-samples", "32", "--max-new-tokens", "48", "--samples", "0"]
    if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0:
        sys.exit(f"bench: the report on {folder.name} failed (output above)")
    figures = json.loads((folder / "report.json").read_text())["figures"]
    return {**figures["judge"], "win_rate": figures["win_rate"]}


# ---- 4. the floor ---------------------------------------------------------------------------------

def weight_shapes(path: str) -> tuple[list[tuple[int, int]], int]:
    """((out, in) of each linear layer in the transformer, lm-head weights) of the model at `path`."""
    import torch

    from core.models import load_causal_lm

    lm = load_causal_lm(path)
    head = lm.get_output_embeddings()
    shapes = [tuple(m.weight.shape) for m in lm.modules()
              if isinstance(m, torch.nn.Linear) and m is not head]
    return shapes, head.weight.numel()


def matmul_peak(shapes: list[tuple[int, int]], rows: int, seconds: float = 3.0) -> float:
    """GFLOP/s of fp32 F.linear on `rows` input rows through each distinct layer shape, best of repeats."""
    import torch

    layer = sorted(set(shapes))
    weights = [torch.randn(out, inp) for out, inp in layer]
    inputs = [torch.randn(rows, inp) for _, inp in layer]
    flops = sum(2 * rows * w.numel() for w in weights)
    best, deadline = float("inf"), time.time() + seconds
    while time.time() < deadline:
        tic = time.perf_counter()
        for x, w in zip(inputs, weights):
            torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - tic)
    return flops / best / 1e9


def floor(ours: dict, args, path: str) -> dict:
    """Our three phases against this machine's matmul peak. Counted: the weight products (2 FLOPs
    a weight a token forward, 6 forward and backward; the vocabulary projection at response
    positions only) on the padded batch for score and train, and on the prompts once plus each
    generated token for generation; left out: attention scores, norms and the optimizer, so
    each floor is low and each achieved share a little high."""
    shapes, head = weight_shapes(path)
    linear = sum(out * inp for out, inp in shapes)
    rows = args.prompts * args.group_size
    prompt_width, response_width = ours["widths"]
    tokens = rows * (prompt_width + response_width)
    generated = ours["gen_tokens_per_s"] * ours["time_generate_s"]
    forward = 2 * linear * tokens + 2 * head * rows * response_width   # the policy or the reference
    flops = {"generate": 2 * linear * (rows * prompt_width + generated) + 2 * head * generated,
             "score": forward * (2 if ours["actor_scored"] else 1) + 2 * linear * tokens,  # + the reward model
             "train": 3 * forward}
    peak = matmul_peak(shapes, int(args.batch_size * (prompt_width + response_width)))
    result = {"peak_gflops": round(peak, 1)}
    for phase, count in flops.items():
        result[phase] = {"tflop": round(count / 1e12, 3), "gflops": round(count / ours[f"time_{phase}_s"] / 1e9, 1),
                         "seconds_at_peak": round(count / peak / 1e9, 2)}
    result["step_at_peak_s"] = round(sum(result[phase]["seconds_at_peak"] for phase in flops), 2)
    return result


# ---- report ------------------------------------------------------------------------------------

def print_step_table(results: dict, args) -> None:
    print(f"\nGRPO step, built-in model, {args.prompts} prompts x {args.group_size} samples, <= "
          f"{args.max_new_tokens} new tokens, minibatch {args.batch_size}, mean of {args.steps} steps")
    print(f"{'system':<28}" + "".join(f"{p.replace('time_', '').replace('_s', ''):>11}" for p in PHASES)
          + f"{'gen tok/s':>11}{'resp len':>10}")
    for name, row in results.items():
        print(f"{name:<28}" + "".join(f"{row[p]:>10.2f}s" for p in PHASES)
              + f"{row['gen_tokens_per_s']:>11.1f}{row['response_length']:>10.1f}")


def main() -> None:
    args = parse_args()
    threads, env = bench_env()
    import torch
    from core import models
    from core.hardware import hardware, resolve_precision

    precision = resolve_precision("auto").name  # both sides: bf16 only where the CPU computes it natively
    machine = f"{hardware().describe()}, {threads} threads, torch {torch.__version__}, precision {precision}"
    print(f"machine: {machine}", flush=True)
    report = {"machine": machine, "args": {**vars(args), "skip": sorted(args.skip)}}
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        steps = {"ours (grpo)": run_ours(args, Path(tmp) / "ours", env, threads)}
        if "trl" not in args.skip:
            steps[f"TRL {TRL_VERSION} GRPOTrainer"] = run_trl(
                args, models.resolve_model("default"), precision, Path(tmp), env, threads)
        report["step"] = steps
        report["logprob_gap"] = logprob_gap(args.max_new_tokens)
        if precision == "fp32":  # the peak is timed in fp32
            report["floor"] = floor(steps["ours (grpo)"], args, models.resolve_model("default"))
        if "vs-ppo" not in args.skip:
            reward = Path(args.reward) if args.reward else train_reward_model(
                Path(tmp) / "proxy", "0,2.5,7.5", "proxy", env, threads)
            judge = Path(args.judge) if args.judge else train_reward_model(
                Path(tmp) / "judge", "2.5,2.5,5", "judge", env, threads)
            report["vs_ppo"] = {"proxy": args.reward or "trained here on the RM part's first half",
                                "judge": args.judge or "trained here on the RM part's second half",
                                "budget_s": args.budget_s}
            for algorithm in ("grpo", "ppo"):
                report["vs_ppo"][algorithm] = run_within_budget(algorithm, args, reward, judge,
                                                                Path(tmp) / algorithm, env)

    print(f"\nmachine: {machine}")
    print_step_table(report["step"], args)
    trl = report["step"].get(f"TRL {TRL_VERSION} GRPOTrainer")
    if trl:
        ours = report["step"]["ours (grpo)"]
        print(f"ratio TRL/ours: step {trl['step_time_s'] / ours['step_time_s']:.2f}x, generate "
              f"{trl['time_generate_s'] / ours['time_generate_s']:.2f}x (TRL {trl['setup']['trl']}, "
              f"mixed precision {trl['setup']['mixed_precision']}, loss {trl['setup']['loss_type']}, "
              f"gradient checkpointing {trl['setup']['gradient_checkpointing']})")
    if "floor" in report:
        low = report["floor"]
        print(f"floor: fp32 matmul peak {low['peak_gflops']} GFLOP/s on the model's layer shapes; "
              + "; ".join(f"{phase} {low[phase]['tflop']} TFLOP at {low[phase]['gflops']} GFLOP/s "
                          f"({low[phase]['seconds_at_peak']} s at peak)" for phase in ("generate", "score", "train"))
              + f"; a step at peak: {low['step_at_peak_s']} s"
              + (f", TRL/that {trl['step_time_s'] / low['step_at_peak_s']:.2f}x" if trl else ""))
    gap = report["logprob_gap"]
    print(f"sampling vs training log-probs ({gap['decoder']} decoder, {gap['dtype']}, {gap['tokens']} "
          f"tokens): max |diff| {gap['max_abs_diff']:.3g}, mean {gap['mean_abs_diff']:.3g}")
    if "vs_ppo" in report:
        for algorithm in ("grpo", "ppo"):
            row = report["vs_ppo"][algorithm]
            judged, gain = row["judge"], row["judge"]["gain"]
            print(f"{algorithm}: {row['steps']} steps in {row['train_minutes']:.1f} min of training; held-out "
                  f"proxy {row['curve'][0]['eval_reward']} -> {row['curve'][-1]['eval_reward']}; judge "
                  f"{judged['before']} -> {judged['after']} ({gain['value']:+} [{gain['low']}, {gain['high']}], "
                  f"win rate {judged['win_rate']['value']}): {row['judge_per_minute']:+.4f} judge reward per "
                  f"minute (mean KL {row['mean_kl']})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
