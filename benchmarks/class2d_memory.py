"""Peak memory of 2D classification without pre-reading: N vs 2N particles.

The data (2N particles) is simulated once; each measurement runs one EM iteration in a fresh
process on the first N or all 2N particles and reports that process's peak RSS. Streaming images
batch by batch means doubling N adds only per-particle metadata.

Run: ``.venv/bin/python benchmarks/class2d_memory.py [--n 4000]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from tamis.io.star import read_star, write_star
from tamis.simulate.particles import ParticleSimulation, simulate_particles

CHILD = """
import resource, sys
from tamis.class2d import Class2DOptions, run_class2d
run_class2d(sys.argv[1], sys.argv[2],
            Class2DOptions(K=8, iter=1, ctf=True, zero_mask=True, psi_step=12, offset_range=5,
                           offset_step=2, particle_diameter=150, random_seed=1, batch_size=128),
            log=lambda s: None)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_mib(star: Path, out: Path) -> float:
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(star), str(out)],
        capture_output=True,
        text=True,
        check=True,
        cwd=star.parent,
    )
    return int(run.stdout.split()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=4000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        simulate_particles(
            ParticleSimulation(
                n_particles=2 * args.n, box_size=64, pixel_size=2.8, junk_fraction=0.1, seed=1
            ),
            work,
        )
        blocks = read_star(work / "particles.star")
        half = dict(blocks, particles=blocks["particles"].iloc[: args.n])
        write_star(half, work / "half.star")
        one = peak_mib(work / "half.star", work / "a" / "run")
        two = peak_mib(work / "particles.star", work / "b" / "run")
    print(
        f"peak RSS, one EM iteration (K=8, box 64): {args.n} particles {one:.0f} MiB, "
        f"{2 * args.n} particles {two:.0f} MiB, increase {100 * (two - one) / one:.1f}%"
    )


if __name__ == "__main__":
    main()
