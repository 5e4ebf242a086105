"""Strong scaling of 2D classification over torch.distributed ranks, and a model of it at scale.

Runs the Class2D benchmark's recipe (``benchmarks/recipes.py``; default ``hard``) three ways on
this machine: one process with 1 thread, ``torchrun`` with 2 ranks of 1 thread (gloo), and one
process with 2 threads (what one would run here without ranks). Each run records per-iteration
seconds, and each rank the bytes and seconds of its all-reduces (``tamis.distributed.COMM_STATS``);
the classifications of the 1- and 2-rank runs are compared.

Then the model: an iteration on ``p`` ranks costs ``N t / p`` (``t``: measured seconds per
particle and iteration on one rank) plus a ring all-reduce of ``B`` bytes,
``2 (p - 1) / p * B / bandwidth + 2 (p - 1) * latency``; ``B`` is the measured bytes per
iteration, split into the part fixed by the model size (grids, spectra) and the per-particle part
(the rows every rank shares), scaled to the target job. Efficiency = one rank's time / (p x the
time on p ranks).

Run: ``.venv/bin/python benchmarks/ranks.py --work DIR [--recipe hard] [--n 1500] [--K 20]
[--iter 25] [--algo em|vdam]``; prints a JSON report (also ``DIR/report_ranks_<algo>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

ROWS_COLUMNS = 9  # per particle shared after each E-step: psi, origin x/y, class, norm, loglik,
# pmax, number of significant samples (2D; 3D adds rot and tilt)


def worker(args) -> None:
    """One run (under torchrun or not): Class2D with per-iteration times and this rank's
    all-reduce statistics written to ``<out>_rank<r>.json``."""
    import torch
    from recipes import make_recipe

    import tamis  # noqa: F401
    from tamis import distributed
    from tamis.class2d import Class2DOptions, run_class2d

    work = Path(args.work)
    recipe = make_recipe(args.recipe, work, args.n, seed=11)
    make = Class2DOptions.gui_vdam if args.algo == "vdam" else Class2DOptions.gui_em
    options = make(
        K=args.K, particle_diameter=recipe.diameter, random_seed=11, j=args.j, iter=args.iter,
    )  # fmt: skip
    torch.set_num_threads(args.j)
    stamps = []
    t0 = time.perf_counter()
    run_class2d(
        work / "sim" / "particles.star",
        args.out,
        options,
        log=lambda line: stamps.append(time.perf_counter()),
    )
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{args.out}_rank{rank}.json").write_text(
        json.dumps(
            {
                "wall_s": time.perf_counter() - t0,
                "iteration_s": list(np.diff(stamps)),
                "comm": dict(distributed.COMM_STATS),
            }
        )
    )


def _run(cmd: list[str]) -> float:
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stdout[-2000:] + done.stderr[-4000:])
    return time.perf_counter() - t


def _same(a: str, b: str, it: int) -> dict:
    from tamis.io.mrc import read_mrc
    from tamis.io.star import read_star

    da = read_star(f"{a}_it{it:03d}_data.star")["particles"]
    db = read_star(f"{b}_it{it:03d}_data.star")["particles"]
    ra, _ = read_mrc(f"{a}_it{it:03d}_classes.mrcs")
    rb, _ = read_mrc(f"{b}_it{it:03d}_classes.mrcs")
    return {
        "same_class": float(np.mean(da["rlnClassNumber"] == db["rlnClassNumber"])),
        "same_psi": float(np.mean(da["rlnAnglePsi"] == db["rlnAnglePsi"])),
        "class_images_max_rel_diff": float(np.abs(ra - rb).max() / np.ptp(ra)),
    }


def model(t: float, serial: float, fixed_bytes: float, n: float, ranks: list[int],
          bandwidth: float, latency: float, write: tuple[float, float, float] | None = None,
          write_rows: float = 0.0) -> list[dict]:  # fmt: skip
    """Predicted seconds per iteration and efficiency on ``ranks``: ``n`` particles per
    iteration at ``t`` seconds each, ``serial`` seconds that every rank spends whatever its share
    (projections, M-step, files), a ring all-reduce of the fixed bytes plus the rows, and with
    ``write`` = (format, write, table seconds per row) data.star's ``write_rows`` rows per
    iteration: each rank builds, formats and writes its share of the rows at its offset of the
    shared file (``tamis.distributed.write_shared``)."""
    out = []

    def files(p: int) -> float:
        if write is None:
            return 0.0
        fmt, text, table = write
        return write_rows * (table + fmt + text) / p + (2 * (p - 1) * latency if p > 1 else 0.0)

    one = n * t + serial + files(1)
    for p in ranks:
        b = fixed_bytes + n * ROWS_COLUMNS * 8
        comm = 2 * (p - 1) / p * b / bandwidth + 2 * (p - 1) * latency if p > 1 else 0.0
        total = n * t / p + serial + comm + files(p)
        out.append(
            {
                "ranks": p,
                "seconds": round(total, 3),
                "allreduce_s": round(comm, 3),
                "files_s": round(files(p), 3),
                "efficiency": round(one / (p * total), 3),
            }
        )
    return out


def write_seconds_per_row(out: str, it: int, work: Path) -> tuple[float, float, float]:
    """Seconds per particle row of data.star, for 100,000 rows (this run's rows repeated):
    formatting the rows (each rank its share), and rank 0 writing the gathered text; and the
    whole write in one process."""
    import pandas as pd

    from tamis.io.star import LoopText, format_loop_rows, read_star, write_star

    data = read_star(f"{out}_it{it:03d}_data.star")
    rows = data["particles"]
    big = pd.concat([rows] * (100_000 // len(rows) + 1), ignore_index=True)[:100_000]
    probe = work / "write_probe.star"
    t = time.perf_counter()
    text = format_loop_rows(big)
    t_format = time.perf_counter() - t
    t = time.perf_counter()
    write_star({"optics": data["optics"], "particles": LoopText(list(big.columns), text)}, probe)
    t_text = time.perf_counter() - t
    t = time.perf_counter()
    write_star({"optics": data["optics"], "particles": big}, probe)
    t_whole = time.perf_counter() - t
    probe.unlink()
    n = len(big)
    return t_format / n, t_text / n, t_whole / n


def mean_subset(algo: str, n: int, iters: int, K: int) -> float:
    """Particles per iteration: all (EM), or VDAM's mini-batch schedule's mean."""
    if algo == "em":
        return float(n)
    from tamis.class2d import Class2DOptions
    from tamis.class2d.schedule import VdamSchedule

    sch = VdamSchedule.create(Class2DOptions.gui_vdam(K=K, iter=iters), n, is_3d=False)
    sizes = [sch.subset_size(it) for it in range(1, iters + 1)]
    return float(np.mean([n if s < 0 else s for s in sizes]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", required=True)
    ap.add_argument("--recipe", default="hard")
    ap.add_argument("--algo", choices=("em", "vdam"), default="em")
    ap.add_argument("--n", "--particles", dest="n", type=int, default=1500)
    ap.add_argument("--K", type=int, default=20)
    ap.add_argument("--iter", type=int, default=25)
    ap.add_argument("--j", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    work = Path(args.work)
    me = [sys.executable, __file__, "--work", str(work), "--recipe", args.recipe, "--algo",
          args.algo, "--particles", str(args.n), "--K", str(args.K), "--iter", str(args.iter),
          "--worker"]  # fmt: skip
    runs = {}
    for name, ranks, threads in (("1rank_1thread", 1, 1), ("2ranks_1thread", 2, 1),
                                 ("1rank_2threads", 1, 2)):  # fmt: skip
        out = str(work / f"ranks_{args.algo}_{name}" / "run")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        cmd = [*me, "--j", str(threads), "--out", out]
        if ranks > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={ranks}", *cmd[1:]]  # fmt: skip
        done = all(Path(f"{out}_rank{r}.json").is_file() for r in range(ranks))
        wall = float("nan") if done else _run(cmd)  # a finished run is read, not redone
        per_rank = [json.loads(Path(f"{out}_rank{r}.json").read_text()) for r in range(ranks)]
        runs[name] = {
            "out": out,
            "wall_s": round(wall, 1),
            "iteration_s": [round(x, 2) for x in per_rank[0]["iteration_s"]],
            "iterations_s_total": round(sum(per_rank[0]["iteration_s"]), 1),
            "allreduce_bytes_per_iteration": [r["comm"]["bytes"] / args.iter for r in per_rank],
            "allreduce_s_per_iteration": [
                round(r["comm"]["seconds"] / args.iter, 4) for r in per_rank
            ],
        }
        print(name, json.dumps({k: v for k, v in runs[name].items() if k != "iteration_s"}),
              flush=True)  # fmt: skip
    one, two = runs["1rank_1thread"], runs["2ranks_1thread"]
    t1, t2 = one["iterations_s_total"], two["iterations_s_total"]
    bytes_it = two["allreduce_bytes_per_iteration"][0]
    # one iteration: T1 = m t + s on one rank, T2 = m t / 2 + s + c2 on two (c2: rank 0's
    # all-reduce seconds, waiting for the other rank included); m particles per iteration
    m = mean_subset(args.algo, args.n, args.iter, args.K)
    fixed = bytes_it - m * ROWS_COLUMNS * 8
    T1, T2 = t1 / args.iter, t2 / args.iter
    c2 = two["allreduce_s_per_iteration"][0]
    t_particle = 2 * (T1 - T2 + c2) / m
    serial = max(T1 - m * t_particle, 0.0)
    report = {
        "recipe": args.recipe,
        "algo": args.algo,
        "n": args.n,
        "K": args.K,
        "iterations": args.iter,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "runs": runs,
        "speedup_2ranks_vs_1rank": round(t1 / t2, 2),
        "efficiency_2ranks": round(t1 / (2 * t2), 2),
        "vs_1rank_2threads": round(runs["1rank_2threads"]["iterations_s_total"] / t2, 2),
        "same_as_1rank": _same(one["out"], two["out"], args.iter),
        "particles_per_iteration_mean": m,
        "seconds_per_particle_iteration_1thread": t_particle,
        "serial_seconds_per_iteration_1thread": serial,
        "allreduce_bytes_fixed_per_iteration": fixed,
        "model_1M_particles": {},
    }
    # The model for 1 M particles (EM: every particle each iteration; VDAM: its 200-iteration
    # schedule's mean mini-batch), over 100 Gb/s InfiniBand (12.5 GB/s, 5 us): one CPU core as
    # measured, and GPUs assumed F times faster than one core on the per-particle work and on
    # the serial work (optimistic) or only F/10 on the serial work (pessimistic); F not measured.
    m_big = mean_subset(args.algo, 1_000_000, 200 if args.algo == "vdam" else args.iter, args.K)
    report["model_particles_per_iteration"] = m_big
    # Rank 0 writes every particle's row to data.star (EM: each iteration; VDAM: every 10th),
    # while the others wait at the next all-reduce: serial, and growing with N.
    fmt, text, whole = write_seconds_per_row(one["out"], args.iter, work)
    table_row = 0.42e-6  # particle_table(), measured separately: 0.42 us per row
    rows_1m = 1_000_000 / (10 if args.algo == "vdam" else 1)
    report["data_star_seconds_per_row"] = {
        "format": fmt, "write_text": text, "table": table_row, "whole_one_process": whole,
    }  # fmt: skip
    for label, f_p, f_s in (("cpu_core", 1, 1), ("gpu_F200_serial200", 200, 200),
                            ("gpu_F200_serial20", 200, 20)):  # fmt: skip
        for files in ("", "_with_data_star"):
            report["model_1M_particles"][label + files] = model(
                t_particle / f_p, serial / f_s, fixed, m_big, [8, 64, 256, 1024],
                bandwidth=12.5e9, latency=5e-6,
                write=(fmt, text, table_row) if files else None, write_rows=rows_1m,
            )  # fmt: skip
    path = work / f"report_ranks_{args.algo}.json"
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
