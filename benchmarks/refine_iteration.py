"""One iteration of an auto-refine job continued from its files, timed: the A/B driver for the
3D kernels (run it with two versions of the code, alternating, on the same files).

usage: .venv/bin/python benchmarks/refine_iteration.py RUN_itNNN_optimiser.star [--save OUT.pt]

Runs iteration NNN + 1 as ``--continue`` would (same options, ``--j 2``) but writes no files;
prints its wall time. ``--save`` keeps the half maps, angles and origins for comparing two
versions' results."""

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
from tamis.io.particles import ParticleSet
from tamis.refine.auto_refine import AutoRefineOptions, AutoRefineRun


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("optimiser", type=Path)
    ap.add_argument("--j", type=int, default=2)
    ap.add_argument("--save", default="")
    a = ap.parse_args()
    keep_freed_memory()
    opt = a.optimiser.resolve()
    it = int(re.search(r"_it(\d+)_optimiser", opt.name).group(1)) + 1
    os.chdir(opt.parent.parent)  # the paths in the files are relative to the project
    cont = read_continue(opt)
    options = continued_options(cont, AutoRefineOptions(j=a.j), frozenset())
    scratch = Path("/tmp") / f"refine_iteration_{os.getpid()}" / "run"
    run = AutoRefineRun(ParticleSet.from_file(cont.data_path), options, str(scratch))
    run.load_continue(opt)
    t0 = time.perf_counter()
    run.iterate(it)
    seconds = time.perf_counter() - t0
    print(f"iteration {it}: {seconds:.1f} s (size {run.current_size})", flush=True)
    if a.save:
        angles = np.asarray(run.angles_of(np.arange(run.n)))
        torch.save(
            {
                "refs": [s.refs.clone() for s in run.states],
                "angles": torch.as_tensor(angles),
                "origin": torch.as_tensor(run.origin),
                "seconds": seconds,
            },
            a.save,
        )


if __name__ == "__main__":
    main()
