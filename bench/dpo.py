"""Benchmark: our DPO step against TRL's DPOTrainer, in one run, on the same model (the built-in
SmolLM2-135M-Instruct), preference pairs, batch size, max length, beta, learning rate and
precision (each at its best on this machine: bf16 where the CPU computes it natively, else fp32).

    python bench/dpo.py [--steps 8] [--batch-size 8] [--max-seq-len 256]

Works as bench/rm.py does (bench/trainer_bench.py holds what they share): both systems run as
subprocesses, one after the other, on the HH harmless pairs that both take whole; the first 2
steps of each are dropped (ours skips the reference pass before its first optimizer step, when
the policy still is the reference). Both compute the reference log-probs every step (TRL's
default; ours computes each pair's once, which is every step in a first epoch). Prints s/step,
pairs/s, the ratio ours/TRL and the machine kind, and writes the same to bench/results/dpo.json.
On first run it sets up current TRL in its own venv, bench/.peer-trl (torch pinned to our CPU
build), unless our venv has it (bench/common.py).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from trainer_bench import hh_pairs, pair_files, pair_summary, report, run_ours, run_trl, setup

BETA, LEARNING_RATE = 0.1, 1e-6  # TRL's defaults, and ours


def main() -> None:
    s = setup(__doc__, default_steps=8)
    pairs, batch_size = hh_pairs(s), s.args.batch_size
    loss = ["--beta", str(BETA), "--learning-rate", str(LEARNING_RATE)]
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        work = Path(tmp)
        ours_data, trl_data = pair_files(work, pairs)
        rows, others = run_ours(s, "dpo", work, ours_data, [*loss, "--no-tensorboard"])
        ours = pair_summary("ours", [r["step_time_s"] for r in rows if "step_time_s" in r],
                            batch_size, others)
        peer, others = run_trl(s, "dpo", "DPOTrainer", work, trl_data, loss)
        trl = pair_summary(f"TRL {peer['trl']}", peer["step_time_s"], batch_size, others)
    report(s, "dpo", ours, trl, peer, "pairs_per_s",
           f"batch {batch_size} pairs, max length {s.args.max_seq_len}, beta {BETA}, "
           f"lr {LEARNING_RATE}, {len(pairs)} shared pairs",
           {"beta": BETA, "learning_rate": LEARNING_RATE, "pairs": len(pairs)})


if __name__ == "__main__":
    main()
