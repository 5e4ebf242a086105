"""Find a point group's axes in a map and rotate the map into RELION's standard frame for that
group (``relion_align_symmetry``'s role).

For a candidate rotation ``A`` the map is turned to ``V(A^T r)`` and scored by the share of its
power that is *not* symmetric, ``sum_k |F_A(k) - 1/G sum_g F_A(R_g k)|² / sum_k |F_A(k)|²``
(RELION scores the unnormalised real-space sum of the same difference; by Parseval that is
this numerator). Candidates: ``nr_uniform`` orientations uniform on SO(3) (seeded, unlike
RELION's clock-seeded draw), then a 5 x 5 x 5 grid of ``+-{0, 1, 2} x step`` degrees about the
best one. Frequencies up to the Nyquist of a ``box_size`` working box are used (RELION
Fourier-crops the map to that box).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tamis.errors import InputFileError, TamisError
from tamis.geometry import euler_to_matrix, matrix_to_euler, random_euler_angles
from tamis.io.mrc import read_mrc, write_mrc
from tamis.io.star import read_star
from tamis.refine.maps import (
    HalfGrid,
    centre_of_mass,
    map_grid,
    rotate_volumes,
    sample,
    shift_volume,
    symmetrise_map,
)
from tamis.symmetry import canonical_symmetry, symmetry_operators

__all__ = [
    "SymmetryAlignment",
    "asymmetry_scores",
    "align_symmetry",
    "select_class_map",
    "align_symmetry_file",
]


@dataclass
class SymmetryAlignment:
    """The result: the aligned map, the rotation that aligns it and every candidate's score."""

    volume: torch.Tensor  # (n, n, n) float32, V(A^T r) (symmetrised with apply_sym)
    angles: tuple[float, float, float]  # rot, tilt, psi of A (degrees)
    score: float  # unsymmetric share of the power at the best rotation (0 = symmetric)
    shift: tuple[float, float, float]  # the re-centring applied first (x, y, z voxels)
    candidates: torch.Tensor = field(repr=False)  # (C, 4): rot, tilt, psi, score


def asymmetry_scores(
    volume: torch.Tensor,
    rotations: torch.Tensor,
    operators: torch.Tensor,
    *,
    r_max: float,
    pad: int = 2,
    chunk: int = 8,
) -> torch.Tensor:
    """Per rotation ``(R, 3, 3)``: the share of the rotated map's power (``|k| <= r_max``) that
    the group average over ``operators`` ``(G, 3, 3)`` (the identity among them) does not keep;
    ``(R,)`` float64."""
    hg = HalfGrid.create(volume.shape[-1], r_max, device=volume.device)
    grid = map_grid(volume, pad=pad)
    ops = operators.to(volume.device, torch.float64)
    eye = torch.eye(3, dtype=torch.float64, device=ops.device)
    ident = torch.nonzero(torch.isclose(ops, eye).flatten(1).all(1)).squeeze(1)
    if len(ident) != 1:
        raise ValueError("the operators must hold the identity once")
    k_ops = torch.einsum("gij,pj->gpi", ops, hg.k)  # R_g k, (G, P, 3)
    out = torch.empty(rotations.shape[0], dtype=torch.float64, device=volume.device)
    for s in range(0, rotations.shape[0], chunk):
        rot = rotations[s : s + chunk].to(volume.device, torch.float64)
        # F_A(R_g k) = F(A^T R_g k)
        q = pad * torch.einsum("rji,gpj->rgpi", rot, k_ops)
        f = sample(grid, q)  # (r, G, P)
        turned = f[:, int(ident)]  # F_A(k)
        num = (hg.mult * (turned - f.mean(1)).abs() ** 2).sum(1)
        den = (hg.mult * turned.abs() ** 2).sum(1).clamp(min=1e-300)
        out[s : s + len(rot)] = num / den
    return out


def align_symmetry(
    volume: torch.Tensor,
    sym: str,
    *,
    nr_uniform: int = 400,
    box_size: int = 64,
    local_search_step: float = 2.0,
    keep_centre: bool = False,
    only_rot: bool = False,
    apply_sym: bool = False,
    pad: int = 2,
    seed: int = 0,
) -> SymmetryAlignment:
    """Rotate ``volume`` ``(n, n, n)`` so the axes of point group ``sym`` lie as RELION defines
    them (Cn and Dn: n-fold on z; see :mod:`tamis.symmetry`). In C1 the map is returned as it is
    (RELION copies it)."""
    name = canonical_symmetry(sym)
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise TamisError(f"align_symmetry needs a cubic map, got shape {tuple(volume.shape)}")
    vol = volume.to(torch.float64)
    if name == "C1":
        return SymmetryAlignment(
            volume.to(torch.float32), (0.0, 0.0, 0.0), 0.0, (0.0, 0.0, 0.0), torch.zeros((0, 4))
        )
    if box_size % 2:
        raise TamisError(f"--box_size must be even, got {box_size}")
    shift = torch.zeros(3, dtype=torch.float64)
    if not keep_centre:
        shift = -centre_of_mass(vol)
        vol = shift_volume(vol, shift)
    n = vol.shape[-1]
    r_max = min(n, box_size) // 2
    ops = symmetry_operators(name)
    gen = torch.Generator().manual_seed(seed)
    ang = random_euler_angles(nr_uniform, gen)
    if only_rot:
        ang[:, 1:] = 0.0
    scores = asymmetry_scores(vol, euler_to_matrix(*ang.T), ops, r_max=r_max, pad=pad)
    best = ang[int(scores.argmin())]
    # local refinement: +-{0, 1, 2} steps in each angle (rot only with only_rot)
    d = torch.arange(-2, 3, dtype=torch.float64) * local_search_step
    if only_rot:
        grid = torch.stack([best[0] + d, torch.zeros(5), torch.zeros(5)], 1).to(torch.float64)
    else:
        grid = torch.stack(torch.meshgrid(d, d, d, indexing="ij"), -1).reshape(-1, 3) + best
    local = asymmetry_scores(vol, euler_to_matrix(*grid.T), ops, r_max=r_max, pad=pad)
    i = int(local.argmin())
    a = euler_to_matrix(*grid[i])
    out = rotate_volumes(vol, a[None], pad=pad)[0]
    if apply_sym:
        out = symmetrise_map(out, ops, pad=pad)
    angles = matrix_to_euler(a)
    cands = torch.cat(
        [torch.cat([ang, scores[:, None]], 1), torch.cat([grid, local[:, None]], 1)], 0
    )
    return SymmetryAlignment(
        volume=out.to(torch.float32),
        angles=tuple(float(x) for x in angles),
        score=float(local[i]),
        shift=tuple(float(x) for x in shift),
        candidates=cands,
    )


def select_class_map(model_star: str | Path, how: str = "largest") -> Path:
    """The map of a ``_model.star``'s largest class (``rlnClassDistribution``, first on ties:
    RELION's ``--select_largest_class``) or highest-resolution class
    (``rlnEstimatedResolution``, ``--select_highest_resol``); the path as written, resolved
    against the project directory or the STAR file's folder."""
    path = Path(model_star)
    blocks = read_star(path)
    table = blocks.get("model_classes")
    if table is None or "rlnReferenceImage" not in getattr(table, "columns", ()):
        raise InputFileError(path, "has no model_classes table with rlnReferenceImage")
    column = "rlnClassDistribution" if how == "largest" else "rlnEstimatedResolution"
    if column not in table.columns:
        raise InputFileError(path, f"model_classes has no {column}")
    values = table[column].astype(float).to_numpy()
    i = int(values.argmax()) if how == "largest" else int(values.argmin())
    name = str(table["rlnReferenceImage"].iloc[i]).split("@")[-1]
    for candidate in (Path(name), path.parent / Path(name).name):
        if candidate.is_file():
            return candidate
    raise InputFileError(path, f"class map {name} not found")


def align_symmetry_file(
    i: str | Path,
    o: str | Path,
    sym: str,
    *,
    select: str | None = None,
    angpix: float | None = None,
    **options,
) -> SymmetryAlignment:
    """``relion_align_symmetry``: read a map (or a ``_model.star`` with ``select`` "largest" or
    "highest_resol"), align it (:func:`align_symmetry`), write the result to ``o`` (atomically,
    with the map's pixel size). In C1 the map is copied unchanged."""
    src = Path(i)
    if src.suffix == ".star":
        if select is None:
            raise TamisError(
                f"{src}: a model.star needs --select_largest_class or --select_highest_resol"
            )
        src = select_class_map(src, select)
    data, pixel = read_mrc(src)
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputFileError(src, f"is not a cubic 3D map (shape {data.shape})")
    result = align_symmetry(torch.from_numpy(data), sym, **options)
    write_mrc(o, result.volume.numpy(), angpix if angpix else pixel, stack=False)
    return result
