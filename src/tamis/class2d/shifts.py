"""The E-step's cross term over a regular grid of translations, as two small DFT stages.

The cross term of particle ``i``, translation ``t`` and projection ``r`` is
``Re sum_k y_i(k) ramp_t(k) conj(P_r(k))`` over the window's pixels ``k = (kx, ky)``. As one
GEMM (:func:`tamis.class2d.likelihood._log_weights`) it costs ``2 T C`` multiply-adds per
(particle, projection). When the translations are a regular grid (RELION's are: the coarse
grid, or its oversampled children, all moved by one random perturbation),
``ramp_t(k) = ramp_o(k) ex(tx, kx) ey(ty, ky)`` and the sum separates::

    Z(kx; i, ty, r) = sum_ky [y_i ramp_o ey(ty)](kx, ky) conj(P_r(kx, ky))   one GEMM per column kx
    cross(i, tx, ty, r) = Re sum_kx ex(tx, kx) Z(kx; i, ty, r)                one GEMM over kx

about ``4 n_ty C + 2 n_tx n_kx n_ty`` multiply-adds per (particle, projection): 2-3x fewer for
the fine pass's 84 translations (a 10 x 10 grid). The first stage contracts over a column's
``ky``; columns are padded to the longest of their group (groups of similar length, so the
padding stays small), every column of a group in one batched GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from tamis.fourier import shift_phases

__all__ = ["SeparableShifts", "ColumnRefs", "ColumnSums", "gemm"]


def gemm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a @ b`` (float32), through ``dtype`` GEMMs when it is a lower precision (the product is
    returned as float32): the M-step's ``--mstep_bf16``."""
    if dtype == torch.float32:
        return a @ b
    return (a.to(dtype) @ b.to(dtype)).float()


#: Columns join a group while their length is at least this fraction of the group's longest.
_GROUP_FILL = 0.8

#: Floats of the first stage's output per chunk (particles x projections): bounds the temporary
#: memory and keeps it near the caches (10 particles x 1,200 projections of the hard recipe, 24
#: MB; measured 1.7x slower with one particle per chunk, so projections are split first).
_CHUNK_FLOATS = 6 << 20

#: Particles per chunk that :meth:`SeparableShifts.cross` keeps before splitting projections.
_MIN_CHUNK_PARTICLES = 8

#: The separable path is taken when its multiply-adds are at most this fraction of the GEMM's.
_WORTH = 0.45


@dataclass(frozen=True)
class _Grid:
    """Translations ``t = origin + step * (ix, iy)`` and the phases that make their ramps on
    pixels of integer frequencies ``kx``, ``ky`` of a ``box`` image (float64, on the CPU):
    ``ramp_t(k) = ramp_o(k) ex(ix, kx) ey(iy, ky)``, each ``exp(-2 pi i ...)``."""

    origin: tuple[float, float]
    step: tuple[float, float]
    ix: torch.Tensor
    iy: torch.Tensor
    box: int

    @property
    def n_tx(self) -> int:
        return int(self.ix.max()) + 1

    @property
    def n_ty(self) -> int:
        return int(self.iy.max()) + 1

    def origin_ramp(self, kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
        return self._ramps(torch.tensor(self.origin[0]), torch.tensor(self.origin[1]), kx, ky)

    def ex(self, kx: torch.Tensor) -> torch.Tensor:
        """``(n_tx, *kx.shape)``."""
        tx = self.step[0] * torch.arange(self.n_tx, dtype=torch.float64)
        return self._ramps(tx.view(-1, *([1] * kx.dim())), torch.tensor(0.0), kx, 0.0)

    def ey(self, ky: torch.Tensor) -> torch.Tensor:
        """``(n_ty, *ky.shape)``."""
        ty = self.step[1] * torch.arange(self.n_ty, dtype=torch.float64)
        return self._ramps(torch.tensor(0.0), ty.view(-1, *([1] * ky.dim())), 0.0, ky)

    def _ramps(self, x: torch.Tensor, y: torch.Tensor, kx, ky) -> torch.Tensor:
        """The ramps of shifts ``(x, y)`` (broadcast together) at ``(kx, ky)`` (complex128),
        by the project's convention (:func:`tamis.fourier.shift_phases`)."""
        xy = torch.stack(torch.broadcast_tensors(x.double(), y.double()), -1)
        return shift_phases(xy, kx, ky, (self.box, self.box))


def _grid_of(t_px: torch.Tensor, box: int) -> _Grid | None:
    """The translations ``(T, 2)`` (x, y) in pixels as a :class:`_Grid`, or ``None`` when they
    are not a regular grid or fill less than half of it."""
    t = t_px.to(torch.float64).cpu()
    origin, step, index = [], [], []
    for a in range(2):
        v = t[:, a]
        lo, span = float(v.min()), float(v.max() - v.min())
        vals = torch.unique(torch.round((v - lo) * 1e6) / 1e6)
        diffs = vals[1:] - vals[:-1]
        h = float(diffs.min()) if len(diffs) else 1.0
        if h <= 1e-6:
            return None
        if span > 0:  # the step that divides the span exactly (h above is rounded)
            h = span / round(span / h)
        g = (v - lo) / h
        gi = torch.round(g)
        if float((g - gi).abs().max()) > 1e-6:
            return None
        origin.append(lo)
        step.append(h)
        index.append(gi.long())
    grid = _Grid((origin[0], origin[1]), (step[0], step[1]), index[0], index[1], box)
    if grid.n_tx * grid.n_ty > 2 * len(t):
        return None
    return grid


def _columns(kx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The window's columns: the distinct ``kx`` (ascending) and each one's pixels."""
    values = torch.unique(kx)
    return values, [torch.nonzero(kx == v).squeeze(1) for v in values.tolist()]


def _grid_and_frequencies(
    t_px: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor, box: int
) -> tuple[_Grid, torch.Tensor, torch.Tensor] | None:
    """:func:`_grid_of` and the pixels' frequencies as float64 on the CPU, or ``None``."""
    grid = _grid_of(t_px, box)
    if grid is None:
        return None
    return grid, kx.to(torch.float64).cpu(), ky.to(torch.float64).cpu()


@dataclass(frozen=True)
class _Group:
    """Columns of similar length: ``pixels`` ``(ncol, nrow)`` index the window's pixels (``C``
    for padding, a zero appended to the data) and ``ey`` ``(n_ty, ncol, nrow)`` is the y ramps
    (zero at padding)."""

    pixels: torch.Tensor
    ey: torch.Tensor


@dataclass(frozen=True)
class ColumnRefs:
    """Projections laid out for :meth:`SeparableShifts.cross`: per group of columns, ``[Re; Im]``
    stacked over each column's rows, ``(ncol, 2 nrow, R)``."""

    blocks: list[torch.Tensor]
    n_refs: int


@dataclass(frozen=True)
class SeparableShifts:
    """Translations on a regular grid (``ix``, ``iy`` per translation, a common origin), and the
    window's pixels by column, for :meth:`cross`."""

    origin_ramp: torch.Tensor  # (C,) complex64: the grid origin's ramp
    ix: torch.Tensor  # (T,)
    iy: torch.Tensor  # (T,)
    n_tx: int
    n_ty: int
    groups: list[_Group]
    n_pixels: int
    ex: torch.Tensor  # (n_tx, 2 ncol): Re ex, -Im ex interleaved per column, groups in order

    @classmethod
    def create(
        cls, t_px: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor, box: int
    ) -> SeparableShifts | None:
        """For translations ``(T, 2)`` (x, y) in pixels and the pixels' integer frequencies
        ``kx``, ``ky`` ``(C,)`` of a ``box`` image; ``None`` when the translations are not a
        regular grid or the separable sum would not save enough."""
        found = _grid_and_frequencies(t_px, kx, ky, box)
        if found is None:
            return None
        grid, kxc, kyc = found
        n_tx, n_ty, dev = grid.n_tx, grid.n_ty, kx.device
        cols, members = _columns(kxc)
        members = [m[torch.argsort(kyc[m])] for m in members]
        order = sorted(range(len(cols)), key=lambda j: -len(members[j]))
        n_pix = kx.shape[0]
        groups: list[list[int]] = []
        for j in order:
            if groups and len(members[j]) >= _GROUP_FILL * len(members[groups[-1][0]]):
                groups[-1].append(j)
            else:
                groups.append([j])
        # multiply-adds per (particle, projection): the separable sum's, and the GEMM's
        padded = sum(len(g) * len(members[g[0]]) for g in groups)
        separable = 4.0 * n_ty * padded + 2.0 * n_tx * len(cols) * n_ty
        if separable > _WORTH * 2.0 * len(grid.ix) * n_pix:
            return None
        out, ex_cols = [], []
        for g in groups:
            pix = torch.full((len(g), len(members[g[0]])), n_pix, dtype=torch.long)
            for c, j in enumerate(g):
                pix[c, : len(members[j])] = members[j]
            valid = pix < n_pix
            ey = grid.ey(torch.where(valid, kyc[pix.clamp(max=n_pix - 1)], 0.0)) * valid
            out.append(_Group(pix.to(dev), ey.to(torch.complex64).to(dev)))
            ex_cols.append(grid.ex(cols[g]))
        ex = torch.cat(ex_cols, 1)  # (n_tx, ncol)
        ex = torch.stack([ex.real, -ex.imag], 2).reshape(n_tx, -1)
        return cls(
            grid.origin_ramp(kxc, kyc).to(torch.complex64).to(dev),
            grid.ix.to(dev),
            grid.iy.to(dev),
            n_tx,
            n_ty,
            out,
            n_pix,
            ex.to(torch.float32).contiguous().to(dev),
        )

    def prepare(self, proj: torch.Tensor) -> ColumnRefs:
        """Projections ``(R, C)`` (complex) laid out by column (:class:`ColumnRefs`)."""
        r, c = proj.shape
        if c != self.n_pixels:
            raise ValueError(f"projections on {c} pixels, the shifts' window has {self.n_pixels}")
        blocks = []
        for g in self.groups:
            valid = (g.pixels < c).to(torch.float32)
            p = proj[:, g.pixels.clamp(max=c - 1)].permute(1, 2, 0)  # (ncol, nrow, R)
            p = torch.cat([p.real, p.imag], 1).mul_(valid.repeat(1, 2)[..., None])
            blocks.append(p.contiguous())
        return ColumnRefs(blocks, r)

    def flops(self, b: int, r: int) -> float:
        """Floating-point operations of :meth:`cross` for ``b`` particles and ``r`` projections."""
        first = sum(4.0 * g.pixels.numel() for g in self.groups)
        second = 2.0 * self.n_tx * sum(g.pixels.shape[0] for g in self.groups)
        return 2.0 * b * r * self.n_ty * (first + second)

    def cross(self, y: torch.Tensor, refs: ColumnRefs) -> torch.Tensor:
        """``Re sum_k y_i(k) ramp_t(k) conj(P_r(k))`` as ``(B, T, R)`` float32, for data ``y``
        ``(B, C)`` (complex) and projections prepared by :meth:`prepare`.

        Per group of columns one batched GEMM ``[Re Y, Im Y; Im Y, -Re Y] x [Re P; Im P]`` gives
        ``Re Z`` and ``Im Z``; then one batched GEMM over the columns (``ex``) for the chunk's
        particles. Particles
        (and, for many projections, the projections) are taken in chunks of bounded memory."""
        b, c = y.shape
        if c != self.n_pixels:
            raise ValueError(f"data on {c} pixels, the shifts' window has {self.n_pixels}")
        r = refs.n_refs
        nt = len(self.ix)
        dev = y.device
        ncol = self.ex.shape[1] // 2
        per = 2 * ncol * self.n_ty  # floats of Z per (particle, projection)
        n_min = min(b, _MIN_CHUNK_PARTICLES)
        rc = min(r, max(1, _CHUNK_FLOATS // (per * n_min)))
        step = max(1, min(b, _CHUNK_FLOATS // (per * rc)))
        out = torch.empty((b, nt, r), dtype=torch.float32, device=dev)
        yo = torch.cat([y * self.origin_ramp, y.new_zeros(b, 1)], 1)
        flat_t = self.ix * self.n_ty + self.iy
        z_all = torch.empty(step * per * rc, dtype=torch.float32, device=dev)
        grid_all = torch.empty(step * self.n_tx * self.n_ty * rc, dtype=torch.float32, device=dev)
        for s in range(0, b, step):
            yc = yo[s : s + step]
            n = yc.shape[0]
            # per group, the particles' column data times each ty's ramp as the real block
            # [Re Y, Im Y; Im Y, -Re Y] (ncol, 2 n n_ty, 2 nrow): made once for every chunk of
            # projections (Re Z = [Re Y, Im Y] [Re P; Im P], Im Z = [Im Y, -Re Y] [Re P; Im P])
            blocks = []
            for g in self.groups:
                ncol_g, nrow = g.pixels.shape
                yg = yc[:, g.pixels][:, None] * g.ey[None]  # (n, n_ty, ncol, nrow)
                yg = yg.permute(2, 0, 1, 3).reshape(ncol_g, n * self.n_ty, nrow)
                a, bb = yg.real, yg.imag
                yy = torch.stack([torch.cat([a, bb], 2), torch.cat([bb, -a], 2)], 1)
                blocks.append(yy.view(ncol_g, 2 * n * self.n_ty, 2 * nrow))
            for r0 in range(0, r, rc):
                r1 = min(r, r0 + rc)
                m = r1 - r0
                # rows (column, Re/Im Z), particle, (ty, r)
                z = z_all[: n * per * m].view(ncol, 2, n * self.n_ty, m)
                c0 = 0
                for yy, p in zip(blocks, refs.blocks, strict=True):
                    ncol_g = yy.shape[0]
                    zg = z[c0 : c0 + ncol_g].view(ncol_g, 2 * n * self.n_ty, m)
                    torch.bmm(yy, p if m == r else p[:, :, r0:r1], out=zg)
                    c0 += ncol_g
                # per particle: Re sum over columns of ex Z, (n_tx, n_ty * m)
                zp = z.view(2 * ncol, n, self.n_ty * m)
                cells = grid_all[: n * self.n_tx * self.n_ty * m].view(n, self.n_tx, -1)
                torch.matmul(self.ex, zp.transpose(0, 1), out=cells)
                cells = cells.view(n, self.n_tx * self.n_ty, m)
                if m == r:
                    torch.index_select(cells, 1, flat_t, out=out[s : s + n])
                else:
                    out[s : s + n, :, r0:r1] = cells[:, flat_t]
        return out


@dataclass(frozen=True)
class ColumnSums:
    """The M-step's sums over (particle, translation) ``F_r(k) = sum_(i, t) W(i, t, r) y_i(k)
    ramp_t(k)`` for translations on a regular grid (ramps as in :class:`SeparableShifts`),
    column by column of the window::

        V(kx; i, ty, r) = sum_tx ex(tx, kx) W(i, tx, ty, r)           one GEMM for every column
        F_r(kx, ky) = sum_(i, ty) [y_i(k) ramp_o(k) ey(ty, ky)] V(kx; i, ty, r)   one per column

    about ``4 m n_ty C`` real multiply-adds per (particle, r) for ``m`` data sets, against
    ``2 m T C`` as one GEMM over the rows (particle, t): 3-4x fewer for the fine pass's 84
    translations, and the per-column GEMMs' inner dimension is (particle, ty). By columns rather
    than rows: a half-plane window has half as many, so ``V`` is half as big (it is the largest
    temporary, and writing and reading it is most of the time).

    ``cell`` ``(T,)``: each translation's cell ``ix * n_ty + iy``; ``ex`` ``(2 n_cols, n_tx)``:
    ``Re``/``Im`` of each column's ``ex``; ``cols``: each column's pixels; ``a``: per column
    ``ramp_o(k) ey(ty, ky)`` ``(nky, n_ty)``."""

    cell: torch.Tensor
    n_tx: int
    n_ty: int
    ex: torch.Tensor
    cols: list[torch.Tensor]
    a: list[torch.Tensor]

    @classmethod
    def create(
        cls, t_px: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor, box: int
    ) -> ColumnSums | None:
        """For translations ``(T, 2)`` in pixels and the window's pixel frequencies ``(C,)``;
        ``None`` when the translations are not a regular grid or it would not save enough."""
        found = _grid_and_frequencies(t_px, kx, ky, box)
        if found is None:
            return None
        grid, kxc, kyc = found
        n_tx, n_ty, dev = grid.n_tx, grid.n_ty, kx.device
        n_pix, nt = kxc.shape[0], grid.ix.shape[0]
        kx_cols, cols = _columns(kxc)
        # multiply-adds per (particle, r): the columns' (the first stage, then the sums of one
        # data set and class_cross's, 4 n_ty per pixel each), and one GEMM's for two data sets
        separable = 2.0 * len(cols) * n_tx * n_ty + 8.0 * n_pix * n_ty
        if separable > _WORTH * 4.0 * n_pix * nt:
            return None
        ex = grid.ex(kx_cols).T  # (n_cols, n_tx)
        ex_real = torch.stack([ex.real, ex.imag], 1).reshape(2 * len(cols), n_tx)
        # per column ramp_o(k) ey(ty, ky): (nky, n_ty)
        a_all = grid.origin_ramp(kxc, kyc)[:, None] * grid.ey(kyc).T
        return cls(
            (grid.ix * n_ty + grid.iy).to(dev),
            n_tx,
            n_ty,
            ex_real.to(torch.float32).to(dev),
            [c.to(dev) for c in cols],
            [a_all[c].to(torch.complex64).to(dev) for c in cols],
        )

    def spread(self, w: torch.Tensor) -> torch.Tensor:
        """``[Re V; Im V]`` for weights ``w`` ``(n, T, R)``: ``(2 n_cols, n * n_ty * R)``, row
        ``2j`` (Re) and ``2j + 1`` (Im) of window column ``j`` laid out (particle, ty, r)."""
        n, _, r = w.shape
        cells = w.new_zeros((self.n_tx, n, self.n_ty, r))
        cells[self.cell // self.n_ty, :, self.cell % self.n_ty] = w.transpose(0, 1)
        return self.ex @ cells.view(self.n_tx, n * self.n_ty * r)

    def grid_cells(self, w: torch.Tensor) -> torch.Tensor:
        """Weights ``w`` ``(T, ...)`` (translations first) on the whole ``(tx, ty)`` grid, zero
        where the grid has no translation: ``(n_tx, n_ty * S)``, ``S`` the other dimensions'
        size, for :meth:`spread_cells`."""
        cells = w.new_zeros((self.n_tx * self.n_ty, *w.shape[1:]))
        cells[self.cell] = w
        return cells.view(self.n_tx, -1)

    def spread_cells(
        self, cells: torch.Tensor, j0: int, j1: int, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """``V`` of window columns ``j0`` to ``j1`` (at most the last) for weights on the grid
        (:meth:`grid_cells`): ``(j1 - j0, 2 n_ty, S)``, per column its rows (Re/Im, ty), for
        :attr:`column_blocks`. Through ``dtype`` GEMMs as :meth:`add`."""
        j1 = min(j1, len(self.cols))
        v = gemm(self.ex[2 * j0 : 2 * j1], cells, dtype)
        return v.view(j1 - j0, 2 * self.n_ty, cells.shape[1] // self.n_ty)

    @cached_property
    def column_blocks(self) -> tuple[torch.Tensor, list[tuple[int, int]], list[torch.Tensor]]:
        """The window's pixels column by column: their order ``(C,)``, each column's span in
        that order, and each column's ``ramp_o(k) ey(ty, ky)`` as the real block
        ``[[Re, -Im], [Im, Re]]`` ``(2 nky, 2 n_ty)``, rows (pixel, Re/Im): times a column of
        :meth:`spread_cells` it gives ``sum_t ramp_t(k) w(t, s)`` for the column's pixels (rows
        (pixel, Re/Im), as one GEMM with every translation's ramp would). Made once per instance."""
        order = torch.cat(self.cols)
        spans, blocks, c0 = [], [], 0
        for a in self.a:
            spans.append((c0, c0 + a.shape[0]))
            c0 += a.shape[0]
            rows = torch.stack([torch.cat([a.real, -a.imag], 1), torch.cat([a.imag, a.real], 1)], 1)
            blocks.append(rows.reshape(2 * a.shape[0], 2 * self.n_ty).contiguous())
        return order, spans, blocks

    def add(self, v: torch.Tensor, y: torch.Tensor, out: torch.Tensor, dtype: torch.dtype) -> None:
        """Add ``F_r(k)`` to ``out`` ``(C, 2 m, R)`` (Re/Im of each of the ``m`` data sets per
        pixel) for ``V`` of :meth:`spread` (``n`` particles) and data ``y`` ``(m, n, C)``
        (complex): per column one GEMM ``G (2 m nky, 2 n n_ty) x [Re V; Im V] (2 n n_ty, R)``,
        through ``dtype`` (float32 or a lower precision, as the M-step's ``gemm_dtype``)."""
        m, n, _ = y.shape
        r = v.shape[1] // (n * self.n_ty)
        for j, pix in enumerate(self.cols):
            nk = len(pix)
            # G(p; i, ty) = y_i(p) ramp_o(p) ey(ty, ky_p), as the real block [[Re, -Im], [Im, Re]]
            g = y[:, :, pix].permute(0, 2, 1)[..., None] * self.a[j][None, :, None, :]
            g = g.reshape(m * nk, n * self.n_ty)
            blk = torch.stack(
                [torch.cat([g.real, -g.imag], 1), torch.cat([g.imag, g.real], 1)], 1
            ).view(2 * m * nk, 2 * n * self.n_ty)
            vj = v[2 * j : 2 * j + 2].view(2 * n * self.n_ty, r)
            prod = gemm(blk, vj, dtype)
            # rows (set, pixel, Re/Im) -> out[pixel, (set, Re/Im)]
            out[pix] += prod.view(m, nk, 2, r).permute(1, 0, 2, 3).reshape(nk, 2 * m, r)

    def class_refs(
        self, p: torch.Tensor, n_classes: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Projections ``(R, C)`` (complex; R = classes x psi, class-major) for
        :meth:`class_cross`: per window column the pair ``[Re P | -Im P]``, ``[Im P | Re P]``,
        each ``(n_classes, Pf, 2 nky)``."""
        r = p.shape[0]
        if r % n_classes:
            raise ValueError(f"{r} projections are not {n_classes} classes of equal size")
        out = []
        for pix in self.cols:
            pj = p[:, pix].view(n_classes, r // n_classes, len(pix))
            out.append(
                (
                    torch.cat([pj.real, -pj.imag], 2).contiguous(),
                    torch.cat([pj.imag, pj.real], 2).contiguous(),
                )
            )
        return out

    def class_cross(
        self, v: torch.Tensor, y: torch.Tensor, refs: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """``u(c, i, k) = Re y_i(k) sum_(r in class c) conj(P_r(k)) sum_t W(i, t, r) ramp_t(k)``
        as ``(n_classes, n, C)`` float32 (the window's pixel order), for ``V`` of :meth:`spread`
        (``n`` particles), data ``y`` ``(n, C)`` (complex) and projections from
        :meth:`class_refs`: the particles' cross terms with their weighted projections, per
        class and pixel, without forming the sums over particles (:meth:`add`) or a cross term
        per translation.

        Per column two batched GEMMs over the classes contract ``V`` with ``conj(P)`` over psi
        (``U = conj(P) V``, ``(n n_ty, Pf) x (Pf, 2 nky)`` per class, Re and Im side by side);
        then ``Re sum_ty [y ramp_o ey](k; i, ty) U(k; i, ty)`` is one product and one sum."""
        n, c = y.shape
        ka, pf = refs[0][0].shape[:2]
        n_ty = self.n_ty
        out = torch.empty((ka, n, c), dtype=torch.float32, device=y.device)
        for j, pix in enumerate(self.cols):
            nk = len(pix)
            p_re, p_im = refs[j]
            # V's rows (particle, ty), columns (class, psi): per class (n n_ty, Pf)
            v_re = v[2 * j].view(n * n_ty, ka, pf).transpose(0, 1)
            v_im = v[2 * j + 1].view(n * n_ty, ka, pf).transpose(0, 1)
            u = torch.bmm(v_re, p_re).baddbmm_(v_im, p_im)  # [Re U | Im U], (Ka, n n_ty, 2 nky)
            g = y[:, pix][:, None, :] * self.a[j].T[None]  # y ramp_o ey, (n, n_ty, nky)
            u = u.view(ka, n, n_ty, 2 * nk).mul_(torch.cat([g.real, -g.imag], 2))
            out[:, :, pix] = u.view(ka, n, 2 * n_ty, nk).sum(2)
        return out

    def flops(self, n: int, r: int, m: int, class_cross: bool = False) -> float:
        """Floating-point operations of :meth:`spread` and :meth:`add` (``n`` particles, ``r``
        orientations, ``m`` data sets), and with ``class_cross`` those of its GEMMs."""
        n_pix = sum(len(c) for c in self.cols)
        first = 2.0 * 2 * len(self.cols) * self.n_tx * n * self.n_ty * r
        per_set = 2.0 * (2 * n_pix) * (2 * n * self.n_ty) * r  # add's, and class_cross's
        return first + per_set * (m + int(class_cross))
