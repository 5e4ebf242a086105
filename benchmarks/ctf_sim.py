"""CTF estimation on simulated micrographs with known defocus.

Recipe: 12 micrographs of 2048 x 2048 px at 1.0 A/px, PDB 8ZPM, 150 particles each at SNR 0.05,
defocus 0.8-2.5 um with up to 600 A astigmatism (the simulator's defaults), ice crystals and a
carbon edge on 20%; the noise is white shot noise plus a share ``--ice`` of CTF-modulated ice
scattering (0 = Thon rings from the particles and junk alone). tamis's estimator with the
ctffind job's defaults (box 512, 30-5 A, defocus 0.5-5 um in 500 A steps). Reports the median
and 90th-percentile error of the mean defocus and of the astigmatism, the median angle error for
micrographs with > 200 A astigmatism, the fit resolution and seconds per micrograph.

Run: ``.venv/bin/python benchmarks/ctf_sim.py [--ice 0.3] [--work bench_ctf]``
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from tamis.io.mrc import read_mrc
from tamis.io.star import read_star
from tamis.prep.ctffind import estimate_ctf
from tamis.simulate.micrographs import MicrographSimulation, simulate_micrographs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ice", type=float, default=0.3)
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--work", default="bench_ctf")
    args = ap.parse_args()
    work = Path(args.work) / f"ice{args.ice:g}"
    if not (work / "micrographs.star").exists():
        simulate_micrographs(
            MicrographSimulation(
                n_micrographs=args.n, height_px=2048, width_px=2048, pixel_size=1.0,
                particles_per_micrograph=150, snr=0.05, carbon_fraction=0.2,
                ice_scattering=args.ice, seed=11,
            ),
            work,
        )  # fmt: skip
    table = read_star(work / "micrographs.star")["micrographs"]
    err_mean, err_ast, err_ang, res, secs = [], [], [], [], []
    for _, row in table.iterrows():
        img, _ = read_mrc(work / row["rlnMicrographName"])
        t = time.perf_counter()
        fit = estimate_ctf(torch.from_numpy(img), 1.0)
        secs.append(time.perf_counter() - t)
        true_mean = (row["rlnDefocusU"] + row["rlnDefocusV"]) / 2
        true_ast = abs(row["rlnDefocusU"] - row["rlnDefocusV"])
        err_mean.append(abs((fit.defocus_u + fit.defocus_v) / 2 - true_mean))
        err_ast.append(abs(fit.astigmatism - true_ast))
        if true_ast > 200:
            d = (fit.defocus_angle - row["rlnDefocusAngle"]) % 180
            if row["rlnDefocusU"] < row["rlnDefocusV"]:
                d = (d + 90) % 180
            err_ang.append(min(d, 180 - d))
        res.append(fit.max_resolution)
    report = {
        "ice_scattering": args.ice,
        "micrographs": len(table),
        "mean_defocus_error_median_A": float(np.median(err_mean)),
        "mean_defocus_error_p90_A": float(np.percentile(err_mean, 90)),
        "astigmatism_error_median_A": float(np.median(err_ast)),
        "angle_error_median_deg": float(np.median(err_ang)) if err_ang else None,
        "fit_resolution_median_A": float(np.median(res)),
        "seconds_per_micrograph": float(np.median(secs)),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
