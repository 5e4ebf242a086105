"""What a run over 3D references does differently from 2D, shared by the initial model (VDAM)
and auto-refine (EM): volumes and their spectrum, HEALPix orientations as rotation matrices,
the particles' three Euler angles, their changes up to the point group, and the accuracy
estimates' turned orientations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from tamis.fourier import radial_average, rfft3_centered, shell_index
from tamis.geometry import euler_to_matrix, matrix_to_euler
from tamis.io.particles import ParticleSet
from tamis.padded_grid import transform_scale
from tamis.refine.sampling import Sampling3D
from tamis.refine.space import VolumeSpace
from tamis.symmetry import symmetry_operators

__all__ = ["VolumeRun", "axes_distances", "rotation_angles", "best_accuracy"]


def rotation_angles(a: torch.Tensor, b: torch.Tensor, sym: str = "C1") -> torch.Tensor:
    """Angles (degrees) of the rotations between orientations ``a`` and ``b`` ``(N, 3, 3)``, the
    smallest over ``b``'s symmetry mates ``b R`` (the projections of a symmetric map are the
    same)."""
    m = a.transpose(1, 2) @ b  # (N, 3, 3)
    ops = symmetry_operators(sym).to(m.dtype)  # (G, 3, 3)
    trace = torch.einsum("nij,gji->ng", m, ops).amax(1)
    return torch.rad2deg(torch.arccos(((trace - 1) / 2).clamp(-1.0, 1.0)))


def axes_distances(a: torch.Tensor, b: torch.Tensor, sym: str = "C1") -> torch.Tensor:
    """RELION's change of orientation (``HealpixSampling::calculateAngularDistance``), degrees:
    the mean over the three rows of ``a`` and of ``b``'s symmetry mate ``b R`` ``(N, 3, 3)`` of
    the angle between them, the smallest over the mates. About pi/4 of :func:`rotation_angles`
    for a random axis (a turn about one row moves only the other two)."""
    ops = symmetry_operators(sym).to(a.dtype)  # (G, 3, 3)
    mates = torch.einsum("nij,gjk->ngik", b, ops)  # (N, G, 3, 3)
    cos = torch.einsum("nik,ngik->ngi", a, mates).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cos)).mean(-1).amin(1)


def best_accuracy(accuracy: torch.Tensor) -> float:
    """The best (smallest) per-class accuracy estimate, as RELION's auto-sampling takes it;
    999 for classes without one (under 1% of the particles) and when none was made."""
    return float(accuracy.min()) if accuracy.numel() else 999.0


class VolumeRun:
    """Mixin for a :class:`~tamis.class2d.em.Class2DRun` (or VDAM run) over volumes; call
    :meth:`_init_volumes` at the end of ``__init__``."""

    is_3d = True
    accuracy_trials = 100  # RELION's accuracy estimates use 100 particles in 3D (2D: 10)
    coarse_safety = 1.2  # RELION's keep-safe factor of the coarse image size for 3D references

    def _init_volumes(self, particles: ParticleSet, healpix_order: int) -> None:
        o = self.options
        self.space = VolumeSpace(o.sym)
        self.sampling = Sampling3D(
            offset_range=o.offset_range,
            offset_step=o.offset_step,
            oversampling=o.oversampling,
            perturb_factor=o.perturb,
            healpix_order=healpix_order,
            sym=o.sym,
        )
        self.sampling.start_perturbation()
        table = particles.particles
        self.rot = np.zeros(self.n)
        self.tilt = np.zeros(self.n)
        if "rlnAngleRot" in table.columns and "rlnAngleTilt" in table.columns:
            self.rot = table["rlnAngleRot"].to_numpy(dtype=float)[self.order].copy()
            self.tilt = table["rlnAngleTilt"].to_numpy(dtype=float)[self.order].copy()
        if "rlnAnglePsi" in table.columns:
            self.psi = table["rlnAnglePsi"].to_numpy(dtype=float)[self.order].copy()

    def random_orientation(self, rng: np.random.Generator) -> torch.Tensor:
        """RELION's random angles for an initial reconstruction: rot ~ U[0, 360), tilt ~
        U[0, 180) (uniform in angle, as RELION), psi ~ U[0, 360)."""
        rot, tilt, psi = rng.uniform(0.0, 360.0), rng.uniform(0.0, 180.0), rng.uniform(0.0, 360.0)
        a = torch.tensor([rot, tilt, psi], dtype=torch.float64)
        return euler_to_matrix(a[0], a[1], a[2])

    def reference_spectrum(self, refs: torch.Tensor) -> torch.Tensor:
        """Per-shell mean ``|F|²`` of volumes ``(K, N, N, N)`` on RELION's 3D scale (a central
        section is an image transform)."""
        n = refs.shape[-1]
        power = (rfft3_centered(refs) * transform_scale(n, 1, 3)).abs() ** 2
        return radial_average(power, shell_index((n, n, n), device=refs.device), self.nsh)

    def n_directions(self) -> int:
        return self.sampling.nr_directions

    def orientation_samples(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        smp, dev = self.sampling, self.device
        return smp.coarse_rotations().to(dev), smp.fine_rotations().to(dev), smp.n_over_orient

    def angles_of(self, rows: np.ndarray) -> np.ndarray:
        return np.stack([self.rot[rows], self.tilt[rows], self.psi[rows]], 1)

    def row_arrays(self) -> list[np.ndarray]:
        return [self.rot, self.tilt, *super().row_arrays()]

    def angle_change(self, rows: np.ndarray, old: np.ndarray) -> float:
        """Mean change of orientation (degrees) as RELION measures it (:func:`axes_distances`,
        up to the point group): what its auto-sampling's tests of small changes read."""
        a = euler_to_matrix(*torch.from_numpy(old).T)
        b = euler_to_matrix(*torch.from_numpy(self.angles_of(rows)).T)
        return float(axes_distances(a, b, self.options.sym).mean())

    def set_angles(self, rows: np.ndarray, ok: np.ndarray, best: torch.Tensor) -> None:
        ang = matrix_to_euler(best.cpu()).numpy()
        self.rot[rows] = np.where(ok, ang[:, 0], self.rot[rows])
        self.tilt[rows] = np.where(ok, ang[:, 1], self.tilt[rows])
        self.psi[rows] = np.where(ok, ang[:, 2], self.psi[rows])

    def turned_orientations(
        self, angles: np.ndarray, turns: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Particle ``i``'s orientation and the same with rot (i % 3 = 0), tilt (1) or psi (2)
        turned by each of ``turns`` degrees (RELION picks one of the three at random)."""
        a = torch.as_tensor(angles, dtype=torch.float64)  # (P, 3)
        p = len(a)
        moved = a[:, None, :].repeat(1, len(turns), 1)  # (P, A, 3)
        axis = torch.arange(p) % 3
        moved[torch.arange(p), :, axis] += turns.cpu()[None, :].expand(p, -1)
        moved = moved.reshape(-1, 3)
        first = euler_to_matrix(a[:, 0], a[:, 1], a[:, 2])
        turned = euler_to_matrix(moved[:, 0], moved[:, 1], moved[:, 2])
        return first.to(self.device), turned.to(self.device)

    def _volume_table(self, table: pd.DataFrame, rows: slice | None = None) -> pd.DataFrame:
        sel = slice(None) if rows is None else rows
        table["rlnAngleRot"] = self.rot[sel]
        table["rlnAngleTilt"] = self.tilt[sel]
        return table

    def _restore_volumes(self, cont, data: pd.DataFrame) -> None:
        """The first two Euler angles and the HEALPix order of a continued run."""
        self.rot = data["rlnAngleRot"].to_numpy(float).copy()
        self.tilt = data["rlnAngleTilt"].to_numpy(float).copy()
        order = cont.sampling.get("rlnHealpixOrder")
        if order is not None and int(order) != self.sampling.healpix_order:
            self.sampling.set_order(int(order))
