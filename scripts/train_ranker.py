"""Build the class ranker's training set from tamis's own 2D classification of simulated data,
train RELION's network on it, and evaluate on held-out jobs (structures and seeds not used in
training). Writes the weights the package ships (``src/tamis/data/ranker_general.*``) with
``--install``.

Each job: a random data set (one to three random pseudo-proteins ``random:SEED[:RESIDUES]`` or
PDB 8ZPM / its receptor chain, 1,000-2,000 particles, box 48-64 px, 2.4-3.6 A/px, SNR 0.02-0.15,
junk 10-40% of every kind), classified by EM (12 iterations) or VDAM (50 mini-batches) with
K = 10-30; every class labelled from the truth of its members (``tiers_from_truth``: majority
structure and purity -> RELION's target tiers). Test jobs use structures and seeds of their own.

Run: ``.venv/bin/python scripts/train_ranker.py --jobs 40 --test-jobs 8 [--install]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from tamis.class2d import Class2DOptions, run_class2d
from tamis.rank.evaluate import auroc, particle_rates
from tamis.rank.features import network_features
from tamis.rank.select import RankOptions, job_inputs, load_ranker, rank_classes
from tamis.rank.train import (
    Examples,
    RankTrainOptions,
    job_examples,
    tiers_from_truth,
    train_ranker,
)
from tamis.simulate.particles import ParticleSimulation, simulate_particles

TARGET = Path(__file__).resolve().parents[1] / "src" / "tamis" / "data" / "ranker_general"


def make_job(work: Path, j: int, test: bool) -> tuple[Path, Path, dict]:
    rng = np.random.default_rng(10_000 * (2 if test else 1) + j)
    base = 50_000 if test else 0  # held-out jobs use other random structures
    pool = [
        f"random:{base + int(rng.integers(0, 10_000))}:{int(rng.integers(250, 900))}"
        for _ in range(3)
    ]
    if not test and rng.random() < 0.3:
        pool[0] = str(rng.choice(["builtin:8zpm", "builtin:8zpm@R"]))
    structures = pool[: int(rng.integers(1, 4))]
    cfg = dict(
        structures=structures,
        n_particles=int(rng.integers(1000, 2000)),
        box_size=int(rng.choice([48, 64])),
        pixel_size=float(rng.uniform(2.4, 3.6)),
        snr=float(rng.uniform(0.02, 0.15)),
        junk_fraction=float(rng.uniform(0.1, 0.4)),
        seed=int(rng.integers(0, 1_000_000)),
    )
    d = work / f"{'test' if test else 'train'}_{j:03d}"
    if not (d / "sim" / "particles.star").exists():
        simulate_particles(ParticleSimulation(**cfg), d / "sim")
    k = int(rng.integers(10, 31))
    grad = bool(rng.random() < 0.5)
    diameter = 0.9 * cfg["box_size"] * cfg["pixel_size"]
    common = dict(K=k, particle_diameter=diameter, random_seed=cfg["seed"], j=os.cpu_count() or 1)
    opts = (
        Class2DOptions.gui_vdam(iter=50, **common)
        if grad
        else Class2DOptions.gui_em(iter=12, **common)
    )
    opt = sorted((d / "c2d").glob("run_it*_optimiser.star"))
    if not opt or f"it{opts.iter:03d}" not in opt[-1].name:
        result = run_class2d(
            d / "sim" / "particles.star", str(d / "c2d" / "run"), opts, log=lambda s: None
        )
        optimiser = result.optimiser
    else:
        optimiser = opt[-1]
    cfg.update(K=k, algorithm="vdam" if grad else "em")
    return optimiser, d / "sim" / "ground_truth.csv", cfg


def _quiet(_: str) -> None:
    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default="/tmp/ranker_jobs")
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--test-jobs", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--install", action="store_true")
    ap.add_argument(
        "--evaluate-only", action="store_true", help="evaluate the model already in --work/ranker"
    )
    args = ap.parse_args()
    work = Path(args.work)
    train_parts, test_parts, records, test_jobs = [], [], [], []
    for j in range(args.jobs + args.test_jobs):
        test = j >= args.jobs
        jj = j - args.jobs if test else j
        optimiser, truth, cfg = make_job(work, jj, test)
        tiers = tiers_from_truth(optimiser, truth)
        ex = job_examples(optimiser, tiers, job_index=j)
        (test_parts if test else train_parts).append(ex)
        if test:
            test_jobs.append((optimiser, truth))
        records.append(
            {
                "job": j,
                "test": test,
                **cfg,
                "classes": int(len(tiers)),
                "good": int((tiers > 0).sum()),
            }
        )
        print(f"job {j}: {cfg}", flush=True)
    train = Examples.concat(train_parts)
    model = work / "ranker.safetensors"
    if not (args.evaluate_only and model.exists()):
        model = train_ranker(
            train,
            work / "ranker",
            RankTrainOptions(epochs=args.epochs),
            provenance={"script": "scripts/train_ranker.py", "jobs": records},
        )
    net, meta = load_ranker(model)
    test = Examples.concat(test_parts)
    with torch.no_grad():
        s = net(
            torch.from_numpy(test.images)[:, None],
            torch.from_numpy(network_features(test.features)),
        )[:, 0].numpy()
    clear = np.isin(test.tiers, (0, 1, 2))
    # particle level, RELION's default selection (score >= 0.5) on every held-out job
    rates = []
    for (optimiser, truth), j in zip(test_jobs, range(args.test_jobs), strict=True):
        res = rank_classes(
            optimiser, work / "eval" / f"test_{j:03d}", RankOptions(model=str(model)), log=_quiet
        )
        r = particle_rates(job_inputs(optimiser)["data"].table, res.particles, truth)
        rates.append(r)
        print(f"test job {j}: {r}", flush=True)
    pooled = {k: sum(r[k] for r in rates) for k in ("tp", "fp", "fn", "tn")}
    report = {
        "test_auroc_good_vs_bad": auroc(s[clear], test.good[clear]),
        "test_auroc_good_vs_rest": auroc(s, test.good),
        "n_test_classes": len(test),
        "n_test_classes_good": int(test.good.sum()),
        "n_test_classes_bad": int((test.tiers == 0).sum()),
        "particles_false_positive_rate": pooled["fp"] / max(1, pooled["fp"] + pooled["tn"]),
        "particles_false_negative_rate": pooled["fn"] / max(1, pooled["fn"] + pooled["tp"]),
        "particles_junk_in_selection": pooled["fp"] / max(1, pooled["fp"] + pooled["tp"]),
        "per_job": rates,
    }
    meta["test"] = report
    model.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str))
    print(json.dumps({k: v for k, v in report.items() if k != "per_job"}, indent=2))
    if args.install:
        shutil.copy(model, TARGET.with_suffix(".safetensors"))
        shutil.copy(model.with_suffix(".json"), TARGET.with_suffix(".json"))


if __name__ == "__main__":
    main()
