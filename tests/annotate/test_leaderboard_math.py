"""Bradley-Terry ratings of generator versions (``annotate.leaderboard``) against cases worked by
hand: two versions (the MLE difference is the log of the win ratio), ties as half wins, a chain of
three (each edge is fitted alone: no cycle ties them), a version that never lost stays finite, and
bootstrap intervals that hold the estimate and narrow with more games."""

from __future__ import annotations

import math

import numpy as np
import pytest

from annotate.leaderboard import ELO, Games, bootstrap_intervals, bt_fit, elo


def games(n: int, *rows: tuple[int, int, float, int]) -> Games:
    """``(i, j, score of i, how many)`` rows as games."""
    i, j, s = [], [], []
    for a, b, score, count in rows:
        i += [a] * count
        j += [b] * count
        s += [score] * count
    return Games(n, np.array(i), np.array(j), np.array(s, dtype=float))


def test_two_versions_differ_by_the_log_of_their_win_ratio() -> None:
    theta = bt_fit(games(2, (0, 1, 1.0, 3), (0, 1, 0.0, 1)))  # A beat B 3 times, lost once
    assert theta[0] - theta[1] == pytest.approx(math.log(3), abs=1e-3)
    assert theta.sum() == pytest.approx(0.0, abs=1e-12)
    assert elo(theta)[0] - elo(theta)[1] == pytest.approx(400 * math.log10(3), abs=0.5)  # 190.8 points


def test_a_tie_is_half_a_win_each_way() -> None:
    # A: 2 wins + 1 tie = 2.5 of 4; B: 1 win + 1 tie = 1.5. The tie is listed from B's side too.
    theta = bt_fit(games(2, (0, 1, 1.0, 2), (1, 0, 0.5, 1), (1, 0, 1.0, 1)))
    assert theta[0] - theta[1] == pytest.approx(math.log(2.5 / 1.5), abs=1e-3)


def test_a_chain_of_three() -> None:
    theta = bt_fit(games(3, (0, 1, 1.0, 2), (0, 1, 0.0, 1), (1, 2, 1.0, 2), (1, 2, 0.0, 1)))
    assert theta[0] - theta[1] == pytest.approx(math.log(2), abs=1e-3)
    assert theta[1] - theta[2] == pytest.approx(math.log(2), abs=1e-3)
    assert ELO * (theta[0] - theta[2]) == pytest.approx(800 * math.log10(2), abs=0.5)  # 240.8 points


def test_a_version_that_never_lost_stays_finite_and_ahead() -> None:
    theta = bt_fit(games(2, (0, 1, 1.0, 5)))
    assert np.isfinite(theta).all() and theta[0] > theta[1] + 5


def test_bootstrap_intervals_hold_the_estimate_and_narrow_with_more_games() -> None:
    few = games(3, (0, 1, 1.0, 6), (0, 1, 0.0, 4), (1, 2, 1.0, 6), (1, 2, 0.0, 4))
    many = games(3, (0, 1, 1.0, 600), (0, 1, 0.0, 400), (1, 2, 1.0, 600), (1, 2, 0.0, 400))
    widths = []
    for g in (few, many):
        theta = bt_fit(g)
        low, high = bootstrap_intervals(g, rounds=200, seed=1)
        assert (low <= theta + 1e-9).all() and (theta <= high + 1e-9).all()
        widths.append(float((high - low).mean()))
    assert widths[1] < widths[0] / 5  # 100x the games: about 10x narrower
    low, high = bootstrap_intervals(many, rounds=200, seed=1)
    assert low[0] > high[2]  # with 2000 games the best is clearly above the worst


def test_no_games() -> None:
    assert bt_fit(Games(0, np.array([], dtype=int), np.array([], dtype=int), np.array([]))).shape == (0,)
