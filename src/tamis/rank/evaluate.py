"""Measuring a ranker on simulated 2D jobs: AUROC over classes and particle-level error rates of
a selection, both against the simulator's ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tamis.io.star import read_data_star

__all__ = ["auroc", "particle_rates", "class_reference_rates"]


def auroc(scores: np.ndarray, good: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a good > score of a bad), ties counting one half."""
    scores, good = np.asarray(scores, dtype=np.float64), np.asarray(good, dtype=bool)
    pos, neg = scores[good], scores[~good]
    if not len(pos) or not len(neg):
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    # average ranks over ties (1-based)
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1
        i = j + 1
    u = ranks[good].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def particle_rates(
    all_particles: str | Path | pd.DataFrame,
    selected: str | Path | pd.DataFrame,
    ground_truth: str | Path | pd.DataFrame,
) -> dict:
    """Particle-level outcome of a selection on simulated data: a particle is positive when the
    simulator placed a structure there (not junk). Returns counts and the false-positive rate
    (junk selected / all junk), false-negative rate (particles left out / all particles) and the
    junk share of the selection."""
    from tamis.simulate.truth import image_key, truth_for

    def table(x: str | Path | pd.DataFrame) -> pd.DataFrame:
        return x if isinstance(x, pd.DataFrame) else read_data_star(x).table

    data = table(all_particles)
    truth = truth_for(data, ground_truth)
    positive = truth["kind"].to_numpy() == "particle"
    chosen_keys = set(table(selected)["rlnImageName"].map(image_key))
    chosen = data["rlnImageName"].map(image_key).isin(chosen_keys).to_numpy()
    out = _rates(chosen, positive)
    out["junk_in_selection"] = out["fp"] / max(1, out["fp"] + out["tp"])
    return out


def class_reference_rates(
    classes: np.ndarray, selected: set[int] | list[int], reference: set[int] | list[int]
) -> dict:
    """Particle-level agreement of a class selection with a reference class selection (a
    person's, or the truth's good classes), as RELION-4's ranker paper measures it: ``classes``
    holds each particle's class number; a particle is positive when its class is in
    ``reference``. Returns counts, false-positive and false-negative rates."""
    classes = np.asarray(classes)
    chosen = np.isin(classes, list(selected))
    positive = np.isin(classes, list(reference))
    return _rates(chosen, positive)


def _rates(chosen: np.ndarray, positive: np.ndarray) -> dict:
    """Confusion counts of a boolean selection against boolean truth, and FP/FN rates."""
    tp = int((chosen & positive).sum())
    fp = int((chosen & ~positive).sum())
    fn = int((~chosen & positive).sum())
    tn = int((~chosen & ~positive).sum())
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "false_positive_rate": fp / max(1, fp + tn),
        "false_negative_rate": fn / max(1, fn + tp),
    }
