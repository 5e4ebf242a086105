"""RELION's 3D orientation grid: directions, asymmetric units, psi and oversampling."""

from __future__ import annotations

import math

import pytest
import torch

from tamis.healpix import max_pixel_radius, n_pixels
from tamis.orientations import (
    SEAM_LIMIT,
    angular_sampling,
    direction_angles,
    direction_vectors,
    directions,
    oversampled_directions,
    oversampled_psi,
    psi_angles,
)
from tamis.symmetry import symmetry_operators


def test_c1_keeps_every_direction_in_index_order():
    grid = directions(2, "C1")
    assert torch.equal(grid.pixel, torch.arange(n_pixels(2)))
    assert float(grid.rot.min()) > -180 and float(grid.rot.max()) <= 180
    assert float(grid.tilt.min()) >= 0 and float(grid.tilt.max()) <= 180


def test_direction_vector_is_the_rotation_matrix_third_row():
    from tamis.geometry import euler_to_matrix

    rot, tilt = direction_angles(torch.arange(48), 1)
    a = euler_to_matrix(rot, tilt, torch.zeros_like(rot))
    torch.testing.assert_close(direction_vectors(rot, tilt), a[:, 2])


def _angles_to_nearest_image(kept: torch.Tensor, targets: torch.Tensor, sym: str) -> torch.Tensor:
    """For each target direction, the smallest angle to any symmetry image of a kept direction
    (slow loop over operators)."""
    best = torch.full((len(targets),), -2.0, dtype=torch.float64)
    for r in symmetry_operators(sym):
        images = kept @ r  # rows: R^T d
        best = torch.maximum(best, (targets @ images.T).max(1).values)
    return torch.arccos(best.clamp(-1, 1))


@pytest.mark.parametrize("sym", ["C4", "D2", "D7", "T", "O", "I", "I1", "I3", "I4"])
def test_asymmetric_unit_tiles_the_sphere(sym):
    """Order 5 (12,288 directions): the unit holds ~1/G of them, and its symmetry images come
    within 1.5 pixel radii of every direction (a unit bounded by wrong planes, e.g. I3's or
    I4's tilted the other way, leaves 3-8 radii uncovered and holds 20-40% too few)."""
    order = 5
    grid = directions(order, sym)
    g = len(symmetry_operators(sym))
    npix = n_pixels(order)
    assert 0.95 * npix / g <= len(grid) <= 1.05 * npix / g
    kept = direction_vectors(grid.rot, grid.tilt)
    every = direction_vectors(*direction_angles(torch.arange(npix), order))
    gap = _angles_to_nearest_image(kept, every, sym)
    assert float(gap.max()) <= 1.5 * max_pixel_radius(order)
    if len(grid) < SEAM_LIMIT:
        # and no two kept directions are mates closer than half a pixel radius
        cos_closest = torch.full((len(kept), len(kept)), -2.0, dtype=torch.float64)
        for r in symmetry_operators(sym):
            cos_closest = torch.maximum(cos_closest, kept @ (kept @ r).T)
        cos_closest.fill_diagonal_(-2.0)
        assert float(cos_closest.max()) <= math.cos(0.5 * max_pixel_radius(order)) + 1e-12


def test_cn_and_dn_ranges():
    grid = directions(3, "C6")
    assert float(grid.rot.min()) >= -30 and float(grid.rot.max()) <= 30
    grid = directions(3, "D3")
    assert float(grid.rot.min()) >= 30 and float(grid.rot.max()) <= 150
    assert float(grid.tilt.max()) <= 90


def test_psi_angles_and_sampling():
    psi, step = psi_angles(2)
    assert step == pytest.approx(15.0) == angular_sampling(2)
    assert len(psi) == 24 and float(psi[0]) == 0
    psi, step = psi_angles(1, psi_step=7.0)
    assert len(psi) == math.ceil(360 / 7) and step == pytest.approx(360 / 52)
    kids = oversampled_psi(torch.tensor([0.0, 30.0]), 30.0, 1)
    torch.testing.assert_close(kids, torch.tensor([[-7.5, 7.5], [22.5, 37.5]], dtype=torch.float64))


def test_oversampled_directions_are_nested_children():
    pix = torch.tensor([0, 5, 47])
    kids, rot, tilt = oversampled_directions(pix, 1, 1)
    assert torch.equal(kids, pix[:, None] * 4 + torch.arange(4)[None])  # k = 1: ascending
    r2, t2 = direction_angles(kids.reshape(-1), 2)
    torch.testing.assert_close(rot.reshape(-1), r2)
    kids2, _, _ = oversampled_directions(torch.tensor([0]), 0, 2)
    # k = 2: y outer, x inner (x in the even bits): 0, 1, 4, 5, 2, 3, 6, 7, 8, ...
    assert kids2[0, :8].tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert sorted(kids2[0].tolist()) == list(range(16))
