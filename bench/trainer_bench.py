"""What the trainer benchmarks (bench/sft.py, bench/rm.py, bench/dpo.py) share: their options, the
HH preference pairs that both sides take whole, running ours (`python -m train STAGE`) and then
TRL's trainer (bench/peers/trl_STAGE.py) with the same model, batch, length, seed and precision,
and the report: machine, table, ratio ours/TRL and bench/results/STAGE.json.

Left out: what each benchmark counts as its rate (tokens/s for SFT, pairs/s for preference
trainers), its own data set and each side's options beyond the shared ones; those stay in the
script. Imported as a sibling module, like bench/common.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from common import ROOT, TRL_VERSION, best_precision, bench_env, machine, peer_python, print_machine, run

WARMUP = 2  # steps dropped from the means on both sides
HH = ROOT.parent / "shared" / "data" / "hh_harmless_base_test.jsonl.gz"
RATES = {"tokens_per_s": ("tokens/s", 8, ".1f"), "pairs_per_s": ("pairs/s", 7, ".2f")}  # label, width, format


@dataclass
class Setup:
    """What both systems of one trainer benchmark run with."""
    args: argparse.Namespace
    threads: int
    env: dict
    trl_python: str
    model_path: str
    precision: str  # the best for this machine, on both sides


def parse_args(doc: str, default_steps: int) -> argparse.Namespace:
    """The options every trainer benchmark shares."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--steps", type=int, default=default_steps, help="optimizer steps per system")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    if args.steps <= WARMUP:
        parser.error(f"--steps must exceed the {WARMUP} warm-up steps")
    return args


def setup(doc: str, default_steps: int) -> Setup:
    """Parse the options, tune this process, find (or set up) TRL and the built-in model."""
    args = parse_args(doc, default_steps)
    threads, env = bench_env()
    trl_python = peer_python()
    from core import models

    return Setup(args, threads, env, trl_python, models.resolve_model("default"), best_precision())


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def hh_pairs(s: Setup) -> list[dict]:
    """Preference records of the HH harmless set that both sides take whole: no truncated prompt
    on ours, and no pair that TRL's max_length filter would drop."""
    from core.models import load_tokenizer
    from train import data, tokens

    tokenizer = load_tokenizer(s.model_path)
    records = data.phase_records(data.read_source(str(HH)).records, "rm")
    pairs = []
    for record in records:
        example, note = tokens.encode_pair(tokenizer, record, s.args.max_seq_len)
        # TRL tokenises each whole rendered chat, which ends with a newline after the end-of-turn
        # token that ours drops: those renderings must fit too, or TRL would drop the pair.
        trl_lengths = [len(tokenizer.apply_chat_template(
            record["prompt"] + [{"role": "assistant", "content": record[side]}],
            tokenize=True, return_dict=False)) for side in ("chosen", "rejected")]
        if example is not None and note is None and max(trl_lengths) <= s.args.max_seq_len:
            pairs.append({k: record[k] for k in ("prompt", "chosen", "rejected")})
    print(f"bench: {len(pairs)} of {len(records)} preference pairs of {HH.name} fit "
          f"{s.args.max_seq_len} tokens whole; both systems train on exactly these", flush=True)
    return pairs


def pair_files(work: Path, pairs: list[dict]) -> tuple[Path, Path]:
    """The pairs as our records and as TRL's conversational records (answers as messages)."""
    ours = write_jsonl(work / "ours.jsonl", pairs)
    trl = write_jsonl(work / "trl.jsonl", (
        {"prompt": p["prompt"], **{side: [{"role": "assistant", "content": p[side]}]
                                   for side in ("chosen", "rejected")}} for p in pairs))
    return ours, trl


def pair_summary(system: str, times: list[float], batch_size: int, others: float) -> dict:
    """A preference trainer's row: s/step and pairs/s after the warm-up steps."""
    timed = times[WARMUP:]
    return {"system": system, "steps_timed": len(timed), "s_per_step": round(mean(timed), 3),
            "pairs_per_s": round(batch_size / mean(timed), 2),
            "every_step_s": [round(t, 3) for t in times],  # warm-up included
            "cpu_share_of_other_processes": others}


def shared_options(s: Setup) -> list[str]:
    return ["--batch-size", str(s.args.batch_size), "--max-seq-len", str(s.args.max_seq_len),
            "--seed", str(s.args.seed), "--precision", s.precision]


def run_ours(s: Setup, stage: str, work: Path, data: Path, options=()) -> tuple[list[dict], float]:
    """`python -m train STAGE` for --steps steps: (its metrics rows, others' share of the CPU)."""
    cmd = [sys.executable, "-m", "train", stage, "--model", "default", "--data", str(data),
           "--output", str(work / "ours"), "--max-steps", str(s.args.steps), "--eval-fraction", "0",
           "--save-every", "0", "--log-every", "1", "--overwrite", *options, *shared_options(s)]
    others = run(cmd, s.env, f"ours (python -m train {stage})", s.threads)
    rows = (work / "ours" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in rows], others


def run_trl(s: Setup, stage: str, trainer: str, work: Path, data: Path, options=()) -> tuple[dict, float]:
    """TRL's `trainer` through bench/peers/trl_STAGE.py: (what it wrote, others' share of the CPU)."""
    cmd = [s.trl_python, str(ROOT / "bench" / "peers" / f"trl_{stage}.py"), "--model", s.model_path,
           "--data", str(data), "--output", str(work / "trl"), "--result", str(work / "trl.json"),
           "--steps", str(s.args.steps), "--threads", str(s.threads), *options, *shared_options(s)]
    others = run(cmd, s.env, f"TRL {TRL_VERSION} {trainer} ({s.trl_python})", s.threads)
    return json.loads((work / "trl.json").read_text()), others


def report(s: Setup, stage: str, ours: dict, trl: dict, peer: dict, rate: str, described: str,
           facts: dict) -> None:
    """Print the machine, TRL's setup, the settings (`described`: batch and data), both systems'
    rows and the ratio ours/TRL of `rate`; write them to bench/results/STAGE.json with `facts`."""
    info = machine(s.threads)
    ratio = round(ours[rate] / trl[rate], 2)
    label, width, spec = RATES[rate]
    print()
    print_machine(info, {"ours": s.precision, f"TRL {peer['trl']}": s.precision})
    print(f"TRL {peer['trl']} (transformers {peer['transformers']}, torch {peer['torch']}, "
          f"gradient checkpointing {peer['gradient_checkpointing']}: off is its best here)")
    print(f"model {Path(s.model_path).name}, {s.precision}, {described}, "
          f"first {WARMUP} steps dropped\n")
    print(f"{'system':<10} | {'steps timed':>11} | {'s/step':>7} | {label:>{width}}")
    for row in (ours, trl):
        print(f"{row['system']:<10} | {row['steps_timed']:>11} | {row['s_per_step']:>7.3f} | "
              f"{row[rate]:>{width}{spec}}")
    print(f"ratio ours/TRL: {ratio:.2f}")

    results = ROOT / "bench" / "results" / f"{stage}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({
        "machine": info, "model": Path(s.model_path).name, "precision": s.precision,
        "batch_size": s.args.batch_size, "max_seq_len": s.args.max_seq_len, "steps": s.args.steps,
        "warmup_steps_dropped": WARMUP, "seed": s.args.seed, **facts,
        "trl": {k: peer[k] for k in ("trl", "transformers", "torch", "gradient_checkpointing")},
        "systems": [ours, trl], "ratio_ours_over_trl": ratio}, indent=2) + "\n")
    print(f"wrote {results.relative_to(ROOT)}")
