"""The built-in example behind ``make demo``: needs nothing but the installed package.

For now it simulates a small particle data set (two structures plus junk of every kind) and a
few micrographs with known particle positions. Later issues extend it into the automated
pipeline (pick, extract, 2D classification, selection).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tamis.io.particles import ParticleSet
from tamis.simulate.micrographs import MicrographSimulation, simulate_micrographs
from tamis.simulate.particles import ParticleSimulation, simulate_particles

__all__ = ["run_demo"]


def run_demo(out_dir: str | Path, *, show_progress: bool = False) -> list[str]:
    """Simulate the demo data into ``out_dir``; return lines describing what was made."""
    out = Path(out_dir)
    parts = simulate_particles(
        ParticleSimulation(
            structures=["builtin:8zpm", "builtin:8zpm@R"],
            n_particles=2000,
            box_size=64,
            pixel_size=2.8,
            snr=0.05,
            junk_fraction=0.15,
            seed=1,
        ),
        out / "particles",
        show_progress=show_progress,
    )
    mics = simulate_micrographs(
        MicrographSimulation(
            n_micrographs=3,
            height_px=1024,
            width_px=1024,
            pixel_size=1.5,
            particles_per_micrograph=60,
            snr=0.1,
            carbon_fraction=0.34,
            seed=2,
        ),
        out / "micrographs",
        show_progress=show_progress,
    )
    ps = ParticleSet.from_star(parts.star)
    truth = pd.read_csv(parts.ground_truth)
    kinds = ", ".join(f"{k} {v}" for k, v in truth["kind"].value_counts().items())
    return [
        f"particles: {len(ps)} images of {ps.box_size} px at {ps.pixel_size} A/px -> {parts.star}",
        f"  truth ({kinds}) -> {parts.ground_truth}",
        f"micrographs: 3 of 1024x1024 px, {mics.n_particles} particles -> {mics.star}",
        f"  true coordinates -> {mics.coordinates}",
        "next: tamis star info " + str(parts.star),
    ]
