"""RELION's 3D orientation grid (``HealpixSampling``): HEALPix directions (rot, tilt) cut to one
asymmetric unit of the point group, psi angles, and their oversampled children.

- Directions: NESTED HEALPix pixels at ``Nside = 2**order`` in index order; ``rot = phi`` wrapped
  into (-180, 180], ``tilt = acos(z)``, in degrees.
- psi: ``nr_psi = ceil(360 / psi_step)`` angles ``j * 360 / nr_psi`` (default step
  ``360 / (6 Nside)``, the directions' angular sampling).
- Asymmetric unit (``removeSymmetryEquivalentPoints``): RELION's geometric tests per group (rot
  and tilt ranges for Cn and Dn; half spaces bounded by planes through symmetry axes for T, O and
  I), then, when fewer than 4,000 directions remain, a pass in index order that drops a
  direction within half a pixel radius of a symmetry image of one already kept (the seams).
- Oversampling by ``k``: a direction's ``4**k`` NESTED descendants at ``order + k``, visited
  with y outer and x inner within the face; each psi's ``2**k`` children
  ``psi - step/2 + (m + 1/2) step / 2**k``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tamis.geometry import euler_to_matrix
from tamis.healpix import max_pixel_radius, n_pixels, nest_to_xyf, pixel_centres, xyf_to_nest
from tamis.symmetry import canonical_symmetry, symmetry_operators

__all__ = [
    "DirectionGrid",
    "direction_angles",
    "direction_vectors",
    "asymmetric_unit",
    "directions",
    "psi_angles",
    "angular_sampling",
    "oversampled_directions",
    "oversampled_psi",
]

#: RELION corrects the seams of the asymmetric unit only below this many directions.
SEAM_LIMIT = 4000

# Plane normals bounding the asymmetric unit (a direction d is kept when d . n >= 0 for all):
_T_NORMALS = ((-0.942809, 0.0, 0.0), (0.471405, 0.272165, 0.7698), (0.471404, 0.816497, 0.0))
_O_NORMALS = ((0.0, -1.0, 1.0), (1.0, 1.0, 0.0), (-1.0, 1.0, 0.0))
_I2_NORMALS = (
    (0.0, 1.0, 0.0),
    (-0.4999999839058737, -0.8090170074556163, 0.3090169861701543),
    (0.4999999839058737, -0.8090170074556163, 0.3090169861701543),
)
# I4's own normals (kept when d . n <= 0), before its tilt of -31.7174745559 degrees
_I4_NORMALS = (
    (0.0, 0.0, 1.0),
    (0.187592467856686, -0.303530987314591, -0.491123477863004),
    (0.187592467856686, 0.303530987314591, -0.491123477863004),
)
_I_TILT = {"I1": 90.0, "I3": 31.7174745559, "I4": -31.7174745559}


@dataclass(frozen=True)
class DirectionGrid:
    """Directions of one HEALPix order in an asymmetric unit: NESTED ``pixel`` indices and
    their ``rot``, ``tilt`` (degrees, float64), in RELION's order."""

    order: int
    symmetry: str
    pixel: torch.Tensor
    rot: torch.Tensor
    tilt: torch.Tensor

    def __len__(self) -> int:
        return len(self.pixel)


def direction_angles(pixel: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RELION's (rot, tilt) in degrees of NESTED pixels: rot in (-180, 180], tilt in [0, 180]."""
    z, phi = pixel_centres(pixel, order)
    rot = torch.rad2deg(phi)
    rot = torch.where(rot > 180.0, rot - 360.0, rot)
    tilt = torch.rad2deg(torch.arccos(z.clamp(-1.0, 1.0)))
    return rot, tilt


def direction_vectors(rot: torch.Tensor, tilt: torch.Tensor) -> torch.Tensor:
    """Projection directions ``(sin tilt cos rot, sin tilt sin rot, cos tilt)``, ``(..., 3)``
    (RELION's ``Euler_angles2direction``: the third row of the rotation matrix)."""
    r, t = torch.deg2rad(rot), torch.deg2rad(tilt)
    return torch.stack([t.sin() * r.cos(), t.sin() * r.sin(), t.cos()], dim=-1)


def _half_spaces(d: torch.Tensor, normals, tilt: float | None = None) -> torch.Tensor:
    n = torch.tensor(normals, dtype=torch.float64)
    if tilt is not None:
        a = euler_to_matrix(*(torch.tensor(v, dtype=torch.float64) for v in (0.0, tilt, 0.0)))
        n = n @ a.T  # A n for each normal
    n = n / torch.linalg.norm(n, dim=1, keepdim=True)
    return d @ n.T  # (N, 3 normals)


def asymmetric_unit(rot: torch.Tensor, tilt: torch.Tensor, symmetry: str) -> torch.Tensor:
    """RELION's geometric test: which directions lie in the point group's asymmetric unit
    (bool ``(N,)``); the seams are left to :func:`directions`."""
    g = canonical_symmetry(symmetry)
    if g[0] == "C":
        n = int(g[1:])
        return (rot >= -180.0 / n) & (rot <= 180.0 / n)
    if g[0] == "D":
        n = int(g[1:])
        if n == 1:
            return tilt <= 90.0
        return (rot >= 90.0 - 180.0 / n) & (rot <= 90.0 + 180.0 / n) & (tilt <= 90.0)
    d = direction_vectors(rot, tilt)
    if g == "T":
        pre = ((rot >= 90.0) & (rot <= 150.0)) | (rot == 0.0)
        return pre & (_half_spaces(d, _T_NORMALS) >= 0).all(1)
    if g == "O":
        pre = ((rot >= 45.0) & (rot <= 135.0) & (tilt <= 90.0)) | (rot == 0.0)
        return pre & (_half_spaces(d, _O_NORMALS) >= 0).all(1)
    if g == "I2":
        return (_half_spaces(d, _I2_NORMALS) >= 0).all(1)
    if g == "I4":
        return (_half_spaces(d, _I4_NORMALS, _I_TILT["I4"]) <= 0).all(1)
    return (_half_spaces(d, _I2_NORMALS, _I_TILT[g]) >= 0).all(1)  # I1, I3


def directions(order: int, symmetry: str = "C1") -> DirectionGrid:
    """RELION's directions at ``order`` in one asymmetric unit of ``symmetry``."""
    g = canonical_symmetry(symmetry)
    pixel = torch.arange(n_pixels(order))
    rot, tilt = direction_angles(pixel, order)
    keep = asymmetric_unit(rot, tilt, g)
    pixel, rot, tilt = pixel[keep], rot[keep], tilt[keep]
    if len(pixel) < SEAM_LIMIT:
        d = direction_vectors(rot, tilt)  # (N, 3)
        ops = symmetry_operators(g)  # (G, 3, 3)
        images = torch.einsum("gji,nj->ngi", ops, d)  # R^T d for every operator: (N, G, 3)
        cos_max = math.cos(0.5 * max_pixel_radius(order))
        # conflict[i, k]: direction i is within half a pixel radius of an image of direction k
        conflict = (torch.einsum("ngi,mi->mng", images, d) > cos_max).any(-1)
        kept = torch.zeros(len(pixel), dtype=torch.bool)
        for i in range(len(pixel)):  # in index order: the first of a set of mates stays
            kept[i] = not bool((conflict[i, :i] & kept[:i]).any())
        pixel, rot, tilt = pixel[kept], rot[kept], tilt[kept]
    return DirectionGrid(order=order, symmetry=g, pixel=pixel, rot=rot, tilt=tilt)


def angular_sampling(order: int, oversampling: int = 0) -> float:
    """RELION's angular step in degrees at ``order`` (``360 / (6 * 2**(order + oversampling))``)."""
    return 360.0 / (6 * 2 ** (order + oversampling))


def psi_angles(order: int, psi_step: float | None = None) -> tuple[torch.Tensor, float]:
    """The psi angles (degrees, float64) and their step: ``ceil(360 / psi_step)`` angles from 0
    (default step: :func:`angular_sampling`)."""
    step = angular_sampling(order) if psi_step is None or psi_step <= 0 else float(psi_step)
    n = math.ceil(360.0 / step)
    step = 360.0 / n
    return torch.arange(n, dtype=torch.float64) * step, step


def oversampled_directions(
    pixel: torch.Tensor, order: int, oversampling: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The children of NESTED ``pixel`` ``(N,)`` at ``order + oversampling``: their NESTED
    indices and (rot, tilt), ``(N, 4**oversampling)`` each, y outer and x inner as RELION
    visits them."""
    f = 2**oversampling
    x, y, face = nest_to_xyf(pixel, order)
    j, i = torch.meshgrid(torch.arange(f), torch.arange(f), indexing="ij")  # y outer, x inner
    cx = (x[:, None] * f + i.reshape(1, -1)).reshape(-1)
    cy = (y[:, None] * f + j.reshape(1, -1)).reshape(-1)
    cf = face.repeat_interleave(f * f)
    kids = xyf_to_nest(cx, cy, cf, order + oversampling)
    rot, tilt = direction_angles(kids, order + oversampling)
    shape = (len(pixel), f * f)
    return kids.reshape(shape), rot.reshape(shape), tilt.reshape(shape)


def oversampled_psi(psi: torch.Tensor, step: float, oversampling: int) -> torch.Tensor:
    """Each psi's ``2**oversampling`` children ``psi - step/2 + (m + 1/2) step / 2**k``,
    ``(P, 2**k)`` (not wrapped: RELION does not wrap them in 3D)."""
    f = 2**oversampling
    m = torch.arange(f, dtype=torch.float64)
    return psi[:, None] - step / 2 + (m[None] + 0.5) * step / f
