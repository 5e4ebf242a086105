"""Rotations in RELION's convention (``euler.cpp``): ZYZ Euler angles (rot, tilt, psi) in degrees.

``euler_to_matrix(rot, tilt, psi)`` is RELION's ``Euler_angles2matrix``. A projection at those
angles samples the 3D Fourier transform of the map at ``A^T k`` for 2D frequencies ``k = (kx, ky, 0)``
(RELION's ``Projector::project``); in 2D, ``A(psi) = [[cos, sin], [-sin, cos]]`` and the model at
angle psi is ``F_ref(A^T k)``.
"""

from __future__ import annotations

import torch

__all__ = ["euler_to_matrix", "matrix_to_euler", "random_euler_angles", "rotation_2d"]


def euler_to_matrix(rot: torch.Tensor, tilt: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """RELION's ``Euler_angles2matrix``: angles in degrees ``(...,)`` -> matrices ``(..., 3, 3)``."""
    a, b, g = torch.deg2rad(rot), torch.deg2rad(tilt), torch.deg2rad(psi)
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
        [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
        [sc, ss, cb],
    ]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def matrix_to_euler(a: torch.Tensor) -> torch.Tensor:
    """RELION's ``Euler_matrix2angles``: matrices ``(..., 3, 3)`` -> angles ``(..., 3)`` (rot, tilt,
    psi) in degrees, rot and psi in (-180, 180], tilt in [0, 180]; a rotation about z alone
    (tilt 0 or 180) is given as psi with rot 0."""
    a = a.to(torch.float64)
    eps = torch.finfo(torch.float32).eps
    abs_sb = torch.sqrt(a[..., 0, 2] ** 2 + a[..., 1, 2] ** 2)
    gamma = torch.atan2(a[..., 1, 2], -a[..., 0, 2])
    alpha = torch.atan2(a[..., 2, 1], a[..., 2, 0])
    sign_sb = torch.where(
        gamma.sin().abs() < eps,
        torch.sign(-a[..., 0, 2] / gamma.cos()),
        torch.where(gamma.sin() > 0, torch.sign(a[..., 1, 2]), -torch.sign(a[..., 1, 2])),
    )
    beta = torch.atan2(sign_sb * abs_sb, a[..., 2, 2])
    # degenerate: a rotation about z (tilt 0) or a flip (tilt 180)
    degenerate = abs_sb <= 16 * eps
    up = a[..., 2, 2] > 0
    g_deg = torch.where(
        up, torch.atan2(-a[..., 1, 0], a[..., 0, 0]), torch.atan2(a[..., 1, 0], -a[..., 0, 0])
    )
    alpha = torch.where(degenerate, torch.zeros_like(alpha), alpha)
    beta = torch.where(degenerate, torch.where(up, 0.0, torch.pi), beta)
    gamma = torch.where(degenerate, g_deg, gamma)
    return torch.rad2deg(torch.stack([alpha, beta, gamma], dim=-1))


def rotation_2d(psi: torch.Tensor) -> torch.Tensor:
    """RELION's 2D rotation ``[[cos psi, sin psi], [-sin psi, cos psi]]``, psi in degrees."""
    g = torch.deg2rad(psi)
    c, s = g.cos(), g.sin()
    return torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)


def random_euler_angles(
    n: int, generator: torch.Generator, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``(n, 3)`` angles (rot, tilt, psi) in degrees, uniformly distributed over SO(3)."""
    u = torch.rand((n, 3), generator=generator, dtype=dtype)
    rot = 360.0 * u[:, 0] - 180.0
    tilt = torch.rad2deg(torch.arccos(1.0 - 2.0 * u[:, 1]))
    psi = 360.0 * u[:, 2] - 180.0
    return torch.stack([rot, tilt, psi], dim=-1)
