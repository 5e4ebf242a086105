"""The batched E-step: squared differences as GEMMs, weights, 0.999 significance, two passes.

For a batch of B particles, R = (active classes x psi) projections P_r and T translations::

    diff2(i, r, t) = sum_p |c_i P_r - X_i ramp_t|² / (2 sigma²)
                   = const_i + sum_p (c_i² / 2sigma²) |P_r|² - 2 Re sum_p conj(P_r) (c_i X_i ramp_t / 2sigma²)

Pass 0 (coarse size, coarse psi and t) is dense: the cross term is one real GEMM
``(B*T, 2C) x (2C, R)`` and the middle one ``(B, C) x (C, R)`` (``c`` = scale x CTF; DC weight 0).
Where the translations are a regular grid, the dense cross terms come from two small DFTs
instead (:class:`tamis.class2d.shifts.SeparableShifts`).
Pass 1 (current size, oversampled psi and t) has two layouts, chosen per particle (one batch
may hold both). A particle with a broad posterior is dense (:func:`_dense_pass`): every fine
weight of the classes it needs in one float32 ``(B, Tf, R)`` tensor from the same GEMM, children
of insignificant coarse samples at -inf. A sharp one works on *pairs* (particle, fine
orientation) whose coarse parent carried weight:
``Re (conj(P_r) . y_i) @ ramps^T`` is a GEMM ``(M, 2C) x (2C, T_f)`` over every fine translation,
masked to the children of significant coarse translations. Either layout drives the M-step sums
(:func:`tamis.class2d.mstep.accumulate`). Log-weights relative to the particle's best are
float32; the per-particle constants and log-sums are float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from tamis.class2d.shifts import ColumnRefs, SeparableShifts

__all__ = [
    "PreparedRefs",
    "prepare_refs",
    "BatchData",
    "Hypotheses",
    "expectation",
    "cross_terms",
    "pair_cross",
    "significant_mask",
    "GEMM_STATS",
]

#: Floating-point operations done by the E-step GEMMs (``flops``) and by the M-step's
#: (``mstep_flops``), their shapes, and (set by the driver) the E-step's and M-step's wall times,
#: for benchmarks.
GEMM_STATS: dict[str, object] = {
    "flops": 0.0,
    "mstep_flops": 0.0,
    "shapes": [],
    "estep_seconds": 0.0,
    "mstep_seconds": 0.0,
}

#: Significance histograms bin float32 weights by their bit patterns shifted right by this
#: (18: 5 of the 23 mantissa bits, 32 bins per octave).
_SIG_SHIFT = 18

#: Capped significance of rows up to this many samples sorts the top k (topk); longer rows (3D
#: pass 0: ~4 million) find both thresholds from a histogram, 2x faster there, 1.5x slower below.
_TOPK_COLUMNS = 1 << 20

#: Long rows whose weights that can be significant (:func:`_thresholds_of_few`) are at most this
#: fraction of the row find the thresholds by sorting those; more take the histograms.
_FEW_CANDIDATES = 1 / 16

#: A particle's pass 1 goes dense (every fine weight, :func:`_dense_pass`) when more than this
#: fraction of its (class, fine psi) pairs have a significant parent.
DENSE_PAIRS = 0.25

# The per-particle fields of Hypotheses (the others are per pair, or the dense weights).
_PER_PARTICLE = ("best_cls", "best_psi", "best_trans", "pmax", "n_significant", "loglik")


def count_gemm(m: int, k: int, n: int, key: str = "flops") -> None:
    """Add a GEMM of shape (m, k) x (k, n) to ``GEMM_STATS[key]`` (and its shape, for benchmarks)."""
    GEMM_STATS[key] += 2.0 * m * k * n
    shapes = GEMM_STATS["shapes"]
    if len(shapes) < 64:
        shapes.append((m, k, n))


@dataclass
class BatchData:
    """One batch of particles prepared for the E-step (all on one device).

    ``x``/``xu``: masked/unmasked particle spectra on the current-size window ``(B, C)``, already
    norm-corrected and pre-shifted by the rounded previous offset. ``ctf``: scale x CTF ``(B, C)``.
    ``sigma2``: noise variance per pixel ``(B, C)``. ``dc``: bool ``(C,)``, the DC pixel.
    ``high_xi2``: ``sum |X|²`` beyond the current size ``(B,)``. ``offset_px``: rounded previous
    offsets ``(B, 2)``.
    """

    x: torch.Tensor
    xu: torch.Tensor
    ctf: torch.Tensor
    sigma2: torch.Tensor
    dc: torch.Tensor
    high_xi2: torch.Tensor
    offset_px: torch.Tensor

    def subset(self, rows: torch.Tensor) -> BatchData:
        """The particles ``rows`` of this batch (in that order)."""
        return replace(
            self,
            x=self.x[rows],
            xu=self.xu[rows],
            ctf=self.ctf[rows],
            sigma2=self.sigma2[rows],
            high_xi2=self.high_xi2[rows],
            offset_px=self.offset_px[rows],
        )

    @property
    def weight2(self) -> torch.Tensor:
        """``1 / (2 sigma²)`` with the DC pixel excluded, ``(B, C)``."""
        return noise_weights(self.sigma2, self.dc)

    def const(self, pixels: torch.Tensor) -> torch.Tensor:
        """``sum |X|² / (2 sigma²)`` over ``pixels`` plus half the power beyond the current size:
        the part of diff2 that does not depend on the hypothesis, ``(B,)`` float64."""
        x = self.x[:, pixels]
        w2 = self.weight2[:, pixels]
        return (w2 * (x.real**2 + x.imag**2)).sum(1).to(torch.float64) + 0.5 * self.high_xi2

    def log_norm(self, pixels: torch.Tensor) -> torch.Tensor:
        """``sum log(2 pi sigma²)`` over ``pixels`` (DC excluded), the Gaussian's normalisation
        in the log-likelihood, ``(B,)`` float64."""
        terms = torch.where(
            self.dc[None], torch.zeros_like(self.sigma2), torch.log(2 * math.pi * self.sigma2)
        )
        return terms[:, pixels].sum(1).to(torch.float64)


@dataclass
class Hypotheses:
    """The significant fine weights of a batch, as (particle, orientation) pairs x translations.

    Per pair (M,): ``particle`` (row in the batch), ``cls`` (class), ``psi`` (fine psi index).
    ``weight`` ``(M, Tf)``: weights normalised by the particle's total fine weight, zero where
    not significant. Per particle (B,): ``best_cls``, ``best_psi``, ``best_trans``, ``pmax``,
    ``n_significant`` (coarse samples), ``loglik``.

    With fine projections made on demand, ``psi`` counts the fine children of the coarse
    orientations ``coarse_subset`` ``(U,)`` only (fine ``j * n_over + a`` refines coarse
    ``coarse_subset[j]``).

    Particles with broad posteriors come *dense* instead: ``dense`` ``(Bd, Tf, Ka * Pf)``
    float32 holds every fine weight of the classes ``active`` ``(Ka,)`` (row
    ``r = ka * Pf + psi``) for the batch rows ``dense_rows`` ``(Bd,)`` (``None``: every row, in
    order), and the pair fields hold the other particles' pairs.
    """

    particle: torch.Tensor
    cls: torch.Tensor
    psi: torch.Tensor
    weight: torch.Tensor
    best_cls: torch.Tensor
    best_psi: torch.Tensor
    best_trans: torch.Tensor
    pmax: torch.Tensor
    n_significant: torch.Tensor
    loglik: torch.Tensor
    dense: torch.Tensor | None = None
    active: torch.Tensor | None = None
    dense_rows: torch.Tensor | None = None
    coarse_subset: torch.Tensor | None = None

    def to_pairs(self) -> Hypotheses:
        """The same weights as (particle, class, psi) pairs with any non-zero weight."""
        if self.dense is None:
            return self
        b, tf, ra = self.dense.shape
        npf = ra // len(self.active)
        per_pair = self.dense.permute(0, 2, 1)  # (Bd, Ra, Tf)
        i, r = torch.nonzero((per_pair > 0).any(-1), as_tuple=True)
        rows = i if self.dense_rows is None else self.dense_rows[i]
        return replace(
            self,
            particle=torch.cat([self.particle, rows]),
            cls=torch.cat([self.cls, self.active[r // npf]]),
            psi=torch.cat([self.psi, r % npf]),
            weight=torch.cat([self.weight, per_pair[i, r].to(torch.float64)]),
            dense=None,
            active=None,
            dense_rows=None,
        )

    def weighted_orientations(self, n_psi: int) -> tuple[Hypotheses, torch.Tensor]:
        """The same weights over only the fine orientations (of ``n_psi``) that carry any, and
        those orientations ``(P',)``: pairs without weight go, ``psi``, ``best_psi`` and the
        dense columns are renumbered."""
        dev = self.pmax.device
        busy = torch.zeros(n_psi, dtype=torch.bool, device=dev)
        pair_ok = (self.weight > 0).any(1)
        busy[self.psi[pair_ok]] = True
        if self.dense is not None:
            b, tf, ra = self.dense.shape
            busy |= (self.dense > 0).any(1).any(0).view(ra // n_psi, n_psi).any(0)
        keep = torch.nonzero(busy).squeeze(1)
        new = torch.full((n_psi,), -1, dtype=torch.long, device=dev)
        new[keep] = torch.arange(len(keep), device=dev)
        fields = dict(
            particle=self.particle[pair_ok],
            cls=self.cls[pair_ok],
            psi=new[self.psi[pair_ok]],
            weight=self.weight[pair_ok],
            best_psi=torch.where(self.best_psi >= 0, new[self.best_psi.clamp(min=0)], -1),
        )
        if self.dense is not None:
            fields["dense"] = self.dense.view(b, tf, ra // n_psi, n_psi)[..., keep].reshape(
                b, tf, -1
            )
        return replace(self, **fields), keep

    def split(self) -> tuple[tuple[torch.Tensor, Hypotheses], tuple[torch.Tensor, Hypotheses]]:
        """A batch with both layouts as two: ``(rows, dense part), (rows, pair part)``, each
        part's particles numbered within its ``rows``."""
        assert self.dense is not None and self.dense_rows is not None
        b = len(self.pmax)
        rows_d = self.dense_rows
        dense_mask = torch.zeros(b, dtype=torch.bool, device=rows_d.device)
        dense_mask[rows_d] = True
        rows_s = torch.nonzero(~dense_mask).squeeze(1)
        number = torch.full((b,), -1, dtype=torch.long, device=rows_d.device)
        number[rows_s] = torch.arange(len(rows_s), device=rows_d.device)

        def per_particle(rows: torch.Tensor) -> dict[str, torch.Tensor]:
            return {f: getattr(self, f)[rows] for f in _PER_PARTICLE}

        empty = self.particle[:0]
        dense = replace(
            self,
            particle=empty,
            cls=empty,
            psi=empty,
            weight=self.weight[:0],
            dense_rows=None,
            **per_particle(rows_d),
        )
        pairs = replace(
            self,
            particle=number[self.particle],
            dense=None,
            active=None,
            dense_rows=None,
            **per_particle(rows_s),
        )
        return (rows_d, dense), (rows_s, pairs)


def significant_mask(
    logw: torch.Tensor, fraction: float, max_significant: int = -1
) -> torch.Tensor:
    """Per row of ``logw`` ``(B, S)``: the samples that together carry ``fraction`` of the weight.

    RELION's rule: sort descending, accumulate until the running sum exceeds ``fraction x total``;
    the last weight added is the threshold; keep every weight >= threshold (at most
    ``max_significant`` if > 0). Without a cap this is :func:`dense_significance`, which gives the
    same mask without sorting.
    """
    if max_significant <= 0:
        rel = (logw - logw.max(dim=1, keepdim=True).values).to(torch.float32)
        dense_significance(rel, fraction)
        return rel > 0
    return capped_significance(logw.clone(), fraction, max_significant)


def capped_significance(
    logw: torch.Tensor, fraction: float, max_significant: int, max_elements: int = 1 << 22
) -> torch.Tensor:
    """:func:`significant_mask` with a cap, in place and in bounded memory: ``logw`` ``(B, S)``
    (float32 in pass 0; overwritten with normalised weights) gives the mask of the samples that
    carry ``fraction`` of the weight, at most ``max_significant`` (RELION's rule: the top weights
    sorted, the threshold where their running sum exceeds ``fraction`` of the row's total, or the
    ``max_significant``-th largest weight if that comes first). Short rows (2D) sort their top
    ``max_significant``; long ones (3D pass 0) are :func:`capped_significant_indices` written
    into a mask. Rows are taken ``max_elements`` at a time."""
    b, n = logw.shape
    if n > _TOPK_COLUMNS:
        rows, cols = capped_significant_indices(logw, fraction, max_significant, max_elements)
        mask = torch.zeros((b, n), dtype=torch.bool, device=logw.device)
        mask[rows, cols] = True
        return mask
    k = min(max_significant, n)
    mask = torch.empty((b, n), dtype=torch.bool, device=logw.device)
    step = max(1, max_elements // max(n, 1))
    for s in range(0, b, step):
        w = logw[s : s + step]
        _, floor = _normalise_rows(w)
        # the top k sorted; the threshold where their running sum first exceeds the fraction,
        # else the k-th
        top, _ = torch.topk(w, k, dim=1, sorted=True)
        csum = torch.cumsum(top.to(torch.float64), dim=1)
        target = fraction * w.sum(1, keepdim=True, dtype=torch.float64)
        pos = torch.searchsorted(csum, target, right=True).clamp(max=k - 1)
        thr = torch.gather(top, 1, pos).squeeze(1)
        mask[s : s + step] = (w >= thr[:, None]) & (w > floor[:, None])
    return mask


def _normalise_rows(
    w: torch.Tensor, row_max: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-weights ``w`` ``(B, S)`` -> weights over their row's total, in place; the totals
    (float64, relative to the row's largest, ``row_max`` when known) and the floor under which a
    weight counts as none."""
    if row_max is None:
        row_max = w.amax(dim=1)
    # below exp(-80) relative, weights are nothing beside the 1 - fraction cut (and exp is
    # slow on arguments that underflow): raised to it, then excluded by the floor
    w.sub_(row_max[:, None]).clamp_(min=-80.0).exp_()
    total = w.sum(1).to(torch.float64)  # float32 cascade sum: a scale, not a threshold
    w.div_(total.to(torch.float32)[:, None])
    return total, (math.exp(-80.0) / total).to(torch.float32) * 1.001


def capped_significant_indices(
    logw: torch.Tensor, fraction: float, max_significant: int, max_elements: int = 1 << 22
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of the significant samples of :func:`capped_significance`, without a
    ``(B, S)`` mask: 3D pass 0 keeps a few hundred of ~4 million samples per particle, and a
    mask costs more passes over the rows than finding them.

    ``logw`` ``(B, S)`` is overwritten with normalised weights (long rows in float32). Long rows
    sort only the weights that can reach either threshold (:func:`_thresholds_of_few`), found
    in the blocks of :data:`_BLOCK` samples whose largest log-weight can reach them, and pick
    the significant ones from those alone; where those are many, both thresholds come from one
    histogram of the weights' bit patterns, sorting only the members of the bins they fall in,
    as :func:`dense_significance`. Short rows take :func:`capped_significance`'s mask."""
    b, n = logw.shape
    if n <= _TOPK_COLUMNS:
        return torch.nonzero(capped_significance(logw, fraction, max_significant), as_tuple=True)
    if logw.dtype != torch.float32:
        logw = logw.to(torch.float32)  # the histograms bin float32 bit patterns
    k = min(max_significant, n)
    step = max(1, max_elements // max(n, 1))
    found_rows, found_cols = [], []
    for s in range(0, b, step):
        w = logw[s : s + step]
        blocks = _Blocks(w)
        scale, floor = _normalise_rows(w, blocks.row_max)
        few = _thresholds_of_few(blocks, scale, fraction, k)
        if few is not None and bool((few.thr > few.low).all()):
            # every significant weight is >= a threshold above the candidates' bound
            keep = (few.vals >= few.thr[few.rows]) & (few.vals > floor[few.rows])
            rows, cols = few.rows[keep], few.cols[keep]
        else:
            if few is not None:
                thr = few.thr
            else:
                mass, count = _bin_mass(w, with_counts=True)
                frac_thr = _fraction_threshold(w, mass, fraction)
                thr = torch.maximum(frac_thr, _kth_largest(w, count, k)).to(torch.float32)
            rows, cols = torch.nonzero((w >= thr[:, None]) & (w > floor[:, None]), as_tuple=True)
        found_rows.append(rows + s)
        found_cols.append(cols)
    return torch.cat(found_rows), torch.cat(found_cols)


#: Long rows are scanned in blocks of this many samples: only the blocks whose largest weight
#: can be significant are read again.
_BLOCK = 1024


class _Blocks:
    """Rows ``w`` ``(B, S)`` as blocks of :data:`_BLOCK` columns and a shorter tail: each
    block's largest log-weight (taken before the rows are normalised in place) and the rows'
    largest."""

    def __init__(self, w: torch.Tensor) -> None:
        n = w.shape[1]
        self.w, self.n_blocks = w, n // _BLOCK
        self.main = self.n_blocks * _BLOCK
        self.block_max = self.as_blocks().amax(-1)  # (B, n_blocks)
        row_max = w[:, self.main :].amax(1) if self.main < n else None
        if self.n_blocks:
            top = self.block_max.amax(1)
            row_max = top if row_max is None else torch.maximum(row_max, top)
        self.row_max = row_max

    def as_blocks(self) -> torch.Tensor:
        """The rows' blocks as a view ``(B, n_blocks, _BLOCK)`` (the tail left out)."""
        return self.w[:, : self.main].view(self.w.shape[0], self.n_blocks, _BLOCK)

    def total(self) -> torch.Tensor:
        """Row sums (float64) of the normalised rows: float32 within a block, float64 across
        (a float64 sum of every sample is ~20 times slower)."""
        total = self.as_blocks().sum(-1).to(torch.float64).sum(-1)
        return total + self.w[:, self.main :].sum(1, dtype=torch.float64)

    def above(
        self, low: torch.Tensor, scale: torch.Tensor, limit: float
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(row, column) of the normalised weights above ``low`` ``(B,)``, in row-major order,
        or ``None`` if they are more than ``limit``: only blocks whose largest weight,
        ``exp(block max - row max) / scale``, may be above it (with a margin for the rounding of
        exp) are compared sample by sample."""
        b, n = self.w.shape
        tail = self.w[:, self.main :] > low[:, None]
        count = int(tail.sum())
        inside = None
        if self.n_blocks:
            cut = torch.log(low.to(torch.float64) * scale) - 1e-3  # (B,)
            rel_max = (self.block_max - self.row_max[:, None]).to(torch.float64)
            # clamped at exp(-80), every sample of a row with a lower cut may be above low
            maybe = (rel_max > cut[:, None]) | (cut <= -80.0)[:, None]
            br, bc = torch.nonzero(maybe, as_tuple=True)
            inside = self.as_blocks()[br, bc] > low[br, None]  # (blocks, _BLOCK)
            count += int(inside.sum())
        if count > limit:
            return None
        rows_list, cols_list = [], []
        if inside is not None:
            i, j = torch.nonzero(inside, as_tuple=True)
            rows_list.append(br[i])
            cols_list.append(bc[i] * _BLOCK + j)
        if self.main < n:
            tr, tcol = torch.nonzero(tail, as_tuple=True)
            rows_list.append(tr)
            cols_list.append(tcol + self.main)
        rows, cols = torch.cat(rows_list), torch.cat(cols_list)
        if len(rows_list) > 1:
            order = torch.argsort(rows * n + cols)
            rows, cols = rows[order], cols[order]
        return rows, cols


@dataclass(frozen=True)
class _Few:
    """:func:`_thresholds_of_few`'s result: both thresholds in one ``thr`` ``(B,)`` (float32),
    the bound ``low`` ``(B,)`` the candidates are above, and the candidates (row, column,
    value)."""

    thr: torch.Tensor
    low: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor


def _thresholds_of_few(
    blocks: _Blocks, scale: torch.Tensor, fraction: float, k: int
) -> _Few | None:
    """Both thresholds of :func:`capped_significance` (float32, per row of the normalised
    weights ``blocks.w`` ``(B, S)``, ``scale`` their sums before normalising) from the weights
    that can reach them, sorted; ``None`` when those are more than
    :data:`_FEW_CANDIDATES` of the rows (then the histograms are faster).

    A weight under ``(1 - fraction) / (10 S)`` of its row's total is never added: the weights
    above it sum to more than ``fraction`` of the total before it comes (RELION adds while the
    running sum is <= ``fraction``), so the fraction's threshold is among the weights above it;
    and where fewer than ``k`` weights are above it, the ``k``-th largest is under the fraction's
    threshold and does not count. Sharp posteriors (3D pass 0 at HEALPix order 3: a median of
    ~700 such weights of 4 million) need only those."""
    w = blocks.w
    b, n = w.shape
    total = blocks.total()
    low = (0.1 * (1.0 - fraction) / n * total).to(torch.float32)
    found = blocks.above(low, scale, _FEW_CANDIDATES * w.numel())
    if found is None:
        return None
    rows, cols = found
    vals = w[rows, cols]
    zero = torch.zeros(len(rows), dtype=torch.float64, device=w.device)
    frac_thr = _threshold_in_bin(rows, vals, zero, b, fraction * total)
    frac_thr = torch.where(torch.isfinite(frac_thr), frac_thr, 0.0)
    kth = _ranked_in_rows(rows, vals, torch.full((b,), k, device=w.device), b)
    return _Few(torch.maximum(frac_thr, kth).to(torch.float32), low, rows, cols, vals)


def _ranked_in_rows(
    rows: torch.Tensor, vals: torch.Tensor, rank: torch.Tensor, b: int
) -> torch.Tensor:
    """Per row of ``b``, the ``rank``-th largest (1-based, ``(b,)``) of the values ``vals`` that
    belong to it (``rows``), float64; 0 where the row has fewer."""
    vals = vals.to(torch.float64)
    order = torch.argsort(rows.to(torch.float64) + (1.0 - vals))  # by row, then descending
    sv = vals[order]
    per_row = torch.bincount(rows, minlength=b)
    first = torch.cumsum(per_row, 0) - per_row
    pos = (first + rank - 1).clamp(min=0, max=max(len(sv) - 1, 0))
    if not len(sv):
        return torch.zeros(b, dtype=torch.float64, device=vals.device)
    return torch.where(per_row >= rank, sv[pos], torch.zeros_like(sv[pos]))


def _bin_mass(
    w: torch.Tensor, with_counts: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row of normalised weights ``w`` ``(B, S)`` (float32 in [0, 1]): their mass (float64)
    and, optionally, their number in each bin of the float32 bit patterns shifted by
    :data:`_SIG_SHIFT` (monotone in the value). Columns are taken in pieces so that the 64-bit
    temporaries stay small."""
    b, n = w.shape
    bits = w.view(torch.int32)
    n_bins = (0x3F800000 >> _SIG_SHIFT) + 1
    # Bin masses in float64: a row holds up to millions of similar weights, and a float32 sum
    # drifts by percents there, far more than the 1 - fraction margin.
    mass = torch.zeros((b, n_bins), dtype=torch.float64, device=w.device)
    count = torch.zeros((b, n_bins), dtype=torch.int64, device=w.device) if with_counts else None
    cols = max(1, (1 << 20) // max(b, 1))
    for s in range(0, n, cols):
        code = (bits[:, s : s + cols] >> _SIG_SHIFT).long().clamp_(max=n_bins - 1)
        mass.scatter_add_(1, code, w[:, s : s + cols].to(torch.float64))
        if count is not None:
            count.scatter_add_(1, code, torch.ones_like(code))
    return mass, count


def _members(w: torch.Tensor, bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of the weights that fall in bin ``bins[row]``."""
    lo = (bins << _SIG_SHIFT).to(torch.int32)[:, None]
    bits = w.view(torch.int32)
    return torch.nonzero((bits >= lo) & (bits < lo + (1 << _SIG_SHIFT)), as_tuple=True)


def _fraction_threshold(w: torch.Tensor, mass: torch.Tensor, fraction: float) -> torch.Tensor:
    """RELION's threshold per row (float64): the smallest weight added while the running sum of
    the weights sorted descending is <= ``fraction`` of the row's total (0 if none)."""
    b = w.shape[0]
    # mass of the bins above each bin: non-increasing along the row
    above = mass.sum(1, keepdim=True) - torch.cumsum(mass, 1)
    target = fraction * mass.sum(1)  # (B,): the fraction of the row's own total
    # The crossing bin, the first (from the top) whose higher bins do not exceed the target:
    # the bins that do form a prefix of the row.
    cbin = (above > target[:, None]).sum(1)
    r_idx, c_idx = _members(w, cbin)
    thr = _threshold_in_bin(r_idx, w[r_idx, c_idx], above[r_idx, cbin[r_idx]], b, target)
    # A row without a threshold (not expected: the crossing bin's first member is always added)
    # keeps every weight rather than none.
    return torch.where(torch.isfinite(thr), thr, 0.0)


def _kth_largest(w: torch.Tensor, count: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest weight of each row (float64), from the bin counts: the bins with at
    least ``k`` weights above them form a prefix; the next holds it, and only it is sorted."""
    b = w.shape[0]
    above = count.sum(1, keepdim=True) - torch.cumsum(count, 1)  # weights above each bin
    kbin = (above >= k).sum(1).clamp(max=count.shape[1] - 1)
    need = k - above.gather(1, kbin[:, None]).squeeze(1)  # its rank within that bin (1-based)
    r_idx, c_idx = _members(w, kbin)
    return _ranked_in_rows(r_idx, w[r_idx, c_idx], need, b)


def noise_weights(sigma2: torch.Tensor, dc: torch.Tensor) -> torch.Tensor:
    """``1 / (2 sigma²)`` ``(B, C)`` of the noise ``sigma2`` ``(B, C)``, zero at the DC pixel
    (``dc`` ``(C,)``): the E-step's per-pixel weights (:attr:`BatchData.weight2`)."""
    w = 0.5 / sigma2
    return torch.where(dc[None], torch.zeros_like(w), w)


@dataclass(frozen=True)
class PreparedRefs:
    """Projections ``(R, C)`` as the E-step's GEMMs read them: real rows ``(R, 2C)`` (a view of
    contiguous projections), squared norms ``(R, C)`` and, for translations that separate, the
    projections by column (``cols``). Made once per iteration for pass 0, whose projections
    every batch shares (:func:`prepare_refs`)."""

    rows: torch.Tensor
    norm2: torch.Tensor
    cols: ColumnRefs | None = None


def prepare_refs(proj: torch.Tensor, shifts: SeparableShifts | None = None) -> PreparedRefs:
    """:class:`PreparedRefs` of projections ``(R, C)`` (complex), laid out by column too when
    ``shifts`` is given."""
    cols = shifts.prepare(proj) if shifts is not None else None
    return PreparedRefs(real_rows(proj), proj.real**2 + proj.imag**2, cols)


def _log_weights(
    y_w: torch.Tensor,
    a_w: torch.Tensor | None,
    proj: torch.Tensor | PreparedRefs,
    ramps: torch.Tensor,
    shifts: SeparableShifts | None = None,
    bias: torch.Tensor | None = None,
    norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """``2 cross(i, t, r) - A(i, r) + bias(r)`` as ``(B, T, R)`` float32: minus diff2 up to the
    particle's constant (plus a log-prior per projection, ``bias`` ``(R,)``, when given). The
    cross term comes straight out of one GEMM ``(B*T, 2C) x (2C, R)`` (the particles scaled by
    2, exactly), or, when the translations separate (``shifts``, the ramps' grid on these
    pixels), from :meth:`SeparableShifts.cross`; A by ``(B, C) x (C, R)``, subtracted in place.

    ``y_w = c X / (2 sigma²)`` ``(B, C)``, ``a_w = c² / (2 sigma²)`` ``(B, C)``, ``proj`` ``(R, C)``
    (or prepared once for many batches), ``ramps`` ``(T, C)``. With ``a_w=None``: ``2 cross``
    alone (:func:`cross_terms`). ``norms``: ``A`` ``(B, R)`` when already made (read only).
    """
    refs = proj if isinstance(proj, PreparedRefs) else prepare_refs(proj, shifts)
    b, c = y_w.shape
    t, r = ramps.shape[0], refs.rows.shape[0]
    if shifts is not None:
        cols = refs.cols
        if cols is None:
            cols = shifts.prepare(torch.view_as_complex(refs.rows.view(r, c, 2)))
        logw = shifts.cross(2.0 * y_w, cols)
        GEMM_STATS["flops"] += shifts.flops(b, r)
    else:
        logw = (shifted_real(2.0 * y_w, ramps) @ refs.rows.T).view(b, t, r)
        count_gemm(b * t, 2 * c, r)
    if a_w is None:
        return logw
    a = norm_terms(a_w, refs) if norms is None else norms
    if bias is not None:  # on the (B, R) terms: no pass over the (B, T, R) weights
        a = a - bias.to(a.dtype)[None]
    return logw.sub_(a[:, None, :])


def norm_terms(a_w: torch.Tensor, refs: PreparedRefs) -> torch.Tensor:
    """``A(i, r) = sum_k a_w(i, k) |P_r(k)|²`` ``(B, R)``: one GEMM ``(B, C) x (C, R)``."""
    count_gemm(a_w.shape[0], a_w.shape[1], refs.norm2.shape[0])
    return a_w @ refs.norm2.T


def cross_terms(
    y: torch.Tensor,
    proj: torch.Tensor | PreparedRefs,
    ramps: torch.Tensor,
    shifts: SeparableShifts | None = None,
) -> torch.Tensor:
    """``2 Re sum_p conj(P_r) y_i ramp_t`` as ``(B, T, R)`` float32: the E-step's cross terms
    alone, by the same GEMMs or separable sums (:func:`_log_weights`)."""
    return _log_weights(y, None, proj, ramps, shifts)


def _diff2_dense(
    y_w: torch.Tensor,
    a_w: torch.Tensor,
    proj: torch.Tensor | PreparedRefs,
    ramps: torch.Tensor,
    shifts: SeparableShifts | None = None,
) -> torch.Tensor:
    """``A(i, r) - 2 cross(i, t, r)`` as ``(B, R, T)`` (float64); see :func:`_log_weights`."""
    return -_log_weights(y_w, a_w, proj, ramps, shifts).transpose(1, 2).to(torch.float64)


def expectation(
    data: BatchData,
    *,
    proj_coarse: torch.Tensor,
    proj_fine: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    coarse_pixels: torch.Tensor,
    estep_pixels: torch.Tensor,
    ramps_coarse: torch.Tensor,
    ramps_fine: torch.Tensor,
    log_prior_offset: torch.Tensor,
    log_prior_class: torch.Tensor,
    n_over_psi: int,
    n_over_trans: int,
    fraction: float = 0.999,
    max_significant: int = -1,
    dense_pairs: float | None = None,
    coarse_refs: PreparedRefs | None = None,
    log_prior_orient: torch.Tensor | None = None,
    shifts_coarse: SeparableShifts | None = None,
    shifts_fine: SeparableShifts | None = None,
    log_prior_dir: torch.Tensor | None = None,
    coarse_norms: torch.Tensor | None = None,
) -> Hypotheses:
    """Run both E-step passes for one batch.

    ``proj_coarse`` ``(K, Pc, Cc)`` on ``coarse_pixels`` (positions in the window);
    ``proj_fine`` ``(K, Pf, C)`` on the whole current-size window, or a function that makes
    them for the coarse orientations ``(U,)`` that pass 0 found significant for any particle
    (``(K, U * n_over_psi, C)``; the hypotheses then count fine orientations within those,
    :attr:`Hypotheses.coarse_subset`), given also which ``(K, U)`` (class, coarse orientation)
    pairs are significant for any particle: the others' projections are never read (their
    weights are zero) and may be left zero; ``estep_pixels`` are the
    window positions the fine pass uses (all, or the coarse ones with ``--strict_highres_exp``).
    ``ramps_*`` are phase ramps ``(T, C*)`` of the perturbed translations;
    ``log_prior_offset`` ``(B, K, Tc)`` is evaluated at the unperturbed coarse translations.
    ``log_prior_class`` ``(K,)`` is ``-inf`` for empty classes.
    With ``n_over_psi == n_over_trans == 1`` and ``proj_fine is proj_coarse``
    (``--oversampling 0``) pass 0 is the only pass. A particle for which more than
    ``dense_pairs`` of its (class, fine psi) pairs need evaluating takes the dense pass 1.
    ``log_prior_orient`` ``(B, Pc)``: a per-particle log-prior of each coarse orientation (local
    searches: ``-inf`` outside the particle's neighbourhood), shared by its fine children, as
    RELION's ``exp_directions_prior * exp_psi_prior``. ``shifts_coarse``/``shifts_fine``: the
    coarse translations on ``coarse_pixels`` and the fine ones on ``estep_pixels`` as regular
    grids (:class:`~tamis.class2d.shifts.SeparableShifts`), for the dense passes' cross terms.
    ``log_prior_dir`` ``(K, Pc)``: a log-prior per class and coarse orientation (RELION's
    learned ``pdf_direction`` in 3D global searches, relative to each class's mean: the class's
    own part is in ``log_prior_class``), shared by the fine children. ``coarse_norms``
    ``(B, K * Pc)``: pass 0's ``A(i, r)`` against every class's coarse projections when made
    beforehand for several batches (:func:`norm_terms`; read only).
    """
    b = data.x.shape[0]
    k, pc, _ = proj_coarse.shape
    tc = ramps_coarse.shape[0]
    w2 = data.weight2
    ctf, x = data.ctf, data.x

    # ---- pass 0: dense over active classes x coarse psi x coarse t ---------------------------
    n_sig: torch.Tensor | None = None
    subset: torch.Tensor | None = None  # coarse orientations any particle needs (on demand)
    active = torch.nonzero(torch.isfinite(log_prior_class)).squeeze(1)
    ka = len(active)
    w2c, ctfc, xc = w2[:, coarse_pixels], ctf[:, coarse_pixels], x[:, coarse_pixels]
    if ka == k:  # every class active: no copy, and the prepared rows when given
        pc_flat = coarse_refs if coarse_refs is not None else proj_coarse.reshape(k * pc, -1)
    else:
        pc_flat = proj_coarse[active].reshape(ka * pc, -1)
    final_pass = n_over_psi == 1 and n_over_trans == 1 and proj_fine is proj_coarse
    if final_pass:
        d2 = _diff2_dense(w2c * ctfc * xc, w2c * ctfc * ctfc, pc_flat, ramps_coarse, shifts_coarse)
        d2 = d2.reshape(b, ka, pc, tc) + data.const(coarse_pixels)[:, None, None, None]
        prior = log_prior_class[active][None, :, None, None] + log_prior_offset[:, active, None, :]
        if log_prior_orient is not None:
            prior = prior + log_prior_orient[:, None, :, None]
        if log_prior_dir is not None:
            prior = prior + log_prior_dir[active][None, :, :, None]
        logw0 = (prior - d2).reshape(b, -1)
        sig = significant_mask(logw0, fraction, max_significant).reshape(b, ka, pc, tc)
    else:
        # Only the mask is needed: log-weights without the particle's constant, in place in
        # float32, as in the dense pass 1.
        bias = None if log_prior_dir is None else log_prior_dir[active].reshape(-1)
        norms = coarse_norms
        if norms is not None and ka < k:
            norms = norms.view(b, k, pc)[:, active].reshape(b, ka * pc)
        rel = _log_weights(
            w2c * ctfc * xc, w2c * ctfc * ctfc, pc_flat, ramps_coarse, shifts_coarse, bias, norms
        )
        rel = rel.view(b, tc, ka, pc)
        pri = log_prior_class[active][None, None, :] + log_prior_offset[:, active].transpose(1, 2)
        rel.add_(pri.to(torch.float32)[..., None])
        if log_prior_orient is not None:
            rel.add_(log_prior_orient.to(torch.float32)[:, None, None, :])
        if max_significant > 0 and rel[0].numel() > _TOPK_COLUMNS:
            # long rows (3D at HEALPix order 3): few significant samples, found as indices
            sig, n_sig, subset = _sparse_significance(
                rel, fraction, max_significant, callable(proj_fine)
            )
        else:
            if max_significant > 0:
                sig = capped_significance(rel.view(b, -1), fraction, max_significant)
                sig = sig.view(rel.shape)
            else:
                dense_significance(rel.view(b, -1), fraction)
                sig = rel > 0
            sig = sig.permute(0, 2, 3, 1)  # (B, Ka, Pc, Tc)
    if n_sig is None:
        n_sig = sig.sum((1, 2, 3))
    pairs = torch.nonzero(sig.any(-1))  # (Mc, 3): particle, active class, coarse psi

    if final_pass:
        # --oversampling 0: the coarse pass is the final one.
        lse = torch.logsumexp(logw0, dim=1)
        logw = logw0.reshape(b, ka, pc, tc)[pairs[:, 0], pairs[:, 1], pairs[:, 2]]
        keep = sig[pairs[:, 0], pairs[:, 1], pairs[:, 2]]
        weight = torch.where(keep, torch.exp(logw - lse[pairs[:, 0], None]), 0.0)
        p_i, p_k, p_psi = pairs[:, 0], active[pairs[:, 1]], pairs[:, 2]
        return _finish(p_i, p_k, p_psi, weight, lse, n_sig, data, coarse_pixels, b)

    if callable(proj_fine):
        if subset is None:
            subset = torch.nonzero(sig.any(3).any(1).any(0)).squeeze(1)
            sig = sig[:, :, subset]
        # the (class, coarse orientation) pairs any particle needs: a coarse orientation is
        # mostly significant in one class (measured in 3D at HEALPix order 3: one of three)
        need = torch.zeros((k, len(subset)), dtype=torch.bool, device=sig.device)
        need[active] = sig.any(3).any(0)
        proj_fine = proj_fine(subset, need)
        pairs = torch.nonzero(sig.any(-1))
        if log_prior_orient is not None:
            log_prior_orient = log_prior_orient[:, subset]
        if log_prior_dir is not None:
            log_prior_dir = log_prior_dir[:, subset]
    fp = _FinePass(
        proj_fine,
        estep_pixels,
        ramps_fine,
        log_prior_class,
        n_over_psi,
        n_over_trans,
        fraction,
        log_prior_orient,
        shifts_fine,
        log_prior_dir,
    )
    hyp = _fine_pass(data, sig, pairs, active, log_prior_offset, n_sig, fp, dense_pairs)
    return hyp if subset is None else replace(hyp, coarse_subset=subset)


def _sparse_significance(
    rel: torch.Tensor, fraction: float, max_significant: int, needed_only: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pass 0's capped significance of log-weights ``rel`` ``(B, Tc, Ka, Pc)`` (overwritten)
    from :func:`capped_significant_indices`: the mask ``(B, Ka, Pc', Tc)``, the significant
    samples per particle ``(B,)`` and, with ``needed_only``, the coarse orientations ``(Pc',)``
    that any particle needs (the mask then holds those only; else all ``Pc`` and ``None``)."""
    b, tc, ka, pc = rel.shape
    rows, cols = capped_significant_indices(rel.view(b, -1), fraction, max_significant)
    t_i, a_p = cols // (ka * pc), cols % (ka * pc)
    a_i, p_i = a_p // pc, a_p % pc
    n_sig = torch.bincount(rows, minlength=b)
    coarse = None
    if needed_only:
        coarse = torch.unique(p_i)  # sorted
        p_i = torch.searchsorted(coarse, p_i)
    n_p = pc if coarse is None else len(coarse)
    sig = torch.zeros((b, ka, n_p, tc), dtype=torch.bool, device=rel.device)
    sig[rows, a_i, p_i, t_i] = True
    return sig, n_sig, coarse


def _fine_pass(
    data: BatchData,
    sig: torch.Tensor,
    pairs: torch.Tensor,
    active: torch.Tensor,
    log_prior_offset: torch.Tensor,
    n_sig: torch.Tensor,
    fp: _FinePass,
    dense_pairs: float | None,
) -> Hypotheses:
    """Pass 1 for every particle of the batch, each in its own layout (dense or pairs)."""
    b = data.x.shape[0]
    k, n_fine_psi = fp.proj.shape[:2]
    dev = data.x.device
    dense_pairs = DENSE_PAIRS if dense_pairs is None else dense_pairs
    # Significance is per particle, so each particle takes its own layout: broad posteriors
    # (most of its (class, fine psi) pairs needed) go dense, sharp ones as pairs. Later
    # iterations of hard data have both kinds in one batch.
    per_particle = torch.bincount(pairs[:, 0], minlength=b) * fp.n_over_psi
    broad = per_particle > dense_pairs * k * n_fine_psi
    if bool(broad.all()):
        return _dense_pass(data, sig, active, log_prior_offset, n_sig, fp)
    if not bool(broad.any()):
        return _pair_pass(data, sig, pairs, active, log_prior_offset, n_sig, fp)
    rows_d = torch.nonzero(broad).squeeze(1)
    rows_s = torch.nonzero(~broad).squeeze(1)
    sig_d = sig[rows_d]
    used = sig_d.any(3).any(2).any(0)  # classes any broad particle needs
    hd = _dense_pass(
        data.subset(rows_d), sig_d[:, used], active[used], log_prior_offset[rows_d],
        n_sig[rows_d], fp.rows(rows_d),
    )  # fmt: skip
    sig_s = sig[rows_s]
    hs = _pair_pass(
        data.subset(rows_s), sig_s, torch.nonzero(sig_s.any(-1)), active,
        log_prior_offset[rows_s], n_sig[rows_s], fp.rows(rows_s),
    )  # fmt: skip

    def merged(field: str) -> torch.Tensor:
        a, c = getattr(hd, field), getattr(hs, field)
        out = torch.empty((b,), dtype=a.dtype, device=dev)
        out[rows_d] = a
        out[rows_s] = c
        return out

    return replace(
        hs,
        particle=rows_s[hs.particle],
        dense=hd.dense,
        active=hd.active,
        dense_rows=rows_d,
        **{f: merged(f) for f in _PER_PARTICLE},
    )


@dataclass(frozen=True)
class _FinePass:
    """What pass 1 needs besides the particles: the fine projections ``(K, Pf, C)``, the window
    pixels it uses, the fine translations' ramps, the class priors and the oversampling."""

    proj: torch.Tensor
    pixels: torch.Tensor
    ramps: torch.Tensor
    log_prior_class: torch.Tensor
    n_over_psi: int
    n_over_trans: int
    fraction: float
    log_prior_orient: torch.Tensor | None = None  # (B, Pc) per particle and coarse orientation
    shifts: SeparableShifts | None = None  # the fine translations on ``pixels`` as a grid
    log_prior_dir: torch.Tensor | None = None  # (K, Pc) per class and coarse orientation

    def rows(self, rows: torch.Tensor) -> _FinePass:
        """The same for the particles ``rows`` of the batch."""
        if self.log_prior_orient is None:
            return self
        return replace(self, log_prior_orient=self.log_prior_orient[rows])


def _pair_pass(
    data: BatchData,
    sig: torch.Tensor,
    pairs: torch.Tensor,
    active: torch.Tensor,
    log_prior_offset: torch.Tensor,
    n_sig: torch.Tensor,
    fp: _FinePass,
) -> Hypotheses:
    """Pass 1 on (particle, fine psi) pairs whose coarse parent (``pairs``: particle, active
    class, coarse psi) was significant, at the fine translations that are children of its
    significant coarse translations (the weights ``(M, Tf)`` are zero at the others)."""
    proj_fine, e, ramps_fine, log_prior_class = fp.proj, fp.pixels, fp.ramps, fp.log_prior_class
    n_over_psi, n_over_trans, fraction = fp.n_over_psi, fp.n_over_trans, fp.fraction
    b = data.x.shape[0]
    k = proj_fine.shape[0]
    dev = data.x.device
    sub = torch.arange(n_over_psi, device=dev)
    p_i = pairs[:, 0].repeat_interleave(n_over_psi)
    p_ka = pairs[:, 1].repeat_interleave(n_over_psi)
    p_psi = (pairs[:, 2][:, None] * n_over_psi + sub[None]).reshape(-1)
    p_k = active[p_ka]
    tmask = sig[pairs[:, 0], pairs[:, 1], pairs[:, 2]].repeat_interleave(n_over_trans, dim=1)
    tmask = tmask.repeat_interleave(n_over_psi, dim=0)  # (M, Tf)
    # Only the children of significant coarse translations count (about a tenth of (M, Tf) in
    # 3D): the cross terms are GEMMs over every fine translation, everything after them is
    # done on the counted (pair, translation) elements alone.
    el_r, el_t = torch.nonzero(tmask, as_tuple=True)  # row-major: el_r ascending
    el_i = p_i[el_r]
    w2, ctf, x = data.weight2, data.ctf, data.x
    w2e, ctfe, xe = w2[:, e], ctf[:, e], x[:, e]
    y = w2e * ctfe * xe  # (B, Ce)
    const_f = data.const(e)
    pf = proj_fine[:, :, e]
    _, npf, ce = pf.shape
    # A(i, k, psi) for every orientation: one GEMM, then gather the pairs.
    a_all = (w2e * ctfe * ctfe) @ (pf.real**2 + pf.imag**2).reshape(k * npf, ce).T  # (B, K*Pf)
    count_gemm(b, ce, k * npf)
    r_idx = p_k * npf + p_psi
    a = a_all[p_i, r_idx].to(torch.float64)
    cross = pair_cross(pf[p_k, p_psi], y, p_i, ramps_fine[:, e], el_r, el_t)  # (N,)
    t_coarse = torch.arange(ramps_fine.shape[0], device=dev) // n_over_trans
    el_k = p_k[el_r]
    pri = log_prior_class[el_k] + log_prior_offset[el_i, el_k, t_coarse[el_t]]
    if fp.log_prior_orient is not None:
        pri = pri + fp.log_prior_orient[el_i, p_psi[el_r] // n_over_psi]
    if fp.log_prior_dir is not None:
        pri = pri + fp.log_prior_dir[el_k, p_psi[el_r] // n_over_psi]
    logw = pri - (const_f[el_i] + a[el_r] - 2.0 * cross)
    lse, keep = _pair_significance(el_i, logw[:, None], b, fraction)
    weight = torch.zeros(tmask.shape, dtype=torch.float64, device=dev)
    weight[el_r, el_t] = torch.where(keep[:, 0], torch.exp(logw - lse[el_i]), 0.0)
    return _finish(p_i, p_k, p_psi, weight, lse, n_sig, data, e, b)


def pair_cross(
    proj: torch.Tensor,
    y: torch.Tensor,
    particle: torch.Tensor,
    ramps: torch.Tensor,
    el_r: torch.Tensor,
    el_t: torch.Tensor,
    chunk: int = 8192,
) -> torch.Tensor:
    """``Re sum_c conj(P_m(c)) y_{i_m}(c) ramp_t(c)`` at the elements ``(m, t) = (el_r, el_t)``
    (``el_r`` ascending): ``(N,)`` float64.

    Per chunk of pairs, ``P . conj(y)`` (the conjugate of ``conj(P) . y``) per pair, whose
    real view is ``[Re, -Im]`` pixel by pixel, one real GEMM ``(m, 2C) x (2C, T)`` with the
    ramps' real view, and the chunk's elements gathered from it. (Two halves concatenated as
    ``[Re, -Im]`` cost 1.4x the whole step at 8,192 pairs x 483 pixels x 116 translations.)
    """
    m, c = proj.shape
    t = ramps.shape[0]
    # rows (pixel, Re/Im): Re ramp and Im ramp of each pixel
    rr = torch.view_as_real(ramps.T.contiguous()).permute(0, 2, 1).reshape(2 * c, t)
    yc = y.conj_physical()
    out = torch.empty(len(el_r), dtype=torch.float64, device=proj.device)
    bounds = torch.searchsorted(el_r, torch.arange(0, m + chunk, chunk, device=el_r.device))
    bounds = bounds.tolist()
    for n, s in enumerate(range(0, m, chunk)):
        lo, hi = bounds[n], bounds[n + 1]
        if lo == hi:
            continue
        u = proj[s : s + chunk] * yc[particle[s : s + chunk]]
        block = torch.view_as_real(u).view(u.shape[0], 2 * c) @ rr  # (m, T)
        count_gemm(u.shape[0], 2 * c, t)
        out[lo:hi] = block[el_r[lo:hi] - s, el_t[lo:hi]].to(torch.float64)
    return out


def _pair_significance(
    particle: torch.Tensor, logw: torch.Tensor, b: int, fraction: float, n_bins: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per particle over all its pairs x translations: (logsumexp ``(B,)``, keep mask).

    RELION's rule on the normalised weights: sort descending, keep adding until the running sum
    exceeds ``fraction``; keep every weight >= the last one added. Without a full sort: the
    weights' mass is binned by log-weight per particle; bins wholly inside the kept set are kept,
    and only the bin where the running sum crosses ``fraction`` is sorted. Weights too small to
    matter together (< (1 - fraction) / 10) are left out. The result equals the full sort's.
    """
    dev = logw.device
    row_max = logw.max(dim=1).values
    seg_max = torch.full((b,), -math.inf, dtype=logw.dtype, device=dev)
    seg_max = seg_max.scatter_reduce(0, particle, row_max, reduce="amax", include_self=True)
    # Relative log-weights have a small range: single precision is enough from here on.
    rel = (logw - seg_max[particle][:, None]).to(torch.float32)
    w = torch.exp(rel)
    total = torch.zeros(b, dtype=torch.float64, device=dev)
    total.index_add_(0, particle, w.sum(1, dtype=torch.float64))
    lse = seg_max + torch.log(total)
    nw = w / total.to(torch.float32)[particle][:, None]
    per_particle = int(torch.bincount(particle, minlength=b).max()) * logw.shape[1]
    if fraction >= 1:
        return lse, nw > 0
    cutoff = math.log(0.1 * (1.0 - fraction) / max(per_particle, 1))
    # bin index: n_bins - 1 for the largest weights, 0 just above the cutoff, -1 below it
    pos = ((rel - cutoff) / -cutoff * n_bins).floor().clamp(max=n_bins - 1)
    pos = torch.where(rel > cutoff, pos, torch.full_like(pos, -1)).to(torch.long)
    seg = particle[:, None].expand_as(pos)
    # every element binned (those below the cutoff with weight 0): no compaction of the
    # valid ones (a nonzero and three gathers of the whole (M, T) arrays)
    flat = (seg * n_bins + pos.clamp(min=0)).reshape(-1)
    mass = torch.zeros(b * n_bins, dtype=torch.float64, device=dev)
    mass.index_add_(0, flat, torch.where(pos >= 0, nw, 0.0).reshape(-1).to(torch.float64))
    mass = mass.view(b, n_bins)
    above = torch.flip(torch.cumsum(torch.flip(mass, [1]), 1), [1]) - mass  # mass of higher bins
    # The crossing bin: the highest bin whose higher bins do not yet exceed the fraction while
    # including it does (every particle has one: the bins hold > 99.99% of its weight).
    crossing = ((above <= fraction) & (above + mass > fraction)).to(torch.int8)
    cbin = (n_bins - 1) - torch.flip(crossing, [1]).argmax(1)
    keep = pos > cbin[seg]
    in_bin = pos == cbin[seg]
    rows, cols = torch.nonzero(in_bin, as_tuple=True)
    if len(rows):
        sg = particle[rows]
        thr = _threshold_in_bin(sg, nw[rows, cols], above[sg, cbin[sg]], b, fraction)
        keep |= in_bin & (nw >= thr.to(torch.float32)[particle][:, None])
    return lse, keep & (w > 0)


def _threshold_in_bin(
    seg: torch.Tensor,
    vals: torch.Tensor,
    above: torch.Tensor,
    b: int,
    fraction: float | torch.Tensor,
) -> torch.Tensor:
    """RELION's threshold per segment (particle) ``(b,)`` from the members of its crossing bin:
    ``vals`` are their normalised weights, ``above`` the weight of the higher bins (per member);
    members are added in descending order while the running sum is <= ``fraction``, and the
    threshold is the last one added (``inf`` where none was added). ``fraction`` may be given per
    segment ``(b,)``."""
    thr = torch.full((b,), math.inf, dtype=torch.float64, device=vals.device)
    if not len(seg):
        return thr
    vals = vals.to(torch.float64)
    order = torch.argsort(seg.to(torch.float64) + (1.0 - vals))  # by segment, then descending
    sv, ss, sa = vals[order], seg[order], above[order]
    exclusive = torch.cumsum(sv, 0) - sv
    counts = torch.bincount(ss, minlength=b)
    first = (torch.cumsum(counts, 0) - counts).clamp(max=len(sv) - 1)
    before = exclusive - exclusive[first][ss] + sa
    limit = fraction[ss] if isinstance(fraction, torch.Tensor) else fraction
    added = before <= limit  # RELION adds while the running sum <= fraction
    return thr.scatter_reduce(0, ss[added], sv[added], reduce="amin", include_self=True)


def _finish(
    p_i: torch.Tensor,
    p_k: torch.Tensor,
    p_psi: torch.Tensor,
    weight: torch.Tensor,
    lse: torch.Tensor,
    n_sig: torch.Tensor,
    data: BatchData,
    pixels: torch.Tensor,
    b: int,
) -> Hypotheses:
    """Best hypothesis, Pmax and log-likelihood per particle."""
    dev = weight.device
    row_max, row_arg = weight.max(dim=1)
    pmax = torch.zeros(b, dtype=weight.dtype, device=dev)
    pmax = pmax.scatter_reduce(0, p_i, row_max, reduce="amax", include_self=True)
    is_best = (row_max == pmax[p_i]) & (row_max > 0)
    rows = torch.arange(len(p_i), device=dev)
    best = torch.full((b,), len(p_i), dtype=torch.long, device=dev)
    best = best.scatter_reduce(0, p_i[is_best], rows[is_best], reduce="amin", include_self=True)
    ok = best < len(p_i)
    bb = best.clamp(max=max(len(p_i) - 1, 0))
    none = torch.full((b,), -1, dtype=torch.long, device=dev)
    return Hypotheses(
        particle=p_i,
        cls=p_k,
        psi=p_psi,
        weight=weight,
        best_cls=torch.where(ok, p_k[bb], none) if len(p_i) else none,
        best_psi=torch.where(ok, p_psi[bb], none) if len(p_i) else none,
        best_trans=torch.where(ok, row_arg[bb], none) if len(p_i) else none,
        pmax=pmax,
        n_significant=n_sig,
        loglik=lse - data.log_norm(pixels),
    )


def shifted_real(y: torch.Tensor, ramps: torch.Tensor) -> torch.Tensor:
    """Every row of ``y`` ``(B, C)`` times every phase ramp ``(T, C)``, as the real matrix
    ``(B * T, 2C)`` (real and imaginary parts interleaved per pixel), so that
    ``shifted_real(y, ramps) @ view_as_real(P).reshape(R, 2C).T`` is ``Re(y ramp conj(P))``
    summed over pixels."""
    b, c = y.shape
    t = ramps.shape[0]
    out = torch.mul(y[:, None, :], ramps[None])
    return torch.view_as_real(out).reshape(b * t, 2 * c)


def real_rows(p: torch.Tensor) -> torch.Tensor:
    """Complex rows ``(R, C)`` as real rows ``(R, 2C)`` (real and imaginary parts interleaved)."""
    return torch.view_as_real(p.contiguous()).reshape(p.shape[0], 2 * p.shape[1])


def _dense_pass(
    data: BatchData,
    sig: torch.Tensor,
    active: torch.Tensor,
    log_prior_offset: torch.Tensor,
    n_sig: torch.Tensor,
    fp: _FinePass,
) -> Hypotheses:
    """Pass 1 with every fine weight of the active classes in one ``(B, Tf, Ka * Pf)`` tensor.

    The cross term is one GEMM ``(B * Tf, 2C) x (2C, Ka * Pf)``; the log-weights are formed in
    place in single precision (the per-particle constant is added to the log-likelihood in
    float64 afterwards), children of coarse samples that were not significant are masked, and
    :func:`dense_significance` turns them into normalised significant weights.
    """
    proj_fine, e, ramps_fine, log_prior_class = fp.proj, fp.pixels, fp.ramps, fp.log_prior_class
    n_over_psi, n_over_trans, fraction = fp.n_over_psi, fp.n_over_trans, fp.fraction
    b = data.x.shape[0]
    ka = len(active)
    dev = data.x.device
    w2e, ctfe, xe = data.weight2[:, e], data.ctf[:, e], data.x[:, e]
    pf = proj_fine[active][:, :, e]
    npf = pf.shape[1]
    ra = ka * npf
    tf = ramps_fine.shape[0]
    ramps_e = ramps_fine if fp.shifts is not None else ramps_fine[:, e]  # (unused with shifts)
    refs = prepare_refs(pf.reshape(ra, -1), fp.shifts)
    logw = cross_terms(w2e * ctfe * xe, refs, ramps_e, fp.shifts)  # 2 cross, (B, Tf, Ra)
    a = norm_terms(w2e * ctfe * ctfe, refs)  # (B, Ra)
    # prior of the coarse parent, -inf where the parent was not significant: (B, Tc, Ka, Pc)
    tc, pc = sig.shape[3], sig.shape[2]
    parent = (
        log_prior_class[active][None, None, :, None]
        + log_prior_offset[:, active].transpose(1, 2)[..., None]
    )
    if fp.log_prior_orient is not None:
        parent = parent + fp.log_prior_orient[:, None, None, :]
    if fp.log_prior_dir is not None:
        parent = parent + fp.log_prior_dir[active][None, None, :, :]
    parent = torch.where(sig.permute(0, 3, 1, 2), parent, -math.inf).to(torch.float32)
    # the parent's prior minus A per (coarse t, fine orientation), added in one pass
    add = parent[..., None] - a.view(b, 1, ka, pc, n_over_psi)  # (B, Tc, Ka, Pc, n_over_psi)
    logw.view(b, tc, n_over_trans, ra).add_(add.reshape(b, tc, 1, ra))
    del add
    lse, pmax, arg = dense_significance(logw.view(b, tf * ra), fraction, best=True)
    lse = lse - data.const(e)
    w = logw
    r_best = arg % ra
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    return Hypotheses(
        particle=empty,
        cls=empty,
        psi=empty,
        weight=torch.zeros((0, tf), dtype=torch.float64, device=dev),
        best_cls=active[r_best // npf],
        best_psi=r_best % npf,
        best_trans=arg // ra,
        pmax=pmax,
        n_significant=n_sig,
        loglik=lse - data.log_norm(e),
        dense=w,
        active=active,
    )


def dense_significance(
    logw: torch.Tensor, fraction: float, max_elements: int = 1 << 22, *, best: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place: per row of ``logw`` ``(B, S)`` (float32, ``-inf`` for excluded samples) the
    normalised weights of the samples that together carry ``fraction`` of the weight, zero
    elsewhere (RELION's rule, as :func:`_pair_significance`); returns the rows' logsumexp
    (float64), and with ``best`` also each row's largest normalised weight (float64) and its
    column, found with the row's maximum (the first of equal log-weights).

    The weights' mass is histogrammed per row by the top bits of their float32 patterns
    (monotone in the value for non-negative floats; :data:`_SIG_SHIFT` sets 32 bins per octave);
    bins above the one where the running sum crosses ``fraction`` are kept whole, and only that
    bin is sorted. Every row needs at least one finite log-weight. Rows are taken
    ``max_elements`` at a time, which bounds the temporary memory.
    """
    rows = max(1, max_elements // max(logw.shape[1], 1))
    if logw.shape[0] > rows:
        parts = [
            dense_significance(logw[s : s + rows], fraction, max_elements, best=best)
            for s in range(0, logw.shape[0], rows)
        ]
        if best:
            return tuple(torch.cat(x) for x in zip(*parts, strict=True))
        return torch.cat(parts)
    if best:
        mx, arg = logw.max(dim=1, keepdim=True)
    else:
        mx = logw.amax(dim=1, keepdim=True)
    # Relative log-weights below -80 (weights < 2e-35, and the excluded -inf) are raised to -80
    # before exp: exp is several times slower on arguments that underflow. Their mass (< S x
    # 2e-35) is nothing beside the 1 - fraction cut, so the threshold below zeroes them again.
    w = logw.sub_(mx).clamp_(min=-80.0).exp_()
    total = w.sum(1).to(torch.float64)
    total32 = total.to(torch.float32)
    w.div_(total32[:, None])
    lse = mx.squeeze(1).to(torch.float64) + torch.log(total)
    if fraction >= 1:
        # everything is kept but what was excluded (or under the exp floor)
        floor = (math.exp(-80.0) / total).to(torch.float32) * 1.001
        w.masked_fill_(w <= floor[:, None], 0.0)
    else:
        mass, _ = _bin_mass(w)
        thr = _fraction_threshold(w, mass, fraction).to(torch.float32)
        w.mul_(w >= thr[:, None])  # 3x faster than masked_fill_ on the CPU
    if best:  # the maximum's weight: exp(0) / total, in float32 as in w
        return lse, (1.0 / total32).to(torch.float64), arg.squeeze(1)
    return lse
