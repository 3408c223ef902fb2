"""A leaderboard of checkpoints from A/B votes: Bradley-Terry strengths with bootstrap intervals,
optionally with answer length controlled for.

The Bradley-Terry model says checkpoint i beats j with probability p_i / (p_i + p_j). The
strengths are fitted by Hunter's MM iteration (Hunter 2004, "MM algorithms for generalized
Bradley-Terry models"):

    p_i <- W_i / sum_j n_ij / (p_i + p_j)

where W_i counts i's wins and n_ij the games between i and j. Reported strengths are log p,
centred on the mean of the board, so a gap of 1.0 means odds of e:1.

Length control (Chatbot Arena's "style control"): people tend to prefer longer answers, so a
checkpoint that writes more can climb the board without being better. With `length_control`
the fit is the logistic regression Arena uses: P(A beats B) = sigmoid(s_A - s_B + gamma * z),
z the scaled, normalised length difference (len_A - len_B) / (len_A + len_B) in
characters; the strengths are then what is left once length has had its say, and gamma (the
`length_coef` of every row) says how much length itself wins votes. Fitted by Newton's method.

Choices:
- a `tie` or `both_bad` verdict counts as half a win for each side (both say "no better");
- votes between two samples of the same checkpoint say nothing about the order of checkpoints
  and are ignored;
- every checkpoint also plays `prior` virtual games against an average checkpoint (strength 1)
  and wins half of them, which keeps an undefeated or winless checkpoint finite and pulls
  checkpoints with few votes towards the middle; `prior=0` is the plain maximum-likelihood fit
  (which needs a connected board where no one wins or loses everything);
- intervals are percentile bootstrap intervals over votes (resampled with replacement) from a
  seeded generator, so the same votes give the same board. Every resample is fitted at once
  (arrays with a leading resample axis), not in a Python loop.

Left out: Elo-style online updates, per-prompt or per-judge effects, style features other than
length, and significance tests.
"""
from __future__ import annotations

import numpy as np

DECISIVE = {"A": 1.0, "B": 0.0, "tie": 0.5, "both_bad": 0.5}
TINY = 1e-300


def votes_from_ratings(ratings: list[dict], with_lengths: bool = False, rounds=None) -> list[tuple]:
    """(model_a, model_b, score of A) for every comparison between two different checkpoints;
    with `with_lengths` also (len(answer_a), len(answer_b)) in characters, for length control.
    `rounds` keeps only votes cast in those rounds of the app's loop."""
    votes = []
    for rating in ratings:
        if rating.get("kind") != "comparison" or rating["verdict"] not in DECISIVE:
            continue
        if rating["model_a"] == rating["model_b"]:
            continue
        if rounds is not None and rating.get("round", 0) not in rounds:
            continue
        vote = (rating["model_a"], rating["model_b"], DECISIVE[rating["verdict"]])
        if with_lengths:
            vote += (len(rating["answer_a"] or ""), len(rating["answer_b"] or ""))
        votes.append(vote)
    return votes


def win_matrix(votes, names: list[str]) -> np.ndarray:
    """(M, M) wins[i, j]: how often i beat j (ties as half a win each)."""
    index = {name: i for i, name in enumerate(names)}
    wins = np.zeros((len(names), len(names)))
    for model_a, model_b, score_a, *_ in votes:
        wins[index[model_a], index[model_b]] += score_a
        wins[index[model_b], index[model_a]] += 1.0 - score_a
    return wins


def fit_strengths(wins: np.ndarray, prior: float = 1.0, iterations: int = 1000,
                  tolerance: float = 1e-10) -> np.ndarray:
    """Log-strengths centred on zero by Hunter's MM iteration: (M,) from an (M, M) win matrix,
    or (R, M) from (R, M, M), R boards (bootstrap resamples) fitted together."""
    single = wins.ndim == 2
    wins = wins[None] if single else wins
    games = wins + wins.transpose(0, 2, 1)          # (R, M, M) games played between i and j
    total_wins = wins.sum(axis=2) + prior / 2       # (R, M) wins, with half the virtual games
    strength = np.ones(wins.shape[:2])              # (R, M) p_i
    for _ in range(iterations):
        pair_sum = strength[:, :, None] + strength[:, None, :]
        denominator = (games / pair_sum).sum(axis=2) + prior / (strength + 1.0)
        updated = total_wins / np.maximum(denominator, TINY)
        log_updated = np.log(np.maximum(updated, TINY))
        updated /= np.exp(log_updated.mean(axis=1, keepdims=True))  # geometric mean 1
        converged = np.max(np.abs(np.log(np.maximum(updated, TINY))
                                  - np.log(np.maximum(strength, TINY)))) < tolerance
        strength = updated
        if converged:
            break
    log_strength = np.log(np.maximum(strength, TINY))
    log_strength -= log_strength.mean(axis=1, keepdims=True)
    return log_strength[0] if single else log_strength


def length_feature(votes) -> np.ndarray:
    """(N,) (len_a - len_b) / (len_a + len_b) of each vote over its root mean square. Not
    centred: swapping A and B must flip its sign, whichever side the app showed first."""
    lengths = np.array([v[3:5] for v in votes], dtype=float)
    total = lengths.sum(axis=1)
    diff = np.divide(lengths[:, 0] - lengths[:, 1], total, out=np.zeros(len(votes)), where=total > 0)
    scale = np.sqrt(np.mean(diff ** 2))
    return diff / scale if scale > 0 else diff


def fit_with_length(design: np.ndarray, outcomes: np.ndarray, weights: np.ndarray, models: int,
                    prior: float, iterations: int = 100, tolerance: float = 1e-10) -> np.ndarray:
    """(R, M + 1) centred strengths and the length coefficient of R weighted logistic fits.

    design: (N, M + 1) rows +1 at A, -1 at B and the length feature last; outcomes: (N,) A's
    score; weights: (R, N) how often each vote is counted (bootstrap). Each checkpoint also
    plays `prior` virtual games against strength 0 and wins half. Newton's method; the
    pseudo-inverse keeps the step off the direction no vote can see (shifting every strength).
    """
    params = np.zeros((len(weights), design.shape[1]))                     # (R, M+1)
    outer = (design[:, :, None] * design[:, None, :]).reshape(len(design), -1)  # (N, (M+1)^2)
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(params @ design.T)))                         # (R, N)
        gradient = (weights * (outcomes - p)) @ design                     # (R, M+1)
        hessian = ((weights * p * (1 - p)) @ outer).reshape(len(weights), *design.shape[1:] * 2)
        p_prior = 1 / (1 + np.exp(-params[:, :models]))                    # virtual games
        gradient[:, :models] += prior * (0.5 - p_prior)
        hessian[:, range(models), range(models)] += prior * p_prior * (1 - p_prior)
        step = (np.linalg.pinv(hessian) @ gradient[:, :, None])[:, :, 0]
        params += step
        if np.max(np.abs(step)) < tolerance:
            break
    params[:, :models] -= params[:, :models].mean(axis=1, keepdims=True)
    return params


def _bootstrap_counts(rng, kinds: np.ndarray, bootstrap: int) -> np.ndarray:
    """(R, C) how often each kind of vote (kinds: (N,) integers below C) appears in each of R
    resamples of the N votes with replacement, counted for all resamples at once."""
    size = kinds.max() + 1
    picked = kinds[rng.integers(0, len(kinds), size=(bootstrap, len(kinds)))]   # (R, N)
    offset = (picked + size * np.arange(bootstrap)[:, None]).ravel()
    return np.bincount(offset, minlength=bootstrap * size).reshape(bootstrap, size).astype(float)


def leaderboard(votes, prior: float = 1.0, bootstrap: int = 200, seed: int = 0,
                confidence: float = 0.95, length_control: bool = False) -> list[dict]:
    """One row per checkpoint, strongest first: strength, CI bounds, games and wins; with
    `length_control` (votes from `votes_from_ratings(..., with_lengths=True)`) also the
    fitted `length_coef`."""
    votes = list(votes)
    names = sorted({v[0] for v in votes} | {v[1] for v in votes})
    if not names:
        return []
    if length_control and any(len(v) < 5 for v in votes):
        raise ValueError("length control needs each vote's answer lengths: "
                         "votes_from_ratings(..., with_lengths=True).")
    wins = win_matrix(votes, names)
    index = {name: i for i, name in enumerate(names)}
    rng = np.random.default_rng(seed)
    if length_control:
        design = np.zeros((len(votes), len(names) + 1))
        rows = np.arange(len(votes))
        design[rows, [index[v[0]] for v in votes]] = 1.0
        design[rows, [index[v[1]] for v in votes]] = -1.0
        design[:, -1] = length_feature(votes)
        outcomes = np.array([v[2] for v in votes])
        fits = fit_with_length(design, outcomes, np.ones((1, len(votes))), len(names), prior)
        strength, length_coef = fits[0, :-1], float(fits[0, -1])
        if bootstrap > 0:
            weights = _bootstrap_counts(rng, np.arange(len(votes)), bootstrap)  # (R, N)
            samples = fit_with_length(design, outcomes, weights, len(names), prior)[:, :-1]
    else:
        strength = fit_strengths(wins, prior)
        if bootstrap > 0:
            # a vote is one of C kinds: (a, b, score); resampling only changes their counts
            kinds = np.array([(index[v[0]] * len(names) + index[v[1]]) * 3 + int(v[2] * 2) for v in votes])
            counts = _bootstrap_counts(rng, kinds, bootstrap)               # (R, C)
            kind = np.arange(counts.shape[1])
            a, b, score = kind // 3 // len(names), kind // 3 % len(names), (kind % 3) / 2
            per_kind = np.zeros((counts.shape[1], len(names), len(names)))  # (C, M, M) wins it adds
            per_kind[kind, a, b] += score
            per_kind[kind, b, a] += 1 - score
            samples = fit_strengths(np.einsum("rc,cij->rij", counts, per_kind), prior)
    low, high = strength.copy(), strength.copy()
    if bootstrap > 0:
        tail = (1.0 - confidence) / 2 * 100
        low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
    games = (wins + wins.T).sum(axis=1)
    rows = [{"model": name, "strength": float(strength[i]), "ci_low": float(low[i]),
             "ci_high": float(high[i]), "games": int(round(games[i])),
             "wins": float(wins[i].sum())} for i, name in enumerate(names)]
    if length_control:
        for row in rows:
            row["length_coef"] = length_coef
    return sorted(rows, key=lambda r: -r["strength"])
