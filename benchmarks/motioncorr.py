"""Motion correction on simulated movies with known motion, tamis beside RELION's own
implementation (``relion_run_motioncorr --use_own``), same movies, same flags, same threads.

    python benchmarks/motioncorr.py --dir /work/bench/mc4k --size 4096 --frames 40 \\
        --relion /work/peers/relion-build/bin/relion_run_motioncorr --threads 2

Per program: seconds per movie (wall), peak RSS, the global track's error against the truth
(median over frames of |estimated - true| shift, pixels), the total shift error (global +
local model) on a 5 x 5 grid at the middle and last frames, and the FRC of the aligned sum
(not dose-weighted) with the clean specimen (mean over 8-3 Å), next to the unaligned sum's.
Writes ``<dir>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tamis.fourier import frc
from tamis.io.motion_star import read_motion_star
from tamis.io.movies import open_movie
from tamis.io.mrc import read_mrc
from tamis.motion_model import evaluate_polynomial
from tamis.simulate.movies import MovieSimulation, simulate_movies


def _run(cmd: list[str], cwd: Path, threads: int) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB, from /usr/bin/time) of a child process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    timer = ["/usr/bin/time", "-f", "MAXRSS_KB %M"] if Path("/usr/bin/time").exists() else []
    t0 = time.perf_counter()
    res = subprocess.run([*timer, *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        sys.exit(f"{cmd[0]} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    kb = [line.split()[1] for line in res.stderr.splitlines() if line.startswith("MAXRSS_KB")]
    return wall, float(kb[-1]) / 1e6 if kb else float("nan")


def _errors(est, truth, frames: int) -> dict[str, float]:
    g = np.linspace(-0.4, 0.4, 5)
    xx, yy = (a.ravel() for a in np.meshgrid(g, g))

    def total(m, z):
        zz = np.full(xx.size, z)
        loc = 0 if m.local_coeffs is None else evaluate_polynomial(m.local_coeffs, xx, yy, zz)
        return m.global_shifts[z] + loc

    glob = np.hypot(*(est.global_shifts - truth.global_shifts).T)
    out = {"global_median_px": float(np.median(glob)), "global_max_px": float(glob.max())}
    for name, z in (("mid", frames // 2), ("last", frames - 1)):
        d = total(est, z) - total(truth, z)
        out[f"total_rms_{name}_px"] = float(np.sqrt((d**2).sum(1).mean()))
    out["local_model"] = est.local_coeffs is not None
    return out


def _frc(img: np.ndarray, clean: np.ndarray, apix: float) -> float:
    f = frc(torch.from_numpy(img.astype(np.float32)), torch.from_numpy(clean.astype(np.float32)))
    n = img.shape[0]
    shells = np.arange(len(f)) / (n * apix)
    band = (shells > 1 / 8) & (shells < 1 / 3)
    return float(f[torch.from_numpy(band)].mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--angpix", type=float, default=1.0)
    ap.add_argument("--patches", type=int, default=5)
    ap.add_argument("--contrast", type=float, default=0.15, help="specimen contrast (sd)")
    ap.add_argument("--dose", type=float, default=1.0, help="e/A^2 per frame")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--relion", default="")
    ap.add_argument("--device", default="cpu", help="tamis's torch device (cpu, cuda)")
    ap.add_argument("--skip_tamis", action="store_true")
    ap.add_argument(
        "--no_noDW", action="store_true", help="RELION's GUI default: no sum without weighting"
    )
    args = ap.parse_args()
    d = args.dir
    if not (d / "movies.star").is_file():
        t0 = time.perf_counter()
        simulate_movies(
            MovieSimulation(
                n_movies=args.n, height_px=args.size, width_px=args.size, n_frames=args.frames,
                dose_per_frame=args.dose, pixel_size=args.angpix,
                particles_per_movie=args.size // 25, contrast=args.contrast, drift_px=20.0,
                local_px=3.0, seed=11,
            ),
            d,
            device=args.device,
        )  # fmt: skip
        print(f"simulated {args.n} movies in {time.perf_counter() - t0:.0f} s", flush=True)
    flags = ["--bfactor", "150", "--patch_x", str(args.patches), "--patch_y", str(args.patches),
             "--dose_weighting", "--dose_per_frame", str(args.dose), "--gainref", "gain.mrc"]  # fmt: skip
    if not args.no_noDW:
        flags.append("--save_noDW")
    results: dict[str, object] = {
        "size": args.size, "frames": args.frames, "movies": args.n, "threads": args.threads,
        "flags": " ".join(flags), "torch_threads": args.threads, "device": args.device,
        "contrast": args.contrast, "dose_per_frame": args.dose,
    }  # fmt: skip
    runs = {}
    if not args.skip_tamis:
        tamis = [sys.executable, "-m", "tamis.cli.main", "motioncorr", "--i", "movies.star",
                 "--o", "tamis_mc/", "--device", args.device, *flags]  # fmt: skip
        subprocess.run(["rm", "-rf", str(d / "tamis_mc")], check=True)
        runs["tamis"] = ("tamis_mc", tamis)
    if args.relion:
        relion = [args.relion, "--i", "movies.star", "--o", "relion_mc/", "--use_own",
                  "--j", str(args.threads), *flags]  # fmt: skip
        subprocess.run(["rm", "-rf", str(d / "relion_mc")], check=True)
        runs["relion"] = ("relion_mc", relion)
    gain, _ = read_mrc(d / "gain.mrc")
    for name, (out, cmd) in runs.items():
        wall, peak = _run(cmd, d, args.threads)
        per = {"seconds_total": wall, "seconds_per_movie": wall / args.n, "peak_rss_gb": peak,
               "movies": []}  # fmt: skip
        for m in range(1, args.n + 1):
            est = read_motion_star(d / out / "Movies" / f"movie_{m:05d}.star")
            truth = read_motion_star(d / "truth" / f"movie_{m:05d}.star")
            row = _errors(est, truth, args.frames)
            clean, apix = read_mrc(d / "truth" / f"movie_{m:05d}_clean.mrc")
            if not args.no_noDW:
                aligned, _ = read_mrc(d / out / "Movies" / f"movie_{m:05d}_noDW.mrc")
                row["frc_aligned_8_3A"] = _frc(aligned, clean, apix)
            if "frc_unaligned_8_3A" not in results:
                with open_movie(d / "Movies" / f"movie_{m:05d}.tif") as mv:
                    raw = np.zeros(mv.shape, np.float64)
                    for a in range(0, mv.n_frames, 8):
                        raw += (mv.read(a, min(a + 8, mv.n_frames)) * gain).sum(0)
                results["frc_unaligned_8_3A"] = _frc(raw, clean, apix)
            per["movies"].append(row)
        results[name] = per
        print(name, json.dumps(per, indent=1), flush=True)
    name = "results_noDW_off.json" if args.no_noDW else "results.json"
    (d / name).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
