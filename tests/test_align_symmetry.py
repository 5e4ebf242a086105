"""Symmetry alignment (tamis.refine.align_symmetry) and the Fourier-space map tools it uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tamis.errors import TamisError
from tamis.geometry import euler_to_matrix, matrix_to_euler, random_euler_angles
from tamis.refine.align_symmetry import align_symmetry, asymmetry_scores
from tamis.refine.maps import centre_of_mass, flip_hand, rotate_volumes, shift_volume
from tamis.symmetry import symmetry_operators

N = 32
# an asymmetric unit of blobs: centre (x, y, z) in voxels from the box centre, sigma, amplitude
UNIT = [((5.0, 1.0, 3.0), 1.8, 1.0), ((3.0, -3.5, -2.0), 1.5, 0.7), ((8.0, 2.0, -5.0), 2.0, 0.5)]


def _density(pts: np.ndarray, sym: str) -> np.ndarray:
    """The group's copies of the unit's blobs, evaluated at points ``(..., 3)`` (x, y, z)."""
    out = np.zeros(pts.shape[:-1])
    for op in symmetry_operators(sym).numpy():
        for c, s, a in UNIT:
            d = pts - op @ np.array(c)
            out += a * np.exp(-(d**2).sum(-1) / (2 * s * s))
    return out


def _map(sym: str, rotation: np.ndarray | None = None) -> torch.Tensor:
    """The symmetric map in RELION's frame, or turned by ``rotation`` B: ``V(B^T r)``."""
    c = np.arange(N) - N // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    pts = np.stack([x, y, z], -1).astype(float)
    if rotation is not None:
        pts = pts @ rotation  # rows: (B^T r)^T = r^T B
    return torch.from_numpy(_density(pts, sym))


def _random_rotation(seed: int) -> torch.Tensor:
    a = random_euler_angles(1, torch.Generator().manual_seed(seed))[0]
    return euler_to_matrix(*a)


@pytest.mark.parametrize("sym, seed", [("C4", 1), ("D2", 2), ("C3", 3)])
def test_a_turned_symmetric_map_is_brought_back_to_relions_frame(sym: str, seed: int):
    b = _random_rotation(seed)
    turned = _map(sym, b.numpy())
    ops = symmetry_operators(sym)
    r_max = N // 2
    before = float(asymmetry_scores(turned, torch.eye(3)[None], ops, r_max=r_max)[0])
    res = align_symmetry(turned, sym, nr_uniform=300, box_size=N, keep_centre=True, seed=0)
    assert before > 0.1
    assert res.score < 0.03
    # the found A undoes B up to the group's normaliser: (A B) keeps the n-fold axis on +-z (Cn),
    # or permutes the three 2-folds of D2 (each row of A B one +-1); the local grid steps 2 deg
    a = euler_to_matrix(*torch.tensor(res.angles, dtype=torch.float64))
    ab = a @ b
    cos_tol = np.cos(np.deg2rad(6.0))
    if sym == "D2":
        assert bool((ab.abs().max(1).values > cos_tol).all())
    else:
        assert abs(float(ab[2, 2])) > cos_tol
    # and the aligned map is the original up to that turn: symmetric about RELION's axes
    aligned = res.volume.to(torch.float64)
    after = float(asymmetry_scores(aligned, torch.eye(3)[None], ops, r_max=r_max)[0])
    assert after < 0.03
    assert len(res.candidates) == 300 + 125


def test_apply_sym_returns_the_group_average_and_c1_copies():
    b = _random_rotation(4)
    turned = _map("C4", b.numpy())
    res = align_symmetry(turned, "C4", nr_uniform=200, box_size=N, keep_centre=True, apply_sym=True)
    ops = symmetry_operators("C4")
    assert float(asymmetry_scores(res.volume, torch.eye(3)[None], ops, r_max=N // 2)[0]) < 1e-3
    same = align_symmetry(turned, "c1")
    assert torch.equal(same.volume, turned.to(torch.float32))


def test_bad_input_is_one_clear_error():
    with pytest.raises(TamisError, match="symmetry"):
        align_symmetry(torch.zeros((8, 8, 8)), "C2v")
    with pytest.raises(TamisError, match="cubic"):
        align_symmetry(torch.zeros((8, 8, 6)), "C2")


def test_rotate_volumes_matches_the_analytic_rotation():
    b = _random_rotation(5)
    vol = _map("C1")
    got = rotate_volumes(vol, b[None])[0]
    ref = _map("C1", b.numpy())
    inside = torch.from_numpy(
        np.sum(np.stack(np.meshgrid(*[np.arange(N) - N // 2] * 3, indexing="ij")) ** 2, 0) < 13**2
    )
    err = (got - ref)[inside].norm() / ref[inside].norm()
    assert err < 0.03


def test_centre_shift_and_hand():
    vol = _map("C1")
    com = centre_of_mass(vol)
    moved = shift_volume(vol, -com)
    assert torch.allclose(centre_of_mass(moved), torch.zeros(3, dtype=torch.float64), atol=0.05)
    flipped = flip_hand(vol)
    c = np.arange(N) - N // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    mirror = torch.from_numpy(_density(np.stack([x, y, -z], -1).astype(float), "C1"))
    # slab 0 (z = -n/2) has no mirror inside the box and wraps
    assert torch.allclose(flipped[1:], mirror[1:], atol=1e-12)


def test_matrix_to_euler_inverts_euler_to_matrix():
    ang = random_euler_angles(500, torch.Generator().manual_seed(0))
    m = euler_to_matrix(*ang.T)
    back = matrix_to_euler(m)
    assert torch.allclose(euler_to_matrix(*back.T), m, atol=1e-12)
    assert torch.allclose(back, ang, atol=1e-9)
    # rotations about z alone come back as psi with rot = tilt = 0 (RELION's choice)
    z = matrix_to_euler(euler_to_matrix(*torch.tensor([30.0, 0.0, 20.0], dtype=torch.float64)))
    assert torch.allclose(z, torch.tensor([0.0, 0.0, 50.0], dtype=torch.float64), atol=1e-6)


def test_cli_aligns_the_largest_class_of_a_model_star(tmp_path):
    from typer.testing import CliRunner

    from tamis.cli.main import app
    from tamis.io.mrc import read_mrc, write_mrc
    from tamis.io.star import write_star

    turned = _map("C4", _random_rotation(6).numpy())
    write_mrc(tmp_path / "run_it200_class001.mrc", np.zeros((N, N, N)), 2.0, stack=False)
    write_mrc(tmp_path / "run_it200_class002.mrc", turned.numpy(), 2.0, stack=False)
    import pandas as pd

    classes = pd.DataFrame(
        {
            "rlnReferenceImage": ["run_it200_class001.mrc", "run_it200_class002.mrc"],
            "rlnClassDistribution": [0.3, 0.7],
        }
    )
    write_star({"model_classes": classes}, tmp_path / "run_it200_model.star")
    out = tmp_path / "aligned.mrc"
    r = CliRunner().invoke(
        app,
        ["align_symmetry", "--i", str(tmp_path / "run_it200_model.star"), "--o", str(out),
         "--sym", "C4", "--select_largest_class", "--box_size", "32", "--nr_uniform", "200",
         "--keep_centre"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "unsymmetric power" in r.output
    aligned, pixel = read_mrc(out)
    assert pixel == pytest.approx(2.0)
    ops = symmetry_operators("C4")
    vol = torch.from_numpy(aligned).to(torch.float64)
    assert float(asymmetry_scores(vol, torch.eye(3)[None], ops, r_max=N // 2)[0]) < 0.03
    # a model.star without a selection flag, and a symmetry RELION does not know: one line each
    r = CliRunner().invoke(
        app, ["align_symmetry", "--i", str(tmp_path / "run_it200_model.star"), "--sym", "C4"]
    )
    assert r.exit_code != 0 and "--select_largest_class" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(
        app, ["align_symmetry", "--i", str(out), "--o", str(tmp_path / "x.mrc"), "--sym", "Q7"]
    )
    assert r.exit_code != 0 and "Traceback" not in r.output
