"""Euler angles in RELION's convention, and the Fourier-slice projector against real space."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tamis.geometry import euler_to_matrix, random_euler_angles, rotation_2d
from tamis.simulate.project import Projector
from tamis.simulate.structure import atoms_to_volume


def relion_euler(rot: float, tilt: float, psi: float) -> np.ndarray:
    """RELION's Euler_angles2matrix, written out from its definition: Rz(psi) Ry(tilt) Rz(rot)
    with RELION's sign convention (passive rotations)."""

    def rz(a: float) -> np.ndarray:
        c, s = math.cos(a), math.sin(a)
        return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])

    def ry(a: float) -> np.ndarray:
        c, s = math.cos(a), math.sin(a)
        return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])

    return rz(math.radians(psi)) @ ry(math.radians(tilt)) @ rz(math.radians(rot))


@pytest.mark.parametrize(
    "angles", [(0, 0, 0), (30, 0, 0), (0, 40, 0), (10, 20, 30), (-170, 95, 260)]
)
def test_euler_matches_relion_definition(angles):
    ours = euler_to_matrix(*(torch.tensor(float(a), dtype=torch.float64) for a in angles)).numpy()
    np.testing.assert_allclose(ours, relion_euler(*angles), atol=1e-12)
    assert np.linalg.det(ours) == pytest.approx(1.0)


def test_rotation_2d_is_relion_psi_block():
    psi = torch.tensor(37.0, dtype=torch.float64)
    a3 = euler_to_matrix(torch.zeros_like(psi), torch.zeros_like(psi), psi)
    torch.testing.assert_close(rotation_2d(psi), a3[:2, :2])


def test_random_angles_are_uniform_over_so3():
    gen = torch.Generator().manual_seed(0)
    ang = random_euler_angles(20000, gen)
    # Uniform on SO(3): cos(tilt) uniform in [-1, 1], rot and psi uniform.
    ct = torch.cos(torch.deg2rad(ang[:, 1]))
    assert abs(ct.mean().item()) < 0.02
    assert abs((ct**2).mean().item() - 1 / 3) < 0.02
    assert ang[:, 0].min() >= -180 and ang[:, 2].max() <= 180


def test_projection_equals_real_space_projection_of_rotated_atoms():
    """Projecting at A must equal summing along z the density of the atoms rotated by A."""
    rng = np.random.default_rng(0)
    atoms = rng.normal(scale=6.0, size=(60, 3))
    atoms[:10] += [12.0, 0.0, 0.0]  # break symmetry so a wrong convention shows
    weights = np.ones(len(atoms))
    n, p = 40, 1.5
    vol = atoms_to_volume(atoms, weights, n, p, bfactor=200.0)
    centroid = atoms.mean(0)
    proj = Projector(vol)
    for angles in [(0.0, 0.0, 0.0), (30.0, 50.0, -20.0), (120.0, 100.0, 45.0)]:
        a = euler_to_matrix(*(torch.tensor(x, dtype=torch.float64) for x in angles))
        rotated = (atoms - centroid) @ a.numpy().T
        ref = atoms_to_volume(rotated, weights, n, p, bfactor=200.0).sum(0)
        ours = proj.project(a[None])[0]
        corr = torch.corrcoef(torch.stack([ours.flatten(), ref.flatten()]))[0, 1].item()
        assert corr > 0.99, (angles, corr)
        # Mass is kept to within the gridding correction's few-percent effect on the DC term.
        assert ours.sum().item() == pytest.approx(ref.sum().item(), rel=0.05)
