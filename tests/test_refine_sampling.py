"""RELION's 3D orientation sampling per iteration (tamis.refine.sampling.Sampling3D)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tamis.class2d.vdam import moments_from_half, moments_to_half
from tamis.geometry import euler_to_matrix
from tamis.orientations import directions, max_pixel_radius
from tamis.refine.sampling import Sampling3D


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cos = ((a.transpose(-1, -2) @ b).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))


@pytest.mark.parametrize("order, sym", [(1, "C1"), (2, "D2")])
def test_counts_and_coarse_major_children(order: int, sym: str):
    s = Sampling3D(healpix_order=order, sym=sym, oversampling=1, offset_range=6, offset_step=2)
    d = directions(order, sym)
    assert s.nr_directions == len(d.pixel)
    assert s.psi_step == pytest.approx(360.0 / (6 * 2**order))
    coarse, fine = s.coarse_rotations(), s.fine_rotations()
    assert coarse.shape == (len(d.pixel) * s.nr_psi, 3, 3)
    assert fine.shape == (len(coarse) * 8, 3, 3)
    # fine j * 8 + a refines coarse j: its direction (third row of A) is within the parent's
    # pixel and its psi within a quarter step of the parent's
    kids = fine.view(len(coarse), 8, 3, 3)
    cos = (kids[:, :, 2, :] * coarse[:, None, 2, :]).sum(-1).clamp(-1, 1)
    assert (
        float(torch.rad2deg(torch.arccos(cos)).max()) <= np.rad2deg(max_pixel_radius(order)) + 1e-6
    )
    # coarse orientation d * nr_psi + p is direction d at psi p
    rot, tilt, psi = s.coarse_angles()
    assert torch.equal(rot[:: s.nr_psi], d.rot)
    assert torch.equal(psi[: s.nr_psi], torch.arange(s.nr_psi, dtype=torch.float64) * s.psi_step)


def test_perturbation_is_a_right_multiplication():
    s = Sampling3D(healpix_order=1, oversampling=1, perturb_factor=0.5)
    plain = s.coarse_rotations()
    s.perturbation = 0.3
    moved = s.coarse_rotations()
    d = torch.tensor(0.3 * 30.0, dtype=torch.float64)
    assert torch.allclose(moved, plain @ euler_to_matrix(d, d, d), atol=1e-12)
    # every orientation moves by the same angle, the translations by 0.3 steps
    ang = _angle(plain, moved)
    assert float(ang.max() - ang.min()) < 1e-6
    assert np.allclose(
        s.coarse_translations() - s.coarse_translations(perturbed=False), 0.3 * s.offset_step
    )


def test_set_order_rebuilds_the_grid():
    s = Sampling3D(healpix_order=1)
    n1 = len(s.coarse_rotations())
    s.set_order(2)
    assert len(s.coarse_rotations()) == 192 * 24 > n1
    assert s.psi_step == pytest.approx(15.0)


def test_moment_half_grids_round_trip_in_3d():
    gen = torch.Generator().manual_seed(0)
    vol = torch.randn((2, 8, 8, 8), generator=gen, dtype=torch.float64)
    from tamis.padded_grid import padded_transforms

    grid = padded_transforms(vol, pad=1, gridding=False)  # Hermitian, centred
    back = moments_from_half(moments_to_half(grid))
    assert moments_to_half(grid).shape == (2, 8, 8, 10)
    assert torch.allclose(back, grid, atol=1e-4 * float(grid.abs().max()))
