"""VDAM schedules for 2D (RELION's ``updateSubsetSize``, ``updateStepSize``, ``updateTau2Fudge``).

Three phases of ``int(iter * ini_frac)``, ``iter - ini - fin`` and ``int(iter * fin_frac)``
iterations; the mini-batch grows linearly in the middle phase, the step size falls from
``inflate * stepsize`` to ``stepsize`` and T rises from 1 to ``--tau2_fudge`` on sigmoids centred
in the middle phase. The last iteration uses every particle when K > 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tamis.class2d.state import Class2DOptions
from tamis.errors import TamisError

__all__ = ["VdamSchedule"]


def _sigmoid(x: float, start: float, length: float) -> float:
    """RELION's ``1 / (10^((x - b - a/2) / (a/4)) + 1)``; a step at ``b + a/2`` when ``a = 0``."""
    if length <= 0:
        return 1.0 if x <= start else 0.0
    e = (x - start - length / 2.0) / (length / 4.0)
    if e > 300:
        return 0.0
    return 1.0 / (math.pow(10.0, e) + 1.0)


def _scheme_factor(scheme: str, option: str) -> float | None:
    """``"plain"`` -> None; ``"<f>-step"`` -> f."""
    if scheme == "plain":
        return None
    if scheme.endswith("-step"):
        try:
            f = float(scheme[: -len("-step")])
        except ValueError:
            f = -1.0
        if f > 0:
            return f
    raise TamisError(f"{option} {scheme!r}: expected 'plain' or '<factor>-step' with factor > 0")


@dataclass(frozen=True)
class VdamSchedule:
    """Iteration-dependent VDAM settings for ``n_particles`` particles and ``n_classes`` classes."""

    n_iter: int
    ini_iter: int
    between_iter: int
    fin_iter: int
    ini_subset: int
    fin_subset: int
    n_particles: int
    n_classes: int
    stepsize: float
    stepsize_inflate: float | None  # None: plain
    tau2_fudge: float
    tau2_deflate: float | None  # None: plain

    @classmethod
    def create(
        cls, options: Class2DOptions, n_particles: int, *, is_3d: bool = False
    ) -> VdamSchedule:
        """The schedule of a run; ``is_3d`` takes RELION's 3D initial-model constants (base
        step 0.5, mini-batches ``max(min(0.005 N, 5000), 200)`` to
        ``max(min(0.1 N, 50000), 1000)``)."""
        o = options
        if o.iter < 1:
            raise TamisError(f"--iter {o.iter}: VDAM needs at least one iteration")
        for name, frac in (
            ("--grad_ini_frac", o.grad_ini_frac),
            ("--grad_fin_frac", o.grad_fin_frac),
        ):
            if not 0 < frac < 1:
                raise TamisError(f"{name} {frac}: must be between 0 and 1")
        ini_frac, fin_frac = o.grad_ini_frac, o.grad_fin_frac
        if ini_frac + fin_frac > 0.9:  # RELION keeps at least 10% for the middle phase
            total = ini_frac + fin_frac + 0.1
            ini_frac, fin_frac = ini_frac / total, fin_frac / total
        ini = int(o.iter * ini_frac)
        fin = int(o.iter * fin_frac)
        between = max(o.iter - ini - fin, 0)
        ini_subset = (
            o.grad_ini_subset
            if o.grad_ini_subset > 0
            else int(max(min(n_particles * 0.005, 5000 if is_3d else 10000), 200))
        )
        fin_subset = (
            o.grad_fin_subset
            if o.grad_fin_subset > 0
            else int(
                max(min(n_particles * 0.1, 50000), 1000)
                if is_3d
                else max(min(n_particles * 0.05, 100000), 1000)
            )
        )
        step = o.grad_stepsize if o.grad_stepsize > 0 else (0.5 if is_3d else 0.3)
        inflate = _scheme_factor(
            o.grad_stepsize_scheme or f"{0.9 / step}-step", "--grad_stepsize_scheme"
        )
        fudge = o.tau2_fudge if o.tau2_fudge > 0 else 4.0
        deflate = _scheme_factor(o.tau2_fudge_scheme or f"{fudge}-step", "--tau2_fudge_scheme")
        return cls(
            n_iter=ini + between + fin,
            ini_iter=ini,
            between_iter=between,
            fin_iter=fin,
            ini_subset=ini_subset,
            fin_subset=fin_subset,
            n_particles=n_particles,
            n_classes=o.K,
            stepsize=step,
            stepsize_inflate=inflate,
            tau2_fudge=fudge,
            tau2_deflate=deflate,
        )

    def subset_size(self, it: int) -> int:
        """Mini-batch size of iteration ``it``; -1 means every particle."""
        if it < self.ini_iter:
            size = self.ini_subset
        elif it < self.ini_iter + self.between_iter:
            frac = (it - self.ini_iter) / self.between_iter
            size = self.ini_subset + math.floor(frac * (self.fin_subset - self.ini_subset) + 0.5)
        else:
            size = self.fin_subset
        if (it == self.n_iter and self.n_classes > 1) or size >= self.n_particles:
            return -1
        return size

    def step_size(self, it: int) -> float:
        """Base step size (RELION's ``grad_current_stepsize``)."""
        if self.stepsize_inflate is None:
            return self.stepsize
        a = self.between_iter // 2
        s = _sigmoid(it, self.ini_iter, a)
        return self.stepsize * self.stepsize_inflate * s + self.stepsize * (1 - s)

    def class_step_sizes(self, it: int, pdf_class):
        """Per-class step ``eta(it) (1 - exp(-(3K + 10) pdf_class))`` (tensor or array in, same out)."""
        return self.step_size(it) * (1 - (-(3 * self.n_classes + 10) * pdf_class).exp())

    def tau2_fudge_at(self, it: int) -> float:
        """T of iteration ``it``: ``T / deflate`` early, ``T`` late (1 -> T by default)."""
        if self.tau2_deflate is None:
            return self.tau2_fudge
        a = self.between_iter // 4
        s = _sigmoid(it, self.ini_iter, a)
        return self.tau2_fudge / self.tau2_deflate * s + self.tau2_fudge * (1 - s)

    def mu(self, it: int, mu: float) -> float:
        """Momentum of the other parameters: 0 when the iteration uses every particle."""
        return 0.0 if self.subset_size(it) == -1 else mu

    def replaces_classes(self, it: int) -> bool:
        """Inactive classes are replaced only in the middle phase (exclusive at both ends)."""
        return self.ini_iter < it < self.ini_iter + self.between_iter

    def centres(self, it: int) -> bool:
        """Classes are centred before the last phase, and in the last iteration."""
        return it < self.ini_iter + self.between_iter or it >= self.n_iter

    def writes(self, it: int, every: int) -> bool:
        """RELION skips writing only mini-batch iterations that are not a multiple of ``every``
        (iterations over every particle, it000 and the last are always written)."""
        if it == 0 or it >= self.n_iter or self.subset_size(it) < 0:
            return True
        return every > 0 and it % every == 0

    def particles_evaluated(self) -> int:
        """Particle E-steps over the whole run (final all-particle pass included)."""
        total = 0
        for it in range(1, self.n_iter + 1):
            s = self.subset_size(it)
            total += self.n_particles if s < 0 else s
        return total
