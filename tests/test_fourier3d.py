"""The 3D Fourier kernels (tamis.refine.fourier3d, tamis.padded_grid in 3D) against slow
references: real-space line integrals, the adjoint's dot-product identity, a voxel loop for the
symmetrisation, and reconstruction from true orientations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tamis.class2d.fourier2d import FourierWindow
from tamis.fourier import irfft2_centered, rfft2_centered
from tamis.geometry import euler_to_matrix, random_euler_angles
from tamis.padded_grid import (
    padded_to_real,
    padded_transforms,
    reconstruct,
    reference_grids,
    with_periodic_edge,
)
from tamis.refine.fourier3d import back_project, project, symmetrise
from tamis.simulate.project import Projector
from tamis.symmetry import symmetry_operators

DATA = Path(__file__).parent / "data"
N = 32
BLOBS = [  # centre (x, y, z) in voxels from the box centre, sigma, amplitude
    ((3.0, -2.0, 1.5), 2.0, 1.0),
    ((-5.0, 4.0, -2.0), 1.6, 0.8),
    ((1.0, 6.0, 4.0), 2.4, 0.6),
    ((-2.0, -6.0, -5.0), 1.8, 0.9),
]


def _blob_density(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    out = np.zeros(np.broadcast(x, y, z).shape)
    for (cx, cy, cz), s, a in BLOBS:
        out += a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * s * s))
    return out


def _volume(n: int = N) -> torch.Tensor:
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    return torch.from_numpy(_blob_density(x, y, z))


def _line_integral(a: np.ndarray, n: int = N) -> np.ndarray:
    """image(x, y) = sum_z V(A^T (x, y, z)), the analytic density summed along z, one z at a time."""
    c = np.arange(n) - n // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    img = np.zeros((n, n))
    for z in range(-n, n + 1):
        pts = np.stack([x, y, np.full_like(x, z)], -1) @ a  # rows r^T A = (A^T r)^T
        img += _blob_density(pts[..., 0], pts[..., 1], pts[..., 2])
    return img


def _rotations(n: int, seed: int) -> torch.Tensor:
    ang = random_euler_angles(n, torch.Generator().manual_seed(seed))
    return euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])


def test_sections_match_real_space_line_integrals():
    """Sections equal the transforms of ``sum_z V(A^T (x, y, z))`` to a few percent: RELION's
    radial gridding pre-correction over-corrects samples that land on grid voxels (up to ~5% at
    the identity), so the agreement is that of RELION's projector, not exact. The transposed
    rotation (the other convention) is far off."""
    window = FourierWindow.create(N, N)
    grids = reference_grids(_volume()[None], pad=2)
    rots = _rotations(4, seed=3)
    sections = project(grids, rots, window, pad=2)[0]
    wrong = project(grids, rots.transpose(1, 2), window, pad=2)[0]
    for i in range(len(rots)):
        ref = window.gather(rfft2_centered(torch.from_numpy(_line_integral(rots[i].numpy()))))
        got = sections[i].to(torch.complex128)
        err = (got - ref).abs().norm() / ref.abs().norm()
        assert err < 0.04, f"rotation {i}: relative error {err:.4f}"
        scale = (got * ref.conj()).sum().real / (ref.abs() ** 2).sum()
        assert float(scale) == pytest.approx(1.0, abs=0.02)
        off = (wrong[i].to(torch.complex128) - ref).abs().norm() / ref.abs().norm()
        assert off > 0.5


def test_sections_agree_with_the_simulator():
    """The engine's sections and the simulator's (the source of every truth) share a convention."""
    window = FourierWindow.create(N, N)
    vol = _volume()
    rots = _rotations(3, seed=5)
    ours = project(reference_grids(vol[None], pad=2), rots, window, pad=2)[0]
    sim = window.gather(Projector(vol, pad=2).slices(rots)).to(torch.complex64)
    low = (window.kx**2 + window.ky**2) <= (N // 4) ** 2
    err = (ours - sim)[:, low].abs().norm() / sim[:, low].abs().norm()
    assert err < 0.01


def test_back_projection_is_the_adjoint_of_projection():
    """Re <G, BP(Y)> = Re sum (1 + [pixel not DC]) P conj(Y) for a Hermitian grid G (each pixel is
    splatted at q and, conjugated, at -q)."""
    window = FourierWindow.create(16, 12)
    gen = torch.Generator().manual_seed(0)
    vols = torch.randn((2, 16, 16, 16), generator=gen, dtype=torch.float64)
    g = padded_transforms(vols, pad=2, gridding=False)  # Hermitian, (2, 32, 32, 32)
    wg = torch.rand((2, 32, 32, 32), generator=gen, dtype=torch.float64)
    wg = wg + torch.flip(
        torch.roll(wg, (-1, -1, -1), dims=(1, 2, 3)), dims=(1, 2, 3)
    )  # W(q) = W(-q)
    rots = _rotations(5, seed=1)
    p = project(with_periodic_edge(g).to(torch.complex64), rots, window, pad=2)
    pw = project(with_periodic_edge(wg).to(torch.complex64), rots, window, pad=2).real
    c = len(window)
    y = torch.randn((2, 5, c), generator=gen, dtype=torch.complex64)
    yw = torch.rand((2, 5, c), generator=gen)
    d, w = back_project(y, yw, rots, window, pad=2)
    mult = 1.0 + ((window.kx != 0) | (window.ky != 0)).to(torch.float64)
    lhs = float((g * d.conj()).real.sum())
    rhs = float(((p * y.conj()).real.to(torch.float64) * mult).sum())
    assert lhs == pytest.approx(rhs, rel=1e-4)
    lhs_w = float((wg * w).sum())
    rhs_w = float((pw.to(torch.float64) * yw * mult).sum())
    assert lhs_w == pytest.approx(rhs_w, rel=1e-4)


def _trilinear(grid: np.ndarray, x: float, y: float, z: float) -> complex:
    x0, y0, z0 = int(np.floor(x)), int(np.floor(y)), int(np.floor(z))
    out = 0.0
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                zi, yi, xi = z0 + dz, y0 + dy, x0 + dx
                if not (
                    0 <= xi < grid.shape[2] and 0 <= yi < grid.shape[1] and 0 <= zi < grid.shape[0]
                ):
                    continue
                wt = (x - x0 if dx else 1 - (x - x0)) * (y - y0 if dy else 1 - (y - y0))
                wt *= z - z0 if dz else 1 - (z - z0)
                out = out + wt * grid[zi, yi, xi]
    return out


def test_symmetrise_matches_a_voxel_loop():
    m, r_max, pad = 12, 2.5, 2
    gen = torch.Generator().manual_seed(2)
    d = torch.randn((1, m, m, m), generator=gen, dtype=torch.complex128)
    w = torch.rand((1, m, m, m), generator=gen, dtype=torch.float64)
    ops = symmetry_operators("C4")
    ds, ws = symmetrise(d, w, ops, r_max=r_max, pad=pad)
    dn, wn = d[0].numpy(), w[0].numpy()
    ref_d, ref_w = dn.copy(), wn.copy()
    rmax2 = round(r_max * pad) ** 2
    rest = [o.numpy() for o in ops if not np.allclose(o.numpy(), np.eye(3))]
    for z in range(m):
        for y in range(m):
            for x in range(m):
                q = np.array([x, y, z], dtype=float) - m // 2
                if q @ q > rmax2:
                    continue
                for op in rest:
                    px, py, pz = op @ q + m // 2
                    ref_d[z, y, x] += _trilinear(dn, px, py, pz)
                    ref_w[z, y, x] += _trilinear(wn, px, py, pz)
    assert np.allclose(ds[0].numpy(), ref_d, atol=1e-10)
    assert np.allclose(ws[0].numpy(), ref_w, atol=1e-10)


def _reconstruct_from(
    rots: torch.Tensor,
    vol: torch.Tensor,
    ops: torch.Tensor | None = None,
    expand: torch.Tensor | None = None,
):
    """Reconstruct from the sections of ``vol`` at ``rots``; with ``ops``, symmetrised; with
    ``expand``, each section is back-projected at every ``A R_g`` instead."""
    window = FourierWindow.create(N, N)
    grids = reference_grids(vol[None], pad=2)
    sections = project(grids, rots, window, pad=2)
    if expand is not None:
        g = len(expand)
        sections = sections[:, :, None].expand(-1, -1, g, -1).reshape(1, -1, sections.shape[-1])
        rots = (rots[:, None] @ expand[None].to(rots.dtype)).reshape(-1, 3, 3)
    d, w = back_project(sections, torch.ones(sections.shape), rots, window, pad=2)
    if ops is not None:
        d, w = symmetrise(d, w, ops, r_max=N / 2, pad=2)
    return reconstruct(d, w, box=N, r_max=N / 2, tau2=None, pad=2)[0].to(torch.float64)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_reconstruction_from_true_orientations_recovers_the_volume():
    vol = _volume()
    rec = _reconstruct_from(_rotations(1500, seed=7), vol)
    inside = torch.from_numpy(
        np.sum(np.stack(np.meshgrid(*[np.arange(N) - N // 2] * 3, indexing="ij")) ** 2, 0) < 12**2
    )
    assert _corr(rec[inside], vol[inside]) > 0.995
    scale = float((rec[inside] * vol[inside]).sum() / (vol[inside] ** 2).sum())
    assert scale == pytest.approx(1.0, abs=0.05)


def _ball(n: int, radius: float) -> torch.Tensor:
    c = np.arange(n) - n // 2
    return torch.from_numpy(
        np.sum(np.stack(np.meshgrid(c, c, c, indexing="ij")) ** 2, 0) < radius**2
    )


def test_symmetrised_reconstruction_recovers_the_symmetrised_volume():
    """Back-projecting at A and summing D(R_g q) over C4 reconstructs the group average
    ``1/4 sum_g V(R_g r)``, as back-projecting each image at every ``A R_g`` does (RELION's
    symmetry-expansion identity)."""
    ops = symmetry_operators("C4")
    rots = _rotations(400, seed=9)
    vol = _volume()
    c = np.arange(N) - N // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    pts = np.stack([x, y, z], -1).astype(float)
    truth = sum(
        torch.from_numpy(_blob_density(*np.moveaxis(pts @ op.numpy().T, -1, 0))) for op in ops
    ) / len(ops)
    inside = _ball(N, 12)
    sym = _reconstruct_from(rots, vol, ops)
    expanded = _reconstruct_from(rots, vol, expand=ops)
    assert _corr(sym[inside], truth[inside]) > 0.99
    assert _corr(expanded[inside], truth[inside]) > 0.99
    assert _corr(sym[inside], vol[inside]) < 0.9  # the blobs are not C4-symmetric themselves


def test_padded_volume_round_trip_is_exact():
    vol = _volume(16)[None]
    back = padded_to_real(
        padded_transforms(vol, pad=2, gridding=False), box=16, pad=2, gridding=False
    )
    inside = torch.from_numpy(
        np.sum(np.stack(np.meshgrid(*[np.arange(16) - 8] * 3, indexing="ij")) ** 2, 0) < 7**2
    )
    assert torch.allclose(back[0][inside].to(torch.float64), vol[0][inside], atol=1e-5)


def test_sections_match_relion_project():
    """RELION's own projections of the same volume (relion_project, pad 2, trilinear): Euler
    convention, projection direction, scale and pixel centre, to float32 rounding."""
    ref = np.load(DATA / "relion_project_blobs32.npz")
    ang = torch.from_numpy(ref["angles"])
    window = FourierWindow.create(N, N)
    # RELION read the volume as float32
    grids = reference_grids(_volume().to(torch.float32).to(torch.float64)[None], pad=2)
    sections = project(grids, euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2]), window, pad=2)[0]
    half = torch.zeros((len(ang), N * (N // 2 + 1)), dtype=torch.complex128)
    half[:, window.index] = sections.to(torch.complex128)
    half = half.view(len(ang), N, N // 2 + 1)
    half[:, N // 2 + 1 :, 0] = half[:, 1 : N // 2, 0].flip(1).conj()  # the dropped half column
    ours = irfft2_centered(half, (N, N)).numpy()
    assert np.abs(ours - ref["images"]).max() < 1e-4 * np.abs(ref["images"]).max()


@pytest.mark.parametrize("ndim", [2, 3])
def test_splat_over_the_reached_cube_equals_the_whole_grid(ndim):
    """GridSplat(reach=r) accumulates only the cube the positions touch and places it in the
    whole grid: the same grids as accumulating over the whole grid."""
    from tamis.padded_grid import GridSplat

    gen = torch.Generator().manual_seed(ndim)
    m, r = 32, 9.0
    pos = (torch.rand((3000, ndim), generator=gen, dtype=torch.float64) * 2 - 1) * r / 2**0.5
    pos[:5] = 0.0  # samples at the origin (no Hermitian mate)
    data = torch.randn((2, 3000), generator=gen, dtype=torch.complex128)
    weight = torch.rand((2, 3000), generator=gen, dtype=torch.float64)
    whole, cube = GridSplat(2, m, ndim, "cpu"), GridSplat(2, m, ndim, "cpu", reach=r)
    assert cube.flat.shape[1] < whole.flat.shape[1]
    for s in (whole, cube):
        s.add(pos, data, weight)
    for a, b in zip(cube.grids(), whole.grids(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def _splat_loop(m: int, pos: np.ndarray, data: np.ndarray, weight: np.ndarray):
    """A slow reference of GridSplat: every sample's 2^d linear weights added one by one in
    float64 at q and, conjugated, at -q (once at the origin), the periodic edge folded back."""
    k, ndim = data.shape[0], pos.shape[1]
    e = m + 1
    d = np.zeros((k,) + (e,) * ndim, dtype=np.complex128)
    w = np.zeros((k,) + (e,) * ndim)
    for c in range(k):
        for j in range(pos.shape[0]):
            if data[c, j] == 0 and weight[c, j] == 0:
                continue
            mates = [(pos[j], data[c, j])]
            if np.any(pos[j] != 0):
                mates.append((-pos[j], np.conj(data[c, j])))
            for q, value in mates:
                g = q + m // 2
                lo = np.floor(g).astype(int)
                f = g - lo
                for corner in np.ndindex(*(2,) * ndim):
                    i = lo + np.array(corner)
                    if np.any(i < 0) or np.any(i >= e):
                        continue
                    lw = np.prod(np.where(np.array(corner) == 1, f, 1 - f))
                    d[(c,) + tuple(i[::-1])] += lw * value
                    w[(c,) + tuple(i[::-1])] += lw * weight[c, j]
    for grid in (d, w):  # the extra periodic plane of each axis back onto -M/2
        for axis in range(1, ndim + 1):
            first = [slice(None)] * (ndim + 1)
            last = list(first)
            first[axis], last[axis] = 0, m
            grid[tuple(first)] += grid[tuple(last)]
    inner = (slice(None),) + (slice(0, m),) * ndim
    return d[inner], w[inner]


@pytest.mark.parametrize(
    ("ndim", "sum_dtype", "tol"),
    [(2, None, 1e-12), (3, None, 1e-5), (3, torch.float64, 1e-12)],
)
def test_splat_equals_a_sample_by_sample_loop(ndim, sum_dtype, tol):
    """GridSplat against a float64 loop over samples and corners, over two adds, with empty
    samples, samples at the origin and on the grid's edge: to float64's precision in 2D (the
    default there) and with float64 sums in 3D, to float32's with 3D's default float32 sums."""
    from tamis.padded_grid import GridSplat

    gen = torch.Generator().manual_seed(10 + ndim)
    m, n = 12, 400
    pos = (torch.rand((n, ndim), generator=gen, dtype=torch.float64) * 2 - 1) * (m / 2)
    pos[:3] = 0.0
    pos[3, 0] = m / 2  # on the periodic edge (frequency +M/2)
    pos[4] = -m / 2
    data = torch.randn((2, n), generator=gen, dtype=torch.complex128)
    weight = torch.rand((2, n), generator=gen, dtype=torch.float64)
    data[0, 10:60], weight[0, 10:60] = 0, 0
    splat = GridSplat(2, m, ndim, "cpu", sum_dtype=sum_dtype)
    assert splat.sum_dtype == (torch.float32 if ndim == 3 and sum_dtype is None else torch.float64)
    half = n // 2
    splat.add(pos[:half], data[:, :half], weight[:, :half])
    splat.add(pos[half:], data[:, half:], weight[:, half:])
    d, w = splat.grids()
    d_ref, w_ref = _splat_loop(m, pos.numpy(), data.numpy(), weight.numpy())
    np.testing.assert_allclose(d.numpy(), d_ref, rtol=0, atol=tol * np.abs(d_ref).max())
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=0, atol=tol * np.abs(w_ref).max())
    assert d.dtype == torch.complex128 and w.dtype == torch.float64


@pytest.mark.parametrize("stage_bytes", [0, 1 << 30])
def test_splat_kept_in_float32_over_many_adds_equals_the_loop(stage_bytes, monkeypatch):
    """A 3D (float32) GridSplat keeps its counts in float32 grids for a few adds before adding
    them into its float64 totals: over more adds than that (a fold in the middle), with its
    totals read half-way (``flat``, as the ranks' all-reduce reads them, which adds what is
    kept), the grids equal the float64 loop's to float32's precision; the same with no kept
    grids (too large for their budget: every add goes into the totals)."""
    import tamis.padded_grid as pg

    monkeypatch.setattr(pg, "_STAGE_BYTES", stage_bytes)
    gen = torch.Generator().manual_seed(31)
    m, n, adds = 12, 1100, 11
    pos = (torch.rand((n, 3), generator=gen, dtype=torch.float64) * 2 - 1) * (m / 2)
    data = torch.randn((2, n), generator=gen, dtype=torch.complex128)
    weight = torch.rand((2, n), generator=gen, dtype=torch.float64)
    data[1, :500], weight[1, :500] = 0, 0  # class 2 empty in the first adds
    splat = pg.GridSplat(2, m, 3, "cpu")
    assert (splat._staged is not None) == (stage_bytes > 0)
    chunks = torch.arange(n).chunk(adds)
    for i, c in enumerate(chunks):
        splat.add(pos[c], data[:, c], weight[:, c])
        if i == 4:
            seen = splat.flat.clone()  # the first five adds' sums, all in the totals
            assert float(seen[2].sum()) == pytest.approx(float(weight[:, : c[-1] + 1].sum()))
    d, w = splat.grids()
    d_ref, w_ref = _splat_loop(m, pos.numpy(), data.numpy(), weight.numpy())
    np.testing.assert_allclose(d.numpy(), d_ref, rtol=0, atol=1e-5 * np.abs(d_ref).max())
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=0, atol=1e-5 * np.abs(w_ref).max())


@pytest.mark.parametrize("k", [1, 3])
def test_interpolate_in_groups_equals_one_batch_entry_per_class(k, monkeypatch):
    """interpolate() deals the positions out in groups on the CPU (grid_sample runs its batch
    entries in parallel): the same samples as one grid_sample call per class at all the
    positions, positions outside the grid included (zero), whatever the count's remainder."""
    import torch.nn.functional as F

    import tamis.padded_grid as pg

    gen = torch.Generator().manual_seed(k)
    e = 17
    planes = torch.randn((k, 2, e, e, e), generator=gen, dtype=torch.float64)
    pos = (torch.rand((1001, 3), generator=gen, dtype=torch.float64) * 2 - 1) * 9.5
    monkeypatch.setattr(pg, "_GROUP_POINTS", 16)
    grouped = pg.interpolate(planes, pos)
    coords = ((pos + (e - 1) // 2) * (2.0 / (e - 1)) - 1.0).reshape(1, -1, 1, 1, 3)
    for c in range(k):
        ref = F.grid_sample(
            planes[c : c + 1], coords, mode="bilinear", padding_mode="zeros", align_corners=True
        ).reshape(2, -1)
        assert torch.equal(grouped[c], ref)
    outside = (pos.abs() >= (e - 1) // 2 + 1).any(1)  # no corner inside the grid
    assert outside.any() and (grouped[:, :, outside] == 0).all()


@pytest.mark.parametrize(("k", "reach"), [(1, None), (3, None), (1, 5.0), (2, 5.0)])
def test_slice_tiles_sample_as_a_trilinear_loop(k, reach, monkeypatch):
    """SliceTiles (the 3D grid laid out as 2D tiles, sampled bilinearly in two slices and then
    linearly in z) against a voxel loop of trilinear interpolation, zero outside the grid
    (and, with ``reach``, outside the laid-out cube): points inside, on the edges, far outside
    along each axis, dealt out in groups with a remainder or one batch entry per class."""
    import tamis.padded_grid as pg

    gen = torch.Generator().manual_seed(k)
    e, centre = 15, 7
    planes = torch.randn((k, 2, e, e, e), generator=gen, dtype=torch.float32)
    pos = (torch.rand((1001, 3), generator=gen, dtype=torch.float64) * 2 - 1) * 9.0
    pos[:6] = torch.tensor(
        [[7.0, 0.0, 0.0], [0.0, -7.0, 0.0], [0.0, 0.0, 7.0], [-7.5, 0.0, 0.0],
         [0.0, 0.0, -30.0], [40.0, 3.0, 0.0]], dtype=torch.float64
    )  # fmt: skip
    monkeypatch.setattr(pg, "_GROUP_POINTS", 16)
    tiles = pg.SliceTiles(planes, reach=reach)
    pos32 = pos.to(torch.float32)
    got = tiles.sample(pos32[:, :2], pos32[:, 2])  # (K, 2, P)
    lo, hi = 0, e - 1
    if reach is not None:
        lo, hi = centre - (math.ceil(reach) + 1), centre + math.ceil(reach) + 1
    cube = np.zeros(planes.shape, dtype=np.float64)
    sl = slice(lo, hi + 1)
    cube[:, :, sl, sl, sl] = planes.numpy()[:, :, sl, sl, sl]
    for c in range(k):
        for ch in range(2):
            ref = np.array([_trilinear(cube[c, ch], *(p + centre)) for p in pos.numpy()])
            np.testing.assert_allclose(got[c, ch].numpy(), ref, rtol=0, atol=2e-5)
    assert len(tiles) == k and tiles[k - 1 : k].image.shape[0] == 1
    # the points a cube covers: the same samples without the per-point test
    radius = 5.0 if reach is None else reach
    assert tiles.covers(radius) and not tiles.covers(radius + 3.0)
    near = pos32.norm(dim=1) < radius
    assert near.sum() > 20
    fast = tiles.sample(pos32[near, :2], pos32[near, 2], inside=True)
    assert torch.equal(fast, tiles.sample(pos32[near, :2], pos32[near, 2]))


def test_linear_corners_read_axis_major_positions():
    """linear_corners gives the same corners for (P, d) positions and for the transpose of a
    (d, P) tensor (the layout the 3D splat passes, read without a copy)."""
    from tamis.padded_grid import linear_corners

    gen = torch.Generator().manual_seed(2)
    xyz = (torch.rand((3, 500), generator=gen) * 2 - 1) * 6.0
    a = linear_corners(xyz.T.contiguous(), 15, 7, torch.float32)
    b = linear_corners(xyz.T, 15, 7, torch.float32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_fine_projections_on_demand_only_where_needed():
    """The E-step's on-demand fine projections (class2d.em._FineOnDemand) of three classes:
    each class projected at the fine children of its needed coarse orientations equals the
    projection of every class at all of them there, and is zero where no particle needs it."""
    from tamis.class2d.em import _children_of, _FineOnDemand
    from tamis.refine.space import VolumeSpace

    vol = _volume()
    grids = reference_grids(torch.stack([vol, vol.flip(0), vol.roll(3, 1)]), pad=2)
    window = FourierWindow.create(N, 12)
    fine = _rotations(24, seed=4)  # 12 coarse orientations x 2 children
    coarse = torch.tensor([1, 4, 5, 9, 10])
    need = torch.tensor(
        [[True, False, False, True, False], [False, True, False, True, False],
         [False, False, True, False, False]]
    )  # fmt: skip
    made = _FineOnDemand(VolumeSpace(), grids, _children_of(fine, 2), window, 2)
    proj = made(coarse, need)
    every = project(grids, made.used, window, pad=2)
    assert torch.equal(made.used, fine[(coarse[:, None] * 2 + torch.arange(2)).reshape(-1)])
    wanted = need.repeat_interleave(2, dim=1)  # (K, U * 2)
    assert torch.allclose(proj[wanted], every[wanted], atol=1e-6 * float(every.abs().max()))
    assert (proj[~wanted] == 0).all() and (every[~wanted] != 0).any()
    assert torch.equal(made(coarse, torch.ones_like(need)), every)
