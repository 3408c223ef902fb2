"""Benchmark: our reward-model step against TRL's RewardTrainer, in one run, on the same model
(the built-in SmolLM2-135M-Instruct with a scalar head), preference pairs, batch size, max
length and precision: the best for this machine (bf16 where native, else fp32: bench/common.py).

    python bench/rm.py [--steps 12] [--batch-size 8] [--max-seq-len 256]

Works as bench/sft.py does (bench/trainer_bench.py holds what they share): both systems run as
subprocesses, one after the other; the first 2 steps of each are dropped. Prints s/step and
pairs/s (batch size / mean step time) and the ratio ours/TRL, and writes the same to
bench/results/rm.json. The pairs are those of the HH harmless test set that both sides take
whole: no truncated prompt on ours, and no pair that TRL's max_length filter would drop.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from trainer_bench import hh_pairs, pair_files, pair_summary, report, run_ours, run_trl, setup


def main() -> None:
    s = setup(__doc__, default_steps=12)
    pairs, batch_size = hh_pairs(s), s.args.batch_size
    with tempfile.TemporaryDirectory(prefix="bench-rm-") as tmp:
        work = Path(tmp)
        ours_data, trl_data = pair_files(work, pairs)
        rows, others = run_ours(s, "rm", work, ours_data, ["--stats-samples", "8"])
        ours = pair_summary("ours", [r["step_time_s"] for r in rows if "step_time_s" in r],
                            batch_size, others)
        peer, others = run_trl(s, "rm", "RewardTrainer", work, trl_data)
        trl = pair_summary(f"TRL {peer['trl']}", peer["step_time_s"], batch_size, others)
    report(s, "rm", ours, trl, peer, "pairs_per_s",
           f"batch {batch_size} pairs ({2 * batch_size} sequences), max length "
           f"{s.args.max_seq_len}, {len(pairs)} shared pairs", {"pairs": len(pairs)})


if __name__ == "__main__":
    main()
