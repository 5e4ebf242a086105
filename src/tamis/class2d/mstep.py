"""Weighted sums (from E-step hypotheses) and the M-step updates (RELION's ``storeWeightedSums``,
``maximization`` and ``maximizationOtherParameters``), plus centring and solvent flattening."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from tamis._threads import map_work, worker_count
from tamis.class2d.fourier2d import FourierWindow, reconstruct, ssnr_arrays
from tamis.class2d.likelihood import GEMM_STATS, BatchData, Hypotheses, count_gemm, real_rows
from tamis.class2d.shifts import ColumnSums, gemm
from tamis.class2d.state import Class2DOptions, ModelState, WeightedSums
from tamis.fourier import duplicate_half_column, radial_average, rfft2_centered, shell_index
from tamis.masks import solvent_mask

__all__ = [
    "accumulate",
    "maximize",
    "update_other_parameters",
    "center_classes",
    "class_centres",
    "shift_classes",
    "flatten_solvent",
    "current_resolution_shell",
    "spectrum",
    "fill_low_shells",
    "pixels_per_shell",
]


def spectrum(images: torch.Tensor, shells: torch.Tensor, nsh: int) -> torch.Tensor:
    """Per-shell mean ``|F|²`` of real images ``(..., N, N)`` (RELION's ``getSpectrum``)."""
    return radial_average(rfft2_centered(images).abs() ** 2, shells, nsh)


def fill_low_shells(spectra: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """RELION's repair of noise spectra: a shell at or below ``floor`` takes the previous shell's
    (repaired) value; a low first shell takes the next value above ``floor`` (1e-10 if none)."""
    out = spectra.clone()
    rows = out.reshape(-1, out.shape[-1])
    for r in rows:
        good = torch.nonzero(r > floor)
        if len(good) and r[0] <= floor:
            r[0] = r[int(good[0])]
        elif not len(good):
            r[:] = 1e-10
    for s in range(1, rows.shape[-1]):
        rows[:, s] = torch.where(rows[:, s] <= floor, rows[:, s - 1], rows[:, s])
    return out


def pixels_per_shell(box: int, nsh: int, device) -> torch.Tensor:
    """Half-plane pixels of an ``N`` box per shell, duplicated half column excluded."""
    shells = shell_index((box, box), device=device)
    s = shells[~duplicate_half_column((box, box), device=device)]
    return torch.bincount(s[s < nsh], minlength=nsh).to(torch.float64)


#: The dense M-step works by (particle, class) block when fewer than this fraction of the blocks
#: carry weight; otherwise by GEMMs over every class (three times the block path's GEMM work,
#: but bigger GEMMs and no per-pixel pass). Measured (hard recipe, 2 CPU threads): with every
#: block weighted (iteration 2) the GEMMs took 3.0-3.9 s for one batch against 6.8-11.5 s by
#: block; 25 iterations took 236 s (block always), 244 s (0.8) and 209 s (0.9), the broad
#: particles of later iterations weighting 80-85% of their blocks.
BLOCK_FRACTION = 0.9

#: Pixels per piece of the block path's Mix (see :func:`_class_block_sums`).
_MIX_PIXELS = 32

#: Window columns per first-stage GEMM of the block path's Mix on a translation grid
#: (:func:`_class_block_sums`), so that its output is read back from cache: measured on three
#: real batches of the hard recipe's iteration 21 (one thread per piece), 3-8 columns within 5%
#: of each other, one column 10% slower, all 25 at once (12 MB) 5-15% slower.
_SPREAD_COLUMNS = 5


def _add_rows(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """``out.index_add_(0, index, rows)`` for complex rows, through their real views: on the CPU
    torch's complex ``index_add_`` is 4-8x slower than the real one on the same bytes (measured
    on 8192 rows of 500-1200 pixels; 1-D or along another dimension the real view is not
    faster, so only whole rows go this way)."""
    torch.view_as_real(out).index_add_(0, index, torch.view_as_real(rows))


def _class_block_sums(
    w: torch.Tensor,
    members: torch.Tensor,
    in_class: torch.Tensor,
    q: torch.Tensor,
    cx: torch.Tensor,
    p: torch.Tensor,
    ramps_re: torch.Tensor,
    pf: int,
    msk: torch.Tensor | None,
    cross_part: torch.Tensor,
    max_pairs: int,
    gemm_dtype: torch.dtype = torch.float32,
    col_sums: ColumnSums | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sums of :func:`_accumulate_dense` over the (particle, class) blocks with weight only.

    Per class, ``Mix = ramps^T W`` ``(2C, n * Pf)`` over the class's particles (the ramps are
    shared), laid out pixel by pixel so that both contractions that follow read it once, as
    batched products over pixels: ``sum_i q_i Mix_i`` (the class's reconstruction sums) and
    ``sum_psi conj(P) Mix_i`` (times ``c X_i``: the particle's cross term, per pixel for the
    noise, per particle for the norm and masked for the scale). ``Mix`` is one GEMM over the
    translations, a few pixels at a time, or, with the translations on a regular grid
    (``col_sums``), two small DFTs: over ``tx`` for a few window columns at a time, then over
    ``ty`` column by column (:attr:`ColumnSums.column_blocks`). The (class, particles) pieces
    run side by side on single-threaded workers (:func:`tamis._threads.map_work`) and are added
    up in order. Adds to ``cross_part``; returns the reconstruction sums ``(Ra, C)``, the noise
    cross term per pixel ``(C,)`` and the scale's cross term per particle of ``members`` (zeros
    without ``msk``).
    """
    b, tf, ra = w.shape
    ka = ra // pf
    c = p.shape[1]
    dev = w.device
    fimg = torch.zeros((ra, c), dtype=torch.complex64, device=dev)
    noise = torch.zeros(c, dtype=torch.float64, device=dev)
    xa = torch.zeros(b, dtype=torch.float64, device=dev)
    if col_sums is not None:
        # the window's pixels column by column: every per-pixel array in that order, and the
        # pixel sums put back at the end
        order, pieces, col_blocks = col_sums.column_blocks
        p, q, cx = p[:, order], q[:, order], cx[:, order]
        msk = None if msk is None else msk[:, order]
        n_ty = col_sums.n_ty
    else:
        ramps_t = ramps_re.T.contiguous()  # (2C, Tf), rows (pixel, re/im)
        pieces = [(c0, min(c, c0 + _MIX_PIXELS)) for c0 in range(0, c, _MIX_PIXELS)]
    inc = in_class[members]

    def block_sums(task: tuple[int, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """One class's sums over the particles ``ii``: the class's reconstruction sums ``(Pf,
        C)`` and ``u = Re(c X conj(P) Mix)`` summed over pixels (per particle), over particles
        (per pixel) and over the masked pixels (per particle; empty without ``msk``)."""
        kk, ii = task
        blk = slice(kk * pf, (kk + 1) * pf)
        n = len(ii)
        pb = p[blk]
        p_rows = torch.stack([pb.real.T, pb.imag.T], 1)  # (C, 2, Pf)
        qr, qi = q[ii].real.T, q[ii].imag.T  # (C, n)
        qq = torch.stack([torch.cat([qr, -qi], 1), torch.cat([qi, qr], 1)], 1)  # (C, 2, 2n)
        f = torch.empty((c, 2, pf), device=dev)
        o = torch.empty((c, 2, 2 * n), device=dev)
        w_blk = w[:, :, blk][ii].transpose(0, 1)  # (Tf, n, Pf)
        if col_sums is not None:
            cells = col_sums.grid_cells(w_blk)  # on the whole (tx, ty) grid
        else:
            wt = w_blk.reshape(tf, n * pf)
        # Mix a piece of pixels at a time: the two products that read it run 1.5x faster while
        # it stays in cache
        for j, (c0, c1) in enumerate(pieces):
            if col_sums is not None:
                if j % _SPREAD_COLUMNS == 0:
                    # V(kx; re/im, ty; i, psi) = sum_tx ex(tx, kx) W(i, tx, ty, psi) for the
                    # next few window columns
                    v = col_sums.spread_cells(cells, j, j + _SPREAD_COLUMNS, gemm_dtype)
                mix = gemm(col_blocks[j], v[j % _SPREAD_COLUMNS], gemm_dtype)
            else:
                mix = gemm(ramps_t[2 * c0 : 2 * c1], wt, gemm_dtype)
            mix = mix.view(c1 - c0, 2 * n, pf)
            torch.bmm(qq[c0:c1], mix, out=f[c0:c1])  # sum_i q_i Mix_i
            # Re/Im P x Re/Im Mix, summed over psi, as (P, 2) x (2n, Pf)^T per pixel: torch's
            # CPU bmm with Mix on the left and two columns on the right ran 4-5x slower at
            # these shapes (308 against 65 us for 32 pixels x 236 rows x 60 psi)
            torch.bmm(p_rows[c0:c1], mix.transpose(1, 2), out=o[c0:c1])
        # Re(c X conj(P) Mix) per (pixel, particle), every pixel at once
        o4 = o.view(c, 2, 2, n)
        z_re = o4[:, 0, 0] + o4[:, 1, 1]  # Re sum_psi conj(P) Mix, (C, n)
        z_im = o4[:, 0, 1] - o4[:, 1, 0]
        u = z_re.mul_(cx[ii].real.T).sub_(z_im.mul_(cx[ii].imag.T))
        masked = u.new_empty(0, dtype=torch.float64)
        if msk is not None:
            masked = (u * msk[kk * pf][:, None]).sum(0, dtype=torch.float64)
        f_c = torch.complex(f[:, 0], f[:, 1]).T
        return f_c, u.sum(0).to(torch.float64), u.sum(1).to(torch.float64), masked

    tasks = []
    for kk in range(ka):
        sel = members[torch.nonzero(inc[:, kk]).squeeze(1)]
        tasks += [(kk, sel[s : s + max_pairs]) for s in range(0, len(sel), max_pairs)]
    # single-threaded workers: each piece is many ops of a fraction of a millisecond, whose
    # joins on all the threads can cost more than the work (tamis._threads); sums added in order
    for (kk, ii), (f_c, per_particle, per_pixel, masked) in zip(
        tasks, map_work(block_sums, tasks, dev), strict=True
    ):
        n = len(ii)
        if col_sums is not None:
            count_gemm(len(col_sums.cols) * 2, col_sums.n_tx, n_ty * n * pf, "mstep_flops")
            count_gemm(2 * c, 2 * n_ty, n * pf, "mstep_flops")
        else:
            count_gemm(2 * c, tf, n * pf, "mstep_flops")
        fimg[kk * pf : (kk + 1) * pf] += f_c
        cross_part.index_add_(0, ii, per_particle)
        noise += per_pixel
        if msk is not None:
            xa.index_add_(0, ii, masked)
    if col_sums is not None:  # back to the window's pixel order
        fimg_w = torch.empty_like(fimg)
        fimg_w[:, order] = fimg
        noise_w = torch.empty_like(noise)
        noise_w[order] = noise
        fimg, noise = fimg_w, noise_w
    return fimg, noise, xa[members]


def _compact(index: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of ``index`` (in ``[0, size)``), ascending, and each element's position
    among them: ``torch.unique(..., return_inverse=True)`` by a presence table, without a sort."""
    present = torch.zeros(size, dtype=torch.bool, device=index.device)
    present[index] = True
    used = torch.nonzero(present).squeeze(1)
    position = torch.cumsum(present, 0) - 1
    return used, position[index]


def accumulate(
    sums: WeightedSums,
    data: BatchData,
    hyp: Hypotheses,
    proj_f: torch.Tensor,
    ramps_f: torch.Tensor,
    window: FourierWindow,
    *,
    full_power: torch.Tensor,
    optics: torch.Tensor,
    groups: torch.Tensor,
    scale: torch.Tensor,
    ssnr_mask: torch.Tensor | None,
    translations_px: torch.Tensor,
    prior_offset: torch.Tensor,
    pixel_size: float,
    old_norm: torch.Tensor,
    avg_norm: float,
    nsh: int,
    half: torch.Tensor | None = None,
    chunk: int = 8192,
    max_rows: int = 8192,
    gemm_dtype: torch.dtype = torch.float32,
    col_sums: ColumnSums | None = None,
) -> torch.Tensor:
    """Add one batch's significant weights to ``sums``; return the new norm corrections ``(B,)``.
    ``gemm_dtype`` torch.bfloat16: the sums over translations as bfloat16 GEMMs
    (:attr:`Class2DOptions.mstep_bf16`). ``col_sums`` (for the window's pixels): the fine
    translations as a regular grid, for the dense layout's sums over translations
    (:class:`~tamis.class2d.shifts.ColumnSums`).

    Per (particle, orientation) pair ``m`` with weights ``W_m(t)`` over the fine translations,
    ``Mix_m = W_m @ ramps`` is one GEMM. The reconstruction sums per (class, psi) then take
    ``c X_unmasked Mix_m / sigma2`` (unmasked particle); noise, norm and scale use the masked
    particle through ``M1_i = sum_m conj(P_m) Mix_m`` and ``M2_i = sum_m |P_m|² sum_t W_m``
    (residual power per pixel ``c² M2 - 2 Re(c X M1) + W |X|²``).
    """
    if hyp.dense is not None and hyp.dense_rows is not None:
        # both layouts in one batch: each part on its own particles
        def part(rows: torch.Tensor, h: Hypotheses) -> torch.Tensor:
            return accumulate(
                sums, data.subset(rows), h, proj_f, ramps_f, window,
                full_power=full_power[rows], optics=optics[rows], groups=groups[rows],
                scale=scale, ssnr_mask=ssnr_mask, translations_px=translations_px,
                prior_offset=prior_offset, pixel_size=pixel_size, old_norm=old_norm[rows],
                avg_norm=avg_norm, nsh=nsh, half=None if half is None else half[rows],
                chunk=chunk, max_rows=max_rows, gemm_dtype=gemm_dtype, col_sums=col_sums,
            )  # fmt: skip

        new_norm = torch.empty_like(old_norm, dtype=torch.float64)
        for rows, h in hyp.split():
            new_norm[rows] = part(rows, h)
        return new_norm
    if hyp.dense is not None:
        return _accumulate_dense(
            sums, data, hyp, proj_f, ramps_f, window, full_power=full_power, optics=optics,
            groups=groups, scale=scale, ssnr_mask=ssnr_mask, translations_px=translations_px,
            prior_offset=prior_offset, pixel_size=pixel_size, old_norm=old_norm,
            avg_norm=avg_norm, nsh=nsh, half=half, max_rows=max_rows, gemm_dtype=gemm_dtype,
            col_sums=col_sums,
        )  # fmt: skip
    k, pf, c = proj_f.shape
    b = data.x.shape[0]
    dev = data.x.device
    w = hyp.weight  # (M, Tf) float64
    wr = w.sum(1)  # (M,)
    inv_sig = 1.0 / data.sigma2
    q = data.ctf * data.xu * inv_sig
    cw = data.ctf * data.ctf * inv_sig
    proj_flat = proj_f.reshape(k * pf, c)
    p2 = proj_flat.real**2 + proj_flat.imag**2  # (K * Pf, C)
    slots = sums.fimg.shape[0]
    r_all = hyp.cls * pf + hyp.psi
    slot_all = r_all if half is None else (hyp.cls + k * half[hyp.particle]) * pf + hyp.psi
    # Sums that need only each pair's total weight are small GEMMs over the (particle,
    # orientation) weight matrix: M2 = Wr |P|², the reconstruction weights Wr^T (c²/sigma2).
    w_pr = torch.zeros((b, k * pf), dtype=torch.float32, device=dev)
    w_pr.index_put_((hyp.particle, r_all), wr.to(torch.float32), accumulate=True)
    m2 = w_pr @ p2  # (B, C)
    # Per-batch accumulators in single precision over the slots this batch touches (a few of
    # the K x Pf when orientations are many, as in 3D); added to the float64 totals once.
    used_slot, slot_of = _compact(slot_all, slots * pf)
    fimg = torch.zeros((len(used_slot), c), dtype=torch.complex64, device=dev)
    m1 = torch.zeros((b, c), dtype=torch.complex64, device=dev)
    with_scale = ssnr_mask is not None
    m1_masked = torch.zeros((b, c), dtype=torch.complex64, device=dev) if with_scale else None
    ramps_ri = torch.view_as_real(ramps_f.contiguous()).reshape(ramps_f.shape[0], 2 * c)
    for s in range(0, len(wr), chunk):
        sl = slice(s, s + chunk)
        i, r, r_slot = hyp.particle[sl], r_all[sl], slot_of[sl]
        w32 = w[sl].to(torch.float32)
        # one GEMM with the ramps' real view gives Mix's real view, (m, C) complex
        mix = torch.view_as_complex(gemm(w32, ramps_ri, gemm_dtype).view(-1, c, 2))
        count_gemm(w32.shape[0], w32.shape[1], 2 * c, "mstep_flops")
        g = proj_flat[r].conj_physical_().mul_(mix)
        _add_rows(m1, i, g)
        if m1_masked is not None:
            _add_rows(m1_masked, i, g.mul_(ssnr_mask[hyp.cls[sl]]))
        _add_rows(fimg, r_slot, mix.mul_(q[i]))
    used_r, _ = _compact(r_all, k * pf)
    fw_rows = sums.fweight.view(slots * pf, c)
    if half is None:
        fw_rows.index_add_(0, used_r, (w_pr[:, used_r].T @ cw).to(torch.float64))  # (U, C)
    else:
        for h in range(2):
            sel = torch.nonzero(half == h).squeeze(1)
            fw = w_pr[sel][:, used_r].T @ cw[sel]
            fw_rows.index_add_(0, used_r + h * k * pf, fw.to(torch.float64))
    xa = aa = torch.zeros(b, dtype=torch.float32, device=dev)
    if with_scale:
        ctf = data.ctf
        xa = (ctf * data.x * m1_masked).real.sum(1)
        msk = ssnr_mask.to(torch.float32).repeat_interleave(pf, 0)  # (K * Pf, C)
        aa = (ctf * ctf * (w_pr @ (msk * p2))).sum(1)
    _add_rows(sums.fimg.view(slots * pf, c), used_slot, fimg.to(torch.complex128))
    m1, m2 = m1.to(torch.complex128), m2.to(torch.float64)
    xa, aa = xa.to(torch.float64), aa.to(torch.float64)
    wsum = torch.zeros(b, dtype=torch.float64, device=dev).index_add_(0, hyp.particle, wr)
    sums.pdf_class.index_add_(0, hyp.cls, wr)
    _offset_sums(
        sums, w, hyp.particle, hyp.cls, data.offset_px, translations_px, prior_offset, pixel_size
    )
    return _particle_sums(
        sums,
        data,
        hyp,
        m1,
        m2,
        wsum,
        xa,
        aa,
        window,
        full_power=full_power,
        optics=optics,
        groups=groups,
        scale=scale,
        with_scale=with_scale,
        old_norm=old_norm,
        avg_norm=avg_norm,
        nsh=nsh,
    )


def _particle_sums(
    sums: WeightedSums,
    data: BatchData,
    hyp: Hypotheses,
    m1: torch.Tensor | None,
    m2: torch.Tensor,
    wsum: torch.Tensor,
    xa: torch.Tensor | None,
    aa: torch.Tensor,
    window: FourierWindow,
    *,
    full_power: torch.Tensor,
    optics: torch.Tensor,
    groups: torch.Tensor,
    scale: torch.Tensor,
    with_scale: bool,
    old_norm: torch.Tensor,
    avg_norm: float,
    nsh: int,
    cross_pixels: torch.Tensor | None = None,
    cross_particles: torch.Tensor | None = None,
) -> torch.Tensor:
    """Noise, norm, scale and likelihood sums from the per-particle expectations M1, M2.

    Without ``m1`` the cross term ``Re(c X M1)`` comes summed instead: per optics group and
    pixel (``cross_pixels`` ``(n_optics, C)``, for the noise) and per particle
    (``cross_particles`` ``(B,)``, for the norm); ``xa`` is then already added to the sums.
    """
    dev = data.x.device
    x = data.x.to(torch.complex128)
    ctf = data.ctf.to(torch.float64)
    rp = ctf**2 * m2 + wsum[:, None] * (x.real**2 + x.imag**2)
    if m1 is not None:
        rp = rp - 2 * (ctf * x * m1).real
    n_opt = sums.sigma2_noise.shape[0]
    flat = (optics[:, None] * nsh + window.shell[None]).reshape(-1)
    s2 = sums.sigma2_noise.view(-1)
    s2.index_add_(0, flat, rp.reshape(-1))
    if cross_pixels is not None:
        flat_o = (torch.arange(n_opt, device=dev)[:, None] * nsh + window.shell[None]).reshape(-1)
        s2.index_add_(0, flat_o, -2.0 * cross_pixels.reshape(-1))
    beyond = (torch.arange(nsh, device=dev) > window.size // 2).to(torch.float64)
    s2.view(n_opt, nsh).index_add_(0, optics, full_power * beyond)
    sums.sumw_optics.index_add_(0, optics, wsum)
    resid = rp.sum(1) + (full_power * beyond).sum(1)
    if cross_particles is not None:
        resid = resid - 2.0 * cross_particles
    new_norm = (old_norm / avg_norm) * torch.sqrt(2 * resid.clamp(min=0))
    sums.norm_sum += float(new_norm.sum())
    if with_scale:
        s_g = scale[groups]
        if xa is not None:
            sums.xa.index_add_(0, groups, xa / s_g)
        sums.aa.index_add_(0, groups, aa / s_g**2)
    sums.loglik += float(hyp.loglik.sum())
    sums.pmax_sum += float(hyp.pmax.sum())
    return new_norm


def _offset_sums(
    sums: WeightedSums,
    w: torch.Tensor,
    particle: torch.Tensor,
    cls: torch.Tensor,
    offset_px: torch.Tensor,
    translations_px: torch.Tensor,
    prior_offset: torch.Tensor,
    pixel_size: float,
) -> None:
    """Add the offsets' sums of weights ``w`` ``(N, Tf)`` over the translations, each row of a
    particle and class: ``sum_t W ps (o_i + t)`` per class and ``sum_t W |prior_k - ps (o_i +
    t)|²`` in all (Å), from one GEMM ``W [t, |t|²]`` ``(N, 3)``. RELION's own sum, ``ps² |mu_k -
    o_i - t|²`` with ``mu_k`` in Å and the offsets in pixels (its pitfall P12), is this one for
    ``prior_offset = ps mu``."""
    w = w.to(torch.float64)
    t = translations_px.to(torch.float64)
    wt = w @ torch.cat([t, (t * t).sum(1, keepdim=True)], 1)  # (N, 3)
    wr = w.sum(1)
    o = offset_px.to(torch.float64)[particle]  # (N, 2)
    sums.prior_offset.index_add_(0, cls, pixel_size * (wr[:, None] * o + wt[:, :2]))
    a = prior_offset[cls].to(torch.float64) - pixel_size * o  # (N, 2)
    d2 = wr * (a * a).sum(1) - 2 * pixel_size * (a * wt[:, :2]).sum(1) + pixel_size**2 * wt[:, 2]
    sums.sigma2_offset += float(d2.sum())


def _dense_sums_gemm(
    w: torch.Tensor,
    members: torch.Tensor,
    q: torch.Tensor,
    cx: torch.Tensor,
    p_re: torch.Tensor,
    ramps_f: torch.Tensor,
    fimg_h: torch.Tensor,
    cross_part: torch.Tensor,
    step: int,
    gemm_dtype: torch.dtype,
) -> torch.Tensor:
    """The dense sums of the particles ``members`` by GEMMs over the rows (particle, t): adds
    the reconstruction sums to ``fimg_h`` ``(Ra, C)`` and each particle's cross term to
    ``cross_part``; returns ``sum W^T c X ramp`` ``(Ra, C)`` (the noise's cross term before
    ``conj(P)``)."""
    b, tf, ra = w.shape
    c = q.shape[1]
    dev = q.device
    gx = torch.zeros((ra, c), dtype=torch.complex64, device=dev)
    contiguous = int(members[-1] - members[0]) + 1 == len(members)
    for s in range(0, len(members), step):
        idx = members[s : s + step]
        n = len(idx)
        # the piece's rows of W: a view when its particles are consecutive (EM)
        sl = slice(int(idx[0]), int(idx[0]) + n) if contiguous else idx
        buf = torch.empty((n, tf, 2, c), dtype=torch.complex64, device=dev)
        torch.mul(q[sl][:, None, :], ramps_f[None], out=buf[:, :, 0])
        torch.mul(cx[sl][:, None, :], ramps_f[None], out=buf[:, :, 1])
        y = torch.view_as_real(buf).reshape(n * tf, 4 * c)
        wp = w[sl].reshape(n * tf, ra)
        out = torch.view_as_complex(gemm(wp.T, y, gemm_dtype).reshape(ra, 2, c, 2))
        count_gemm(ra, n * tf, 4 * c, "mstep_flops")
        count_gemm(n * tf, 2 * c, ra, "mstep_flops")
        fimg_h += out[:, 0]
        gx += out[:, 1]
        # per particle: sum_t,r W Re(conj(P_r) c X ramp_t), as batched dot products
        xc = gemm(y.view(n * tf, 2, 2 * c)[:, 1], p_re.T, gemm_dtype)  # (n*Tf, Ra)
        dots = torch.bmm(xc.view(n, 1, tf * ra), wp.view(n, tf * ra, 1)).view(n)
        cross_part[idx] = dots.to(torch.float64)
        del y, buf
    return gx


def _dense_sums_separable(
    w: torch.Tensor,
    members: torch.Tensor,
    q: torch.Tensor,
    cx: torch.Tensor,
    col_sums: ColumnSums,
    class_refs: list[tuple[torch.Tensor, torch.Tensor]],
    mask: torch.Tensor | None,
    fimg_h: torch.Tensor,
    max_rows: int,
    gemm_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`_dense_sums_gemm` with the translations on a regular grid: the reconstruction sums
    over (particle, t) as :meth:`ColumnSums.add` (one GEMM per column of the window over
    (particle, ty)), added to ``fimg_h``, and the cross terms from the particles' ``u = Re(c X
    conj(P) Mix)`` per class and pixel (:meth:`ColumnSums.class_cross`, from the same first DFT
    stage), summed piece by piece: per particle of ``members`` ``(n,)``, per pixel ``(C,)``
    and, with ``mask`` ``(Ka, C)`` (the scale's pixels per class), per particle over the masked
    pixels ``(n,)`` (else ``None``); float64. ``gemm_dtype`` applies to the per-column GEMMs of
    the sums."""
    ra = w.shape[2]
    c = q.shape[1]
    dev = q.device
    acc = torch.zeros((c, 2, ra), dtype=torch.float32, device=dev)
    per_particle = torch.empty(len(members), dtype=torch.float64, device=dev)
    per_pixel = torch.zeros(c, dtype=torch.float64, device=dev)
    masked = None if mask is None else torch.empty_like(per_particle)
    # particles per piece: V (2 columns x n x n_ty x Ra floats) about max_rows x Ra, as the
    # GEMM path's pieces of rows (particle, t) (measured: 4096-16384 x Ra equally fast)
    per = 2 * len(col_sums.cols) * col_sums.n_ty * ra
    step = max(1, min(len(members), (max_rows * ra) // max(per, 1)))
    for s in range(0, len(members), step):
        idx = members[s : s + step]
        n = len(idx)
        v = col_sums.spread(w[idx])
        col_sums.add(v, q[idx][None], acc, gemm_dtype)
        GEMM_STATS["mstep_flops"] += col_sums.flops(n, ra, 1, class_cross=True)
        u = col_sums.class_cross(v, cx[idx], class_refs)  # (Ka, n, C)
        del v
        per_particle[s : s + n] = u.sum((0, 2), dtype=torch.float64)
        per_pixel += u.sum((0, 1), dtype=torch.float64)
        if masked is not None:
            masked[s : s + n] = u.mul_(mask[:, None, :]).sum((0, 2), dtype=torch.float64)
    fimg_h += torch.complex(acc[:, 0], acc[:, 1]).T
    return per_particle, per_pixel, masked


def _accumulate_dense(
    sums: WeightedSums,
    data: BatchData,
    hyp: Hypotheses,
    proj_f: torch.Tensor,
    ramps_f: torch.Tensor,
    window: FourierWindow,
    *,
    full_power: torch.Tensor,
    optics: torch.Tensor,
    groups: torch.Tensor,
    scale: torch.Tensor,
    ssnr_mask: torch.Tensor | None,
    translations_px: torch.Tensor,
    prior_offset: torch.Tensor,
    pixel_size: float,
    old_norm: torch.Tensor,
    avg_norm: float,
    nsh: int,
    half: torch.Tensor | None,
    max_rows: int = 8192,
    gemm_dtype: torch.dtype = torch.float32,
    col_sums: ColumnSums | None = None,
) -> torch.Tensor:
    """:func:`accumulate` for dense weights ``W`` ``(B, Tf, R)`` (R = active classes x psi).

    Every sum over translations is a GEMM over the rows ``(particle, t)``: with
    ``Y_q = c X_unmasked ramp_t / sigma2`` and ``Y_x = c X ramp_t``,
    ``W^T [Y_q | Y_x]`` ``(R, 4C)`` gives the reconstruction sums and, per pixel,
    ``sum_r Re(conj(P_r) W^T Y_x)``, the cross term of the noise (and of the scale, per group);
    ``Y_x P^T`` ``(B * Tf, R)`` gives each particle's cross term for its norm correction
    (:func:`_dense_sums_gemm`). With the translations on a regular grid (``col_sums``) the
    reconstruction sums come from two small DFTs and the cross terms from the first one's output
    contracted with ``conj(P)`` per class, per particle and pixel (:func:`_dense_sums_separable`).
    When few (particle, class) blocks carry weight the sums go block by block
    (:func:`_class_block_sums`). Particles are taken in pieces of one optics group, half set and
    (with ``--scale``, on the GEMM path only) group.
    """
    w = hyp.dense
    assert w is not None and hyp.active is not None
    b, tf, ra = w.shape
    active = hyp.active
    ka = len(active)
    k, pf, c = proj_f.shape
    dev = data.x.device
    p = proj_f[active].reshape(ra, c)
    p_re = real_rows(p)  # (Ra, 2C)
    p2 = p.real**2 + p.imag**2
    inv_sig = 1.0 / data.sigma2
    q = data.ctf * data.xu * inv_sig
    cx = data.ctf * data.x
    cw = data.ctf * data.ctf * inv_sig
    wr = w.sum(1)  # (B, Ra)
    wsum = wr.sum(1).to(torch.float64)
    with_scale = ssnr_mask is not None
    mask_c = ssnr_mask[active].to(torch.float32) if with_scale else None  # (Ka, C)
    msk = mask_c.repeat_interleave(pf, 0) if with_scale else None  # (Ra, C)
    n_opt = sums.sigma2_noise.shape[0]
    n_groups = sums.xa.shape[0]
    zeros = torch.zeros(b, dtype=torch.long, device=dev)
    halves = half if half is not None else zeros
    step = max(1, max_rows // tf)
    in_class = wr.view(b, ka, pf).sum(2) > 0  # (B, Ka): (particle, class) blocks with weight
    by_class = float(in_class.float().mean()) < BLOCK_FRACTION
    # pieces of one (optics group, half set, group); the group only matters for the scale's
    # cross term where it is summed over a piece (the GEMM path; the block and separable paths
    # have it per particle)
    separable = col_sums is not None and not by_class
    per_group = with_scale and not by_class and not separable
    piece = torch.stack([optics, halves, groups if per_group else zeros], 1)
    slots = sums.fimg.shape[0]
    fimg = torch.zeros((2, ra, c), dtype=torch.complex64, device=dev)
    cross_pix = torch.zeros((n_opt, c), dtype=torch.float64, device=dev)
    cross_part = torch.zeros(b, dtype=torch.float64, device=dev)
    xa_sum = torch.zeros(n_groups, dtype=torch.float64, device=dev)
    ramps_re = torch.view_as_real(ramps_f).reshape(tf, 2 * c)
    # the projections by column and class, made once for the separable pieces
    class_refs = col_sums.class_refs(p, ka) if separable else None
    # the block path's pieces run side by side (tamis._threads): each gets its share of the
    # memory bound
    block_pairs = max(1, max_rows // pf // worker_count(dev))
    for o, h, g in torch.unique(piece, dim=0).tolist():
        members = torch.nonzero((piece == piece.new_tensor([o, h, g])).all(1)).squeeze(1)
        if not by_class and not separable:  # the GEMM path: the scale's term per piece
            gx = _dense_sums_gemm(
                w, members, q, cx, p_re, ramps_f, fimg[h], cross_part, step, gemm_dtype
            )
            corr = (gx * p.conj()).real  # (Ra, C)
            cross_pix[o] += corr.sum(0, dtype=torch.float64)
            if with_scale:
                xa_sum[g] += float((msk * corr).sum(dtype=torch.float64)) / float(scale[g])
            continue
        # the block and separable paths: the noise's cross term per pixel, the scale's per
        # particle of ``members``
        if by_class:
            f_part, noise, xa_part = _class_block_sums(
                w, members, in_class, q, cx, p, ramps_re, pf, msk, cross_part,
                max_pairs=block_pairs, gemm_dtype=gemm_dtype, col_sums=col_sums,
            )  # fmt: skip
            fimg[h] += f_part
        else:
            cross_part[members], noise, xa_part = _dense_sums_separable(
                w, members, q, cx, col_sums, class_refs, mask_c, fimg[h], max_rows, gemm_dtype
            )  # fmt: skip
        cross_pix[o] += noise
        if with_scale:
            g_m = groups[members]
            xa_sum.index_add_(0, g_m, xa_part / scale[g_m].to(torch.float64))
    if with_scale:
        sums.xa += xa_sum
    # reconstruction weights, per half set: (Ra, B) x (B, C)
    for h in range(2 if half is not None else 1):
        sel = torch.nonzero(halves == h).squeeze(1)
        fw = wr[sel].T @ cw[sel]  # (Ra, C)
        rows = (active + k * h).repeat_interleave(pf) * pf + torch.arange(pf, device=dev).repeat(ka)
        _add_rows(sums.fimg.view(slots * pf, c), rows, fimg[h].to(torch.complex128))
        sums.fweight.view(slots * pf, c).index_add_(0, rows, fw.to(torch.float64))
    m2 = wr @ p2  # (B, C)
    aa = (
        (data.ctf * data.ctf * (wr @ (msk * p2))).sum(1, dtype=torch.float64)
        if with_scale
        else None
    )
    cls_w = wr.view(b, ka, pf).sum(2).to(torch.float64)  # (B, Ka)
    sums.pdf_class.index_add_(0, active, cls_w.sum(0))
    # each (particle, class) block's weights over translations, as rows
    w_blocks = w.view(b, tf, ka, pf).sum(3).transpose(1, 2).reshape(b * ka, tf)
    _offset_sums(
        sums,
        w_blocks,
        torch.arange(b, device=dev).repeat_interleave(ka),
        active.repeat(b),
        data.offset_px,
        translations_px,
        prior_offset,
        pixel_size,
    )
    return _particle_sums(
        sums,
        data,
        hyp,
        None,
        m2.to(torch.float64),
        wsum,
        None,
        aa if aa is not None else torch.zeros(b, dtype=torch.float64, device=dev),
        window,
        full_power=full_power,
        optics=optics,
        groups=groups,
        scale=scale,
        with_scale=with_scale,
        old_norm=old_norm,
        avg_norm=avg_norm,
        nsh=nsh,
        cross_pixels=cross_pix,
        cross_particles=cross_part,
    )


def maximize(
    st: ModelState,
    sums: WeightedSums,
    d: torch.Tensor,
    w: torch.Tensor,
    *,
    tau2: torch.Tensor,
    options: Class2DOptions,
    tau2_fudge: float,
    current_size: int,
    group_counts: torch.Tensor,
    do_scale: bool,
    n_particles: int,
) -> ModelState:
    """EM M-step: reconstruct the classes from the E-step's padded grids ``d``, ``w`` and
    update every other model parameter (mu = 0)."""
    o = options
    box = st.box
    r_max = current_size / 2
    refs = reconstruct(
        d,
        w,
        box=box,
        r_max=r_max,
        tau2=tau2,
        tau2_fudge=tau2_fudge,
        pad=o.pad,
        minres_map=o.minres_map,
    )
    active = (sums.pdf_class > 0) & (st.pdf_class > 0) & (w.flatten(1).sum(1) > 1e-20)
    refs = refs * active.view(-1, *([1] * (refs.ndim - 1)))
    sigma2_class, dvp, coverage = ssnr_arrays(
        w, tau2, r_max=r_max, tau2_fudge=tau2_fudge, pad=o.pad
    )
    new = update_other_parameters(
        st, sums, options=o, group_counts=group_counts, do_scale=do_scale, mu=0.0
    )
    return replace(
        new,
        refs=refs,
        data_vs_prior=dvp,
        fourier_coverage=coverage,
        sigma2_class=sigma2_class,
        tau2=tau2,
    )


def update_other_parameters(
    st: ModelState,
    sums: WeightedSums,
    *,
    options: Class2DOptions,
    group_counts: torch.Tensor,
    do_scale: bool,
    mu: float = 0.0,
) -> ModelState:
    """RELION's ``maximizationOtherParameters``: class fractions, offset priors, sigma_offset,
    noise spectra, norm and scale, each ``mu * old + (1 - mu) * new`` (EM: mu = 0; VDAM: 0.9 on
    mini-batches). References and SSNR arrays are left as they are."""
    o = options
    box = st.box
    nsh = box // 2 + 1
    sum_w = float(sums.pdf_class.sum())
    if sum_w <= 0:
        raise RuntimeError("no particle contributed to this iteration")
    avg_norm = mu * st.avg_norm + (1 - mu) * sums.norm_sum / sum_w if o.norm else st.avg_norm
    scale = st.scale
    if do_scale:
        s = torch.where(sums.aa > 0, sums.xa / sums.aa.clamp(min=1e-300), torch.ones_like(sums.aa))
        s = mu * st.scale + (1 - mu) * s
        med = torch.sort(s).values[len(s) // 2]
        s = s.clamp(min=float(med) / 5, max=5 * float(med))
        counts = group_counts.to(torch.float64)
        scale = s / ((counts * s).sum() / counts.sum())
    pdf_class = mu * st.pdf_class + (1 - mu) * sums.pdf_class / sum_w
    pdf_class = pdf_class / pdf_class.sum()
    # RELION's pdf_direction, not renormalised; 2D has one direction (the class sums)
    w_dir = sums.pdf_class[:, None] if sums.pdf_direction is None else sums.pdf_direction
    pdf_direction = mu * st.pdf_direction + (1 - mu) * w_dir / sum_w
    # Each class's mean offset; --offset_prior relion as RELION 5: each class's sum over the
    # weight of all classes (the mean times the class fraction), and no offset prior of 3D
    # references' own (centred on a zero total offset, getFourierTransformsAndCtfs; tamis does
    # not read rlnOriginX/YPriorAngst).
    if o.relion_offset_prior and st.refs.ndim == 4:
        prior = torch.zeros_like(st.prior_offset)
    else:
        weight = sum_w if o.relion_offset_prior else sums.pdf_class[:, None].clamp(min=1e-300)
        mean = sums.prior_offset / weight
        has_w = sums.pdf_class[:, None] > 0
        prior = torch.where(has_w, mu * st.prior_offset + (1 - mu) * mean, torch.zeros_like(mean))
    sigma2_offset = (
        st.sigma2_offset  # RELION's --fix_sigma_offset
        if o.fix_sigma_offset
        else max(mu * st.sigma2_offset + (1 - mu) * sums.sigma2_offset / (2 * sum_w), 2.0)
    )
    npix = pixels_per_shell(box, nsh, st.sigma2.device)
    sigma2 = st.sigma2.clone()
    for og in range(sigma2.shape[0]):
        if float(sums.sigma2_noise[og].sum()) == 0 or float(sums.sumw_optics[og]) == 0:
            continue
        new = sums.sigma2_noise[og] / (2 * sums.sumw_optics[og] * npix.clamp(min=1))
        sigma2[og] = fill_low_shells(mu * st.sigma2[og] + (1 - mu) * new, 1e-14)
    return replace(
        st,
        sigma2=sigma2,
        pdf_class=pdf_class,
        pdf_direction=pdf_direction,
        prior_offset=prior,
        sigma2_offset=sigma2_offset,
        avg_norm=avg_norm,
        scale=scale,
        loglik=sums.loglik,
        avg_pmax=sums.pmax_sum / sum_w,
    )


def current_resolution_shell(dvp: torch.Tensor, pdf_class: torch.Tensor, minres: int = 5) -> int:
    """RELION's ``updateCurrentResolution``: per class the last shell before SSNR first drops
    below 1; the maximum over classes, at least ``minres``."""
    best = minres
    last = dvp.shape[1] - 1  # RELION searches shells below N/2, so at most N/2 - 1 is returned
    for c in range(dvp.shape[0]):
        below = torch.nonzero(dvp[c, 1:last] < 1)
        # first shell >= 1 below 1 is below[0] + 1; the resolution is the shell before it
        ires = int(below[0]) if len(below) else last - 1
        best = max(best, ires)
    return best


def class_centres(refs: torch.Tensor, max_shift_px: float) -> torch.Tensor:
    """``(K, 2)`` (x, y) centre of mass of each class's positive density relative to the box
    centre, in pixels, capped at ``max_shift_px`` in length (RELION's ``centerClasses``)."""
    k, n, _ = refs.shape
    c = torch.arange(n, device=refs.device, dtype=torch.float64) - n // 2
    pos = refs.to(torch.float64).clamp(min=0)
    mass = pos.sum(dim=(1, 2)).clamp(min=1e-30)
    com = torch.stack([(pos.sum(1) * c).sum(1) / mass, (pos.sum(2) * c).sum(1) / mass], 1)
    length = com.norm(dim=1, keepdim=True)
    return torch.where(length > max_shift_px, com * max_shift_px / length.clamp(min=1e-30), com)


def shift_classes(refs: torch.Tensor, com: torch.Tensor) -> torch.Tensor:
    """``output(r) = input(r + com)`` per class (bilinear, zero outside): moves ``com`` to the
    centre."""
    k, n, _ = refs.shape
    c = torch.arange(n, device=refs.device, dtype=torch.float64) - n // 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    gx = (xx[None] + com[:, 0, None, None] + n // 2) * (2.0 / (n - 1)) - 1.0
    gy = (yy[None] + com[:, 1, None, None] + n // 2) * (2.0 / (n - 1)) - 1.0
    grid = torch.stack([gx, gy], -1).to(refs.dtype)
    out = F.grid_sample(
        refs[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return out[:, 0]


def center_classes(refs: torch.Tensor, max_shift_px: float) -> torch.Tensor:
    """Move each class's centre of mass of positive density to the origin (capped length)."""
    return shift_classes(refs, class_centres(refs, max_shift_px))


def flatten_solvent(refs: torch.Tensor, radius_px: float, width: float = 5.0) -> torch.Tensor:
    """Multiply by RELION's solvent mask (1 inside, cosine edge to 0 outside the diameter);
    ``refs`` ``(K, N, N)`` images or ``(K, N, N, N)`` maps."""
    ndim = refs.ndim - 1
    mask = solvent_mask(refs.shape[-1], radius_px, width, device=refs.device, ndim=ndim)
    return refs * mask.to(refs.dtype)
