"""Gold-standard 3D auto-refine on simulated particles, side by side with RELION, judged against
the truth.

``.venv/bin/python benchmarks/auto_refine.py --work DIR [--structure asym|c4] [--n 2000]
[--seed 1] [--box 64] [--pixel 4] [--j 2] [--relion PATH/relion_refine_mpi] [--mpirun
PATH/mpirun] [--skip_tamis] [--reference MAP [--firstiter_cc]] [--name NAME]``

Data: ``--n`` particles of ``--box`` px at ``--pixel`` A/px (64 px, 4 A/px by default), SNR
0.05, defocus 0.8-2.5 um, no junk, from one structure of ``benchmarks/initial_model.py``:
``asym`` (the hard 2D recipe's two-subunit ribosome-sized pseudo-protein, ~245 x 160 A: a large
particle in the box) or ``c4`` (four copies of a ~60 A domain around z, refined in C4).

Reference: the true map on the particles' grey scale, or ``--reference`` (e.g. the largest class
of ``benchmarks/initial_model.py``'s job on the same structure: its hand, which single-particle
data cannot tell, is set to the truth's first, as a user would after looking at the map), either
low-passed by both programs with ``--ini_high 40``; ``--firstiter_cc`` adds that option to both
(a reference not on the particles' grey scale). Results go to ``report_NAME.json`` (NAME: the
structure, or ``--name``) and ``sim/Tamis_NAME``, ``sim/Relion_NAME`` with ``--name``.
(RELION's Refine3D job command otherwise: ``--pad 2 --ctf --flatten_solvent
--zero_mask --oversampling 1 --healpix_order 2 --auto_local_healpix_order 4 --offset_range 5
--offset_step 2 --low_resol_join_halves 40 --norm --scale``, mask 260 A). RELION runs as
``mpirun -n 3 relion_refine_mpi --j 1`` (a leader and one follower per half: two busy cores),
tamis with ``--j 2``, one after the other on the same machine.

Judged: wall time and iterations; the final gold-standard resolution (rlnCurrentResolution of
run_model.star); the final map's FSC with the truth (0.5 and 0.143, after superposition); the
median angular error of the particles' orientations against the truth (after the one rotation
relating the frames, up to the point group) and the fraction above 30 degrees.
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

sys.path.insert(0, str(Path(__file__).parent))
from initial_model import _c4_structure  # noqa: E402
from recipes import hard_structures  # noqa: E402

from tamis.io.mrc import read_mrc, write_mrc  # noqa: E402
from tamis.io.star import read_star  # noqa: E402
from tamis.refine.auto_refine import AutoRefineOptions, run_auto_refine  # noqa: E402
from tamis.refine.compare import compare_to_truth, orientation_errors  # noqa: E402
from tamis.simulate.particles import ParticleSimulation, simulate_particles  # noqa: E402
from tamis.simulate.truth import truth_for  # noqa: E402

BOX, PIXEL, DIAMETER = 64, 4.0, 260.0


def simulate(
    work: Path, structure: str, n: int, seed: int, box: int = BOX, pixel: float = PIXEL
) -> Path:
    sim = work / "sim"
    if not (sim / "particles.star").exists():
        spec = hard_structures(work / "structures")[0] if structure == "asym" else None
        spec = spec or _c4_structure(work / "structures")
        simulate_particles(
            ParticleSimulation(
                structures=[spec], n_particles=n, box_size=box, pixel_size=pixel, snr=0.05,
                seed=seed,
            ),
            sim,
        )  # fmt: skip
    scale = json.loads((sim / "simulation.json").read_text())["intensity_scale"]
    vol, px = read_mrc(sim / "structures" / "structure_01.mrc")
    write_mrc(sim / "reference.mrc", vol * scale, px, stack=False)
    return sim


def true_map(sim: Path) -> tuple[torch.Tensor, float]:
    """The particles' true map and its pixel size (the particles')."""
    vol, px = read_mrc(sim / "structures" / "structure_01.mrc")
    return torch.from_numpy(vol), float(px)


def reference(sim: Path, path: str, name: str) -> tuple[str, dict]:
    """``--reference`` in the particles' directory (hand set to the truth's), and its FSC with
    the truth."""
    from tamis.refine.maps import flip_hand

    vol, px = read_mrc(path)
    cmp = compare_to_truth(torch.from_numpy(vol), *true_map(sim))
    ref = flip_hand(torch.from_numpy(vol)).numpy() if cmp.flipped else vol
    out = f"reference_{name}.mrc"
    write_mrc(sim / out, ref, px, stack=False)
    info = {"reference": path, "hand_flipped": cmp.flipped, "reference_fsc_truth_05_A":
            cmp.resolution_05, "reference_fsc_truth_0143_A": cmp.resolution_0143}  # fmt: skip
    return out, info


def judge(sim: Path, root: Path, sym: str) -> dict:
    model = read_star(f"{root}_model.star")["model_general"]
    data = read_star(f"{root}_data.star")["particles"]
    truth = truth_for(data, sim / "ground_truth.csv")
    err, _ = orientation_errors(
        data[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(),
        truth[["rot", "tilt", "psi"]].to_numpy(),
        sym,
    )
    cmp = compare_to_truth(torch.from_numpy(read_mrc(f"{root}_class001.mrc")[0]), *true_map(sim))
    iters = sorted(root.parent.glob(f"{root.name}_it*_optimiser.star"))
    return {
        "gold_standard_resolution_A": float(model["rlnCurrentResolution"]),
        "fsc_truth_05_A": cmp.resolution_05,
        "fsc_truth_0143_A": cmp.resolution_0143,
        "median_angular_error_deg": float(np.median(err)),
        "fraction_error_above_30deg": float((err > 30).mean()),
        "iterations": len(iters),  # it001..itNNN and the final one (not it000)
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--structure", choices=("asym", "c4"), default="asym")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--box", type=int, default=BOX, help="particle box, px")
    ap.add_argument("--pixel", type=float, default=PIXEL, help="pixel size, A")
    ap.add_argument("--j", type=int, default=2)
    ap.add_argument("--relion", default="")
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--skip_tamis", action="store_true")
    ap.add_argument("--iter", type=int, default=999, help="--iter (--auto_iter_max) of tamis")
    ap.add_argument("--reference", default="", help="start from this map (else the truth)")
    ap.add_argument("--firstiter_cc", action="store_true")
    ap.add_argument("--name", default="", help="name of this run's report and directories")
    ap.add_argument("--tamis_continue", default="", help="run_itNNN_optimiser.star to continue")
    ap.add_argument(
        "--tamis_prior_seconds", type=float, default=0.0,
        help="seconds the continued run had spent up to that iteration (added)",
    )  # fmt: skip
    a = ap.parse_args()
    sym = "C1" if a.structure == "asym" else "C4"
    sim = simulate(a.work, a.structure, a.n, a.seed, a.box, a.pixel)
    name = a.name or a.structure
    suffix = f"_{a.name}" if a.name else ""
    report: dict = {"n": a.n, "structure": a.structure, "sym": sym}
    ref = "reference.mrc"
    if a.reference:
        ref, info = reference(sim, a.reference, name)
        report.update(info)
        print(json.dumps(info), flush=True)
    report["firstiter_cc"] = a.firstiter_cc
    if not a.skip_tamis:
        root = sim / f"Tamis{suffix}" / "run"
        root.parent.mkdir(parents=True, exist_ok=True)
        opts = AutoRefineOptions(
            ref=str(sim / ref), ini_high=40.0, particle_diameter=DIAMETER, sym=sym,
            j=a.j, random_seed=a.seed, iter=a.iter, firstiter_cc=a.firstiter_cc,
        )  # fmt: skip
        cwd = os.getcwd()
        os.chdir(sim)
        t0 = time.perf_counter()
        try:
            run_auto_refine(
                None if a.tamis_continue else "particles.star",
                f"Tamis{suffix}/run",
                opts,
                continue_from=a.tamis_continue or None,
                log=lambda s: print(s, flush=True),
            )
        finally:
            os.chdir(cwd)
        seconds = time.perf_counter() - t0 + a.tamis_prior_seconds
        report["tamis"] = {"seconds": seconds, **judge(sim, root, sym)}
        print(json.dumps(report["tamis"]), flush=True)
    if a.relion:
        (sim / f"Relion{suffix}").mkdir(exist_ok=True)
        cmd = [
            a.mpirun, "-n", "3", a.relion, "--o", f"Relion{suffix}/run", "--auto_refine",
            "--split_random_halves", "--i", "particles.star", "--ref", ref,
            "--trust_ref_size", "--ini_high", "40", "--dont_combine_weights_via_disc", "--pad", "2",
            "--ctf", "--particle_diameter", str(DIAMETER), "--flatten_solvent", "--zero_mask",
            "--oversampling", "1", "--healpix_order", "2", "--auto_local_healpix_order", "4",
            "--offset_range", "5", "--offset_step", "2", "--sym", sym, "--low_resol_join_halves",
            "40", "--norm", "--scale", "--j", "1", "--random_seed", str(a.seed),
        ] + (["--firstiter_cc"] if a.firstiter_cc else [])  # fmt: skip
        t0 = time.perf_counter()
        with open(sim / f"Relion{suffix}" / "log.txt", "w") as fh:
            subprocess.run(cmd, cwd=sim, stdout=fh, stderr=subprocess.STDOUT, check=True)
        report["relion"] = {
            "seconds": time.perf_counter() - t0,
            **judge(sim, sim / f"Relion{suffix}" / "run", sym),
        }
        print(json.dumps(report["relion"]), flush=True)
    (a.work / f"report_{name}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
