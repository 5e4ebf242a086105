"""The built-in example behind ``make demo``: needs nothing but the installed package.

It simulates a small particle data set (two structures plus junk of every kind) and a few
micrographs with known particle positions, then runs a short 2D classification (RELION's EM
algorithm) on the particles and reports, per class, what the ground truth says it holds. Later
issues extend it into the automated pipeline (pick, extract, 2D classification, selection).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tamis.class2d import Class2DOptions, run_class2d
from tamis.io.particles import ParticleSet
from tamis.io.star import read_star
from tamis.simulate.micrographs import MicrographSimulation, simulate_micrographs
from tamis.simulate.particles import ParticleSimulation, simulate_particles
from tamis.simulate.truth import truth_for

__all__ = ["run_demo"]


def run_demo(
    out_dir: str | Path, *, show_progress: bool = False, class2d_iterations: int = 6
) -> list[str]:
    """Simulate the demo data into ``out_dir`` and classify it; return lines describing it."""
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
    c2d = run_class2d(
        parts.star,
        str(out / "Class2D" / "run"),
        Class2DOptions.gui_em(K=8, iter=class2d_iterations, particle_diameter=150.0, random_seed=1),
        log=lambda line: None,
        show_progress=show_progress,
    )
    summary = _class_summary(c2d.data, truth)
    return [
        f"particles: {len(ps)} images of {ps.box_size} px at {ps.pixel_size} A/px -> {parts.star}",
        f"  truth ({kinds}) -> {parts.ground_truth}",
        f"micrographs: 3 of 1024x1024 px, {mics.n_particles} particles -> {mics.star}",
        f"  true coordinates -> {mics.coordinates}",
        f"2D classification (EM, K=8, {c2d.iteration} iterations) -> {c2d.optimiser}",
        *summary,
        "next: tamis star info " + str(c2d.data),
    ]


def _class_summary(data_star: Path, truth: pd.DataFrame) -> list[str]:
    """One line per class: its share of the particles and what the ground truth says it holds."""
    data = read_star(data_star)["particles"]
    truth = truth_for(data, truth)
    label = truth["kind"].where(
        truth["kind"] != "particle", "structure " + truth["structure"].astype(str)
    )
    table = pd.crosstab(data["rlnClassNumber"].to_numpy(), label.to_numpy())
    lines = []
    for cls, row in table.iterrows():
        top = row.sort_values(ascending=False)
        parts = ", ".join(f"{v / row.sum():.0%} {k}" for k, v in top.items() if v > 0)
        lines.append(f"  class {cls:2d}: {row.sum() / len(data):5.1%} of particles: {parts}")
    return lines
