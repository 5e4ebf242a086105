"""The shipped deep picker's pick count on the real EMPIAR-10017 micrographs against the manual
count, across thresholds, with the pipeline's side rule (picks and truth within half a box of a
side dropped), and what the unmatched picks are (near-duplicates or not, their scores).

Run: ``.venv/bin/python benchmarks/pick_real_threshold.py [--data ../shared/data/micrographs/empiar-10017]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pick_real import PIXEL, mask_centres  # noqa: E402

from tamis.pick.deep.predict import DeepPicker, load_model  # noqa: E402
from tamis.pick.evaluate import match_picks, score_picks  # noqa: E402
from tamis.pick.micrograph import read_micrograph  # noqa: E402

DIAMETER = 191.0  # Å, the masks' discs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="../shared/data/micrographs/empiar-10017")
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = Path(args.data)
    mics = sorted(p for p in data.glob("*.jpg") if not p.name.endswith("_mask.jpg"))
    model, meta = load_model(None)
    dp = DeepPicker.from_model(model, meta, DIAMETER)
    d = DIAMETER / PIXEL
    edge = 1.5 * DIAMETER / 2 / PIXEL  # half of RELION's box (1.5 diameters), in pixels
    for k, m in enumerate(mics, 1):
        mic = read_micrograph(m, PIXEL)
        h, w = mic.shape
        truth = mask_centres(m.with_name(m.stem + "_mask.jpg"))
        inside_t = (truth[:, 0] >= edge) & (truth[:, 0] < w - edge)
        inside_t &= (truth[:, 1] >= edge) & (truth[:, 1] < h - edge)
        t = truth[inside_t]
        for thr in (0.5, 0.7, 0.9, 0.95, 0.98, 0.99, 0.995):
            dp.threshold = thr
            p = dp.pick(mic)
            keep = (p.x >= edge) & (p.x < w - edge) & (p.y >= edge) & (p.y < h - edge)
            xy = np.c_[p.x[keep], p.y[keep]]
            sc = score_picks(xy, t, 0.5 * d)
            print(f"micrograph {k} threshold {thr}: {len(xy)} picks / {len(t)} manual = "
                  f"{len(xy) / len(t):.2f}, precision {sc.precision:.2f}, recall {sc.recall:.2f}")  # fmt: skip
            if thr == 0.5:
                fom = p.fom[keep]
                nn = cKDTree(xy).query(xy, k=2)[0][:, 1] / d
                unmatched = match_picks(xy, t, 0.5 * d) < 0
                print(f"  unmatched {int(unmatched.sum())}, of them within 0.7 diameters of "
                      f"another pick {int((unmatched & (nn < 0.7)).sum())}; median score "
                      f"unmatched {np.median(fom[unmatched]):.2f}, matched "
                      f"{np.median(fom[~unmatched]):.2f}; median nearest-neighbour distance "
                      f"(diameters) picks {np.median(nn):.2f}, manual "
                      f"{np.median(cKDTree(t).query(t, k=2)[0][:, 1] / d):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
