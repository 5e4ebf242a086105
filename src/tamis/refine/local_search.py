"""Local angular searches (RELION's ``HealpixSampling::selectOrientationsWithNonZeroPriorProbability``
for single particles): each particle is compared only with the coarse orientations near its
previous one, weighted by a Gaussian prior on the angular distance.

- Directions: the angle between the particle's prior direction and a coarse direction, the
  smallest over the direction's symmetry mates; kept below ``3 sigma``, weight
  ``exp(-d² / 2 sigma²)`` normalised over the kept ones.
- psi: ``|psi - psi_prior|`` wrapped to at most 180 degrees; kept below ``3 sigma_psi``, weight
  as above. (Like RELION, the psi test ignores the rot-psi coupling near tilt 0.)
- No direction (psi) within ``3 sigma``: the nearest one alone.
- The orientation's prior is the product of the two (``exp_directions_prior * exp_psi_prior``)
  and is shared by the orientation's oversampled children.

The E-step evaluates a batch against the union of its particles' neighbourhoods with ``-inf``
outside each particle's own (:func:`local_priors`), which is exact; batches are made of particles
with nearby prior orientations (:func:`orientation_order`) so that the union stays small.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tamis.orientations import direction_vectors, directions
from tamis.refine.sampling import Sampling3D
from tamis.symmetry import symmetry_operators

__all__ = ["local_priors", "orientation_order", "direction_distances"]


def direction_distances(
    rot: torch.Tensor, tilt: torch.Tensor, grid_rot: torch.Tensor, grid_tilt: torch.Tensor, sym: str
) -> torch.Tensor:
    """Angles (degrees) ``(B, D)`` between the directions (rot, tilt) ``(B,)`` and the grid
    directions ``(D,)``, the smallest over each grid direction's symmetry mates."""
    p = direction_vectors(rot.to(torch.float64), tilt.to(torch.float64))  # (B, 3)
    g = direction_vectors(grid_rot.to(torch.float64), grid_tilt.to(torch.float64))  # (D, 3)
    ops = symmetry_operators(sym).to(torch.float64)  # (G, 3, 3)
    mates = torch.einsum("gij,dj->gdi", ops, g)  # (G, D, 3)
    cos = torch.einsum("bi,gdi->bgd", p, mates).amax(1)  # (B, D)
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))


def _log_gauss(dist: torch.Tensor, sigma: float) -> torch.Tensor:
    """Normalised log-weights ``-d²/2σ²`` of the entries within ``3σ`` per row, ``-inf`` beyond;
    a row with none keeps its nearest entry alone (log-weight 0)."""
    keep = dist < 3.0 * sigma
    nearest = dist.argmin(1)
    none = ~keep.any(1)
    keep[none, nearest[none]] = True
    logw = torch.where(keep, -(dist**2) / (2.0 * sigma**2), -math.inf)
    return logw - torch.logsumexp(logw, 1, keepdim=True)


def local_priors(
    angles: np.ndarray, sampling: Sampling3D, sigma_ang: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """For particles with prior (rot, tilt, psi) ``angles`` ``(B, 3)`` (degrees): the union of
    their coarse neighbourhoods as coarse orientation indices ``(U,)`` (sorted) and each
    particle's log-prior over them ``(B, U)`` (float64, ``-inf`` outside its neighbourhood;
    ``sigma_ang`` on rot, tilt and psi alike, as auto-refine sets them)."""
    a = torch.as_tensor(angles, dtype=torch.float64)
    grot, gtilt = sampling.direction_angles
    ddir = direction_distances(a[:, 0], a[:, 1], grot, gtilt, sampling.sym)  # (B, D)
    dpsi = (a[:, 2:3] - sampling.psi[None].to(torch.float64) + 180.0) % 360.0 - 180.0
    ldir = _log_gauss(ddir, sigma_ang)  # (B, D)
    lpsi = _log_gauss(dpsi.abs(), sigma_ang)  # (B, P)
    dirs = torch.nonzero(torch.isfinite(ldir).any(0)).squeeze(1)
    psis = torch.nonzero(torch.isfinite(lpsi).any(0)).squeeze(1)
    # the union is taken over (direction, psi) pairs that some particle keeps
    both = torch.isfinite(ldir[:, dirs])[:, :, None] & torch.isfinite(lpsi[:, psis])[:, None, :]
    used = both.any(0)  # (Du, Pu)
    di, pi = torch.nonzero(used, as_tuple=True)
    ids = dirs[di] * sampling.nr_psi + psis[pi]
    logp = ldir[:, dirs[di]] + lpsi[:, psis[pi]]
    order = torch.argsort(ids)
    return ids[order], logp[:, order]


def orientation_order(angles: np.ndarray, sym: str, order: int = 3) -> np.ndarray:
    """An order of the particles that keeps nearby prior orientations together: by the nearest
    direction of the HEALPix grid at ``order`` (NESTED, so neighbouring indices are mostly
    neighbouring directions), then by psi."""
    a = torch.as_tensor(angles, dtype=torch.float64)
    grid = directions(order, sym)
    chunk = 4096  # bounds the (particles, directions, mates) temporaries
    cell = np.concatenate(
        [
            direction_distances(a[s : s + chunk, 0], a[s : s + chunk, 1], grid.rot, grid.tilt, sym)
            .argmin(1)
            .numpy()
            for s in range(0, len(a), chunk)
        ]
    )
    return np.lexsort((np.mod(np.asarray(angles, dtype=float)[:, 2], 360.0), cell))
