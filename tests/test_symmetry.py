"""Point groups against RELION's printed operators and the group axioms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tamis.errors import TamisError
from tamis.symmetry import axis_rotation, canonical_symmetry, group_order, symmetry_operators

ORACLE = json.loads((Path(__file__).parent / "data" / "relion_symmetry_ops.json").read_text())


@pytest.mark.parametrize("name", sorted(ORACLE))
def test_operator_set_is_relions(name):
    ops = symmetry_operators(name).numpy()
    ref = np.array(ORACLE[name])
    assert len(ops) == len(ref)
    # the same set: every RELION operator matches exactly one of ours (RELION prints 5+ digits)
    dist = np.abs(ref[:, None] - ops[None]).max(axis=(2, 3))
    assert (dist.min(1) < 2e-4).all()
    assert ((dist < 2e-4).sum(1) == 1).all()


@pytest.mark.parametrize(
    "name, order",
    [("C1", 1), ("c5", 5), ("C12", 12), ("D1", 2), ("d3", 6), ("D11", 22), ("T", 12), ("O", 24)]
    + [(g, 60) for g in ("I", "I1", "I2", "I3", "I4")],
)
def test_group_axioms(name, order):
    ops = symmetry_operators(name)
    assert len(ops) == order == group_order(name)
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(ops[0], eye)
    torch.testing.assert_close(ops @ ops.transpose(1, 2), eye.expand_as(ops))
    torch.testing.assert_close(torch.linalg.det(ops), torch.ones(order, dtype=torch.float64))
    # closure and inverses, with a slow loop over every pair
    flat = ops.reshape(order, 9)
    for a in ops:
        inv_found = False
        for b in ops:
            d = (flat - (a @ b).reshape(1, 9)).abs().max(1).values
            assert float(d.min()) < 1e-5  # RELION's axes have 6 digits
            inv_found |= bool(torch.allclose(a @ b, eye, atol=1e-5))
        assert inv_found


def test_axes_are_where_relion_puts_them():
    # D2: 2-folds along x, y and z
    for axis in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):
        assert _contains(symmetry_operators("D2"), axis_rotation(axis, 180))
    # O: 4-folds along x, y, z; I2: 2-folds along x, y, z; I3: 5-fold along z
    for axis in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):
        assert _contains(symmetry_operators("O"), axis_rotation(axis, 90))
        assert _contains(symmetry_operators("I"), axis_rotation(axis, 180))
    assert _contains(symmetry_operators("I3"), axis_rotation((0, 0, 1), 72))
    assert not _contains(symmetry_operators("I2"), axis_rotation((0, 0, 1), 72))


def _contains(ops: torch.Tensor, m: torch.Tensor) -> bool:
    return bool(((ops - m).abs().amax((1, 2)) < 1e-5).any())


def test_axis_rotation_is_right_handed():
    r = axis_rotation((0, 0, 1), 90)
    torch.testing.assert_close(
        r @ torch.tensor([1.0, 0, 0], dtype=torch.float64),
        torch.tensor([0.0, 1, 0], dtype=torch.float64),
    )


@pytest.mark.parametrize("name", ["X5", "C0", "C100", "I5", "Dn", "", "c4v", "Oh", "Ci"])
def test_bad_names_are_one_clear_error(name):
    with pytest.raises(TamisError, match="symmetry group"):
        canonical_symmetry(name)


def test_canonical_names():
    assert canonical_symmetry("c4") == "C4"
    assert canonical_symmetry(" i ") == "I2"
    assert canonical_symmetry("d07") == "D7"
