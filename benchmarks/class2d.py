"""2D classification (EM or VDAM) on simulated data with ground truth: quality and speed.

Recipes (``benchmarks/recipes.py``): ``easy`` (default; 8ZPM and its receptor chain, ~100 A in
64 px at 2.8 A/px, posteriors sharp after two iterations) and ``hard`` (a ribosome-sized
pseudo-protein and a nine-fold ring, ~240 A in 64 px at 4 A/px, mask 240 A, posteriors broad).
Both: SNR 0.05, 15% junk (ice, carbon edges, aggregates, empty boxes), defocus 0.8-2.5 um.
Options as RELION's GUI job: EM ``--K 20 --iter 25 --tau2_fudge 2 --ctf --zero_mask
--flatten_solvent --center_classes --norm --scale --psi_step 12 --offset_range 5 --offset_step 2
--oversampling 1``; VDAM the same with ``--grad --iter 200``.

Run: ``.venv/bin/python benchmarks/class2d.py [--recipe hard] [--algo em|vdam] [--n 5000]
[--K 20] [--iter N] [--j 2] [--device cpu] [--max_memory GB] [--profile] [--offset A]
[--fix_sigma_offset] [--offset_prior angst|relion] --work DIR``.
Prints per-iteration seconds and a JSON report (also ``DIR/report_<algo>.json``): quality against
the truth, wall time, peak RSS (the job's, when it returned, and the process's after the
evaluation), E-step GEMM rate against torch.matmul on the same shapes.
RELION on the same particles: ``benchmarks/relion_class2d.py``.
"""

from __future__ import annotations

import tamis  # noqa: F401  (before torch: sets its allocation options, see tamis/__init__.py)

# isort: split
import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from tamis.class2d import Class2DOptions, run_class2d
from tamis.class2d.likelihood import GEMM_STATS
from tamis.fourier import frc
from tamis.geometry import euler_to_matrix
from tamis.io.mrc import read_mrc
from tamis.io.star import read_star
from tamis.simulate.project import Projector
from tamis.simulate.truth import truth_for

sys.path.insert(0, str(Path(__file__).parent))
from recipes import RECIPES, make_recipe  # noqa: E402


def matmul_rate(shapes: list[tuple[int, int, int]], device: str) -> float:
    """FLOP/s of torch.matmul (float32) on the E-step's GEMM shapes, same device: for each of the
    12 distinct shapes doing the most work (conservative: big GEMMs run fastest), the median of
    7 timed calls after 2 warm-up calls; total flops / total time."""
    total, seconds = 0.0, 0.0
    for m, k, n in _largest(shapes):
        a = torch.randn(m, k, device=device)
        b = torch.randn(k, n, device=device)
        times = []
        for rep in range(9):
            t = time.perf_counter()
            a @ b
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if rep >= 2:
                times.append(time.perf_counter() - t)
        seconds += float(np.median(times))
        total += 2.0 * m * k * n
    return total / seconds


def _largest(shapes: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    return sorted(set(shapes), key=lambda s: -s[0] * s[1] * s[2])[:12]


def aligned_clean_images(
    truth: pd.DataFrame, data: pd.DataFrame, volumes: dict, pixel: float, box: int
) -> torch.Tensor:
    """Clean projections of members put into their class frame with the *assigned* psi/origin."""
    out = torch.zeros((len(data), box, box))
    for s, vol in volumes.items():
        rows = np.flatnonzero(truth["structure"].to_numpy() == s)
        if not len(rows):
            continue
        proj = Projector(vol)
        ang = torch.tensor(truth[["rot", "tilt", "psi"]].to_numpy()[rows])
        img = proj.project(euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2]))
        # the true shift, then the assigned alignment: shift by origin, rotate by -psi
        shift = torch.tensor(
            truth[["shift_x_px", "shift_y_px"]].to_numpy()[rows], dtype=torch.float32
        )
        origin = torch.tensor(
            data[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()[rows] / pixel,
            dtype=torch.float32,
        )
        psi = torch.deg2rad(torch.tensor(data["rlnAnglePsi"].to_numpy()[rows], dtype=torch.float32))
        # Class frame: ref(y) = particle(A y - origin), and particle(x) = clean(x - shift).
        c = torch.arange(box, dtype=torch.float32) - box // 2
        yy, xx = torch.meshgrid(c, c, indexing="ij")
        cs, sn = torch.cos(psi)[:, None, None], torch.sin(psi)[:, None, None]
        px = cs * xx + sn * yy - origin[:, 0, None, None] - shift[:, 0, None, None]
        py = -sn * xx + cs * yy - origin[:, 1, None, None] - shift[:, 1, None, None]
        grid = torch.stack([px + box // 2, py + box // 2], -1) * (2.0 / (box - 1)) - 1.0
        out[rows] = F.grid_sample(img[:, None].float(), grid, align_corners=True)[:, 0]
    return out


def rotate_images(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate ``(d, n, n)`` images by ``degrees[d]`` about the centre pixel (bilinear)."""
    n = images.shape[-1]
    c = torch.arange(n, dtype=torch.float32) - n // 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    a = torch.deg2rad(degrees.float())[:, None, None]
    px = torch.cos(a) * xx - torch.sin(a) * yy + n // 2
    py = torch.sin(a) * xx + torch.cos(a) * yy + n // 2
    grid = torch.stack([px, py], -1) * (2.0 / (n - 1)) - 1.0
    return F.grid_sample(images[:, None].float(), grid, align_corners=True)[:, 0]


def origin_errors(
    truth: pd.DataFrame, data: pd.DataFrame, cls: np.ndarray, kinds: np.ndarray, majority: dict
) -> dict:
    """The particles' assigned origins against the truth, per axis (rms, A). In the class frame
    (see :func:`aligned_clean_images`) member ``i``'s content is displaced by ``A_i^-1 (o_i -
    o_true_i)`` (``A_i`` the rotation of its assigned psi), which is the same for every member
    of a well-aligned class; so per class that one displacement is fitted (least squares) and
    what is left is the error. ``true_origin_rms_A``: the true origins' own spread (what
    origins of zero would score)."""
    o = data[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float)
    t = truth[["origin_x_angst", "origin_y_angst"]].to_numpy(float)
    psi = np.deg2rad(data["rlnAnglePsi"].to_numpy(float))
    res, spread = [], []
    for c, (m, _purity) in majority.items():
        sel = np.flatnonzero((cls == c) & (kinds == "particle"))
        if m == 0 or len(sel) < 5:
            continue
        cs, sn = np.cos(psi[sel]), np.sin(psi[sel])
        a = np.zeros((2 * len(sel), 2))  # rows of A_i = [[cos, sin], [-sin, cos]]
        a[0::2, 0], a[0::2, 1], a[1::2, 0], a[1::2, 1] = cs, sn, -sn, cs
        b = (o[sel] - t[sel]).reshape(-1)
        shift, *_ = np.linalg.lstsq(a, b, rcond=None)
        res.append(b - a @ shift)
        spread.append(t[sel].reshape(-1))
    if not res:
        return {"origin_error_rms_A": None, "true_origin_rms_A": None}
    return {
        "origin_error_rms_A": float(np.sqrt(np.mean(np.concatenate(res) ** 2))),
        "true_origin_rms_A": float(np.sqrt(np.mean(np.concatenate(spread) ** 2))),
    }


def evaluate(work: Path, result, psi_step: float) -> dict:
    truth = pd.read_csv(work / "sim" / "ground_truth.csv")
    data = read_star(result.data)["particles"]

    truth = truth_for(data, truth)
    classes, _ = read_mrc(result.classes)
    k = classes.shape[0]
    cls = data["rlnClassNumber"].to_numpy() - 1
    kinds = truth["kind"].to_numpy()
    structure = truth["structure"].to_numpy()
    n = len(data)
    report: dict = {"n_particles": n, "K": k}
    counts = np.bincount(cls, minlength=k)
    report["near_empty_classes"] = int((counts < 0.005 * n).sum())
    junk_frac = np.array(
        [np.mean(kinds[cls == c] != "particle") if counts[c] else 0 for c in range(k)]
    )
    junk_classes = junk_frac >= 0.8
    report["junk_to_junk_classes"] = {
        kind: float(np.mean(junk_classes[cls[kinds == kind]]))
        for kind in ("ice", "carbon", "aggregate", "empty")
        if (kinds == kind).any()
    }
    report["particles_in_junk_classes"] = float(np.mean(junk_classes[cls[kinds == "particle"]]))
    majority = {}
    for c in range(k):
        if counts[c] == 0:
            continue
        members = structure[(cls == c) & (kinds == "particle")]
        labels = np.concatenate(
            [members, np.zeros(int(((cls == c) & (kinds != "particle")).sum()), int)]
        )
        vals, cnt = np.unique(labels, return_counts=True)
        majority[c] = (int(vals[np.argmax(cnt)]), float(cnt.max() / counts[c]))
    report["structures_with_majority_class"] = sorted({m for m, _ in majority.values() if m > 0})
    # FRC of class averages vs the same members' clean projections in the class frame
    sim = json.loads((work / "sim" / "simulation.json").read_text())
    pixel = float(sim["config"]["pixel_size"])
    box = classes.shape[-1]
    vols = {}
    for i, (_name, f) in enumerate(sim["structure_files"].items(), start=1):
        vols[i] = torch.from_numpy(read_mrc(work / "sim" / f)[0])
    clean = aligned_clean_images(truth, data, vols, pixel, box)
    # In-plane consistency: each member's clean image, put into its class frame with the
    # assigned psi and origin, should need no further rotation to match the class's mean.
    resid = []
    deltas = torch.arange(-45.0, 45.5, 0.5)
    for c, (m, _purity) in majority.items():
        sel = np.flatnonzero((cls == c) & (kinds == "particle"))
        if m == 0 or len(sel) < 5:
            continue
        members = clean[torch.from_numpy(sel)]
        ref = members.mean(0, keepdim=True).expand(len(deltas), -1, -1)
        rotated = rotate_images(ref, deltas)
        mask = torch.from_numpy(
            np.hypot(*np.meshgrid(np.arange(box) - box // 2, np.arange(box) - box // 2))
            < box / 2 - 2
        )
        score = torch.einsum("mij,dij->md", members * mask, rotated * mask)
        resid.append(deltas[score.argmax(1)].abs().numpy())
    allres = np.concatenate(resid) if resid else np.array([np.nan])
    report["psi_residual_median_deg"] = float(np.median(allres))
    report["psi_residual_within_step"] = float(np.mean(allres <= psi_step))
    report.update(origin_errors(truth, data, cls, kinds, majority))
    frc_res = {}
    for c, (m, _purity) in majority.items():
        sel = (cls == c) & (kinds == "particle")
        if m == 0 or sel.sum() < 20:
            continue
        ref = clean[torch.from_numpy(np.flatnonzero(sel))].mean(0)
        curve = frc(torch.from_numpy(classes[c]).double(), ref.double())
        below = torch.nonzero(curve[1:] < 0.5)
        shell = int(below[0]) if len(below) else box // 2
        frc_res[c] = box * pixel / max(shell, 1)
    report["frc05_resolution_A"] = {str(c): round(v, 1) for c, v in frc_res.items()}
    report["frc05_best_A"] = min(frc_res.values()) if frc_res else None
    report["frc05_median_A"] = float(np.median(list(frc_res.values()))) if frc_res else None
    # steadier between seeds than the median (which swings 27-256 A on the hard recipe)
    report["classes_frc05_30A_or_better"] = sum(v <= 30.0 for v in frc_res.values())
    report["class_majority"] = {str(c): v for c, v in majority.items()}
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="easy")
    ap.add_argument("--algo", choices=("em", "vdam"), default="em")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--K", type=int, default=20)
    ap.add_argument("--iter", type=int, default=None, help="default: 25 (EM), 200 (VDAM)")
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--j", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work", default="bench_class2d")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--max_memory", type=float, default=None, help="GB (tamis's --max_memory)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler's top entries")
    ap.add_argument("--mstep_bf16", action="store_true", help="tamis's --mstep_bf16")
    ap.add_argument("--offset", type=float, default=None, help="--offset (A)")
    ap.add_argument("--fix_sigma_offset", action="store_true", help="--fix_sigma_offset")
    ap.add_argument("--offset_prior", default=None, help="--offset_prior angst|relion")
    args = ap.parse_args()
    work = Path(args.work)
    recipe = make_recipe(args.recipe, work, args.n, seed=args.seed, snr=args.snr)
    star = work / "sim" / "particles.star"
    make = Class2DOptions.gui_vdam if args.algo == "vdam" else Class2DOptions.gui_em
    # the tamis options given (flags when set), else the GUI job's defaults
    passed = ("iter", "max_memory", "mstep_bf16", "offset", "fix_sigma_offset", "offset_prior")
    extra = {n: v for n in passed if (v := getattr(args, n)) is not None and v is not False}
    options = make(
        K=args.K,
        particle_diameter=recipe.diameter,
        random_seed=args.seed,
        j=args.j,
        device=args.device,
        **extra,
    )
    torch.set_num_threads(args.j)
    times = [time.perf_counter()]
    lines = []

    per_iter = []
    last = {"f": 0.0, "s": 0.0, "e": 0.0, "m": 0.0}
    split = []  # per iteration: E-step and M-step seconds

    def log(line: str) -> None:
        times.append(time.perf_counter())
        lines.append(line)
        if len(times) > 2:  # an iteration: its E+M GEMM work and E+M seconds
            f = GEMM_STATS["flops"] + GEMM_STATS["mstep_flops"]
            sec = GEMM_STATS["estep_seconds"] + GEMM_STATS["mstep_seconds"]
            per_iter.append((f - last["f"], sec - last["s"]))
            e, m = GEMM_STATS["estep_seconds"], GEMM_STATS["mstep_seconds"]
            split.append((round(e - last["e"], 2), round(m - last["m"], 2)))
            last.update(f=f, s=sec, e=e, m=m)
        print(f"[{times[-1] - times[-2]:7.1f} s] {line}", flush=True)

    t0 = time.perf_counter()
    out = work / ("Class2D" if args.algo == "em" else "Class2D_vdam") / "run"
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            result = run_class2d(star, str(out), options, log=log)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        (work / f"profile_{args.algo}.txt").write_text(table)
        print(table)
    else:
        result = run_class2d(star, str(out), options, log=log)
    wall = time.perf_counter() - t0
    job_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the evaluation
    iteration_s = [round(b - a, 1) for a, b in zip(times[1:-1], times[2:], strict=True)]
    report = evaluate(work, result, options.psi_step / 2)
    rate = matmul_rate(GEMM_STATS["shapes"], args.device)
    n_iter = options.iter
    report.update(
        recipe=args.recipe,
        algo=args.algo,
        machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.device}, {args.j} threads",
        wall_s=round(wall, 1),
        setup_s=round(times[1] - t0, 1),
        iteration_s=iteration_s,
        pmax=[_field(line, "pmax") for line in lines if line.startswith("iteration")],
        job_peak_rss_mb=round(job_peak),  # the process's peak when the job returned
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        particles_per_s=round(result.particles_evaluated / wall, 1),
        iterations=n_iter,
        estep_gemm_gflop=round(GEMM_STATS["flops"] / 1e9, 1),
        estep_seconds=round(GEMM_STATS["estep_seconds"], 1),
        estep_gflops=round(GEMM_STATS["flops"] / max(GEMM_STATS["estep_seconds"], 1e-9) / 1e9, 1),
        matmul_gflops=round(rate / 1e9, 1),
        gemm_shapes=_largest(GEMM_STATS["shapes"]),
        estep_fraction_of_matmul=round(
            GEMM_STATS["flops"] / max(GEMM_STATS["estep_seconds"], 1e-9) / rate, 3
        ),
    )
    name = f"report_{args.algo}.json"
    report["estep_mstep_seconds_per_iteration"] = split
    report["em_gemm_gflops_per_iteration"] = [round(f / max(t, 1e-9) / 1e9, 1) for f, t in per_iter]
    report["em_fraction_of_matmul_per_iteration"] = [
        round(f / max(t, 1e-9) / rate, 2) for f, t in per_iter
    ]
    (work / name).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def _field(line: str, key: str) -> float | None:
    words = line.replace(",", " ").split()
    for a, b in zip(words, words[1:], strict=False):
        if a == key:
            try:
                return float(b)
            except ValueError:
                return None
    return None


if __name__ == "__main__":
    main()
