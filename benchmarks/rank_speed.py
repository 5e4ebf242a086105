"""Time ``tamis rank`` on 100 classes: a synthetic 2D job (100 class averages of 128 px at 2 A/px,
10,000 particles), RELION's features for every class, the network (randomly initialised weights:
the time does not depend on them) and every output file; then the same with the particle screen,
which reads every particle of the selected classes (a float16 stack of the particles is written
first, outside the timing).

Run: ``.venv/bin/python benchmarks/rank_speed.py [--classes 100 --box 128 --particles 10000]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from tamis.io.mrc import write_mrc
from tamis.io.star import write_star
from tamis.rank.network import ClassRankerNet
from tamis.rank.screen import ScreenOptions
from tamis.rank.select import RankOptions, rank_classes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--particles", type=int, default=10_000)
    ap.add_argument("--device", default="cpu", help="the particle screen's device")
    args = ap.parse_args()
    k, n, p = args.classes, args.box, 2.0
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        g = np.random.default_rng(0)
        yy, xx = np.mgrid[0:n, 0:n] - n // 2
        imgs = np.stack(
            [
                np.exp(-((yy - g.normal(0, 5)) ** 2 + xx**2) / g.uniform(50, 400))
                + 0.1 * g.standard_normal((n, n))
                for _ in range(k)
            ]
        )
        write_mrc(d / "run_it025_classes.mrcs", imgs.astype(np.float32), p)
        frac = g.dirichlet(np.ones(k))
        classes = pd.DataFrame({
            "rlnReferenceImage": [f"{c + 1:06d}@{d / 'run_it025_classes.mrcs'}" for c in range(k)],
            "rlnClassDistribution": frac, "rlnAccuracyRotations": g.uniform(1, 10, k),
            "rlnAccuracyTranslationsAngst": g.uniform(1, 5, k), "rlnEstimatedResolution": g.uniform(6, 30, k),
            "rlnOverallFourierCompleteness": np.ones(k), "rlnClassPriorOffsetX": 0.0, "rlnClassPriorOffsetY": 0.0,
        })  # fmt: skip
        write_star(
            {
                "model_general": {"rlnPixelSize": p, "rlnOriginalImageSize": n},
                "model_classes": classes,
                "model_optics_group_1": pd.DataFrame(
                    {
                        "rlnSpectralIndex": np.arange(n // 2 + 1),
                        "rlnSigma2Noise": np.full(n // 2 + 1, 1.0 / n**2),
                    }
                ),  # fmt: skip
            },
            d / "run_it025_model.star",
        )
        n_parts = args.particles
        cls = g.choice(np.arange(1, k + 1), n_parts, p=frac)
        parts = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@{d / 'x.mrcs'}" for i in range(n_parts)],
                              "rlnClassNumber": cls, "rlnOpticsGroup": 1,
                              "rlnAnglePsi": g.uniform(0, 360, n_parts), "rlnOriginXAngst": 0.0,
                              "rlnOriginYAngst": 0.0, "rlnDefocusU": g.uniform(1e4, 2e4, n_parts),
                              "rlnDefocusV": 15000.0, "rlnDefocusAngle": 0.0})  # fmt: skip
        stack = imgs[cls - 1] + g.standard_normal((n_parts, n, n), dtype=np.float32)
        write_mrc(d / "x.mrcs", stack.astype(np.float16), p, float16=True)
        del stack
        optics = pd.DataFrame(
            {
                "rlnOpticsGroup": [1],
                "rlnOpticsGroupName": ["opticsGroup1"],
                "rlnImagePixelSize": [p],
                "rlnImageSize": [n],
                "rlnVoltage": [300.0],
                "rlnSphericalAberration": [2.7],
                "rlnAmplitudeContrast": [0.1],
            }
        )
        write_star({"optics": optics, "particles": parts}, d / "run_it025_data.star")
        write_star({"optimiser_general": {"rlnModelStarFile": str(d / "run_it025_model.star"),
                    "rlnExperimentalDataStarFile": str(d / "run_it025_data.star"), "rlnDoCorrectCtf": 1,
                    "rlnParticleDiameter": 0.8 * n * p}}, d / "run_it025_optimiser.star")  # fmt: skip
        save_file(
            {k2: v.contiguous() for k2, v in ClassRankerNet().state_dict().items()},
            str(d / "w.safetensors"),
        )
        for screen in (None, ScreenOptions(device=args.device)):
            t = time.perf_counter()
            rank_classes(
                d / "run_it025_optimiser.star",
                d / "Select",
                RankOptions(model=str(d / "w.safetensors"), min_score=-1e9, screen=screen),
            )
            print(
                f"{k} classes of {n} px, {n_parts} particles "
                f"({'particle screen on all ' + str(n_parts) if screen else 'no particle screen'}): "
                f"{time.perf_counter() - t:.1f} s (torch threads {torch.get_num_threads()})"
            )


if __name__ == "__main__":
    main()
