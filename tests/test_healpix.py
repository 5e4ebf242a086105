"""HEALPix NESTED centres against the ring formulas of the paper, written out as slow loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tamis.healpix import max_pixel_radius, n_pixels, nest_to_xyf, pixel_centres, xyf_to_nest


def ring_centres(nside: int) -> list[tuple[float, float]]:
    """Every pixel centre (z, phi) ring by ring (Gorski et al. 2005, eqs. 4-9)."""
    out = []
    for i in range(1, 4 * nside):
        if i < nside:  # north polar cap
            z = 1 - i * i / (3 * nside * nside)
            out += [(z, math.pi / (2 * i) * (j - 0.5)) for j in range(1, 4 * i + 1)]
        elif i <= 3 * nside:  # equatorial belt
            z = 4 / 3 - 2 * i / (3 * nside)
            s = (i - nside + 1) % 2
            out += [(z, math.pi / (2 * nside) * (j - s / 2)) for j in range(1, 4 * nside + 1)]
        else:  # south polar cap, the mirror of the north
            k = 4 * nside - i
            z = -(1 - k * k / (3 * nside * nside))
            out += [(z, math.pi / (2 * k) * (j - 0.5)) for j in range(1, 4 * k + 1)]
    return out


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_nested_centres_are_the_ring_centres(order):
    nside = 2**order
    z, phi = pixel_centres(torch.arange(n_pixels(order)), order)
    assert len(z) == 12 * nside * nside
    assert float(phi.min()) >= 0 and float(phi.max()) < 2 * math.pi
    ours = np.stack([z.numpy(), np.cos(phi.numpy()), np.sin(phi.numpy())], 1)
    ref = np.array([(zz, math.cos(p), math.sin(p)) for zz, p in ring_centres(nside)])
    assert len(ref) == len(ours)
    # one-to-one: every ring centre is exactly one nested centre
    d = np.abs(ref[:, None] - ours[None]).max(-1)
    assert (d.min(1) < 1e-12).all()
    assert ((d < 1e-12).sum(1) == 1).all()


def test_base_faces():
    z, phi = pixel_centres(torch.arange(12), 0)
    np.testing.assert_allclose(z.numpy(), [2 / 3] * 4 + [0] * 4 + [-2 / 3] * 4, atol=1e-15)
    expected = [1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7]
    np.testing.assert_allclose(phi.numpy(), [e * math.pi / 4 for e in expected], atol=1e-15)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_children_are_inside_their_parent(order):
    """The 4^k NESTED descendants p * 4^k ... of pixel p lie within HEALPix's bound on a pixel's
    radius around p's centre, and xyf is the inverse of the index."""
    pix = torch.arange(n_pixels(order))
    x, y, f = nest_to_xyf(pix, order)
    assert torch.equal(xyf_to_nest(x, y, f, order), pix)
    zp, pp = pixel_centres(pix, order)
    for k in (1, 2):
        kids = (pix[:, None] * 4**k + torch.arange(4**k)[None]).reshape(-1)
        zc, pc = pixel_centres(kids, order + k)

        def vec(z, p):
            s = torch.sqrt((1 - z * z).clamp(min=0))
            return torch.stack([s * torch.cos(p), s * torch.sin(p), z], -1)

        parent = vec(zp, pp).repeat_interleave(4**k, 0)
        ang = torch.arccos((parent * vec(zc, pc)).sum(-1).clamp(-1, 1))
        assert float(ang.max()) <= max_pixel_radius(order) + 1e-12
