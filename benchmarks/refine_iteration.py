"""One iteration of an auto-refine or 2D classification job continued from its files, timed: the
A/B driver for the E/M kernels (run it with two versions of the code, alternating, on the same
files).

usage: .venv/bin/python benchmarks/refine_iteration.py RUN_itNNN_optimiser.star
[--class2d | --initial_model] [--repeat R] [--save OUT.pt]

Runs iteration NNN + 1 as ``--continue`` would (same options, ``--j 2``) but writes no files;
prints its wall time (with ``--class2d``, a Class2D job, EM or VDAM, and ``--initial_model``, an
InitialModel job, also the E-step and M-step seconds). ``--repeat R`` runs it R times from the
same files in one process. ``--save`` keeps the references, angles and origins of the last run
for comparing two versions' results."""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from tamis._malloc import keep_freed_memory
from tamis.class2d.files import continued_options, read_continue
from tamis.class2d.job import _run_class
from tamis.class2d.likelihood import GEMM_STATS
from tamis.class2d.state import Class2DOptions
from tamis.io.particles import ParticleSet
from tamis.refine.auto_refine import AutoRefineOptions, AutoRefineRun
from tamis.refine.initial_model import InitialModelOptions, InitialModelRun


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("optimiser", type=Path)
    ap.add_argument("--j", type=int, default=2)
    ap.add_argument("--save", default="")
    kind = ap.add_mutually_exclusive_group()
    kind.add_argument("--class2d", action="store_true", help="a Class2D job (EM or VDAM)")
    kind.add_argument("--initial_model", action="store_true", help="an InitialModel job (3D VDAM)")
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    keep_freed_memory()
    torch.set_num_threads(a.j)
    opt = a.optimiser.resolve()
    it = int(re.search(r"_it(\d+)_optimiser", opt.name).group(1)) + 1
    os.chdir(opt.parent.parent)  # the paths in the files are relative to the project
    cont = read_continue(opt)
    if a.initial_model:
        base, run_type = InitialModelOptions(j=a.j), InitialModelRun
    elif a.class2d:
        base, run_type = Class2DOptions(j=a.j), None
    else:
        base, run_type = AutoRefineOptions(j=a.j), AutoRefineRun
    options = continued_options(cont, base, frozenset())
    run_type = run_type or _run_class(options)
    scratch = Path("/tmp") / f"refine_iteration_{os.getpid()}" / "run"
    particles = ParticleSet.from_file(cont.data_path)
    for _ in range(a.repeat):
        run = run_type(particles, options, str(scratch), log=lambda _: None)
        run.load_continue(opt)
        e0, m0 = GEMM_STATS["estep_seconds"], GEMM_STATS["mstep_seconds"]
        t0 = time.perf_counter()
        run.iterate(it)
        seconds = time.perf_counter() - t0
        split = ""
        if a.class2d or a.initial_model:
            e, m = GEMM_STATS["estep_seconds"] - e0, GEMM_STATS["mstep_seconds"] - m0
            split = f", E-step {e:.2f} s, M-step {m:.2f} s"
        print(f"iteration {it}: {seconds:.2f} s (size {run.current_size}{split})", flush=True)
    if a.save:
        angles = np.asarray(run.angles_of(np.arange(run.n)))
        states = getattr(run, "states", None) or [run.state]
        torch.save(
            {
                "refs": [s.refs.clone() for s in states],
                "angles": torch.as_tensor(angles),
                "origin": torch.as_tensor(run.origin),
                "seconds": seconds,
            },
            a.save,
        )


if __name__ == "__main__":
    main()
