"""Picks against true positions: one-to-one matching within a radius, precision/recall/F1 and
average precision."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

__all__ = ["PickScore", "match_picks", "score_picks", "average_precision"]


@dataclass
class PickScore:
    n_picks: int
    n_true: int
    true_positives: int

    @property
    def precision(self) -> float:
        return self.true_positives / self.n_picks if self.n_picks else 0.0

    @property
    def recall(self) -> float:
        return self.true_positives / self.n_true if self.n_true else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    def __add__(self, other: PickScore) -> PickScore:
        return PickScore(
            self.n_picks + other.n_picks,
            self.n_true + other.n_true,
            self.true_positives + other.true_positives,
        )


def match_picks(picks: np.ndarray, truth: np.ndarray, radius: float) -> np.ndarray:
    """Best one-to-one matching of picks ``(n, 2)`` to true positions ``(m, 2)`` with distance
    < ``radius`` (maximum number of pairs). Returns, per pick, the index of its true partner or -1."""
    out = np.full(len(picks), -1, dtype=np.int64)
    if len(picks) == 0 or len(truth) == 0:
        return out
    tree = cKDTree(truth)
    pairs = tree.query_ball_point(picks, r=radius)
    rows = [i for i, js in enumerate(pairs) if js]
    cols = sorted({j for js in pairs for j in js})
    if not rows:
        return out
    col_index = {j: k for k, j in enumerate(cols)}
    cost = np.ones((len(rows), len(cols)))
    for a, i in enumerate(rows):
        for j in pairs[i]:
            d = np.hypot(*(picks[i] - truth[j]))
            cost[a, col_index[j]] = d / radius * 1e-3  # prefer any match, then close ones
    ra, ca = linear_sum_assignment(cost)
    for a, c in zip(ra, ca, strict=True):
        if cost[a, c] < 1:
            out[rows[a]] = cols[c]
    return out


def score_picks(picks: np.ndarray, truth: np.ndarray, radius: float) -> PickScore:
    matched = match_picks(picks, truth, radius)
    return PickScore(len(picks), len(truth), int((matched >= 0).sum()))


def average_precision(
    picks: np.ndarray, fom: np.ndarray, truth: np.ndarray, radius: float, n_true: int | None = None
) -> float:
    """Area under the precision-recall curve of picks ranked by ``fom`` (a pick is correct when it
    is the first, by FOM, to claim a true position within ``radius``)."""
    n_true = len(truth) if n_true is None else n_true
    if n_true == 0 or len(picks) == 0:
        return 0.0
    order = np.argsort(-np.asarray(fom), kind="stable")
    tree = cKDTree(truth) if len(truth) else None
    claimed = np.zeros(len(truth), dtype=bool)
    hits = np.zeros(len(order), dtype=bool)
    for k, i in enumerate(order):
        if tree is None:
            break
        for j in sorted(
            tree.query_ball_point(picks[i], r=radius),
            key=lambda j: np.hypot(*(picks[i] - truth[j])),
        ):
            if not claimed[j]:
                claimed[j] = True
                hits[k] = True
                break
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / n_true
    # step-wise integral: sum of precision at each new true positive / n_true
    return float((precision * hits).sum() / n_true) if len(hits) else float(recall[-1])
