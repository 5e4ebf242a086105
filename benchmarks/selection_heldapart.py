"""Class selection on a generator family never used for training or tuning (issue 21).

For every held-apart job (``heldapart_family.py``): simulate, classify (RELION's GUI EM flags,
25 iterations, or VDAM 60 mini-batches, as the job's settings say), then rank and select with
the shipped ranker at its default threshold, with and without the particle screen. Reports
pooled particle false-positive and false-negative rates against the truth, per junk kind, the
class ranking's AUROC, and the calibration of P(good) (a reliability table). The classification
is cached in ``--work``; ``--evaluate`` reruns only the selection (seconds per job).

Run: ``.venv/bin/python benchmarks/selection_heldapart.py --work DIR --jobs 8``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from heldapart_family import KINDS, STRUCTURES, make_family_job  # noqa: E402

from tamis.class2d import Class2DOptions, run_class2d  # noqa: E402
from tamis.io.star import read_data_star  # noqa: E402
from tamis.rank.evaluate import auroc  # noqa: E402
from tamis.rank.screen import ScreenOptions  # noqa: E402
from tamis.rank.select import RankOptions, job_inputs, rank_classes  # noqa: E402
from tamis.rank.train import tiers_from_truth  # noqa: E402
from tamis.simulate.truth import image_key, truth_for  # noqa: E402


def classify(work: Path, j: int) -> tuple[Path, Path, dict]:
    cfg = make_family_job(work, j)
    d = work / f"job_{j:03d}"
    diameter = min(1.1 * cfg["diameter"], 0.98 * cfg["box"] * cfg["pixel"])
    common = dict(K=cfg["K"], particle_diameter=round(diameter, 1), random_seed=cfg["seed"] % 100000,
                  j=os.cpu_count() or 1)  # fmt: skip
    opts = (
        Class2DOptions.gui_em(iter=25, **common)
        if cfg["algorithm"] == "em"
        else Class2DOptions.gui_vdam(iter=60, **common)
    )
    done = sorted((d / "c2d").glob(f"run_it{opts.iter:03d}_optimiser.star"))
    if done:
        return done[-1], d / "sim" / "ground_truth.csv", cfg
    t = time.time()
    res = run_class2d(
        d / "sim" / "particles.star", str(d / "c2d" / "run"), opts, log=lambda s: None
    )
    cfg["classify_seconds"] = round(time.time() - t, 1)
    (d / "classify.json").write_text(json.dumps(cfg, indent=1))
    return res.optimiser, d / "sim" / "ground_truth.csv", cfg


def evaluate(work: Path, j: int, optimiser: Path, truth_csv: Path, options: RankOptions,
             tag: str, structures: list[str]) -> dict:  # fmt: skip
    out = work / f"job_{j:03d}" / f"rank_{tag}"
    res = rank_classes(optimiser, out, options, log=lambda s: None)
    data = job_inputs(optimiser)["data"].table
    truth = truth_for(data, truth_csv)
    kinds = truth["kind"].to_numpy()
    sel = read_data_star(res.particles).table if res.particles else data.iloc[:0]
    chosen = data["rlnImageName"].map(image_key).isin(set(sel["rlnImageName"].map(image_key)))
    chosen = chosen.to_numpy()
    tiers = tiers_from_truth(optimiser, truth_csv)
    scored = res.scores > -999
    clear = scored & np.isin(tiers, (0, 1, 2))
    row = {
        "job": j,
        "n": len(data),
        "particles": int((kinds == "particle").sum()),
        "kept_particles": int((chosen & (kinds == "particle")).sum()),
        # the class ranking the selection used (the ranker's score, times the screen's verdict
        # on each class's particles when the screen runs), and the network's own
        "auroc": auroc(res.selection[clear], tiers[clear] > 0),
        "auroc_network": auroc(res.scores[clear], tiers[clear] > 0),
        "prob": res.probability[scored].tolist(),
        "good": (tiers[scored] > 0).tolist(),
    }
    for k in KINDS:
        row[f"{k}_n"] = int((kinds == k).sum())
        row[f"{k}_kept"] = int((chosen & (kinds == k)).sum())
    which = truth["structure"].to_numpy()
    for s, name in enumerate(structures, 1):
        real = (kinds == "particle") & (which == s)
        row[f"{name}_n"] = row.get(f"{name}_n", 0) + int(real.sum())
        row[f"{name}_kept"] = row.get(f"{name}_kept", 0) + int((chosen & real).sum())
    return row


def summary(rows: list[dict]) -> dict:
    keys = {k for r in rows for k in r if k.endswith(("_n", "_kept"))}
    tot = {k: sum(r.get(k, 0) for r in rows) for k in keys}
    junk_n = sum(tot[f"{k}_n"] for k in KINDS)
    junk_kept = sum(tot[f"{k}_kept"] for k in KINDS)
    parts = sum(r["particles"] for r in rows)
    kept = sum(r["kept_particles"] for r in rows)
    out = {
        "jobs": len(rows),
        "FPR": junk_kept / max(1, junk_n),
        "FNR": 1 - kept / max(1, parts),
        "AUROC_mean": float(np.nanmean([r["auroc"] for r in rows])),
        "AUROC_network_mean": float(np.nanmean([r.get("auroc_network", np.nan) for r in rows])),
        "per_kind_FPR": {k: tot[f"{k}_kept"] / max(1, tot[f"{k}_n"]) for k in KINDS},
        "per_structure_FNR": {
            s: 1 - tot[f"{s}_kept"] / tot[f"{s}_n"] for s in STRUCTURES if tot.get(f"{s}_n")
        },
        "per_job": [
            (
                r["job"],
                round(
                    sum(r[f"{k}_kept"] for k in KINDS) / max(1, sum(r[f"{k}_n"] for k in KINDS)), 3
                ),
                round(1 - r["kept_particles"] / max(1, r["particles"]), 3),
                round(r["auroc"], 3),
            )
            for r in rows
        ],  # fmt: skip
    }
    prob = np.concatenate([r["prob"] for r in rows])
    good = np.concatenate([r["good"] for r in rows]).astype(bool)
    bins = np.linspace(0, 1, 6)
    rel = []
    for lo, hi in zip(bins[:-1], bins[1:], strict=True):
        m = (prob >= lo) & ((prob < hi) | (hi == 1))
        if m.any():
            rel.append((f"{lo:.1f}-{hi:.1f}", int(m.sum()), round(float(prob[m].mean()), 3),
                        round(float(good[m].mean()), 3)))  # fmt: skip
    out["reliability"] = rel
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default="/tmp/heldapart")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--classify-only", action="store_true")
    ap.add_argument("--out", default=None, help="JSON report")
    ap.add_argument("--model", default=None, help="ranker weights (default: the shipped ones)")
    ap.add_argument("--tag", default="", help="suffix of the rank_* folders")
    args = ap.parse_args()
    work = Path(args.work)
    variants = {
        "default": RankOptions(model=args.model),
        "fixed_screen": RankOptions(model=args.model, screen=ScreenOptions(adaptive=False)),
        "classes_only": RankOptions(model=args.model, screen=None, gallery=False),
    }
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for j in range(args.first, args.first + args.jobs):
        optimiser, truth, cfg = classify(work, j)
        print(f"job {j}: {cfg}", flush=True)
        if args.classify_only:
            continue
        for name, options in variants.items():
            results[name].append(
                evaluate(work, j, optimiser, truth, options, name + args.tag, cfg["structures"])
            )
    if args.classify_only:
        return
    report = {name: summary(rows) for name, rows in results.items()}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": report, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
