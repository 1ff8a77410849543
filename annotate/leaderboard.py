"""Bradley-Terry ratings of generator versions from human judgments, with bootstrap intervals.

Each judged pair of two versions' outputs is a game: the winner scores 1, the loser 0, a tie 1/2
each (a "both bad" verdict says nothing about which is better and is left out; a k-wise ranking
gives all its ordered pairs). The strengths ``theta`` maximise

    sum over games  s * log sigmoid(theta_i - theta_j) + (1 - s) * log sigmoid(theta_j - theta_i)
    - l2 / 2 * |theta|^2

(a tie as half a win each way, the usual reading of ties in arena leaderboards). The tiny ``l2``
keeps a version that never lost finite; with it the two-version case gives
``theta_a - theta_b = log(wins_a / wins_b)`` to within 1e-3 (the test checks a hand-computed case).
Ratings are shown on the Elo scale, ``1000 + 400 / ln 10 * theta`` with mean theta 0. The 95%
interval of each rating comes from refitting on judgments resampled with replacement.

Numpy only: the SQL that reads the games is in ``annotate.selectors.leaderboard``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ELO = 400.0 / math.log(10.0)
L2 = 1e-4


@dataclass
class Games:
    """Games between ``n`` players: ``i`` and ``j`` index the players, ``s`` is i's score (1, 0.5, 0)."""

    n: int
    i: np.ndarray
    j: np.ndarray
    s: np.ndarray

    def take(self, idx: np.ndarray) -> Games:
        return Games(self.n, self.i[idx], self.j[idx], self.s[idx])


def bt_fit(games: Games, *, l2: float = L2, iterations: int = 100) -> np.ndarray:
    """Maximum-likelihood strengths ``(n,)`` (mean 0) by Newton's method on the concave objective."""
    theta = np.zeros(games.n)
    if games.n == 0 or len(games.s) == 0:
        return theta
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(theta[games.i] - theta[games.j])))
        r = games.s - p  # d/d(theta_i) of each game's log-likelihood
        grad = np.bincount(games.i, r, games.n) - np.bincount(games.j, r, games.n) - l2 * theta
        w = p * (1.0 - p)
        hess = np.zeros((games.n, games.n))
        np.add.at(hess, (games.i, games.i), -w)
        np.add.at(hess, (games.j, games.j), -w)
        np.add.at(hess, (games.i, games.j), w)
        np.add.at(hess, (games.j, games.i), w)
        hess[np.diag_indices(games.n)] -= l2
        step = np.linalg.solve(hess, -grad)
        theta = theta + step
        if float(np.abs(step).max()) < 1e-10:
            break
    return theta - theta.mean()


def elo(theta: np.ndarray) -> np.ndarray:
    """Strengths on the Elo scale (1000 for the average version)."""
    return 1000.0 + ELO * theta


def bootstrap_intervals(
    games: Games, *, rounds: int = 200, seed: int = 0, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper ends ``(n,)`` of each strength's interval (percentile bootstrap over games)."""
    if len(games.s) == 0:
        return np.zeros(games.n), np.zeros(games.n)
    rng = np.random.default_rng(seed)
    fits = np.stack([bt_fit(games.take(rng.integers(0, len(games.s), len(games.s)))) for _ in range(rounds)])
    tail = (1.0 - level) / 2.0
    return np.quantile(fits, tail, axis=0), np.quantile(fits, 1.0 - tail, axis=0)
