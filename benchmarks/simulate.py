"""Simulator speed: particles/s for stacks, seconds per micrograph.

Run: ``make bench`` or ``.venv/bin/python benchmarks/simulate.py [--device cuda]``.
Prints a Markdown table row per case, ready for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch

from tamis.simulate.micrographs import MicrographSimulation, simulate_micrographs
from tamis.simulate.particles import ParticleSimulation, simulate_particles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}"
    )
    print("| case | wall (s) | rate |")
    print("|---|---|---|")
    cases = [
        ("2,000 particles, 64 px, 2 structures, 15% junk", 2000, 64, 2.8),
        ("20,000 particles, 64 px, 2 structures, 15% junk", 20000, 64, 2.8),
        ("5,000 particles, 128 px, 2 structures, 15% junk", 5000, 128, 1.4),
    ]
    for label, n, box, apix in cases:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            simulate_particles(
                ParticleSimulation(
                    structures=["builtin:8zpm", "builtin:8zpm@R"],
                    n_particles=n,
                    box_size=box,
                    pixel_size=apix,
                    junk_fraction=0.15,
                ),
                tmp,
                device=args.device,
            )
            dt = time.perf_counter() - t
        print(f"| {label} | {dt:.1f} | {n / dt:,.0f} particles/s |")
    for size in (1024, 4096):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            simulate_micrographs(
                MicrographSimulation(
                    n_micrographs=3,
                    height_px=size,
                    width_px=size,
                    pixel_size=1.0,
                    particles_per_micrograph=size // 8,
                    carbon_fraction=0.34,
                ),
                tmp,
                device=args.device,
            )
            dt = time.perf_counter() - t
        print(
            f"| 3 micrographs {size}x{size} px at 1 A/px, {size // 8} particles each | {dt:.1f} "
            f"| {dt / 3:.1f} s/micrograph |"
        )


if __name__ == "__main__":
    main()
