"""RELION's 2D classification on a benchmark recipe's particles, timed per iteration and judged
against the truth with the same criteria as ``benchmarks/class2d.py``.

RELION is not part of tamis: build it beside the project (``../shared/docs/peers.md``) and pass
its ``relion_refine``. Options are those of RELION's GUI job, as ``class2d.py`` gives tamis:
EM ``--iter 25 --tau2_fudge 2 --ctf --flatten_solvent --zero_mask --center_classes
--oversampling 1 --psi_step 12 --offset_range 5 --offset_step 2 --norm --scale``, VDAM the same
with ``--grad --class_inactivity_threshold 0.1 --grad_write_iter 10 --iter 200``.

Run (after ``class2d.py --recipe hard --work W`` has simulated the particles)::

    .venv/bin/python benchmarks/relion_class2d.py --relion PEERS/relion-build/bin/relion_refine \\
        --work W --recipe hard [--cpu] [--algo em|vdam] [--iter N] [--j 2]

Per-iteration seconds come from the times RELION writes each iteration's model file; the peak
RSS is RELION's (children's maximum). Writes ``W/report_relion_<label>.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from class2d import evaluate  # noqa: E402
from recipes import RECIPES  # noqa: E402


@dataclass
class _Result:
    data: Path
    classes: Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--relion", required=True, help="path of relion_refine")
    ap.add_argument("--work", required=True)
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="hard")
    ap.add_argument("--algo", choices=("em", "vdam"), default="em")
    ap.add_argument("--cpu", action="store_true", help="RELION's accelerated CPU path (ALTCPU)")
    ap.add_argument("--iter", type=int, default=None)
    ap.add_argument("--K", type=int, default=20)
    ap.add_argument("--j", type=int, default=2)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--grad_write_iter", type=int, default=10, help="VDAM: 1 times every batch")
    args = ap.parse_args()
    recipe = RECIPES[args.recipe]
    work = Path(args.work).resolve()
    label = f"{args.algo}_{'cpu' if args.cpu else 'plain'}"
    out = work / f"Relion_{label}"
    out.mkdir(parents=True, exist_ok=True)
    n_iter = args.iter or (200 if args.algo == "vdam" else 25)
    cmd = [
        args.relion,
        "--i", "particles.star",
        "--o", str(out / "run"),
        "--dont_combine_weights_via_disc", "--pool", "3", "--pad", "2",
        "--ctf", "--iter", str(n_iter), "--tau2_fudge", "2",
        "--particle_diameter", str(recipe.diameter), "--K", str(args.K),
        "--flatten_solvent", "--zero_mask", "--center_classes",
        "--oversampling", "1", "--psi_step", "12", "--offset_range", "5", "--offset_step", "2",
        "--norm", "--scale", "--j", str(args.j), "--random_seed", str(args.seed),
    ]  # fmt: skip
    if args.algo == "vdam":
        cmd += ["--grad", "--class_inactivity_threshold", "0.1"]
        cmd += ["--grad_write_iter", str(args.grad_write_iter)]
    if args.cpu:
        cmd.append("--cpu")
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    with open(out / "run.out", "w") as log:
        subprocess.run(cmd, cwd=work / "sim", stdout=log, stderr=subprocess.STDOUT, check=True)
    wall = time.time() - t0
    stamps = {
        int(p.name.split("_it")[1][:3]): p.stat().st_mtime for p in out.glob("run_it*_model.star")
    }
    its = sorted(stamps)
    iteration_s = [round(stamps[b] - stamps[a], 1) for a, b in zip(its, its[1:], strict=False)]
    last = its[-1]
    result = _Result(
        data=out / f"run_it{last:03d}_data.star", classes=out / f"run_it{last:03d}_classes.mrcs"
    )
    report = evaluate(work, result, 12.0 / 2)
    report.update(
        command=" ".join(cmd),
        wall_s=round(wall, 1),
        setup_s=round(stamps[its[0]] - t0, 1) if its else None,
        iterations_written=its,
        iteration_s=iteration_s,
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
    )
    (work / f"report_relion_{label}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
