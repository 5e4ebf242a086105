"""The numeric kernels of RELION's own motion correction (MotionCor2's model), batched as tensors:
frame alignment by iterated leave-one-out cross-correlation, frame groups, dose weighting
(Grant & Grigorieff 2015) and accumulated motion. The deformation model, its fit and the
resampler are in :mod:`tamis.motion_model`.

Conventions (``relion-motioncorr-mdcatch.md`` §0, §A2):

- Spectra are ``torch.fft.rfft2(..., norm="forward")`` of images with the origin at pixel 0
  (``(..., h, w // 2 + 1)``), so Fourier cropping keeps the mean per pixel.
- A shift ``s = (sx, sy)`` is what is *applied to a frame* to bring it into register:
  ``aligned(x, y) = raw(x - sx, y - sy)``; the first frame's shift is 0.
- Time in the deformation model is the frame index counted from the first frame used: frame
  ``i`` is at ``z = i`` when fitted and when applied, and a group of frames at the mean of its
  frame indices (RELION fits at ``start + size/2`` and applies at ``z = i``: half a frame apart).
- The B-factor weight of the alignment is isotropic, ``exp(-2 B ((ky/h)² + (kx/w)²))`` (RELION
  divides kx by ``w/2+1``, which weights x about four times more in d²).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tamis.fourier import crop_fourier, fourier_shift_cropped, rfft_frequencies
from tamis.motion_model import critical_exposure

__all__ = [
    "GOOD_SIZES",
    "good_size",
    "ccf_shape",
    "weight_band",
    "weight_radius",
    "align_spectra",
    "frame_groups",
    "dose_weights",
    "DoseWeighting",
    "accumulated_motion",
]

#: RELION's ``findGoodSize`` list (sizes with small prime factors for the CCF box).
GOOD_SIZES = (192, 216, 256, 288, 324, 384, 432, 486, 512, 576, 648, 768, 800, 864, 972, 1024,
              1296, 1536, 1728, 1944, 2048, 2304, 2592, 3072, 3200, 3456, 3888, 4096, 4608, 5000,
              5184, 6144, 6250, 6400, 6912, 7776, 8192, 9216, 10240, 12288, 12500)  # fmt: skip


def good_size(n: int) -> int:
    """The first of :data:`GOOD_SIZES` that is >= ``n``, or ``n`` itself above them all."""
    for s in GOOD_SIZES:
        if s >= n:
            return s
    return n


def weight_radius(bfactor: float) -> float:
    """``sqrt(-ln(1e-8) / (2 B))``: beyond this fraction of an image's size the alignment's
    B-factor weight ``exp(-2 B d²)`` is below 1e-8 (RELION's criterion; 1 for ``B <= 0``)."""
    return math.sqrt(-math.log(1e-8) / (2.0 * bfactor)) if bfactor > 0 else 1.0


def weight_band(
    image_shape: tuple[int, int], bfactor: float, box: tuple[int, int], margin: int = 0
) -> tuple[int, int]:
    """The even half-plane crop ``(h', w')`` that holds every frequency of ``image_shape`` with a
    B-factor weight above 1e-8 (plus ``margin`` frequencies on each side), no larger than
    ``box`` (the CCF box: RELION rounds it up to a good FFT size, 192 at least, so for small
    images the band is the smaller one)."""
    r = weight_radius(bfactor)
    return (
        min(box[0], 2 * math.ceil(r * image_shape[0]) + 2 + 2 * margin),
        min(box[1], 2 * math.ceil(r * image_shape[1]) + 2 + 2 * margin),
    )


def ccf_shape(
    image_shape: tuple[int, int], bfactor: float, ccf_downsample: float = 0.0
) -> tuple[int, int]:
    """The cross-correlation box for images of ``image_shape``: the frequencies the B-factor
    weight leaves above 1e-8, :func:`weight_radius` of the size (or ``ccf_downsample``),
    rounded up to a good size, capped at the image, made even."""
    r = ccf_downsample if ccf_downsample > 0 else weight_radius(bfactor)
    out = []
    for n in image_shape:
        s = min(good_size(int(n * r)), n)
        out.append(s + s % 2 if s + s % 2 <= n else s - 1)
    return out[0], out[1]


def _ccf_window(prod: torch.Tensor, ccf_box: tuple[int, int], reach: int) -> torch.Tensor:
    """The cross-correlation ``irfft2(prod, s=ccf_box, norm="backward")`` at the shifts
    ``|dy|, |dx| <= reach`` only: ``(..., 2 reach + 1, 2 reach + 1)``, row ``i`` for
    ``dy = i - reach`` (wrapped on the CCF grid). ``prod`` is a half-plane spectrum cropped as
    :func:`crop_fourier` leaves it, ``(..., ey, ex // 2 + 1)``, for images of ``ccf_box``. Two
    GEMMs over the frequencies instead of an inverse FFT of the whole box, of which the peak
    search reads a window."""
    cy, cx = ccf_box
    ey, exh = prod.shape[-2:]
    dev = prod.device
    ky, kx = rfft_frequencies((ey, 2 * (exh - 1)), device=dev, dtype=torch.float64)
    d = torch.arange(-reach, reach + 1, device=dev, dtype=torch.float64)
    phase_y = 2 * math.pi * d[:, None] * ky[:, 0][None] / cy
    ey_mat = torch.polar(torch.ones_like(phase_y), phase_y)
    # the half plane's columns count twice, but for kx = 0 and the box's Nyquist column
    twice = torch.full((exh,), 2.0, dtype=torch.float64, device=dev)
    twice[0] = 1.0
    if exh - 1 == cx // 2:
        twice[-1] = 1.0
    phase_x = 2 * math.pi * kx[0][:, None] * d[None] / cx
    ex_mat = twice[:, None] * torch.polar(torch.ones_like(phase_x), phase_x)
    ey_mat, ex_mat = ey_mat.to(torch.complex64), ex_mat.to(torch.complex64)
    batch = prod.shape[:-2]
    m = prod.reshape(-1, ey, exh)
    n = m.shape[0]
    rows = ey_mat @ m.permute(1, 0, 2).reshape(ey, n * exh)  # (2R+1, M * exh)
    rows = rows.view(len(d), n, exh).permute(1, 0, 2).reshape(n * len(d), exh)
    out = (rows @ ex_mat).real / (cy * cx)
    return out.view(*batch, len(d), len(d))


def _peaks_window(ccf: torch.Tensor) -> torch.Tensor:
    """Sub-pixel argmax ``(..., 2)`` (x, y) of CCF windows from :func:`_ccf_window`, searched
    inside their one-pixel border (which holds the neighbours), refined by a 3-point parabola on
    each axis (RELION's)."""
    size = ccf.shape[-1]
    n_in = size - 2
    flat = ccf[..., 1:-1, 1:-1].flatten(-2).argmax(-1)
    iy, ix = flat // n_in + 1, flat % n_in + 1
    flat_ccf = ccf.flatten(-2)

    def value(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.gather(flat_ccf, -1, (y * size + x)[..., None])[..., 0].double()

    v0 = value(iy, ix)
    out = []
    for pos, (vm, vp) in (
        (ix, (value(iy, ix - 1), value(iy, ix + 1))),
        (iy, (value(iy - 1, ix), value(iy + 1, ix))),
    ):
        den = vp + vm - 2.0 * v0
        offset = torch.where(den < -1e-15, -0.5 * (vp - vm) / den.clamp(max=-1e-15), 0.0)
        out.append((pos - size // 2).double() + offset.clamp(-1.0, 1.0))
    return torch.stack(out, -1)


def align_spectra(
    spectra: torch.Tensor,
    image_shape: tuple[int, int],
    bfactor: float,
    *,
    max_iter: int = 5,
    tolerance: float = 0.5,
    search: float = 50.0,
    ccf_downsample: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Align K images to each other (RELION's ``alignPatch``), for every leading batch entry.

    Each iteration correlates every image with the sum of the others (all shifted by the
    current estimate), under the weight ``exp(-2 B d²)``, in the cross-correlation box of
    :func:`ccf_shape`; the peak within ``search`` pixels, refined by a parabola, is the
    increment; increments are re-referenced to the first image. Iterations stop when the RMS
    increment is below ``tolerance`` pixels (a batch entry stops on its own).

    Parameters
    ----------
    spectra
        ``(..., K, h', w'//2+1)`` complex: rfft2 (forward norm) of images of ``image_shape``,
        already cropped to any box at least as large as the CCF box or as the band where the
        B-factor weight exceeds 1e-8, whichever is smaller.
    image_shape
        ``(h, w)`` of the images, in pixels (shifts are in these pixels).
    bfactor
        In pixel² (RELION's ``--bfactor`` divided by the square of any early binning).

    Returns
    -------
    shifts
        ``(..., K, 2)`` float64 (x, y), the first image's 0.
    converged
        ``(...,)`` bool.
    """
    h, w = image_shape
    cy, cx = ccf_shape(image_shape, bfactor, ccf_downsample)
    # The products and shifts are made on the B-factor band only (:func:`weight_band`), and the
    # CCF of the box is evaluated on the search window only (:func:`_ccf_window`): the same CCF
    # up to terms weighted < 1e-8.
    ey, ex = weight_band(image_shape, bfactor, (cy, cx))
    f = crop_fourier(spectra, (ey, ex)).clone()
    ky, kx = rfft_frequencies((ey, ex), device=f.device, dtype=torch.float32)
    weight = torch.exp(-2.0 * bfactor * ((ky / h) ** 2 + (kx / w) ** 2))
    scale = torch.tensor([w / cx, h / cy], dtype=torch.float64, device=f.device)
    reach = int(min(search / max(w / cx, h / cy), cx // 2 - 1, cy // 2 - 1))
    batch = f.shape[:-3]
    k = f.shape[-3]
    # a flat batch; entries that converged drop out of the next iterations
    f = f.reshape(-1, *f.shape[-3:])
    total = torch.zeros((f.shape[0], k, 2), dtype=torch.float64, device=f.device)
    converged = torch.zeros(f.shape[0], dtype=torch.bool, device=f.device)
    active = torch.arange(f.shape[0], device=f.device)
    for _ in range(max_iter):
        fa = f[active]
        prod = fa.sum(-3, keepdim=True) - fa  # the others' sum, times conj(image), weighted:
        prod.mul_(fa.conj()).mul_(weight)  # in place
        inc = _peaks_window(_ccf_window(prod, (cy, cx), reach + 1)) * scale
        inc = inc - inc[:, :1, :]
        total[active] += inc
        f[active] = fourier_shift_cropped(fa.flatten(0, 1), inc.flatten(0, 1), (h, w)).view_as(fa)
        rmsd = torch.sqrt((inc**2).sum((-1, -2)) / k)
        done = rmsd < tolerance
        converged[active[done]] = True
        active = active[~done]
        if not len(active):
            break
    return total.reshape(*batch, k, 2), converged.reshape(batch)


def frame_groups(n_frames: int, group: int) -> list[range]:
    """Frames ``0..n-1`` in groups of ``group`` (RELION: ``n // group`` groups; the remainder
    goes one frame at a time to the last groups, never to the first)."""
    n_groups = n_frames // group
    if n_groups < 1:
        return []
    sizes = [group] * n_groups
    extra = n_frames - group * n_groups
    i = n_groups - 1
    while extra > 0:
        sizes[i] += 1
        extra -= 1
        i = i - 1 if i > 1 else n_groups - 1
        if n_groups == 1:
            i = 0
    out, start = [], 0
    for s in sizes:
        out.append(range(start, start + s))
        start += s
    return out


class DoseWeighting:
    """RELION's dose weighting (``doseWeighting``) for frames of ``image_shape`` at
    ``pixel_size`` (Å), one batch of frames at a time: ``weights(doses)`` are
    ``w_i(k) = exp(-N_i / (2 Ne(k))) / sqrt(sum_j w_j(k)²)``, the sum over ``all_doses``.

    Doses (e/Å², at the *end* of each frame, pre-exposure included) are divided by 0.8 at 200
    kV and by 0.64 at 100 kV; other voltages are refused, as in RELION.
    """

    def __init__(
        self,
        image_shape: tuple[int, int],
        pixel_size: float,
        all_doses: torch.Tensor,
        voltage: float,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        if abs(voltage - 300) <= 2:
            factor = 1.0
        elif abs(voltage - 200) <= 2:
            factor = 0.8
        elif abs(voltage - 100) <= 2:
            factor = 0.64
        else:
            from tamis.errors import TamisError

            raise TamisError(f"dose weighting: voltage {voltage} kV (only 100, 200 or 300 kV)")
        h, w = image_shape
        ky, kx = rfft_frequencies(image_shape, device=device, dtype=torch.float32)
        k = torch.sqrt((ky / h) ** 2 + (kx / w) ** 2) / pixel_size
        self._inv = 1.0 / (2.0 * critical_exposure(k))  # 0 at k = 0
        self._factor = factor
        norm = torch.zeros_like(k)
        for n in all_doses.tolist():
            norm += torch.exp(-2.0 * (n / factor) * self._inv)
        self._scale = torch.rsqrt(norm)

    def weights(self, doses: torch.Tensor) -> torch.Tensor:
        """``(F, h, w // 2 + 1)`` float32 weights for frames with exposures ``doses`` ``(F,)``."""
        n = (doses.to(self._inv.device, torch.float32) / self._factor)[:, None, None]
        return torch.exp(-n * self._inv) * self._scale


def dose_weights(
    image_shape: tuple[int, int],
    pixel_size: float,
    doses: torch.Tensor,
    voltage: float,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """All frames' weights of :class:`DoseWeighting` at once: ``(F, h, w // 2 + 1)``."""
    return DoseWeighting(image_shape, pixel_size, doses, voltage, device=device).weights(doses)


def accumulated_motion(
    shifts: np.ndarray, dose_per_frame: float, pre_exposure: float = 0.0, cutoff: float = 4.0
) -> tuple[float, float, float]:
    """RELION's ``rlnAccumMotionTotal/Early/Late`` (pixels) from global shifts ``(n, 2)`` of
    every frame of the movie (NaN for frames not used): the summed frame-to-frame distances,
    early for frames (1-based) up to ``(cutoff - pre_exposure) / dose_per_frame``."""
    frame_cut = (cutoff - pre_exposure) / dose_per_frame if dose_per_frame > 0 else 0.0
    total = early = late = 0.0
    prev = None
    for f, s in enumerate(np.asarray(shifts, dtype=np.float64), start=1):
        if not np.all(np.isfinite(s)):
            continue
        if prev is not None:
            d = float(np.hypot(*(s - prev)))
            total += d
            if f <= frame_cut:
                early += d
            else:
                late += d
        prev = s
    return total, early, late
