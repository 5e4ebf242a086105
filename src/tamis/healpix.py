"""HEALPix pixel centres in the NESTED scheme (Gorski et al. 2005, ApJ 622:759), written from
the paper's pixelisation: 12 base faces of Nside x Nside pixels; a pixel's index holds its
face and its (x, y) position in the face with x in the even bits and y in the odd bits.

RELION orders its 3D directions by NESTED index at ``Nside = 2**order``
(``HealpixSampling::setOrientations``); :func:`pixel_centres` returns ``z = cos(theta)`` and
``phi`` in ``[0, 2 pi)`` the way RELION computes them (z and phi first, angles after), so
directions on the edges of an asymmetric unit fall on the same side as in RELION.
"""

from __future__ import annotations

import math

import torch

__all__ = ["n_pixels", "pixel_centres", "nest_to_xyf", "xyf_to_nest", "max_pixel_radius"]

# Per base face: the ring (in units of Nside) of its southernmost corner, and the longitude of
# its centre in units of pi/4 (the paper's jrll and jpll).
_FACE_RING = (2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4)
_FACE_PHI = (1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7)


def n_pixels(order: int) -> int:
    """``12 * Nside**2`` pixels at ``Nside = 2**order``."""
    return 12 * 4**order


def _spread_bits(v: torch.Tensor, bits: int) -> torch.Tensor:
    out = torch.zeros_like(v)
    for b in range(bits):
        out |= ((v >> b) & 1) << (2 * b)
    return out


def _compact_bits(v: torch.Tensor, bits: int) -> torch.Tensor:
    out = torch.zeros_like(v)
    for b in range(bits):
        out |= ((v >> (2 * b)) & 1) << b
    return out


def nest_to_xyf(pix: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NESTED indices -> (x, y, face) (int64)."""
    pix = torch.as_tensor(pix, dtype=torch.int64)
    per_face = 4**order
    face = pix // per_face
    ipf = pix % per_face
    return _compact_bits(ipf, order), _compact_bits(ipf >> 1, order), face


def xyf_to_nest(x: torch.Tensor, y: torch.Tensor, face: torch.Tensor, order: int) -> torch.Tensor:
    """(x, y, face) -> NESTED indices (int64)."""
    x, y, face = (torch.as_tensor(v, dtype=torch.int64) for v in (x, y, face))
    return face * 4**order + _spread_bits(x, order) + (_spread_bits(y, order) << 1)


def pixel_centres(pix: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NESTED pixel indices -> centres ``(z, phi)`` (float64; ``z = cos(theta)``, ``phi`` in
    ``[0, 2 pi)``)."""
    nside = 2**order
    npix = n_pixels(order)
    x, y, face = nest_to_xyf(pix, order)
    ring_face = torch.tensor(_FACE_RING, dtype=torch.int64)[face]
    phi_face = torch.tensor(_FACE_PHI, dtype=torch.int64)[face]
    jr = ring_face * nside - x - y - 1  # ring number, 1 .. 4 Nside - 1, from the north pole
    fact2 = 4.0 / npix
    fact1 = 2 * nside * fact2
    north = jr < nside
    south = jr > 3 * nside
    nr = torch.where(north, jr, torch.where(south, 4 * nside - jr, torch.full_like(jr, nside)))
    z = torch.where(
        north,
        1.0 - nr.double() ** 2 * fact2,
        torch.where(south, nr.double() ** 2 * fact2 - 1.0, (2 * nside - jr).double() * fact1),
    )
    # equatorial rings alternate between pixels starting at phi = 0 and half a pixel later
    kshift = torch.where(north | south, torch.zeros_like(jr), (jr - nside) & 1)
    jp = (phi_face * nr + x - y + 1 + kshift) // 2
    jp = torch.where(jp > 4 * nside, jp - 4 * nside, jp)
    jp = torch.where(jp < 1, jp + 4 * nside, jp)
    phi = (jp.double() - (kshift.double() + 1) * 0.5) * (0.5 * math.pi / nr.double())
    return z, phi


def max_pixel_radius(order: int) -> float:
    """The largest angular distance (radians) from a pixel centre to its corners, as HEALPix
    bounds it: between the centre at ``z = 2/3, phi = pi / (4 Nside)`` and the corner at
    ``z = 1 - (1 - 1/Nside)**2 / 3, phi = 0``."""
    nside = 2**order
    z1, p1 = 2.0 / 3.0, math.pi / (4 * nside)
    z2, p2 = 1.0 - (1.0 - 1.0 / nside) ** 2 / 3.0, 0.0

    def vec(z: float, p: float) -> tuple[float, float, float]:
        s = math.sqrt(max(0.0, 1.0 - z * z))
        return (s * math.cos(p), s * math.sin(p), z)

    a, b = vec(z1, p1), vec(z2, p2)
    dot = sum(u * v for u, v in zip(a, b, strict=True))
    return math.acos(max(-1.0, min(1.0, dot)))
