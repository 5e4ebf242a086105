"""RELION's padded Fourier grids, in 2D and 3D: transforms, shells, tau2, MAP reconstruction and
SSNR arrays (``Projector::computeFourierTransformMap``, ``BackProjector::reconstruct``,
``windowToOridimRealSpace``, ``updateSSNRarrays``).

Grids are full, centred (frequency 0 at index ``M // 2`` on every axis), ``M = pad * N``, complex,
and scaled as RELION's: the unnormalised transform of the padded map divided by ``N²``, so a
central section of a volume (or a sample of a 2D grid) is an ``N``-box image transform
normalised by ``1 / N²`` (forward units). That factor is ``pad^d N^(d-2)`` times the
forward-normalised ``M^d`` transform. The dimension ``d`` (2 or 3) is read from the batched
tensors' shapes: ``(K, N, N)`` images or ``(K, N, N, N)`` volumes.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from tamis._threads import map_work
from tamis.masks import radius_map, soft_mask_outside

__all__ = [
    "relion_round",
    "oversampling_correction",
    "transform_scale",
    "padded_transforms",
    "padded_to_real",
    "with_periodic_edge",
    "fold_periodic_edge",
    "reference_grids",
    "interpolate",
    "SliceTiles",
    "linear_corners",
    "GridSplat",
    "grid_shells",
    "grid_tau2",
    "reconstruct",
    "ssnr_arrays",
]


def relion_round(x: torch.Tensor) -> torch.Tensor:
    """RELION's ``ROUND`` (``macros.h``): halves away from zero, ``floor(|x| + 0.5)`` with the
    sign of ``x`` (``ROUND(-0.5) = -1``; ``torch.round`` rounds halves to even)."""
    return (torch.sign(x) * torch.floor(x.abs() + 0.5)).to(torch.int64)


def oversampling_correction(pad: int, ndim: int) -> float:
    """RELION's correction of the prior term for a padded grid: ``pad^d`` (4 in 2D, 8 in 3D)."""
    return float(pad**ndim)


def transform_scale(box: int, pad: int, ndim: int) -> float:
    """``pad^d N^(d-2)``: RELION's padded transform over the forward-normalised one."""
    return float(pad**ndim) * float(box) ** (ndim - 2)


def _dims(ndim: int) -> tuple[int, ...]:
    return tuple(range(-ndim, 0))


def _sinc2(r: torch.Tensor) -> torch.Tensor:
    return torch.sinc(r) ** 2


def padded_transforms(refs: torch.Tensor, *, pad: int = 2, gridding: bool = True) -> torch.Tensor:
    """Centred ``(K, M, ..., M)`` complex128 transforms of real maps ``(K, N, ..., N)`` zero-padded
    to ``M = pad N``, on RELION's scale; with ``gridding``, divided by ``sinc²(r / M)`` first
    (RELION's gridding pre-correction, radial)."""
    ndim = refs.ndim - 1
    k, n = refs.shape[0], refs.shape[-1]
    m = pad * n
    img = refs.to(torch.float64)
    if gridding:
        r = radius_map(n, device=refs.device, ndim=ndim)
        img = img / _sinc2(r / m).clamp(min=1e-6)
    padded = torch.zeros((k,) + (m,) * ndim, dtype=torch.float64, device=refs.device)
    o = m // 2 - n // 2
    padded[(slice(None),) + (slice(o, o + n),) * ndim] = img
    dims = _dims(ndim)
    spec = torch.fft.fftshift(
        torch.fft.fftn(torch.fft.ifftshift(padded, dim=dims), dim=dims, norm="forward"), dim=dims
    )
    return spec * transform_scale(n, pad, ndim)


def padded_to_real(
    fgrid: torch.Tensor, *, box: int, pad: int = 2, gridding: bool = True
) -> torch.Tensor:
    """Inverse of :func:`padded_transforms` as RELION's ``windowToOridimRealSpace``: transform,
    window to ``box``, soft-mask at radius ``box/2`` (3 px edge, mean outside) and, with
    ``gridding``, divide by ``sinc²(r / M)``. Returns float32 ``(K, box, ..., box)``."""
    ndim = fgrid.ndim - 1
    m = fgrid.shape[-1]
    dims = _dims(ndim)
    img = torch.fft.fftshift(
        torch.fft.ifftn(
            torch.fft.ifftshift(fgrid / transform_scale(box, pad, ndim), dim=dims),
            dim=dims,
            norm="forward",
        ),
        dim=dims,
    ).real
    o = m // 2 - box // 2
    img = img[(slice(None),) + (slice(o, o + box),) * ndim]
    img = soft_mask_outside(img, box / 2, 3.0, ndim=ndim)
    if gridding:
        r = radius_map(box, device=fgrid.device, ndim=ndim)
        img = img / _sinc2(r / m).clamp(min=1e-6)
    return img.to(torch.float32)


def with_periodic_edge(spec: torch.Tensor) -> torch.Tensor:
    """``(K, M, ..., M)`` -> ``(K, M+1, ..., M+1)``: one periodic extra plane per axis (frequency
    ``+M/2 = -M/2``), so samples at the edge of the padded grid (the box's Nyquist frequency)
    interpolate instead of falling outside."""
    for axis in range(1, spec.ndim):
        spec = torch.cat([spec, spec.narrow(axis, 0, 1)], dim=axis)
    return spec


def fold_periodic_edge(grid: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`with_periodic_edge`: ``(K, M+1, ..., M+1)`` -> ``(K, M, ..., M)``, the
    extra plane of each axis added back onto frequency ``-M/2``."""
    for axis in range(1, grid.ndim):
        size = grid.shape[axis] - 1
        out = grid.narrow(axis, 0, size).clone()
        out.narrow(axis, 0, 1).add_(grid.narrow(axis, size, 1))
        grid = out
    return grid


def reference_grids(
    refs: torch.Tensor, *, pad: int = 2, r_max: float | None = None
) -> torch.Tensor:
    """Padded, centred Fourier grids ``(K, M + 1, ..., M + 1)`` (complex64) of real references
    ``(K, N, ..., N)``, ready for interpolation: :func:`padded_transforms` (with the gridding
    pre-correction), voxels with ``|q|² > ROUND(r_max pad)²`` zeroed when ``r_max`` is given, and
    :func:`with_periodic_edge`."""
    ndim = refs.ndim - 1
    m = pad * refs.shape[-1]
    spec = padded_transforms(refs, pad=pad)
    if r_max is not None:
        q2 = radius_map(m, device=refs.device, ndim=ndim) ** 2
        spec = spec * (q2 <= _max_r2(r_max, pad))
    return with_periodic_edge(spec).to(torch.complex64)


#: The fewest positions per batch entry when :func:`interpolate` deals them out in groups.
_GROUP_POINTS = 4096

#: A float32 :class:`GridSplat` keeps its counts in float32 grids for this many :meth:`add`
#: calls before adding them into its float64 totals (each such add is a pass over every voxel),
#: when those grids take no more than ``_STAGE_BYTES``.
_STAGE_CALLS = 8
_STAGE_BYTES = 1 << 30


def interpolate(
    planes: torch.Tensor,
    positions: torch.Tensor,
    *,
    centre: int | None = None,
    max_points: int = 1 << 21,
) -> torch.Tensor:
    """Linear samples (bilinear in 2D, trilinear in 3D) of real planes ``(K, Ch, E, ..., E)`` of
    a centred grid at ``positions`` ``(P, d)`` (x, y[, z], about the centre, in grid units);
    ``(K, Ch, P)``, zero outside. Frequency 0 sits at index ``centre`` (default ``(E - 1) // 2``,
    a grid with its periodic edge, :func:`with_periodic_edge`). Taken ``max_points`` positions
    at a time."""
    k, ch = planes.shape[:2]
    nd = planes.ndim - 2
    e = planes.shape[-1]
    centre = (e - 1) // 2 if centre is None else centre
    out = torch.empty((k, ch, positions.shape[0]), dtype=planes.dtype, device=planes.device)
    for s in range(0, positions.shape[0], max_points):
        pos = positions[s : s + max_points]
        n = pos.shape[0]
        coords = ((pos + centre) * (2.0 / (e - 1)) - 1.0).to(planes.dtype)
        g = _point_groups(n, k, planes.device)
        if g == 1:  # one batch entry per class
            shared = coords.reshape((1, -1) + (1,) * (nd - 1) + (nd,))
            v = _grid_sample(planes, shared.expand((k,) + (-1,) * nd + (nd,)))
            out[:, :, s : s + n] = v.reshape(k, ch, -1)
            continue
        m = -(-n // g) * g
        if m > n:  # padded with the centre; the padding's samples are dropped
            coords = torch.cat([coords, coords.new_zeros((m - n, nd))])
        coords = coords.reshape((g, -1) + (1,) * (nd - 1) + (nd,))
        for c in range(k):
            v = _grid_sample(planes[c : c + 1].expand((g,) + planes.shape[1:]), coords)
            out[c, :, s : s + n] = v.reshape(g, ch, -1).transpose(0, 1).reshape(ch, -1)[:, :n]
    return out


def _point_groups(p: int, k: int, device: torch.device) -> int:
    """How many batch entries ``grid_sample`` gets for one class's ``p`` points. On the CPU it
    runs only the entries of its batch in parallel, so with fewer classes than twice the
    threads (auto-refine: one) the points are dealt out in groups (of at least
    ``_GROUP_POINTS``), a batch entry each, one class (expanded, not copied) at a time;
    1: one batch entry per class, all points."""
    groups = 2 * torch.get_num_threads() if device.type == "cpu" else 1
    g = min(groups, max(1, p // _GROUP_POINTS))
    return 1 if g <= k else g


def _grid_sample(planes: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Linear samples, zero outside, the grid's end points at -1 and 1."""
    return F.grid_sample(planes, coords, mode="bilinear", padding_mode="zeros", align_corners=True)


class SliceTiles:
    """Real planes ``(K, Ch, E, E, E)`` of a centred 3D grid laid out for 2D sampling: trilinear
    interpolation as bilinear interpolation in the two z slices around a position, then linear
    in z (the same eight voxels and weights).

    On the CPU torch's 3D ``grid_sample`` is a scalar loop and its 2D one vectorised: in one
    iteration of a local auto-refine search (box 64) the 3D kernel took 15 of 47 s. Here tile
    ``j`` of a ``(K, 2 Ch, H, W)`` image holds slice ``j - 1`` in its first ``Ch`` channels and
    slice ``j`` in the others (slices outside the grid are zero), each tile followed by a zero
    row and column so that no sample reaches a neighbouring tile. One 2D sample of the ``2 Ch``
    channels at ``(x, y)`` in tile ``floor(z) + 1`` gives both slices.

    Costs: the image holds each voxel twice (2x the grid's memory: ~26 MB for a box-64 grid
    at pad 2, ~2.2 GB per class at box 256). The tiles fill a square about ``n^1.5`` voxels
    wide, and float32 image coordinates resolve ~1e-7 of that: ~1e-4 voxel at box 64, ~1e-3
    at box 256 and pad 2 (the 3D kernel's ~1e-5; RELION's GPU textures resolve 1/256 voxel).

    ``reach``: no position lies further than this from the centre along any axis; only the
    cube of voxels those positions touch is laid out (as :class:`GridSplat`'s ``reach``).
    Positions beyond the laid-out cube sample zero, as the 3D kernel's zero padding."""

    def __init__(
        self, planes: torch.Tensor, *, centre: int | None = None, reach: float | None = None
    ) -> None:
        if planes.ndim != 5:
            raise ValueError(f"SliceTiles: planes (K, Ch, E, E, E), not {tuple(planes.shape)}")
        k, ch, e = planes.shape[0], planes.shape[1], planes.shape[-1]
        centre = (e - 1) // 2 if centre is None else centre
        lo, hi = 0, e - 1
        if reach is not None:
            h = int(math.ceil(reach)) + 1
            lo, hi = max(0, centre - h), min(e - 1, centre + h)
        n = hi - lo + 1
        cube = planes[:, :, lo : hi + 1, lo : hi + 1, lo : hi + 1]
        t = n + 1  # a tile: n voxels and one zero row / column
        ncol = math.isqrt(n) + 1  # tiles j = 0..n (n + 1 of them) in a square
        nrow = -(-(n + 1) // ncol)
        img = torch.zeros((k, 2 * ch, nrow * ncol, t, t), dtype=planes.dtype, device=planes.device)
        img[:, :ch, 1 : n + 1, :n, :n] = cube  # tile j's lower slice: j - 1
        img[:, ch:, :n, :n, :n] = cube  # its upper slice: j
        img = img.view(k, 2 * ch, nrow, ncol, t, t).permute(0, 1, 2, 4, 3, 5)
        self.image = img.reshape(k, 2 * ch, nrow * t, ncol * t)
        self.channels, self.n, self.origin = ch, n, centre - lo
        height, width = self.image.shape[-2:]
        j = torch.arange(n + 1, device=planes.device, dtype=torch.float64)
        # per tile, the normalised image coordinates (grid_sample's, -1 at the first pixel) of
        # position 0: the tile's corner plus the origin
        corner = torch.stack([torch.remainder(j, ncol), torch.div(j, ncol, rounding_mode="floor")])
        scale = torch.tensor(
            [[2.0 / (width - 1)], [2.0 / (height - 1)]], dtype=torch.float64, device=j.device
        )
        self._at_zero = ((corner * t + self.origin) * scale - 1.0).T.contiguous().to(planes.dtype)
        self._scale = scale.T.to(planes.dtype)  # (1, 2): grid units to image coordinates

    def __len__(self) -> int:
        return self.image.shape[0]

    def __getitem__(self, classes: slice) -> SliceTiles:
        """The tiles of some classes (a view, not a copy)."""
        out = copy.copy(self)
        out.image = self.image[classes]
        return out

    def covers(self, radius: float) -> bool:
        """Whether every position within ``radius`` of the centre lies inside the laid-out cube
        (then :meth:`sample` may skip its per-point test: ``inside=True``)."""
        return radius < min(self.origin, self.n - 1 - self.origin) - 1e-3

    def sample(self, xy: torch.Tensor, z: torch.Tensor, *, inside: bool = False) -> torch.Tensor:
        """Trilinear samples ``(K, Ch, P)`` at positions ``xy`` ``(P, 2)`` (x, y) and ``z``
        ``(P,)`` (about the centre, in grid units); zero outside the laid-out cube.
        ``inside=True``: the caller knows every position is inside (:meth:`covers`), and the
        per-point test is skipped."""
        n, o, ch = self.n, self.origin, self.channels
        img = self.image
        k, dt, p = img.shape[0], img.dtype, z.shape[0]
        xy, z = xy.to(dt), z.to(dt)
        # the points dealt out as interpolate() does (padded to a multiple of the groups with
        # the image's centre, whose samples are dropped)
        g = _point_groups(p, k, img.device)
        m = -(-p // g) * g
        zf = torch.floor(z)
        fz = torch.zeros(m, dtype=dt, device=img.device)
        torch.sub(z, zf, out=fz[:p])
        tile = zf.to(torch.int64).add_(o + 1)  # tile floor(z) + 1 holds slices floor(z), +1
        if p and not inside and not self._inside(xy[:, 0], xy[:, 1], tile):
            # outside the cube along x or y: on the zero row / column; along z: x on it too
            xy = xy.clamp(-1 - o, n - o)
            xy[:, 0].masked_fill_((tile < 0) | (tile > n), float(-1 - o))
            tile = tile.clamp(0, n)
        coords = torch.empty((m, 2), dtype=dt, device=img.device)
        torch.index_select(self._at_zero, 0, tile, out=coords[:p])
        coords[:p].addcmul_(xy, self._scale)
        coords[p:] = 0.0
        out = torch.empty((k, ch, m), dtype=dt, device=img.device)
        if g == 1:
            vals = _grid_sample(img, coords.reshape(1, -1, 1, 2).expand(k, -1, -1, -1))
            vals = vals.reshape(k, 2 * ch, m)
            torch.lerp(vals[:, :ch], vals[:, ch:], fz, out=out)
        else:
            grid = coords.reshape(g, -1, 1, 2)
            fz = fz.reshape(g, 1, -1)
            for c in range(k):
                vals = _grid_sample(img[c : c + 1].expand((g,) + img.shape[1:]), grid)
                vals = vals.reshape(g, 2 * ch, -1)
                dest = out[c].view(ch, g, -1).transpose(0, 1)  # (g, Ch, m / g), a view
                torch.lerp(vals[:, :ch], vals[:, ch:], fz, out=dest)
        return out[:, :, :p]

    def _inside(self, x: torch.Tensor, y: torch.Tensor, tile: torch.Tensor) -> bool:
        n, o = self.n, self.origin
        x_lo, x_hi = torch.aminmax(x)
        y_lo, y_hi = torch.aminmax(y)
        t_lo, t_hi = torch.aminmax(tile)
        return bool(
            float(x_lo) >= -1 - o and float(x_hi) <= n - o and float(y_lo) >= -1 - o
            and float(y_hi) <= n - o and int(t_lo) >= 0 and int(t_hi) <= n
        )  # fmt: skip


def linear_corners(
    positions: torch.Tensor, extent: int, origin: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``2^d`` grid points of linear interpolation (bilinear in 2D, trilinear in 3D) at
    ``positions`` ``(P, d)`` (x, y[, z]) on a cube of ``extent^d`` voxels (x fastest) whose
    index ``origin`` holds position 0 on every axis: flat voxel indices (int32 while they fit,
    else int64) and weights (``dtype``), each ``(2^d, P)``, corner ``c`` offset by bit ``a`` of
    ``c`` along axis ``a``. A point outside the cube has weight 0 and index 0.

    Corner-major, and worked out axis by axis on contiguous ``P``-long rows (a ``(P, 2^d)``
    layout made the weights' broadcast products several times slower on the CPU); positions
    given as the transpose of a ``(d, P)`` tensor are read without a copy."""
    nd = positions.shape[-1]
    if nd not in (2, 3):
        raise ValueError(f"linear_corners: positions in 2 or 3 dimensions, not {nd}")
    itype = torch.int32 if extent**nd < 2**31 else torch.int64
    n = positions.shape[0]
    # in the positions' precision: the same weights on any cube
    pos = positions.T.contiguous() + origin  # (d, P)
    lo = torch.floor(pos)
    frac = (pos - lo).to(dtype)
    lo = lo.to(itype)
    base = lo[nd - 1]
    for axis in range(nd - 2, -1, -1):
        base = base * extent + lo[axis]
    strides = [extent**a for a in range(nd)]
    offsets = [sum(strides[a] for a in range(nd) if (c >> a) & 1) for c in range(2**nd)]
    idx = base[None, :] + torch.tensor(offsets, dtype=itype, device=positions.device)[:, None]
    comp = 1 - frac
    # the x-y products once (4 rows), then times z's factors: 2^d rows, bit a of c on axis a
    xy = torch.empty((4, n), dtype=dtype, device=positions.device)
    for c in range(4):
        torch.mul(frac[0] if c & 1 else comp[0], frac[1] if c & 2 else comp[1], out=xy[c])
    if nd == 2:
        wt = xy
    else:
        wt = torch.empty((8, n), dtype=dtype, device=positions.device)
        torch.mul(xy, comp[2], out=wt[:4])
        torch.mul(xy, frac[2], out=wt[4:])
    if n:
        lo_min, lo_max = torch.aminmax(lo)
        if not (int(lo_min) >= 0 and int(lo_max) + 1 < extent):
            # per axis, whether the lower and the upper neighbour lie in the cube: (d, P) each
            ok = [(lo + b >= 0) & (lo + b < extent) for b in (0, 1)]
            inside = torch.stack(
                [torch.stack([ok[(c >> a) & 1][a] for a in range(nd)]).all(0) for c in range(2**nd)]
            )
            wt = torch.where(inside, wt, 0.0)
            idx = torch.where(inside, idx, 0)
    return idx, wt


class GridSplat:
    """The adjoint of :func:`interpolate` for data and weight sums: per-class complex data and
    real weights at positions about the centre are spread linearly (4 or 8 grid points) into
    ``K`` float64 accumulators of ``(M + 1)^d`` voxels (Re, Im, weight), and :meth:`grids`
    folds the periodic edge back into ``(K, M, ..., M)`` grids. Only the (class, position)
    samples that carry something are splatted: after a sparse E-step most classes (and
    pseudo-halves) are empty at most orientations.

    In 3D each :meth:`add` sums in float32 and then adds its grids into the float64 totals, as
    RELION's accelerated back-projector does (``AccBackprojector``: float accumulators, added
    into the double ``BackProjector`` sums): the splat is a scatter of 8 values per sample and
    channel, bound by memory traffic, and about half of a 3D iteration's time; one call's sums
    in float32 agree with float64 to ~1e-6 relative, far below the particles' noise. In 2D the
    splat is ~1% of a run and sums in float64 throughout (``sum_dtype`` chooses).

    Adding a call's counts into the float64 totals is a pass over every voxel of the cube,
    however few a call touches (at box 96, 5.7 M voxels x 3 channels: 75 of a local search
    batch's 102 ms). So a float32 splat keeps its counts in float32 grids (one per channel and
    half of the corners, added to by the worker that counts them) over ``_STAGE_CALLS`` calls,
    then adds them into the totals (RELION's accelerated back-projector keeps a whole
    iteration's in float). :attr:`flat` and :meth:`grids` add what is kept first.

    The grids are made Hermitian: every sample also counts, conjugated, at ``-q`` (RELION's
    half-grid splat followed by ``enforceHermitianSymmetry``). The lattice is symmetric about the
    origin, so the mates' splat is the mirror image ``S(-v)`` of the samples' own; it is added
    once in :meth:`grids`, less the mates of samples at the origin (they have none)."""

    def __init__(
        self,
        k: int,
        m: int,
        ndim: int,
        device,
        reach: float | None = None,
        sum_dtype: torch.dtype | None = None,
    ) -> None:
        """``reach``: no position lies further than this from the centre along any axis (for
        example ``pad * size / 2`` for a window of current size ``size``); the accumulator is
        then the cube around the centre that those positions touch, not the whole grid
        (less memory, fewer cache misses), and :meth:`grids` places it in the whole grid.
        ``sum_dtype``: the precision of one :meth:`add`'s sums (float32 in 3D, float64 in 2D
        by default)."""
        self.k, self.m, self.ndim = k, m, ndim
        if sum_dtype is None:
            sum_dtype = torch.float32 if ndim == 3 else torch.float64
        self.sum_dtype = sum_dtype
        half = m // 2
        if reach is not None:
            half = min(half, int(math.ceil(reach)) + 1)
        self.half = half
        self.voxels = (2 * half + 1) ** ndim
        # (Re, Im, weight) x (class, voxel), float64
        self._flat = torch.zeros((3, k * self.voxels), dtype=torch.float64, device=device)
        self.at_origin = torch.zeros((k, 3), dtype=torch.float64, device=device)
        # counts not yet in the totals: (class, channel, half of the corners, voxel)
        self._staged: torch.Tensor | None = None
        if sum_dtype != torch.float64 and 6 * k * self.voxels * sum_dtype.itemsize <= _STAGE_BYTES:
            self._staged = torch.zeros((k, 3, 2, self.voxels), dtype=sum_dtype, device=device)
        self._staged_calls = 0

    @property
    def flat(self) -> torch.Tensor:
        """The float64 totals ``(3, K * voxels)`` (Re, Im, weight x class, voxel), with every
        call's counts in them (the tensor itself: adding into it, as the ranks' all-reduce
        does, changes the sums)."""
        self._fold()
        return self._flat

    def _fold(self) -> None:
        """Add the float32 grids' counts into the float64 totals (the two halves of the
        corners in order, as :meth:`add` without them) and clear them."""
        if self._staged is None or self._staged_calls == 0:
            return
        totals = self._flat.view(3, self.k, self.voxels)
        for h in (0, 1):
            totals += self._staged[:, :, h].transpose(0, 1)
        self._staged.zero_()
        self._staged_calls = 0

    @classmethod
    def for_window(cls, k: int, window, pad: int, ndim: int, device) -> GridSplat:
        """An accumulator for the pixels of a ``FourierWindow`` (box, current size) at ``pad``."""
        return cls(k, pad * window.box, ndim, device, reach=pad * window.size / 2)

    def _corners(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per position, its ``2^d`` grid points in the accumulated cube
        (:func:`linear_corners`, in ``sum_dtype``): indices and weights ``(2^d, P)``."""
        return linear_corners(positions, 2 * self.half + 1, self.half, self.sum_dtype)

    def add(self, positions: torch.Tensor, data: torch.Tensor, weight: torch.Tensor) -> None:
        """``positions`` ``(N, d)`` (x, y[, z]); ``data`` complex and ``weight`` real
        ``(K, ...)`` with N elements per class, in the positions' order."""
        k, v = self.k, self.voxels
        n = positions.shape[0]
        d = torch.view_as_real(data.reshape(k, n))  # (K, N, 2)
        w = weight.reshape(k, n)
        # samples at the origin (their mates are themselves): x == 0 first, on one column
        cand = torch.nonzero(positions[:, 0] == 0).squeeze(1)
        origin = cand[(positions[cand] == 0).all(1)]
        if len(origin):
            at = torch.cat([d[:, origin].sum(1), w[:, origin].sum(1, keepdim=True)], 1)
            self.at_origin += at.to(torch.float64)
        idx, wt = self._corners(positions)  # (2^d, N) each, shared by the classes
        for slot in range(k):
            ds, ws = d[slot], w[slot]
            live = (ws != 0) | (ds != 0).any(-1)
            n_live = int(live.sum())
            if n_live == 0:
                continue
            values = torch.stack([ds[:, 0], ds[:, 1], ws])  # (3, N): Re, Im, weight
            rows, wts = idx, wt
            if n_live < n // 2:  # a sparse class: only its live samples
                p = torch.nonzero(live).squeeze(1)
                rows, wts, values = idx[:, p], wt[:, p], values[:, p]
            values = values.to(self.sum_dtype)
            # torch's bincount runs on one thread: the channels and two halves of the corners
            # are counted side by side (tamis._threads); kept in the float32 grids by the
            # worker that counts them, or added in order into the totals
            half = rows.shape[0] // 2
            parts = [(ch, h) for ch in range(3) for h in (0, 1)]
            staged = None if self._staged is None else self._staged[slot]

            def count(part, rows=rows, wts=wts, values=values, staged=staged, half=half):
                ch, h = part
                lo, hi = h * half, (h + 1) * half
                w_ch = (wts[lo:hi] * values[ch]).reshape(-1)
                sums = torch.bincount(rows[lo:hi].reshape(-1), weights=w_ch, minlength=v)
                if staged is None:
                    return sums
                staged[ch, h] += sums
                return None

            out = self._flat[:, slot * v : (slot + 1) * v]
            for (ch, _), sums in zip(parts, map_work(count, parts, out.device), strict=True):
                if sums is not None:
                    out[ch] += sums
        if self._staged is not None:
            self._staged_calls += 1
            if self._staged_calls >= _STAGE_CALLS:
                self._fold()

    def grids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(D, W)``: complex128 and float64 ``(K, M, ..., M)``."""
        k, e, h, nd = self.k, self.m + 1, self.half, self.ndim
        cube = self.flat.view((3, k) + (2 * h + 1,) * nd)  # (adds the kept counts first)
        if h < self.m // 2:  # the accumulated cube into the whole grid
            whole = torch.zeros((3, k) + (e,) * nd, dtype=cube.dtype, device=cube.device)
            o = self.m // 2 - h
            whole[(slice(None), slice(None)) + (slice(o, o + 2 * h + 1),) * nd] = cube
            cube = whole
        d = fold_periodic_edge(torch.complex(cube[0], cube[1]))
        w = fold_periodic_edge(cube[2])
        d, w = d + _mirror(d).conj(), w + _mirror(w)
        centre = (slice(None),) + (self.m // 2,) * nd
        o = self.at_origin
        d[centre] -= torch.complex(o[:, 0], -o[:, 1])
        w[centre] -= o[:, 2]
        return d, w


def _mirror(grid: torch.Tensor) -> torch.Tensor:
    """``G(-v)`` on centred ``(K, M, ..., M)`` grids (index ``i`` holds ``i - M/2``, periodic)."""
    m = grid.shape[-1]
    idx = (m - torch.arange(m, device=grid.device)) % m
    for axis in range(1, grid.ndim):
        grid = grid.index_select(axis, idx)
    return grid


def grid_shells(
    m: int, pad: int, device, ndim: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``|q|``, ``ROUND(|q|/pad)`` and ``FLOOR(|q|/pad)`` on a centred ``M^d`` grid."""
    q = radius_map(m, device=device, ndim=ndim)
    return q, relion_round(q / pad), torch.floor(q / pad).to(torch.int64)


def _max_r2(r_max: float, pad: int) -> float:
    return float(relion_round(torch.tensor(r_max * pad))) ** 2


def grid_tau2(grids: torch.Tensor, r_max: float, n_shells: int, *, pad: int = 2) -> torch.Tensor:
    """tau2 per class and shell ``(K, n_shells)``: mean ``|F(q)|²/2`` over padded voxels with
    ``|q|² <= ROUND(r_max pad)²`` and ``ROUND(|q|/pad) = s`` (RELION's
    ``computeFourierTransformMap``). A periodic extra edge (:func:`with_periodic_edge`) is
    ignored."""
    ndim = grids.ndim - 1
    m = pad * 2 * (grids.shape[-1] // (2 * pad))
    grids = grids[(slice(None),) + (slice(0, m),) * ndim]
    k = grids.shape[0]
    q, ires, _ = grid_shells(m, pad, grids.device, ndim)
    inside = q**2 <= _max_r2(r_max, pad)
    ires = torch.where(inside, ires, torch.full_like(ires, n_shells)).reshape(-1)
    power = (grids.abs().to(torch.float64) ** 2 / 2).reshape(k, -1)
    sums = torch.zeros((k, n_shells + 1), dtype=torch.float64, device=grids.device)
    sums.index_add_(1, ires, power)
    counts = torch.bincount(ires, minlength=n_shells + 1).to(torch.float64)
    return (sums / counts.clamp(min=1))[:, :n_shells]


def reconstruct(
    d: torch.Tensor,
    w: torch.Tensor,
    *,
    box: int,
    r_max: float,
    tau2: torch.Tensor | None,
    tau2_fudge: float = 1.0,
    pad: int = 2,
    minres_map: int = 5,
) -> torch.Tensor:
    """RELION's ``BackProjector::reconstruct`` (skip-gridding branch), batched over classes.

    ``F = D / max(W + [ires >= minres_map] / (os T tau2), wbar(FLOOR(|q|/pad)) / 1000)`` inside
    ``|q|² < ROUND(r_max pad)²`` (``os = pad^d``); ``tau2=None`` reconstructs without the prior.
    Then :func:`padded_to_real`. ``d`` complex and ``w`` real, ``(K, M, ..., M)``; returns real
    maps ``(K, box, ..., box)``.
    """
    ndim = d.ndim - 1
    k, m = d.shape[0], d.shape[-1]
    grid = (m,) * ndim
    q, ires, ifloor = grid_shells(m, pad, d.device, ndim)
    inside = q**2 < _max_r2(r_max, pad)
    w = w.to(torch.float64)
    if tau2 is not None:
        n_sh = tau2.shape[1]
        t2 = tau2[:, ires.clamp(max=n_sh - 1).reshape(-1)].reshape((k,) + grid)
        os_ = oversampling_correction(pad, ndim)
        prior = torch.where(
            t2 > 0, 1.0 / (os_ * tau2_fudge * t2.clamp(min=1e-300)), torch.zeros_like(t2)
        )
        zero_tau = (t2 <= 0) & (w > 1e-20)
        prior = torch.where(zero_tau, 1.0 / (0.001 * w.clamp(min=1e-300)), prior)
        # No prior below shell minres_map (RELION's minres_map).
        prior = torch.where((ires >= minres_map)[None], prior, torch.zeros_like(prior))
        wp = w + prior
    else:
        wp = w
    # Floor: a thousandth of the shell's mean weight (FLOOR shells; beyond r_max use r_max - 1).
    rm = int(r_max)
    fl = ifloor.clamp(max=max(rm - 1, 0))
    fl_in = torch.where(inside, fl, torch.full_like(fl, rm + 1)).reshape(-1)
    sums = torch.zeros((k, rm + 2), dtype=torch.float64, device=d.device)
    sums.index_add_(1, fl_in, wp.reshape(k, -1))
    counts = torch.bincount(fl_in, minlength=rm + 2).to(torch.float64)
    wbar = sums / counts.clamp(min=1)
    floor = wbar[:, fl.reshape(-1)].reshape((k,) + grid) / 1000.0
    denom = torch.maximum(wp, floor)
    fgrid = torch.where(
        inside[None] & (denom > 0), d / denom.clamp(min=1e-300), torch.zeros_like(d)
    )
    return padded_to_real(fgrid, box=box, pad=pad)


def ssnr_arrays(
    w: torch.Tensor, tau2: torch.Tensor, *, r_max: float, tau2_fudge: float, pad: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RELION's ``updateSSNRarrays``: (sigma2_class, data_vs_prior, fourier_coverage), each
    ``(K, n_shells)`` with ``n_shells = tau2.shape[1]``; ``w`` ``(K, M, ..., M)``."""
    ndim = w.ndim - 1
    k, m = w.shape[0], w.shape[-1]
    n_sh = tau2.shape[1]
    os_ = oversampling_correction(pad, ndim)
    q, ires, _ = grid_shells(m, pad, w.device, ndim)
    inside = q**2 < _max_r2(r_max, pad)
    idx = torch.where(inside & (ires < n_sh), ires, torch.full_like(ires, n_sh)).reshape(-1)
    w = w.to(torch.float64).reshape(k, -1)
    t2 = tau2[:, idx.clamp(max=n_sh - 1)]
    snr = torch.where(t2 > 0, w * os_ * tau2_fudge * t2, 0.001 * w * w)
    counts = torch.bincount(idx, minlength=n_sh + 1).to(torch.float64)[:n_sh]

    def shell_sum(v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((k, n_sh + 1), dtype=torch.float64, device=w.device)
        return out.index_add_(1, idx, v)[:, :n_sh]

    sum_w = shell_sum(os_ * w)
    sigma2_class = torch.where(sum_w > 0, counts / sum_w.clamp(min=1e-300), torch.zeros_like(sum_w))
    dvp = shell_sum(snr) / counts.clamp(min=1)
    coverage = shell_sum((snr >= 1).to(torch.float64)) / counts.clamp(min=1)
    empty = counts == 0
    dvp = torch.where(empty[None], torch.full_like(dvp, 999.0), dvp)
    beyond = torch.arange(n_sh, device=w.device) > r_max
    dvp = torch.where(beyond[None], torch.zeros_like(dvp), dvp)
    return sigma2_class, dvp, coverage
