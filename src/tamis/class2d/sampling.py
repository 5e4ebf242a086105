"""In-plane angle and translation sampling (RELION's ``HealpixSampling`` for 2D).

* Coarse psi: ``nr_psi = ceil(360 / psi_step)`` angles ``j * 360 / nr_psi``.
* Coarse translations: ``(ix * step, iy * step)`` for ``ix, iy`` in ``[-maxp, maxp]`` (ix outer),
  kept if ``x² + y² < range² + 0.001``; ``maxp = ceil(range / step)``.
* Oversampling order ``o``: each coarse psi becomes ``2^o`` angles and each coarse translation
  ``4^o`` (x outer, y inner) at offsets ``step * ((a + 1/2) / 2^o - 1/2)``; order 1 gives
  ``psi ± step/4`` and ``t ± step/4``.
* Every iteration a random perturbation ``rp`` in ``[-f, f]`` moves every psi by ``rp * psi_step``
  and every translation by ``rp * offset_step`` (x and y alike); ``rp`` starts at and moves by
  RELION's own draws for the run's random seed (:meth:`Sampling.start_perturbation`,
  :meth:`Sampling.advance_perturbation`).

Unlike RELION's GPU code, the number of psi samples is not rounded up to a multiple of 32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tamis.relion_rand import initial_perturbation, perturbation_step, wrap

__all__ = ["Sampling"]


@dataclass
class Sampling:
    """The sampling grids of one iteration. Translations are in pixels, angles in degrees."""

    psi_step: float = 10.0
    offset_range: float = 6.0
    offset_step: float = 2.0
    oversampling: int = 1
    perturb_factor: float = 0.5
    perturbation: float = 0.0

    def __post_init__(self) -> None:
        self.nr_psi = max(1, math.ceil(360.0 / self.psi_step - 1e-9))
        self.psi_step = 360.0 / self.nr_psi

    # ---- psi -----------------------------------------------------------------------------

    @property
    def n_over_psi(self) -> int:
        return 2**self.oversampling

    @property
    def n_over_trans(self) -> int:
        return 4**self.oversampling

    def _sub(self, step: float) -> np.ndarray:
        n = 2**self.oversampling
        return step * ((np.arange(n) + 0.5) / n - 0.5)

    def coarse_psi(self) -> np.ndarray:
        """``(nr_psi,)`` perturbed coarse angles."""
        return (np.arange(self.nr_psi) + self.perturbation) * self.psi_step

    def fine_psi(self) -> np.ndarray:
        """``(nr_psi * 2^o,)`` perturbed fine angles; fine ``j * 2^o + a`` refines coarse ``j``."""
        base = np.arange(self.nr_psi)[:, None] * self.psi_step + self._sub(self.psi_step)[None]
        return (base + self.perturbation * self.psi_step).reshape(-1)

    # ---- translations --------------------------------------------------------------------

    def coarse_translations(self, *, perturbed: bool = True) -> np.ndarray:
        """``(nr_trans, 2)`` coarse (x, y) translations in pixels."""
        maxp = math.ceil(self.offset_range / self.offset_step - 1e-9) if self.offset_step else 0
        pts = [
            (ix * self.offset_step, iy * self.offset_step)
            for ix in range(-maxp, maxp + 1)
            for iy in range(-maxp, maxp + 1)
            if (ix * self.offset_step) ** 2 + (iy * self.offset_step) ** 2
            < self.offset_range**2 + 0.001
        ] or [(0.0, 0.0)]
        t = np.asarray(pts, dtype=np.float64)
        return t + self.perturbation * self.offset_step if perturbed else t

    def fine_translations(self) -> np.ndarray:
        """``(nr_trans * 4^o, 2)`` perturbed fine translations; ``t * 4^o + b`` refines coarse t."""
        sub = self._sub(self.offset_step)
        grid = np.stack(np.meshgrid(sub, sub, indexing="ij"), -1).reshape(-1, 2)  # x outer
        coarse = self.coarse_translations()
        return (coarse[:, None, :] + grid[None]).reshape(-1, 2)

    @property
    def nr_trans(self) -> int:
        return len(self.coarse_translations(perturbed=False))

    # ---- perturbation --------------------------------------------------------------------

    def start_perturbation(self) -> None:
        """The instance before iteration 1, as RELION sets it up (the same for every seed)."""
        self.perturbation = initial_perturbation(self.perturb_factor)

    def advance_perturbation(self, seed: int, iteration: int) -> None:
        """RELION's ``resetRandomlyPerturbedSampling`` for ``iteration`` of a run with
        ``--random_seed`` ``seed``: ``rp += U(f/2, f)`` wrapped into [-f, f], ``U`` drawn as RELION
        draws it (:mod:`tamis.relion_rand`)."""
        f = self.perturb_factor
        if f <= 0:
            return
        self.perturbation = wrap(self.perturbation + perturbation_step(seed, iteration, f), f)
