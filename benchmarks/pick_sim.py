"""Pickers on simulated micrographs with ground truth.

Recipe: 25 micrographs of 2048 x 2048 px at 1.5 A/px with PDB 8ZPM (114 A), 100 particles each,
SNR 0.05 (variance of a CTF-modulated particle over 1.5 diameters / noise variance), defocus
0.8-2.5 um, ice gradient 0.3, ice crystals (0.5 per micrograph), aggregates (0.5), carbon edges on
20% of the micrographs. Scores: one-to-one matches within half a diameter (57 A); precision,
recall, F1 over micrographs 6-25; seconds per micrograph (reading included).

- LoG: RELION's defaults, diameters 90-130 A.
- template: 12 random projections of the structure (white), the micrographs' CTF, 20 A and 10 A
  working resolution, minimum distance 90 A, threshold 0.25 (NCC), and the best 100 per
  micrograph.
- deep: trained on micrographs 1-5 (4 train + 1 validation), 15 epochs; and the shipped model.

Run: ``.venv/bin/python benchmarks/pick_sim.py [--work bench_pick_sim]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tamis.geometry import euler_to_matrix, random_euler_angles
from tamis.io.micrographs import MicrographSet
from tamis.pick.deep.predict import DeepPicker, load_model
from tamis.pick.deep.train import TrainOptions, train_picker
from tamis.pick.evaluate import average_precision, score_picks
from tamis.pick.log import LogOptions, pick_log
from tamis.pick.micrograph import read_micrograph
from tamis.pick.template import TemplateOptions, pick_template
from tamis.simulate.micrographs import MicrographSimulation, simulate_micrographs
from tamis.simulate.project import Projector
from tamis.simulate.structure import load_structure

DIAMETER = 114.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default="bench_pick_sim")
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args()
    work = Path(args.work)
    if not (work / "mics" / "micrographs.star").exists():
        simulate_micrographs(
            MicrographSimulation(
                n_micrographs=25,
                height_px=args.size,
                width_px=args.size,
                pixel_size=1.5,
                particles_per_micrograph=100 * (args.size // 2048) ** 2 or 100,
                snr=args.snr,
                ice_per_micrograph=0.5,
                aggregates_per_micrograph=0.5,
                carbon_fraction=0.2,
                seed=21,
            ),
            work / "mics",
        )
    ms = MicrographSet.from_star(work / "mics" / "micrographs.star")
    gt = pd.read_csv(work / "mics" / "ground_truth.csv")
    truth = [
        gt[(gt.micrograph_name == n) & (gt.kind == "particle")][["x", "y"]].to_numpy()
        for n in ms.names
    ]
    train, test = list(range(5)), list(range(5, len(ms)))
    st = load_structure("builtin:8zpm", box_size=128, pixel_size=1.5)
    ang = random_euler_angles(12, torch.Generator().manual_seed(0))
    templates = (
        Projector(st.volume).project(euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])).float()
    )
    t0 = time.perf_counter()
    res = train_picker(
        [read_micrograph(ms.path(i), 1.5) for i in train],
        [truth[i] for i in train],
        work / "deep",
        TrainOptions(diameter=DIAMETER, epochs=args.epochs, steps_per_epoch=30, batch_size=12),
    )
    report: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, cpu",
        "snr": args.snr,
        "micrograph_px": args.size,
        "deep_training_s": round(time.perf_counter() - t0, 1),
    }
    model, meta = load_model(res.model)
    general, gmeta = load_model()
    t20 = TemplateOptions(diameter=130, min_distance=90, lowpass=20)
    t10 = TemplateOptions(diameter=130, min_distance=90, lowpass=10)
    pickers = {
        "LoG 90-130 A": lambda m, i: pick_log(m, LogOptions(90, 130)),
        "template 20 A, NCC >= 0.25": lambda m, i: pick_template(m, templates, 1.5, t20, ms.ctf(i)),
        "template 10 A, NCC >= 0.25": lambda m, i: pick_template(m, templates, 1.5, t10, ms.ctf(i)),
        "template 20 A, best 100": lambda m, i: pick_template(
            m, templates, 1.5, t20, ms.ctf(i), max_picks=100
        ),
        "deep, trained on 5": lambda m, i: DeepPicker(model, meta, DIAMETER).pick(m),
        "deep, shipped general model": lambda m, i: DeepPicker(general, gmeta, DIAMETER).pick(m),
    }
    radius = 0.5 * DIAMETER / 1.5
    for name, pick in pickers.items():
        tot, secs, aps = None, [], []
        for i in test:
            t = time.perf_counter()
            m = read_micrograph(ms.path(i), 1.5)
            p = pick(m, i)
            secs.append(time.perf_counter() - t)
            xy = np.stack([p.x, p.y], 1)
            s = score_picks(xy, truth[i], radius)
            aps.append(average_precision(xy, p.fom, truth[i], radius))
            tot = s if tot is None else tot + s
        report[name] = {
            "precision": round(tot.precision, 3),
            "recall": round(tot.recall, 3),
            "f1": round(tot.f1, 3),
            "average_precision": round(float(np.mean(aps)), 3),
            "seconds_per_micrograph": round(float(np.mean(secs)), 2),
        }
        print(name, report[name], flush=True)
    (work / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
