"""Class references on RELION's padded Fourier grid: projection (rotation), back-rotation,
Wiener reconstruction, tau2 and SSNR arrays.

Grids are full-plane, centred (frequency 0 at index ``M // 2``), ``M = pad * N``, complex, in the
units of an ``N``-box forward-normalised transform (RELION's ``x pad²``), so a sample at
``pad * A^T k`` *is* the model value at image frequency ``k``. Sampling and splatting are bilinear
(RELION's ``Projector::rotate2D`` / ``BackProjector::backrotate2D``); a splat also writes the
Hermitian mate so the grid stays Hermitian.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tamis.fourier import duplicate_half_column, rfft_frequencies
from tamis.masks import radius_map, soft_mask_outside

__all__ = [
    "FourierWindow",
    "reference_grids",
    "padded_transforms",
    "padded_to_images",
    "grid_shells",
    "project",
    "back_rotate",
    "grid_tau2",
    "reconstruct",
    "ssnr_arrays",
    "relion_round",
]

#: RELION's oversampling correction of the prior term on a 2x padded 2D grid (pad²).
OS = 4.0


def relion_round(x: torch.Tensor) -> torch.Tensor:
    """RELION's ROUND for non-negative values: floor(x + 0.5)."""
    return torch.floor(x + 0.5).to(torch.int64)


@dataclass
class FourierWindow:
    """The half-plane pixels of an ``N`` box used at current size ``n``.

    Kept: ``ROUND(|k|) <= n // 2``, ``ky > -(n // 2)`` (RELION's window drops the ``-n/2`` row), and
    not the duplicated half column ``kx = 0, ky < 0``. Attributes are 1D over those pixels.
    """

    box: int
    size: int
    index: torch.Tensor  # flat index into the (N, N // 2 + 1) half plane
    kx: torch.Tensor
    ky: torch.Tensor
    shell: torch.Tensor
    in_disc: torch.Tensor  # kx² + ky² <= (n//2)²: pixels projected and back-rotated

    @classmethod
    def create(cls, box: int, size: int, device: torch.device | str = "cpu") -> FourierWindow:
        ky, kx = rfft_frequencies((box, box), device=device, dtype=torch.float64)
        shell = relion_round(torch.sqrt(kx * kx + ky * ky))
        half = size // 2
        rows = (ky > -half) if size % 2 == 0 else (ky >= -half)  # odd sizes keep -(n-1)/2
        keep = (shell <= half) & rows & ~duplicate_half_column((box, box), device=device)
        index = torch.nonzero(keep.reshape(-1)).squeeze(1)
        kxs, kys = kx.reshape(-1)[index], ky.reshape(-1)[index]
        return cls(
            box=box,
            size=size,
            index=index,
            kx=kxs,
            ky=kys,
            shell=shell.reshape(-1)[index],
            in_disc=(kxs * kxs + kys * kys) <= (size // 2) ** 2,
        )

    def __len__(self) -> int:
        return self.index.shape[0]

    def gather(self, half_plane: torch.Tensor) -> torch.Tensor:
        """``(..., N, N // 2 + 1)`` -> ``(..., C)``."""
        return half_plane.reshape(*half_plane.shape[:-2], -1)[..., self.index]

    def subset(self, size: int) -> torch.Tensor:
        """Positions (into this window's pixel list) of the pixels of the smaller window ``size``."""
        half = size // 2
        keep = self.shell <= half
        keep &= (self.ky > -half) if size % 2 == 0 else (self.ky >= -half)
        return torch.nonzero(keep).squeeze(1)


def _sinc2(r: torch.Tensor) -> torch.Tensor:
    return torch.sinc(r) ** 2


def padded_transforms(refs: torch.Tensor, *, pad: int = 2, gridding: bool = True) -> torch.Tensor:
    """Centred ``(K, M, M)`` complex128 transforms of real images ``(K, N, N)`` zero-padded to
    ``M = pad N``, in ``N``-box forward units (``x pad²``); with ``gridding``, divided by
    ``sinc²(r / M)`` first (RELION's gridding pre-correction)."""
    k, n, _ = refs.shape
    m = pad * n
    img = refs.to(torch.float64)
    if gridding:
        r = radius_map(n, device=refs.device)
        img = img / _sinc2(r / m).clamp(min=1e-6)
    padded = torch.zeros((k, m, m), dtype=torch.float64, device=refs.device)
    o = m // 2 - n // 2
    padded[:, o : o + n, o : o + n] = img
    return torch.fft.fftshift(
        torch.fft.fft2(torch.fft.ifftshift(padded, dim=(-2, -1)), norm="forward"), dim=(-2, -1)
    ) * float(pad * pad)


def padded_to_images(
    fgrid: torch.Tensor, *, box: int, pad: int = 2, gridding: bool = True
) -> torch.Tensor:
    """Inverse of :func:`padded_transforms` as RELION's ``windowToOridimRealSpace``: transform,
    window to ``box``, soft-mask at radius ``box/2`` (3 px edge, mean outside) and, with
    ``gridding``, divide by ``sinc²(r / M)``. Returns float32 ``(K, box, box)``."""
    m = fgrid.shape[-1]
    img = torch.fft.fftshift(
        torch.fft.ifft2(torch.fft.ifftshift(fgrid / (pad * pad), dim=(-2, -1)), norm="forward"),
        dim=(-2, -1),
    ).real
    o = m // 2 - box // 2
    img = img[:, o : o + box, o : o + box]
    img = soft_mask_outside(img, box / 2, 3.0)
    if gridding:
        r = radius_map(box, device=fgrid.device)
        img = img / _sinc2(r / m).clamp(min=1e-6)
    return img.to(torch.float32)


def reference_grids(
    refs: torch.Tensor, *, pad: int = 2, r_max: float | None = None
) -> torch.Tensor:
    """Padded, centred Fourier grids ``(K, M + 1, M + 1)`` of real references ``(K, N, N)``.

    Gridding pre-correction (divide by ``sinc²(r / (pad N))``), zero-padding, transform, ``x pad²``.
    Voxels with ``|q|² > ROUND(r_max pad)²`` are zeroed when ``r_max`` is given.
    """
    m = pad * refs.shape[-1]
    spec = padded_transforms(refs, pad=pad)
    if r_max is not None:
        q2 = radius_map(m, device=refs.device) ** 2
        spec = spec * (q2 <= float(relion_round(torch.tensor(r_max * pad))) ** 2)
    # One periodic extra row and column (frequency +M/2 = -M/2), so samples at the edge of the
    # padded grid (the box's Nyquist frequency) interpolate instead of falling outside.
    spec = torch.cat([spec, spec[:, :1, :]], dim=1)
    spec = torch.cat([spec, spec[:, :, :1]], dim=2)
    return spec.to(torch.complex64)


def _positions(psi_deg: torch.Tensor, window: FourierWindow, pad: int) -> tuple[torch.Tensor, ...]:
    """Grid positions ``pad * A^T k`` ``(P, C)`` (x, y) for every psi and window pixel."""
    g = torch.deg2rad(psi_deg.to(torch.float64))[:, None]
    c, s = torch.cos(g), torch.sin(g)
    kx, ky = window.kx[None], window.ky[None]
    return pad * (c * kx - s * ky), pad * (s * kx + c * ky)


def project(
    grids: torch.Tensor, psi_deg: torch.Tensor, window: FourierWindow, *, pad: int = 2
) -> torch.Tensor:
    """Projections ``(K, P, C)`` of every class at every psi, on the window's pixels.

    ``P(k) = F_ref(A^T k)`` with ``A = [[cos, sin], [-sin, cos]]``, bilinear on the padded grid;
    zero outside the current size's disc.
    """
    k, size, _ = grids.shape
    m = pad * window.box
    qx, qy = _positions(psi_deg.to(grids.device), window, pad)
    p_, c_ = qx.shape
    coords = torch.stack([(qx + m // 2), (qy + m // 2)], dim=-1) * (2.0 / (size - 1)) - 1.0
    coords = coords.to(torch.float32).reshape(1, p_ * c_, 1, 2).expand(k, -1, -1, -1)
    planes = torch.view_as_real(grids).permute(0, 3, 1, 2)  # (K, 2, M, M)
    out = F.grid_sample(planes, coords, mode="bilinear", padding_mode="zeros", align_corners=True)
    out = torch.complex(out[:, 0, :, 0], out[:, 1, :, 0]).reshape(k, p_, c_)
    return out * window.in_disc.to(out.device)


def back_rotate(
    data: torch.Tensor,
    weight: torch.Tensor,
    psi_deg: torch.Tensor,
    window: FourierWindow,
    *,
    pad: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear splat of per-(class, psi) sums into padded grids (adjoint of :func:`project`).

    ``data`` complex ``(K, P, C)``, ``weight`` real ``(K, P, C)``. Returns ``(D, W)``, each
    ``(K, M, M)``; every pixel is also written, conjugated, at ``-q`` (except the origin).
    """
    k, p_, c_ = data.shape
    m = pad * window.box
    device = data.device
    # RELION back-rotates only pixels within r_max = size // 2 (not the half shell beyond).
    disc = window.in_disc.to(device)
    data = data * disc
    weight = weight * disc
    qx, qy = _positions(psi_deg.to(device), window, pad)
    not_dc = ((window.kx != 0) | (window.ky != 0)).to(device)
    # Mates: -q, conjugated; DC once.
    qx = torch.cat([qx, -qx[:, not_dc]], dim=1)
    qy = torch.cat([qy, -qy[:, not_dc]], dim=1)
    data = torch.cat([data, data[..., not_dc].conj()], dim=-1).to(torch.complex128)
    weight = torch.cat([weight, weight[..., not_dc]], dim=-1).to(torch.float64)
    x = qx + m // 2
    y = qy + m // 2
    x0, y0 = torch.floor(x), torch.floor(y)
    e = m + 1  # one periodic extra row/column, folded back below
    fx, fy = (x - x0).reshape(-1), (y - y0).reshape(-1)
    x0, y0 = x0.long().reshape(-1), y0.long().reshape(-1)
    # The positions depend on (psi, pixel) only: every class is splatted at once, one row
    # (Re, Im, weight for each class) per (psi, pixel).
    rows = torch.cat(
        [
            torch.view_as_real(data).permute(1, 2, 0, 3).reshape(-1, 2 * k),
            weight.permute(1, 2, 0).reshape(-1, k),
        ],
        dim=1,
    )  # (P * C', 3K)
    flat = torch.zeros((e * e, 3 * k), dtype=torch.float64, device=device)
    for dy in (0, 1):
        for dx in (0, 1):
            wt = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)  # (P * C',)
            xi, yi = x0 + dx, y0 + dy
            ok = (xi >= 0) & (xi < e) & (yi >= 0) & (yi < e)
            idx = torch.where(ok, yi * e + xi, 0)
            flat.index_add_(0, idx, rows * torch.where(ok, wt, 0.0)[:, None])
    d_flat = torch.complex(flat[:, 0 : 2 * k : 2], flat[:, 1 : 2 * k : 2]).T.contiguous()
    w_flat = flat[:, 2 * k :].T.contiguous()
    return _fold(d_flat.reshape(k, e, e)), _fold(w_flat.reshape(k, e, e))


def _fold(grid: torch.Tensor) -> torch.Tensor:
    """``(K, M+1, M+1)`` -> ``(K, M, M)``: the extra row/column is frequency -M/2 again."""
    out = grid[:, :-1, :-1].clone()
    out[:, 0, :] += grid[:, -1, :-1]
    out[:, :, 0] += grid[:, :-1, -1]
    out[:, 0, 0] += grid[:, -1, -1]
    return out


def grid_shells(m: int, pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``|q|``, ``ROUND(|q|/pad)`` and ``FLOOR(|q|/pad)`` on a centred ``M x M`` grid."""
    q = radius_map(m, device=device)
    return q, relion_round(q / pad), torch.floor(q / pad).to(torch.int64)


def grid_tau2(grids: torch.Tensor, r_max: float, n_shells: int, *, pad: int = 2) -> torch.Tensor:
    """tau2 per class and shell ``(K, n_shells)``: mean ``|F(q)|²/2`` over padded voxels with
    ``|q|² <= ROUND(r_max pad)²`` and ``ROUND(|q|/pad) = s`` (RELION's ``computeFourierTransformMap``)."""
    grids = grids[
        :, : pad * 2 * (grids.shape[-1] // (2 * pad)), : pad * 2 * (grids.shape[-1] // (2 * pad))
    ]
    k, m, _ = grids.shape
    q, ires, _ = grid_shells(m, pad, grids.device)
    inside = q**2 <= float(relion_round(torch.tensor(r_max * pad))) ** 2
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
    """RELION's ``BackProjector::reconstruct`` (skip-gridding branch) for 2D, batched over classes.

    ``F = D / max(W + [ires >= minres_map] / (os T tau2), wbar(FLOOR(|q|/pad)) / 1000)`` inside
    ``|q|² < ROUND(r_max pad)²``; ``tau2=None`` reconstructs without the prior (initial references).
    Then window to ``box``, divide by pad², soft-mask at radius ``box/2`` (3 px edge, mean outside)
    and divide by ``sinc²(r / (pad box))``. Returns real images ``(K, box, box)``.
    """
    k, m, _ = d.shape
    q, ires, ifloor = grid_shells(m, pad, d.device)
    max_r2 = float(relion_round(torch.tensor(r_max * pad))) ** 2
    inside = q**2 < max_r2
    w = w.to(torch.float64)
    if tau2 is not None:
        n_sh = tau2.shape[1]
        t2 = tau2[:, ires.clamp(max=n_sh - 1).reshape(-1)].reshape(k, m, m)
        prior = torch.where(
            t2 > 0, 1.0 / (OS * tau2_fudge * t2.clamp(min=1e-300)), torch.zeros_like(t2)
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
    floor = wbar[:, fl.reshape(-1)].reshape(k, m, m) / 1000.0
    denom = torch.maximum(wp, floor)
    fgrid = torch.where(
        inside[None] & (denom > 0), d / denom.clamp(min=1e-300), torch.zeros_like(d)
    )
    return padded_to_images(fgrid, box=box, pad=pad)


def ssnr_arrays(
    w: torch.Tensor, tau2: torch.Tensor, *, r_max: float, tau2_fudge: float, pad: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RELION's ``updateSSNRarrays``: (sigma2_class, data_vs_prior, fourier_coverage), each
    ``(K, n_shells)`` with ``n_shells = tau2.shape[1]``."""
    k, m, _ = w.shape
    n_sh = tau2.shape[1]
    q, ires, _ = grid_shells(m, pad, w.device)
    inside = q**2 < float(relion_round(torch.tensor(r_max * pad))) ** 2
    idx = torch.where(inside & (ires < n_sh), ires, torch.full_like(ires, n_sh)).reshape(-1)
    w = w.to(torch.float64).reshape(k, -1)
    t2 = tau2[:, idx.clamp(max=n_sh - 1)]
    snr = torch.where(t2 > 0, w * OS * tau2_fudge * t2, 0.001 * w * w)
    counts = torch.bincount(idx, minlength=n_sh + 1).to(torch.float64)[:n_sh]

    def shell_sum(v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((k, n_sh + 1), dtype=torch.float64, device=w.device)
        return out.index_add_(1, idx, v)[:, :n_sh]

    sum_w = shell_sum(OS * w)
    sigma2_class = torch.where(sum_w > 0, counts / sum_w.clamp(min=1e-300), torch.zeros_like(sum_w))
    dvp = shell_sum(snr) / counts.clamp(min=1)
    coverage = shell_sum((snr >= 1).to(torch.float64)) / counts.clamp(min=1)
    empty = counts == 0
    dvp = torch.where(empty[None], torch.full_like(dvp, 999.0), dvp)
    beyond = torch.arange(n_sh, device=w.device) > r_max
    dvp = torch.where(beyond[None], torch.zeros_like(dvp), dvp)
    return sigma2_class, dvp, coverage
