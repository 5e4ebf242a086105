"""Template matching (RELION's reference-based autopicking, on a low-passed micrograph).

The micrograph is normalised and inverted unless its particles are white, then Fourier-binned to a
pixel of ``lowpass / 2`` Å (RELION-2 showed that picking at ~20 Å keeps recall and is an order of
magnitude faster). Templates (class averages or projections: particles white, CTF-corrected) are
rescaled to the same pixel, multiplied by the micrograph's CTF, rotated over ``psi_step`` and
masked to the particle diameter. The figure of merit is the normalised cross-correlation
``sum(T M) / (|T| |M - mean(M)|)`` under the mask, computed with FFTs for every template and
angle at once; its best value per pixel goes through :func:`tamis.pick.peaks.find_peaks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tamis.ctf import CTFParams
from tamis.errors import TamisError
from tamis.fourier import irfft2_centered, rescale_images, rfft2_centered
from tamis.masks import radius_map
from tamis.pick.micrograph import Micrograph, working_image
from tamis.pick.peaks import Picks, find_peaks

__all__ = ["TemplateOptions", "prepare_templates", "template_fom", "pick_template"]


@dataclass
class TemplateOptions:
    diameter: float  # Å: mask diameter of the templates
    min_distance: float | None = None  # Å between picks; default the diameter
    threshold: float = 0.25  # minimum normalised cross-correlation
    psi_step: float = 10.0  # degrees
    lowpass: float = 20.0  # Å; working pixel lowpass / 2
    invert: bool = False  # particles are white in the micrographs
    use_ctf: bool = True
    edge: float | None = None  # Å excluded at the sides; default half the diameter
    batch: int = 64  # templates x angles per FFT batch


def prepare_templates(
    templates: torch.Tensor,
    template_pixel: float,
    work_pixel: float,
    diameter: float,
    psi_step: float,
    ctf: CTFParams | None = None,
) -> torch.Tensor:
    """``(T, n, n)`` -> zero-mean, unit-norm, masked ``(T * P, m, m)`` at ``work_pixel``."""
    t = templates.to(torch.float64)
    n = t.shape[-1]
    m = max(8, 2 * int(round(n * template_pixel / work_pixel / 2)))
    t = rescale_images(t, m) if m != n else t
    if ctf is not None:
        c = ctf.compute((m, m))[0].to(t.device, torch.float64)
        t = irfft2_centered(rfft2_centered(t) * c, (m, m))
    angles = torch.arange(0.0, 360.0, psi_step, dtype=torch.float64)
    rot = _rotate(t, angles)  # (T, P, m, m)
    rot = rot.reshape(-1, m, m)
    mask = (radius_map(m, device=rot.device) <= diameter / 2 / work_pixel).to(rot.dtype)
    k = mask.sum()
    mean = (rot * mask).sum((1, 2), keepdim=True) / k
    rot = (rot - mean) * mask
    norm = rot.pow(2).sum((1, 2), keepdim=True).sqrt().clamp(min=1e-12)
    return (rot / norm).to(torch.float32)


def _rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    t, m, _ = images.shape
    c = torch.arange(m, dtype=torch.float64) - m // 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    a = torch.deg2rad(degrees)[:, None, None]
    # output(r) = input(R(-a) r): the template rotated by +a
    px = torch.cos(a) * xx + torch.sin(a) * yy + m // 2
    py = -torch.sin(a) * xx + torch.cos(a) * yy + m // 2
    grid = torch.stack([px, py], -1) * (2.0 / (m - 1)) - 1.0  # (P, m, m, 2)
    src = images[:, None].expand(t, len(degrees), m, m).reshape(-1, 1, m, m)
    g = grid[None].expand(t, -1, -1, -1, -1).reshape(-1, m, m, 2)
    out = F.grid_sample(src, g.to(src.dtype), mode="bilinear", align_corners=True)
    return out.reshape(t, len(degrees), m, m)


def template_fom(image: torch.Tensor, templates: torch.Tensor, mask_radius: float, batch: int = 64):
    """Best normalised cross-correlation per pixel of ``image`` ``(h, w)`` over ``templates``
    ``(R, m, m)`` (zero-mean, unit-norm, masked; centred at ``m // 2``), and the best index."""
    h0, w0 = image.shape
    m = templates.shape[-1]
    # mirrored at the sides by half a template: correlations near a side see the mirror, not
    # the opposite side wrapped round
    pad = min(h0 - 1, w0 - 1, m // 2)
    img = F.pad(image.to(torch.float32)[None, None], (pad,) * 4, mode="reflect")[0, 0]
    h, w = img.shape
    spec = torch.fft.rfft2(img)
    mask = (radius_map(m, device=img.device) <= mask_radius).to(torch.float32)
    k = float(mask.sum())

    def embed(t: torch.Tensor) -> torch.Tensor:
        # template centre at (0, 0) with wrap-around, so correlation peaks sit at the centre pixel
        out = torch.zeros((*t.shape[:-2], h, w), dtype=t.dtype, device=t.device)
        out[..., :m, :m] = t
        return torch.roll(out, shifts=(-(m // 2), -(m // 2)), dims=(-2, -1))

    fm = torch.conj(torch.fft.rfft2(embed(mask)))
    s1 = torch.fft.irfft2(spec * fm, s=(h, w))
    s2 = torch.fft.irfft2(torch.fft.rfft2(img * img) * fm, s=(h, w))
    denom = (s2 - s1 * s1 / k).clamp(min=1e-6).sqrt()
    best = torch.full((h, w), -torch.inf)
    arg = torch.zeros((h, w), dtype=torch.long)
    for s in range(0, templates.shape[0], batch):
        ft = torch.conj(torch.fft.rfft2(embed(templates[s : s + batch])))
        cc = torch.fft.irfft2(spec[None] * ft, s=(h, w)) / denom
        v, i = cc.max(0)
        better = v > best
        best = torch.where(better, v, best)
        arg = torch.where(better, i + s, arg)
    return best[pad : pad + h0, pad : pad + w0], arg[pad : pad + h0, pad : pad + w0]


def pick_template(
    mic: Micrograph,
    templates: torch.Tensor,
    template_pixel: float,
    options: TemplateOptions,
    ctf: CTFParams | None = None,
    max_picks: int | None = None,
) -> Picks:
    """Template-matching picks on one micrograph (``ctf``: this micrograph's, one row)."""
    if templates.ndim != 3 or templates.shape[-1] != templates.shape[-2]:
        raise TamisError("templates must be a stack of square images")
    small, (sy, sx), pw = working_image(mic, options.lowpass, options.invert)
    work_ctf = None
    if ctf is not None and options.use_ctf:
        work_ctf = ctf[0:1]
        work_ctf.pixel_size = torch.full_like(work_ctf.pixel_size, pw)
    tmpl = prepare_templates(
        templates, template_pixel, pw, options.diameter, options.psi_step, work_ctf
    )
    best, _ = template_fom(small, tmpl, options.diameter / 2 / pw, options.batch)
    dist = options.min_distance if options.min_distance is not None else options.diameter
    edge_a = options.edge if options.edge is not None else 0.5 * options.diameter
    rows, cols, vals = find_peaks(
        best,
        dist / pw,
        threshold=options.threshold if max_picks is None else -np.inf,
        edge=max(int(edge_a / pw), 1),
        max_peaks=max_picks,
    )
    return Picks(cols / sx, rows / sy, vals.astype(np.float64))
