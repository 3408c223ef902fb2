"""Bradley-Terry leaderboard on hand-made votes with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from core.leaderboard import fit_strengths, leaderboard, votes_from_ratings, win_matrix


def votes(model_a: str, model_b: str, a_wins: int, b_wins: int, ties: int = 0):
    return [(model_a, model_b, 1.0)] * a_wins + [(model_a, model_b, 0.0)] * b_wins \
        + [(model_a, model_b, 0.5)] * ties


def test_two_checkpoints_match_the_closed_form():
    """With no prior, p_a / p_b is the ratio of wins: 3 of 4 games gives a gap of log 3."""
    board = leaderboard(votes("ema", "final", 3, 1), prior=0.0, bootstrap=0)
    assert [r["model"] for r in board] == ["ema", "final"]
    assert board[0]["strength"] - board[1]["strength"] == pytest.approx(math.log(3), abs=1e-6)
    assert board[0]["strength"] + board[1]["strength"] == pytest.approx(0.0, abs=1e-9)
    assert (board[0]["games"], board[0]["wins"]) == (4, 3.0)


def test_fit_satisfies_the_likelihood_equations_on_three_checkpoints():
    """At the maximum-likelihood fit each checkpoint's expected wins equal its actual wins."""
    names = ["a", "b", "c"]
    wins = win_matrix(votes("a", "b", 7, 3) + votes("b", "c", 6, 4) + votes("a", "c", 8, 2), names)
    strength = np.exp(fit_strengths(wins, prior=0.0))
    games = wins + wins.T
    expected = (games * strength[:, None] / (strength[:, None] + strength[None, :])).sum(axis=1)
    assert expected == pytest.approx(wins.sum(axis=1), abs=1e-6)
    assert strength[0] > strength[1] > strength[2]


def test_ties_count_as_half_a_win_and_an_even_record_is_a_draw():
    board = leaderboard(votes("x", "y", 2, 2, ties=4), prior=0.0, bootstrap=0)
    assert board[0]["wins"] == board[1]["wins"] == 4.0
    assert board[0]["strength"] == pytest.approx(0.0, abs=1e-9)


def test_an_undefeated_checkpoint_stays_finite_with_the_prior():
    board = leaderboard(votes("best", "worst", 5, 0), prior=1.0, bootstrap=0)
    assert board[0]["model"] == "best"
    assert 0 < board[0]["strength"] < 5 and math.isfinite(board[1]["strength"])


def test_bootstrap_intervals_are_seeded_contain_the_fit_and_shrink_with_more_votes():
    few = votes("a", "b", 6, 4) + votes("b", "c", 6, 4)
    many = few * 20
    board_1 = leaderboard(few, bootstrap=100, seed=7)
    board_2 = leaderboard(few, bootstrap=100, seed=7)
    assert board_1 == board_2
    for row in board_1:
        assert row["ci_low"] <= row["strength"] <= row["ci_high"]
    width = {r["model"]: r["ci_high"] - r["ci_low"] for r in board_1}
    width_many = {r["model"]: r["ci_high"] - r["ci_low"] for r in leaderboard(many, bootstrap=100)}
    assert all(width_many[m] < width[m] for m in width)
    assert [r["model"] for r in leaderboard(many, bootstrap=0)] == ["a", "b", "c"]


def test_votes_from_ratings_keeps_comparisons_between_different_checkpoints():
    rows = [{"kind": "comparison", "model_a": "m1", "model_b": "m2", "verdict": "B"},
            {"kind": "comparison", "model_a": "m1", "model_b": "m1", "verdict": "A"},
            {"kind": "comparison", "model_a": "m2", "model_b": "m1", "verdict": "both_bad"},
            {"kind": "thumb", "model_a": "m1", "model_b": None, "verdict": "up"}]
    assert votes_from_ratings(rows) == [("m1", "m2", 0.0), ("m2", "m1", 0.5)]
    assert leaderboard([]) == []
