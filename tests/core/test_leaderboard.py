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


def with_lengths(model_a, model_b, a_wins, b_wins, len_a, len_b):
    return [(model_a, model_b, 1.0, len_a, len_b)] * a_wins + [(model_a, model_b, 0.0, len_a, len_b)] * b_wins


def test_length_control_credits_length_not_the_verbose_checkpoint():
    """Two equally good checkpoints; the longer answer wins 4 of 5 votes whoever wrote it, and
    `verbose` writes the longer one in 100 of 120 votes. Plain Bradley-Terry ranks it far ahead;
    with length control the two are even (the saturated fit is exact) and length takes the credit."""
    votes = with_lengths("verbose", "terse", 80, 20, 600, 200) + with_lengths("verbose", "terse", 4, 16, 200, 600)
    plain = {r["model"]: r for r in leaderboard(votes, prior=0.0, bootstrap=0)}
    assert plain["verbose"]["strength"] - plain["terse"]["strength"] == pytest.approx(math.log(84 / 36), abs=1e-6)
    board = leaderboard(votes, prior=0.0, bootstrap=100, length_control=True)
    controlled = {r["model"]: r for r in board}
    assert controlled["verbose"]["strength"] == pytest.approx(0.0, abs=1e-6)
    assert controlled["terse"]["strength"] == pytest.approx(0.0, abs=1e-6)
    # z = +-1 after scaling, so the length coefficient is the log-odds of the longer answer
    assert board[0]["length_coef"] == pytest.approx(math.log(4), abs=1e-6)
    for row in board:
        assert row["ci_low"] <= row["strength"] <= row["ci_high"]


def test_length_control_without_length_differences_is_the_plain_fit():
    equal = with_lengths("ema", "final", 3, 1, 100, 100)
    board = leaderboard(equal, prior=0.0, bootstrap=0, length_control=True)
    assert board[0]["strength"] - board[1]["strength"] == pytest.approx(math.log(3), abs=1e-6)
    assert board[0]["length_coef"] == 0.0
    with pytest.raises(ValueError, match="with_lengths"):
        leaderboard(votes("ema", "final", 3, 1), length_control=True)


def test_bootstrap_is_as_wide_as_refitting_resampled_votes_one_by_one():
    """The vectorised bootstrap resamples votes with replacement, as refitting each resample does."""
    rng = np.random.default_rng(3)
    few = votes("a", "b", 6, 4) + votes("b", "c", 5, 5, ties=2) + votes("a", "c", 7, 3)
    names = ["a", "b", "c"]
    one_by_one = np.array([fit_strengths(win_matrix([few[i] for i in rng.integers(0, len(few), len(few))], names))
                           for _ in range(2000)])
    board = {r["model"]: r for r in leaderboard(few, bootstrap=2000, seed=5)}
    for i, name in enumerate(names):
        low, high = np.percentile(one_by_one[:, i], [2.5, 97.5])
        assert board[name]["ci_low"] == pytest.approx(low, abs=0.08)
        assert board[name]["ci_high"] == pytest.approx(high, abs=0.08)


def test_votes_keep_answer_lengths_and_filter_by_round():
    rows = [{"kind": "comparison", "model_a": "m1", "model_b": "m2", "verdict": "A", "round": 0,
             "answer_a": "four", "answer_b": "sixsix"},
            {"kind": "comparison", "model_a": "m2", "model_b": "m3", "verdict": "B", "round": 1,
             "answer_a": "x", "answer_b": ""}]
    assert votes_from_ratings(rows, with_lengths=True) == [("m1", "m2", 1.0, 4, 6), ("m2", "m3", 0.0, 1, 0)]
    assert votes_from_ratings(rows, rounds={1}) == [("m2", "m3", 0.0)]
