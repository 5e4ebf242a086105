"""The shipped deep picker's pick count on simulated micrographs across score thresholds.

Eight micrographs of ``benchmarks/pick_sim.py``'s recipe (2048 x 2048 px at 1.5 A/px, PDB 8ZPM,
100 particles each, ice, aggregates, carbon edges on 20%, seed 21) at the given SNR; the shipped
model was trained on other simulations, so all eight are held out. Per threshold: picks per
particle, precision and recall (one-to-one matches within half a diameter).

Run: ``.venv/bin/python benchmarks/pick_threshold_sim.py --snr 0.05 [--work DIR]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tamis.io.micrographs import MicrographSet
from tamis.pick.deep.predict import DeepPicker, load_model
from tamis.pick.evaluate import score_picks
from tamis.pick.micrograph import read_micrograph
from tamis.simulate.micrographs import MicrographSimulation, simulate_micrographs

DIAMETER = 114.0  # Å, 8ZPM
PIXEL = 1.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--work", default=None, help="default: bench_pick_threshold_<snr>")
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(args.work or f"bench_pick_threshold_{args.snr}")
    if not (work / "mics" / "micrographs.star").exists():
        simulate_micrographs(
            MicrographSimulation(
                n_micrographs=8, height_px=2048, width_px=2048, pixel_size=PIXEL,
                particles_per_micrograph=100, snr=args.snr, ice_per_micrograph=0.5,
                aggregates_per_micrograph=0.5, carbon_fraction=0.2, seed=21,
            ),
            work / "mics",
        )  # fmt: skip
    ms = MicrographSet.from_star(work / "mics" / "micrographs.star")
    gt = pd.read_csv(work / "mics" / "ground_truth.csv")
    mics = [read_micrograph(ms.path(i), PIXEL) for i in range(len(ms))]
    truth = [
        gt[(gt.micrograph_name == n) & (gt.kind == "particle")][["x", "y"]].to_numpy()
        for n in ms.names
    ]
    model, meta = load_model()
    for thr in (0.5, 0.9, 0.95, 0.98, 0.99):
        picker = DeepPicker.from_model(model, meta, DIAMETER, thr)
        tp = n_picks = n_true = 0.0
        for m, t in zip(mics, truth, strict=True):
            p = picker.pick(m)
            xy = np.c_[p.x, p.y]
            s = score_picks(xy, t, 0.5 * DIAMETER / PIXEL)
            tp += s.precision * len(xy)
            n_picks += len(xy)
            n_true += len(t)
        print(f"SNR {args.snr}, threshold {thr}: {n_picks / n_true:.2f} picks per particle, "
              f"precision {tp / max(n_picks, 1):.3f}, recall {tp / n_true:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
