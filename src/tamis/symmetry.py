"""Point-group symmetry in RELION's conventions (``symmetries.cpp``): names and operators.

Chiral groups only (macromolecules are chiral): ``Cn`` and ``Dn`` (n = 1..99), ``T``, ``O`` and
the icosahedral settings ``I`` (= ``I2``), ``I1``, ``I3``, ``I4``; names are case-insensitive.
Each group is generated from RELION's symmetry axes (in map x, y, z) and closed under
multiplication, so the operator *set* is RELION's (``relion_refine --sym G
--print_symmetry_ops``, checked in the tests); the order is tamis's, with the identity first.

========  ====================================================================================
group     generators (axis)
========  ====================================================================================
Cn        n-fold along z
Dn        n-fold along z, 2-fold along x
T         3-fold along z, 2-fold along (0, 0.816496, 0.577350)
O         3-fold along (1, 1, 1), 4-fold along z
I, I2     2-fold along z, 5-fold along (0.525731, 0, 0.850651), 3-fold along (0, 0.356822, 0.934172)
I1        2-fold along x, 5-fold along (0.850651, 0, -0.525731), 3-fold along (0.934172, 0.356822, 0)
I3        2-fold along (-0.525731, 0, 0.850651), 5-fold along z,
          3-fold along (-0.491123, 0.356822, 0.794654)
I4        2-fold along (0.525731, 0, 0.850651), 5-fold along (0.894427, 0, 0.447214),
          3-fold along (0.491123, 0.356822, 0.794654)
========  ====================================================================================
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

import torch

from tamis.errors import TamisError

__all__ = ["canonical_symmetry", "symmetry_operators", "axis_rotation", "group_order"]

_ACHIRAL = re.compile(r"^(ci|cs|c\d{1,2}[vh]|s\d{1,2}|d\d{1,2}[vh]|td|th|oh|ih)$")

# (fold, axis) per group, RELION's axes as printed in symmetries.cpp's tables
_GENERATORS: dict[str, tuple[tuple[int, tuple[float, float, float]], ...]] = {
    "T": ((3, (0.0, 0.0, 1.0)), (2, (0.0, 0.816496, 0.577350))),
    "O": ((3, (1.0, 1.0, 1.0)), (4, (0.0, 0.0, 1.0))),
    "I1": (
        (2, (1.0, 0.0, 0.0)),
        (5, (0.850651, 0.0, -0.525731)),
        (3, (0.934172, 0.356822, 0.0)),
    ),
    "I2": (
        (2, (0.0, 0.0, 1.0)),
        (5, (0.525731, 0.0, 0.850651)),
        (3, (0.0, 0.356822, 0.934172)),
    ),
    "I3": (
        (2, (-0.525731, 0.0, 0.850651)),
        (5, (0.0, 0.0, 1.0)),
        (3, (-0.491123, 0.356822, 0.794654)),
    ),
    "I4": (
        (2, (0.525731, 0.0, 0.850651)),
        (5, (0.894427, 0.0, 0.447214)),
        (3, (0.491123, 0.356822, 0.794654)),
    ),
}


def canonical_symmetry(name: str) -> str:
    """RELION's group name, upper case (``c4`` -> ``C4``, ``I`` -> ``I2``); a clear error for a
    name RELION does not know or an achiral group."""
    key = str(name).strip().lower()
    if _ACHIRAL.match(key):
        raise TamisError(
            f"symmetry group '{name}' is achiral (mirror or inversion); macromolecules are "
            "chiral: use C<n>, D<n>, T, O or I, I1-I4"
        )
    m = re.fullmatch(r"([cd])(\d{1,2})", key)
    if m and int(m.group(2)) >= 1:
        return f"{m.group(1).upper()}{int(m.group(2))}"
    if key in ("t", "o", "i1", "i2", "i3", "i4"):
        return key.upper()
    if key == "i":
        return "I2"
    raise TamisError(
        f"unknown symmetry group '{name}' (RELION's names: C<n> or D<n> with n = 1-99, T, O, "
        "I (= I2), I1, I2, I3, I4)"
    )


def axis_rotation(axis: tuple[float, float, float], degrees: float) -> torch.Tensor:
    """The right-handed rotation by ``degrees`` about ``axis`` (normalised here), ``(3, 3)``
    float64 (Rodrigues' formula)."""
    u = torch.tensor(axis, dtype=torch.float64)
    u = u / torch.linalg.norm(u)
    t = math.radians(degrees)
    k = torch.tensor(
        [[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]], dtype=torch.float64
    )
    return torch.eye(3, dtype=torch.float64) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)


def _generators(group: str) -> list[tuple[int, tuple[float, float, float]]]:
    if group[0] in "CD" and group[1:].isdigit():
        gens = [(int(group[1:]), (0.0, 0.0, 1.0))]
        if group[0] == "D":
            gens.append((2, (1.0, 0.0, 0.0)))
        return gens
    return list(_GENERATORS[group])


@lru_cache(maxsize=64)
def _operators(group: str) -> tuple[tuple[float, ...], ...]:
    tol = 1e-4  # RELION's axes carry 6 digits: products agree to ~1e-6
    ops = torch.eye(3, dtype=torch.float64)[None]

    def add_new(cands: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
        for m in cands:  # in order, so the result does not depend on ties
            if float((ops - m).abs().amax((1, 2)).min()) > tol:
                ops = torch.cat([ops, m[None]])
        return ops

    for fold, axis in _generators(group):
        rots = torch.stack(
            [axis_rotation(axis, 360.0 * j / fold) for j in range(1, fold)] or [ops[0]]
        )
        ops = add_new(rots, ops)
    # close the group: all products of pairs until nothing new appears
    while True:
        prod = (ops[:, None] @ ops[None]).reshape(-1, 3, 3)
        far = (prod[:, None] - ops[None]).abs().amax((2, 3)).min(1).values > tol
        if not bool(far.any()):
            break
        ops = add_new(prod[far], ops)
        if len(ops) > 60:  # no chiral point group is larger
            raise RuntimeError(f"symmetry group {group} does not close")
    return tuple(tuple(o.reshape(-1).tolist()) for o in ops)


def symmetry_operators(
    name: str, *, dtype: torch.dtype = torch.float64, device=None
) -> torch.Tensor:
    """The rotation matrices ``(G, 3, 3)`` of the point group ``name`` (identity first)."""
    ops = _operators(canonical_symmetry(name))
    return torch.tensor(ops, dtype=dtype, device=device).reshape(-1, 3, 3)


def group_order(name: str) -> int:
    """The number of operators of the point group ``name``."""
    return len(_operators(canonical_symmetry(name)))
