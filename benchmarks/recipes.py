"""Particle data sets for the 2D classification benchmarks (tamis and RELION run on the same files).

* ``easy``: the EM benchmark's original recipe: PDB 8ZPM and its receptor chain (~45 kDa, ~100 A)
  in 64 px at 2.8 A/px, SNR 0.05, 15% junk. Posteriors sharpen after two iterations.
* ``hard``: large particles filling most of the box, as real data look: a two-subunit
  ribosome-sized pseudo-protein (~245 x 160 A) and a nine-fold ring (~230 A across, 80 A thick)
  in 64 px at 4 A/px (256 A box, mask 240 A), SNR 0.05, 15% junk. Posteriors stay broad
  (Pmax < 0.05) for many iterations.

``make_recipe(name, work, n, seed)`` writes ``work/sim/particles.star`` (once) and returns the
recipe's settings (pixel size, mask diameter).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tamis.io.mrc import write_mrc
from tamis.simulate.particles import ParticleSimulation, simulate_particles
from tamis.simulate.structure import atoms_to_volume, random_protein, rotate_about_z

__all__ = ["Recipe", "RECIPES", "make_recipe"]


@dataclass(frozen=True)
class Recipe:
    name: str
    box: int
    pixel: float
    diameter: float  # mask diameter (A), as a user would set it


RECIPES = {
    "easy": Recipe("easy", 64, 2.8, 150.0),
    "hard": Recipe("hard", 64, 4.0, 240.0),
}


def hard_structures(folder: Path) -> list[str]:
    """Write the hard recipe's two maps (2 A/px, 160 px) and return their paths as specs."""
    folder.mkdir(parents=True, exist_ok=True)
    big, wb = random_protein("random:72:20000")
    small, ws = random_protein("random:5:9000")
    ribo = (np.concatenate([big, small + np.array([100.0, 0.0, 0.0])]), np.concatenate([wb, ws]))
    dom, wd = random_protein("random:31:1200")
    ring_xyz = [rotate_about_z(dom + [80.0, 0.0, 0.0], 2 * np.pi * k / 9) for k in range(9)]
    ring = (np.concatenate(ring_xyz), np.tile(wd, 9))
    specs = []
    for name, (xyz, w) in (("ribosome_like", ribo), ("ring9", ring)):
        path = folder / f"{name}.mrc"
        if not path.exists():
            vol = atoms_to_volume(xyz, w, 160, 2.0, bfactor=50.0)
            write_mrc(path, vol.numpy(), 2.0)
        specs.append(str(path))
    return specs


def make_recipe(name: str, work: Path, n: int, seed: int = 11, snr: float = 0.05) -> Recipe:
    """Simulate the recipe's particles into ``work/sim`` unless they are there already."""
    recipe = RECIPES[name]
    star = work / "sim" / "particles.star"
    if star.exists():
        return recipe
    if name == "easy":
        structures = ["builtin:8zpm", "builtin:8zpm@R"]
    else:
        structures = hard_structures(work / "structures")
    simulate_particles(
        ParticleSimulation(
            structures=structures,
            n_particles=n,
            box_size=recipe.box,
            pixel_size=recipe.pixel,
            snr=snr,
            junk_fraction=0.15,
            seed=seed,
        ),
        work / "sim",
    )
    return recipe
