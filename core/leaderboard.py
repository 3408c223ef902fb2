"""A leaderboard of checkpoints from A/B votes: Bradley-Terry strengths with bootstrap intervals.

The Bradley-Terry model says checkpoint i beats j with probability p_i / (p_i + p_j). The
strengths are fitted by Hunter's MM iteration (Hunter 2004, "MM algorithms for generalized
Bradley-Terry models"):

    p_i <- W_i / sum_j n_ij / (p_i + p_j)

where W_i counts i's wins and n_ij the games between i and j. Reported strengths are log p,
centred on the mean of the board, so a gap of 1.0 means odds of e:1.

Choices:
- a `tie` or `both_bad` verdict counts as half a win for each side (both say "no better");
- votes between two samples of the same checkpoint say nothing about the order of checkpoints
  and are ignored;
- every checkpoint also plays `prior` virtual games against an average checkpoint (strength 1)
  and wins half of them, which keeps an undefeated or winless checkpoint finite and pulls
  checkpoints with few votes towards the middle; `prior=0` is the plain maximum-likelihood fit
  (which needs a connected board where no one wins or loses everything);
- intervals are percentile bootstrap intervals over votes (resampled with replacement) from a
  seeded generator, so the same votes give the same board.

Left out: Elo-style online updates, per-prompt or per-judge effects, and significance tests.
"""
from __future__ import annotations

import numpy as np

DECISIVE = {"A": 1.0, "B": 0.0, "tie": 0.5, "both_bad": 0.5}


def votes_from_ratings(ratings: list[dict]) -> list[tuple[str, str, float]]:
    """(model_a, model_b, score of A) for every comparison between two different checkpoints."""
    votes = []
    for rating in ratings:
        if rating.get("kind") != "comparison" or rating["verdict"] not in DECISIVE:
            continue
        if rating["model_a"] == rating["model_b"]:
            continue
        votes.append((rating["model_a"], rating["model_b"], DECISIVE[rating["verdict"]]))
    return votes


def win_matrix(votes, names: list[str]) -> np.ndarray:
    """(M, M) wins[i, j]: how often i beat j (ties as half a win each)."""
    index = {name: i for i, name in enumerate(names)}
    wins = np.zeros((len(names), len(names)))
    for model_a, model_b, score_a in votes:
        wins[index[model_a], index[model_b]] += score_a
        wins[index[model_b], index[model_a]] += 1.0 - score_a
    return wins


def fit_strengths(wins: np.ndarray, prior: float = 1.0, iterations: int = 1000,
                  tolerance: float = 1e-10) -> np.ndarray:
    """(M,) log-strengths centred on zero, by Hunter's MM iteration on the win matrix."""
    games = wins + wins.T                       # (M, M) games played between i and j
    total_wins = wins.sum(axis=1) + prior / 2   # (M,) wins, with half the virtual games
    strength = np.ones(len(wins))               # (M,) p_i
    for _ in range(iterations):
        pair_sum = strength[:, None] + strength[None, :]
        denominator = (games / pair_sum).sum(axis=1) + prior / (strength + 1.0)
        updated = total_wins / np.maximum(denominator, 1e-300)
        updated /= np.exp(np.log(np.maximum(updated, 1e-300)).mean())  # geometric mean 1
        converged = np.max(np.abs(np.log(np.maximum(updated, 1e-300))
                                  - np.log(np.maximum(strength, 1e-300)))) < tolerance
        strength = updated
        if converged:
            break
    log_strength = np.log(np.maximum(strength, 1e-300))
    return log_strength - log_strength.mean()


def leaderboard(votes, prior: float = 1.0, bootstrap: int = 200, seed: int = 0,
                confidence: float = 0.95) -> list[dict]:
    """One row per checkpoint, strongest first: strength, CI bounds, games and wins."""
    votes = list(votes)
    names = sorted({v[0] for v in votes} | {v[1] for v in votes})
    if not names:
        return []
    wins = win_matrix(votes, names)
    strength = fit_strengths(wins, prior)
    low, high = strength.copy(), strength.copy()
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        samples = np.empty((bootstrap, len(names)))
        for b in range(bootstrap):
            picked = rng.integers(0, len(votes), size=len(votes))
            samples[b] = fit_strengths(win_matrix([votes[i] for i in picked], names), prior)
        tail = (1.0 - confidence) / 2 * 100
        low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
    games = (wins + wins.T).sum(axis=1)
    rows = [{"model": name, "strength": float(strength[i]), "ci_low": float(low[i]),
             "ci_high": float(high[i]), "games": int(round(games[i])),
             "wins": float(wins[i].sum())} for i, name in enumerate(names)]
    return sorted(rows, key=lambda r: -r["strength"])
