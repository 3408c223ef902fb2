"""Benchmark: our reward-model step against TRL's RewardTrainer, in one run, on the same model
(the built-in SmolLM2-135M-Instruct with a scalar head), preference pairs, batch size, max
length and precision: the best for this machine (bf16 where native, else fp32: bench/common.py).

    python bench/rm.py [--steps 12] [--batch-size 8] [--max-seq-len 256]

Works as bench/sft.py does (and reuses its helpers): both systems run as subprocesses, one after
the other; the first 2 steps of each are dropped. Prints s/step and pairs/s (batch size / mean
step time) and the ratio ours/TRL, and writes the same to bench/results/rm.json. The pairs are
those of the HH harmless test set that both sides take whole: no truncated prompt on ours, and
no pair that TRL's max_length filter would drop.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from statistics import mean

from common import ROOT, best_precision, machine, print_machine  # makes core/ and train/ importable
from sft import TRL_VERSION, WARMUP, bench_env, parse_args, peer_python, run, write_jsonl

DATA = ROOT.parent / "shared" / "data" / "hh_harmless_base_test.jsonl.gz"
TRL_DRIVER = ROOT / "bench" / "peers" / "trl_rm.py"
RESULTS = ROOT / "bench" / "results" / "rm.json"


def shared_pairs(tokenizer, max_seq_len: int) -> tuple[list[dict], int]:
    """Preference records of the HH set that both sides take whole."""
    from train import data, tokens

    records = data.phase_records(data.read_source(str(DATA)).records, "rm")
    kept = []
    for record in records:
        example, note = tokens.encode_pair(tokenizer, record, max_seq_len)
        # TRL tokenises each whole rendered chat, which ends with a newline after the end-of-turn
        # token that ours drops: those renderings must fit too, or TRL would drop the pair.
        trl_lengths = [len(tokenizer.apply_chat_template(
            record["prompt"] + [{"role": "assistant", "content": record[side]}],
            tokenize=True, return_dict=False)) for side in ("chosen", "rejected")]
        if example is not None and note is None and max(trl_lengths) <= max_seq_len:
            kept.append({k: record[k] for k in ("prompt", "chosen", "rejected")})
    return kept, len(records)


def pair_files(work: Path, pairs: list[dict]) -> tuple[Path, Path]:
    """The pairs as our records and as TRL's conversational records (answers as messages)."""
    ours = write_jsonl(work / "ours.jsonl", pairs)
    trl = write_jsonl(work / "trl.jsonl", (
        {"prompt": p["prompt"], **{side: [{"role": "assistant", "content": p[side]}]
                                   for side in ("chosen", "rejected")}} for p in pairs))
    return ours, trl


def summary(system: str, times: list[float], batch_size: int) -> dict:
    timed = times[WARMUP:]
    return {"system": system, "steps_timed": len(timed), "s_per_step": round(mean(timed), 3),
            "pairs_per_s": round(batch_size / mean(timed), 2),
            "every_step_s": [round(t, 3) for t in times]}  # warm-up included


def main() -> None:
    args = parse_args(__doc__, default_steps=12)
    threads, env = bench_env()
    trl_python = peer_python()

    from core import models

    model_path = models.resolve_model("default")
    precision = best_precision()
    pairs, total = shared_pairs(models.load_tokenizer(model_path), args.max_seq_len)
    print(f"bench: {len(pairs)} of {total} preference pairs of {DATA.name} fit "
          f"{args.max_seq_len} tokens whole; both systems train on exactly these", flush=True)
    common = ["--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
              "--seed", str(args.seed), "--precision", precision]

    with tempfile.TemporaryDirectory(prefix="bench-rm-") as tmp:
        work = Path(tmp)
        ours_data, trl_data = pair_files(work, pairs)

        ours_cmd = [sys.executable, "-m", "train", "rm", "--model", "default",
                    "--data", str(ours_data), "--output", str(work / "ours"),
                    "--max-steps", str(args.steps), "--eval-fraction", "0",
                    "--save-every", "0", "--log-every", "1", "--overwrite",
                    "--stats-samples", "8", *common]
        ours_others = run(ours_cmd, env, "ours (python -m train rm)", threads)
        rows = [json.loads(line) for line in open(work / "ours" / "metrics.jsonl")]
        ours = summary("ours", [r["step_time_s"] for r in rows if "step_time_s" in r],
                       args.batch_size)
        ours["cpu_share_of_other_processes"] = ours_others

        trl_cmd = [trl_python, str(TRL_DRIVER), "--model", model_path, "--data", str(trl_data),
                   "--output", str(work / "trl"), "--result", str(work / "trl.json"),
                   "--steps", str(args.steps), "--threads", str(threads), *common]
        trl_others = run(trl_cmd, env, f"TRL {TRL_VERSION} RewardTrainer ({trl_python})", threads)
        peer = json.loads((work / "trl.json").read_text())
        trl = summary(f"TRL {peer['trl']}", peer["step_time_s"], args.batch_size)
        trl["cpu_share_of_other_processes"] = trl_others

    info = machine(threads)
    ratio = round(ours["pairs_per_s"] / trl["pairs_per_s"], 2)
    print()
    print_machine(info, {"ours": precision, f"TRL {peer['trl']}": precision})
    print(f"TRL {peer['trl']} (transformers {peer['transformers']}, torch {peer['torch']}, "
          f"gradient checkpointing {peer['gradient_checkpointing']}: its default)")
    print(f"model {Path(model_path).name}, {precision}, batch {args.batch_size} pairs ({2 * args.batch_size}"
          f" sequences), max length {args.max_seq_len}, {len(pairs)} shared pairs, "
          f"first {WARMUP} steps dropped\n")
    print(f"{'system':<10} | {'steps timed':>11} | {'s/step':>7} | {'pairs/s':>7}")
    for row in (ours, trl):
        print(f"{row['system']:<10} | {row['steps_timed']:>11} | {row['s_per_step']:>7.3f} | "
              f"{row['pairs_per_s']:>7.2f}")
    print(f"ratio ours/TRL: {ratio:.2f}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": info, "model": Path(model_path).name, "precision": precision,
        "batch_size": args.batch_size, "max_seq_len": args.max_seq_len, "steps": args.steps,
        "warmup_steps_dropped": WARMUP, "seed": args.seed, "pairs": len(pairs),
        "trl": {k: peer[k] for k in ("trl", "transformers", "torch", "gradient_checkpointing")},
        "systems": [ours, trl], "ratio_ours_over_trl": ratio}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
