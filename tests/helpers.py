"""Small data makers shared by several test modules."""

from __future__ import annotations

from pathlib import Path

from tamis.simulate.micrographs import MicrographSimulation, simulate_micrographs


def tiny_micrographs(
    dest: str | Path, *, n: int = 1, size: int = 384, per: int = 10, snr: float = 0.5,
    seed: int = 4,
) -> Path:  # fmt: skip
    """``n`` simulated ``size``² micrographs at 3 A/px in ``dest`` (an Import job directory);
    returns their micrographs.star."""
    return simulate_micrographs(
        MicrographSimulation(
            n_micrographs=n, height_px=size, width_px=size, pixel_size=3.0,
            particles_per_micrograph=per, snr=snr, seed=seed,
        ),
        dest,
    ).star  # fmt: skip
