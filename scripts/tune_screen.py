"""Choose the particle screen's default thresholds (:mod:`tamis.rank.screen`) on the ranker's
*training* jobs (made by ``scripts/train_ranker.py`` in ``--work``), never on its held-out ones.

For each job: the ranker's class scores (``--model``, default the shipped one) and every
particle's amplitude and misfit; for each point of a grid over the adaptive rule's (min_misfit,
max_misfit, min_amplitude, class_shift), and the fixed rule's (max_misfit, min_amplitude) for
comparison, the default selection as ``rank_classes`` makes it (cuts from the ranker's first
choice of classes, classes re-chosen by their share of passing particles, their passing
particles) gives the pooled particle-level false-positive rate (junk kept / all junk) and
false-negative rate (real particles dropped / all real particles) against the simulator's truth.
Training jobs of every family are used: ``train_*``, ``mtrain_*`` (pipeline-style) and
``vtrain_*`` (assemblies).

Run: ``.venv/bin/python scripts/tune_screen.py --work /tmp/ranker_jobs``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from tamis.rank.screen import ScreenOptions, screen_particles
from tamis.rank.select import (
    RankOptions,
    job_inputs,
    job_particle_fit,
    load_ranker,
    rank_classes,
    recommended_min_score,
    select_screened_classes,
)
from tamis.simulate.truth import truth_for


def job_fit(d: Path, out: Path, model: str | None = None) -> pd.DataFrame:
    """Every particle of one job with its screen statistics and truth; the ranker's class
    scores and its first choice of classes in ``attrs`` (the default selection
    then drops classes by their share of particles passing the screen, as ``rank_classes``)."""
    optimiser = sorted((d / "c2d").glob("run_it*_optimiser.star"))[-1]
    res = rank_classes(
        optimiser, out, RankOptions(model=model, screen=None, gallery=False), log=lambda s: None
    )
    job = job_inputs(optimiser)
    table = job["data"].table
    truth_file = (
        d / "extracted_truth.csv" if d.name.startswith("m") else d / "sim" / "ground_truth.csv"
    )
    positive = truth_for(table, truth_file)["kind"].to_numpy() == "particle"
    _, fit = job_particle_fit(job, None, ScreenOptions(device="cpu"))
    fit["positive"] = positive
    n_total = len(table)
    kept = [c for c in range(len(res.scores)) if res.scores[c] > -999]
    share = job["classes"]["rlnClassDistribution"].astype(float).to_numpy()
    fit.attrs.update(
        n_positive=int(positive.sum()), n_junk=int((~positive).sum()), scores=res.scores,
        kept=kept, n_est={c: float(share[c]) * n_total for c in kept},
        first=[c - 1 for c in res.selected],
    )  # fmt: skip
    return fit


def default_selection(fit: pd.DataFrame, opts: ScreenOptions, min_score: float) -> np.ndarray:
    """The particles ``rank_classes`` keeps with the screen ``opts`` at the ranker's threshold
    ``min_score``: cuts from the first choice of classes, classes re-chosen by
    ``select_screened_classes``, their passing particles."""
    a = fit.attrs
    cls = fit["class"].to_numpy().astype(int)
    first = np.isin(cls, [c + 1 for c in a["first"]])
    if not first.any():
        return first
    passed = screen_particles(fit, opts, cuts_from=first)
    chosen, *_ = select_screened_classes(
        a["scores"], a["kept"], a["n_est"], cls, passed, RankOptions(min_score=min_score)
    )
    return np.isin(cls, [c + 1 for c in chosen]) & passed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default="/tmp/ranker_jobs")
    ap.add_argument(
        "--out", default=None, help="JSON of the grid (default WORK/screen_tuning.json)"
    )
    ap.add_argument("--model", default=None, help="ranker weights (default: the shipped ones)")
    args = ap.parse_args()
    work = Path(args.work)
    jobs = [
        d
        for pattern in ("train_*", "mtrain_*", "vtrain_*")
        for d in sorted(work.glob(pattern))
        if d.is_dir()
    ]
    fits = []
    for d in jobs:
        fits.append(job_fit(d, work / "tune" / d.name, args.model))
        print(f"{d.name}: {len(fits[-1])} particles", flush=True)
    min_score = recommended_min_score(load_ranker(args.model)[1])  # the ranker's threshold
    n_pos = sum(f.attrs["n_positive"] for f in fits)
    n_junk = sum(f.attrs["n_junk"] for f in fits)
    rows = []
    grid_points = [
        (True, lo, hi, amp, shift)
        for lo in (2.0, 2.5, 3.0, 3.5, 4.0)
        for hi in (5.0, 6.0, 8.0)
        for amp in (0.5, 0.6)
        for shift in (0.0, 1.0, 2.0, 3.0, 5.0)
    ]
    grid_points += [
        (False, np.nan, hi, amp, 0.0)
        for hi in (3.0, 4.0, 5.0, 6.0, np.inf)
        for amp in (0.0, 0.5, 0.6)
    ]
    for adaptive, min_misfit, max_misfit, min_amplitude, class_shift in grid_points:
        opts = ScreenOptions(
            max_misfit=max_misfit, min_amplitude=min_amplitude, adaptive=adaptive,
            min_misfit=min_misfit if adaptive else 3.0, class_shift=class_shift,
        )  # fmt: skip
        fp = fn = 0
        for f in fits:
            keep = default_selection(f, opts, min_score)
            pos = f["positive"].to_numpy()
            fp += int((keep & ~pos).sum())
            fn += int((~keep & pos).sum())
        rows.append({"adaptive": adaptive, "min_misfit": min_misfit, "max_misfit": max_misfit,
                     "min_amplitude": min_amplitude, "class_shift": class_shift,
                     "fp_rate": fp / n_junk,
                     "fn_rate": fn / n_pos})  # fmt: skip
    grid = pd.DataFrame(rows)
    grid["worse"] = grid[["fp_rate", "fn_rate"]].max(axis=1)
    print(grid.sort_values("worse").head(20).to_string(index=False))
    out = Path(args.out) if args.out else work / "screen_tuning.json"
    out.write_text(
        json.dumps({"jobs": [d.name for d in jobs], "grid": rows}, indent=1, default=str)
    )


if __name__ == "__main__":
    main()
