"""VDAM (``--grad``, 200 mini-batches) against EM (25 iterations) on the EM benchmark recipe.

Same simulated data as ``benchmarks/class2d.py`` (two structures + 15% junk, 64 px, 2.8 A/px,
SNR 0.05) but ``--n 20000`` particles by default; RELION GUI options for each algorithm
(``Class2DOptions.gui_em`` / ``gui_vdam``). For each run it reports the quality measures of
``class2d.py`` (ground truth), the number of particle evaluations (EM: N x iterations; VDAM: the
sum of the mini-batch sizes, final all-particle pass included), the wall time and the number of
near-empty classes (< 0.5% of the particles).

Run both algorithms for one K in one process:
``.venv/bin/python benchmarks/vdam_vs_em.py --work bench_vdam --K 20 --algo both``.
``--algo em`` or ``--algo vdam`` runs one (``report_<algo>_K<K>.json`` in ``--work``); the
comparison table is printed from whatever reports exist.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from class2d import evaluate  # noqa: E402

from tamis.class2d import Class2DOptions, run_class2d  # noqa: E402
from tamis.simulate.particles import ParticleSimulation, simulate_particles  # noqa: E402


def simulate(work: Path, n: int, snr: float, seed: int) -> Path:
    star = work / "sim" / "particles.star"
    if not star.exists():
        simulate_particles(
            ParticleSimulation(
                structures=["builtin:8zpm", "builtin:8zpm@R"],
                n_particles=n,
                box_size=64,
                pixel_size=2.8,
                snr=snr,
                junk_fraction=0.15,
                seed=seed,
            ),
            work / "sim",
        )
    return star


def run_one(work: Path, star: Path, algo: str, k: int, seed: int, threads: int) -> dict:
    common = dict(K=k, particle_diameter=150.0, random_seed=seed, j=threads, device="cpu")
    if algo == "em":
        options = Class2DOptions.gui_em(**common)
    else:
        options = Class2DOptions.gui_vdam(**common)
    root = work / f"{algo}_K{k}" / "run"
    t0 = time.perf_counter()
    result = run_class2d(star, str(root), options, log=lambda s: print(f"[{algo} K={k}] {s}"))
    wall = time.perf_counter() - t0
    report = evaluate(work, result, 12.0 / 2)
    report.update(
        algo=algo,
        iterations=options.iter,
        particles_evaluated=int(result.particles_evaluated),
        wall_s=round(wall, 1),
        threads=threads,
        machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, cpu",
    )
    (work / f"report_{algo}_K{k}.json").write_text(json.dumps(report, indent=2))
    return report


def table(work: Path) -> str:
    rows = []
    for path in sorted(work.glob("report_*_K*.json")):
        r = json.loads(path.read_text())
        junk = r["junk_to_junk_classes"]
        rows.append(
            f"| {r['algo']} | {r['K']} | {r['iterations']} | {r['particles_evaluated']:,} | "
            f"{r['wall_s']:.0f} | {r['near_empty_classes']} | "
            f"{','.join(map(str, r['structures_with_majority_class']))} | "
            f"{junk.get('ice', 0):.0%} / {junk.get('carbon', 0):.0%} / "
            f"{junk.get('empty', 0):.0%} / {junk.get('aggregate', 0):.0%} | "
            f"{r['particles_in_junk_classes']:.1%} | {r['psi_residual_median_deg']:.1f}; "
            f"{r['psi_residual_within_step']:.0%} | {r['frc05_best_A']}-"
            f"{max(map(float, r['frc05_resolution_A'].values()), default=0):.1f} "
            f"(median {r['frc05_median_A']}) |"
        )
    head = (
        "| algo | K | iterations | particle evaluations | wall (s) | near-empty classes | "
        "structures with a majority class | ice / carbon / empty / aggregates in >= 80%-junk "
        "classes | true particles in junk classes | psi residual median; within 6 deg | "
        "FRC=0.5 (A) |\n|" + "---|" * 11
    )
    return head + "\n" + "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--K", type=int, default=20)
    ap.add_argument("--algo", choices=["em", "vdam", "both"], default="both")
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--work", default="bench_vdam")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    work = Path(args.work)
    star = simulate(work, args.n, args.snr, args.seed)
    for algo in ("em", "vdam") if args.algo == "both" else (args.algo,):
        run_one(work, star, algo, args.K, args.seed, args.threads)
    print(table(work))


if __name__ == "__main__":
    main()
