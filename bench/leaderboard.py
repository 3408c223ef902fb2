"""Leaderboard timing: 10,000 votes among 6 checkpoints, 200 bootstrap resamples.

    python bench/leaderboard.py [--votes 10000] [--bootstrap 200]

Times, in one run: the bootstrap as core/leaderboard.py did it before (a Python loop that
rebuilds the win matrix from the resampled votes and refits, once per resample), the vectorised
bootstrap it does now (every resample fitted at once), and the length-controlled fit (a
logistic regression with the length covariate, its bootstrap fitted at once too). Synthetic
votes: checkpoints with known strengths and answer lengths, the longer answer favoured.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.hardware import hardware  # noqa: E402
from core.leaderboard import fit_strengths, leaderboard, win_matrix  # noqa: E402


def synthetic_votes(count: int, seed: int = 0) -> list[tuple]:
    rng = np.random.default_rng(seed)
    strengths = np.array([0.0, 0.3, 0.5, 0.8, 1.0, 1.4])
    mean_length = np.array([300, 900, 400, 600, 500, 700])
    votes = []
    for _ in range(count):
        a, b = rng.choice(len(strengths), size=2, replace=False)
        la, lb = rng.poisson(mean_length[a]), rng.poisson(mean_length[b])
        z = (la - lb) / (la + lb)
        p = 1 / (1 + np.exp(-(strengths[a] - strengths[b] + 2.0 * z)))
        u = rng.random()
        score = 0.5 if abs(u - p) < 0.05 else float(u < p)
        votes.append((f"ckpt-{a}", f"ckpt-{b}", score, la, lb))
    return votes


def loop_bootstrap(votes, bootstrap: int, prior: float = 1.0, seed: int = 0) -> np.ndarray:
    """The bootstrap as it was: one resample, one win matrix, one fit at a time."""
    names = sorted({v[0] for v in votes} | {v[1] for v in votes})
    rng = np.random.default_rng(seed)
    samples = np.empty((bootstrap, len(names)))
    for b in range(bootstrap):
        picked = rng.integers(0, len(votes), size=len(votes))
        samples[b] = fit_strengths(win_matrix([votes[i] for i in picked], names), prior)
    return samples


def timed(what, fn):
    tic = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--votes", type=int, default=10_000)
    parser.add_argument("--bootstrap", type=int, default=200)
    args = parser.parse_args()
    votes = synthetic_votes(args.votes)
    _, before = timed("loop", lambda: loop_bootstrap(votes, args.bootstrap))
    board, after = timed("vectorised", lambda: leaderboard(votes, bootstrap=args.bootstrap))
    styled, styled_s = timed("length", lambda: leaderboard(votes, bootstrap=args.bootstrap,
                                                           length_control=True))
    print(f"machine: {hardware().describe()}; {args.votes} votes, 6 checkpoints, "
          f"{args.bootstrap} resamples")
    print(f"bootstrap, Python loop (before): {before:.2f} s")
    print(f"bootstrap, vectorised (now):     {after:.2f} s   ({before / after:.0f}x)")
    print(f"length-controlled fit + bootstrap: {styled_s:.2f} s; length coefficient "
          f"{styled[0]['length_coef']:.3f}")
    print("strengths (plain / length-controlled):")
    plain = {r["model"]: r for r in board}
    for row in sorted(styled, key=lambda r: r["model"]):
        p = plain[row["model"]]
        print(f"  {row['model']}: {p['strength']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]   "
              f"{row['strength']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]")


if __name__ == "__main__":
    main()
