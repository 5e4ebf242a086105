"""VDAM: RELION-4's gradient-driven 2D classification (``relion_refine --grad``).

Each iteration runs the EM E-step (:meth:`Class2DRun.expectation_step`) on a mini-batch whose size
follows :class:`~tamis.class2d.schedule.VdamSchedule`, back-rotates the *residuals*
``c (X - c P) / sigma2`` of particles at even and odd rows into two pseudo half-sets, turns them
into a gradient ``G = D / max(1, W)``, keeps first (per half) and second moments of it on the
padded Fourier grid, and moves each class towards ``U = mean(M1) / sqrt(M2)`` by a per-class
step, shrinking shells whose half-set SNR is low (RELION's ``reconstructGrad``). Every other
parameter is updated with momentum ``mu`` (:func:`tamis.class2d.mstep.update_other_parameters`).
In the middle phase the least populated class, when inactive, is replaced by a copy of the class
whose gradient is largest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tamis import distributed
from tamis.class2d import mstep
from tamis.class2d.em import Class2DRun
from tamis.class2d.files import ContinueState, IterationFiles
from tamis.class2d.fourier2d import (
    grid_shells,
    padded_to_real,
    padded_transforms,
    relion_round,
    ssnr_arrays,
)
from tamis.class2d.schedule import VdamSchedule
from tamis.class2d.state import Class2DOptions, ModelState
from tamis.errors import InputFileError
from tamis.io.mrc import read_mrc, write_mrc
from tamis.io.particles import ParticleSet

__all__ = [
    "Moments",
    "VdamRun",
    "update_moments",
    "gradient_update",
    "shift_moments",
    "moments_to_half",
    "moments_from_half",
]

#: RELION's XMIPP_EQUAL_ACCURACY (double build): a class is updated only if the weights of its
#: half-set 1 sum above it.
MIN_WEIGHT_SUM = 1e-6


@dataclass
class Moments:
    """Gradient moments on centred padded grids: ``m1`` ``(2K, M, M)`` complex (half-set 1 in
    ``[:K]``, half-set 2 in ``[K:]``), ``m2`` ``(K, M, M)`` real, starting at 1."""

    m1: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def initial(cls, k: int, m: int, device: torch.device | str, ndim: int = 2) -> Moments:
        grid = (m,) * ndim
        return cls(
            m1=torch.zeros((2 * k,) + grid, dtype=torch.complex128, device=device),
            m2=torch.ones((k,) + grid, dtype=torch.float64, device=device),
        )

    @property
    def n_classes(self) -> int:
        return self.m2.shape[0]

    def copy_class(self, dst: int, src: int) -> None:
        k = self.n_classes
        self.m1[dst] = self.m1[src]
        self.m1[dst + k] = self.m1[src + k]
        self.m2[dst] = self.m2[src]


def _disc(
    m: int, r_max: float, pad: int, device, ndim: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxels with ``|q|² < ROUND(r_max pad)²`` and their shells ``ROUND(|q|/pad)``."""
    q, ires, _ = grid_shells(m, pad, device, ndim)
    lim = float(relion_round(torch.tensor(r_max * pad))) ** 2
    return q**2 < lim, ires


def _shell_mean(values: torch.Tensor, disc: torch.Tensor, ires: torch.Tensor, nsh: int):
    """Mean of ``values`` ``(K, M, ...)`` per shell over the disc; ``(K, nsh)`` and counts."""
    k = values.shape[0]
    idx = torch.where(disc, ires, torch.full_like(ires, nsh)).reshape(-1).clamp(max=nsh)
    sums = torch.zeros((k, nsh + 1), dtype=torch.float64, device=values.device)
    sums.index_add_(1, idx, values.reshape(k, -1).to(torch.float64))
    counts = torch.bincount(idx, minlength=nsh + 1).to(torch.float64)
    return (sums / counts.clamp(min=1))[:, :nsh], counts[:nsh]


def _per_class(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(K,)`` -> ``(K, 1, ..., 1)`` against ``(K, M, ...)`` grids of ``ndim`` dimensions."""
    return v.view(-1, *([1] * ndim))


def update_moments(
    moments: Moments,
    d: torch.Tensor,
    w: torch.Tensor,
    *,
    update: torch.Tensor,
    r_max: float,
    pad: int,
    n_shells: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments from this mini-batch's back-rotated residuals ``d`` and weights ``w`` ``(2K, M, M)``.

    Inside ``|q|² < ROUND(r_max pad)²`` and for classes with ``update``: ``G = d / max(1, w)``;
    ``M1 = G`` the first time (all zero) else ``0.9 M1 + 0.1 G`` per half-set;
    ``M2 = 0.999 M2 + 0.001 |G2 - G1|² / (|(G1 + G2)/2|² + 1e-12)``. Returns ``U`` ``(K, M, M)``
    (``mean(M1) / (sqrt(M2) + 1e-12)`` inside, 0 outside) and the per-shell mean amplitude of
    ``M1_1 - M1_2`` ``(K, n_shells)`` (RELION's ``mom1_noise_power``).
    """
    k = moments.n_classes
    m = d.shape[-1]
    nd = d.ndim - 1
    disc, ires = _disc(m, r_max, pad, d.device, nd)
    g = torch.where(disc, d / w.clamp(min=1.0), torch.zeros_like(d))
    upd2 = _per_class(torch.cat([update, update]), nd) & disc
    first = _per_class(moments.m1.flatten(1).sum(1) == 0, nd)
    m1_new = torch.where(first, g, 0.9 * moments.m1 + 0.1 * g)
    moments.m1 = torch.where(upd2, m1_new, moments.m1)
    g1, g2 = g[:k], g[k:]
    n2 = (g2 - g1).abs() ** 2
    s2 = ((g1 + g2) / 2).abs() ** 2
    m2_new = 0.999 * moments.m2 + 0.001 * n2 / (s2 + 1e-12)
    moments.m2 = torch.where(_per_class(update, nd) & disc, m2_new, moments.m2)
    a, b = moments.m1[:k], moments.m1[k:]
    u = torch.where(disc, (a + b) / 2 / (moments.m2.sqrt() + 1e-12), torch.zeros_like(a))
    noise, _ = _shell_mean((a - b).abs(), disc, ires, n_shells)
    return u, noise


def gradient_update(
    refs: torch.Tensor,
    u: torch.Tensor,
    noise: torch.Tensor,
    *,
    step: torch.Tensor,
    tau2_fudge: float,
    r_max: float,
    pad: int,
) -> torch.Tensor:
    """RELION's ``reconstructGrad`` for every class: ``F <- F + step_k (f U - (1 - f) F)``.

    ``F`` is the padded transform of the current reference without gridding correction, limited
    to ``|q|² <= ROUND(r_max pad)²``; ``f(s) = min(1, max(0, SNR / (1 + SNR)))`` with
    ``SNR = 2 T mean|F| / noise`` per shell (0 where the noise is 0), over ``|q|² < ROUND(r_max
    pad)²``, where the update is made. Back to images with a soft edge at ``box/2``.
    """
    k, n = refs.shape[0], refs.shape[-1]
    nd = refs.ndim - 1
    m = pad * n
    nsh = noise.shape[1]
    disc, ires = _disc(m, r_max, pad, refs.device, nd)
    f = padded_transforms(refs, pad=pad, gridding=False)
    q2 = grid_shells(m, pad, refs.device, nd)[0] ** 2
    kept = q2 <= float(relion_round(torch.tensor(r_max * pad))) ** 2
    f = f * kept
    amp, counts = _shell_mean(f.abs(), disc, ires, nsh)
    snr = torch.where(noise > 0, 2 * tau2_fudge * amp / noise.clamp(min=1e-300), 0.0)
    fsc = torch.where(counts > 0, (snr / (1 + snr)).clamp(0.0, 1.0), 0.0)
    fq = fsc[:, ires.clamp(max=nsh - 1).reshape(-1)].reshape((k,) + (m,) * nd)
    step = _per_class(step.to(torch.float64), nd)
    # updated inside |q|² < lim; the ring |q|² = lim keeps the reference (RELION's decenter copies
    # |q|² <= lim), beyond is zero
    f = torch.where(disc, f + step * (fq * u - (1 - fq) * f), f * kept)
    return padded_to_real(f, box=n, pad=pad, gridding=False)


def shift_moments(moments: Moments, com: torch.Tensor) -> None:
    """Apply the centring shift ``output(r) = input(r + com)`` (``com`` ``(K, 2)`` px, x and y)
    to both first moments (RELION shifts them with the references)."""
    k = moments.n_classes
    m = moments.m1.shape[-1]
    f = torch.arange(m, device=com.device, dtype=torch.float64) - m // 2
    c = torch.cat([com, com]).to(torch.float64)
    phase = (
        2
        * torch.pi
        * (f[None, None, :] * c[:, 0, None, None] + f[None, :, None] * c[:, 1, None, None])
        / m
    )
    moments.m1 = moments.m1 * torch.polar(torch.ones_like(phase), phase)
    assert moments.m1.shape[0] == 2 * k


def moments_to_half(grid: torch.Tensor) -> np.ndarray:
    """Centred full grids ``(S, M, ..., M)`` -> RELION's half-grid moment arrays
    ``(S, M, ..., 2 (M/2+1))`` (every axis but the last centred, -M/2..M/2-1; the last kx =
    0..M/2 as interleaved real, imaginary)."""
    m = grid.shape[-1]
    half = torch.cat([grid[..., m // 2 :], grid[..., :1]], dim=-1).to(torch.complex128)
    out = torch.view_as_real(half).reshape(*half.shape[:-1], 2 * (m // 2 + 1))
    return out.cpu().numpy().astype(np.float32)


def moments_from_half(images: np.ndarray) -> torch.Tensor:
    """Inverse of :func:`moments_to_half` for Hermitian grids."""
    arr = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float64))
    w2 = arr.shape[-1]
    half = torch.view_as_complex(arr.reshape(*arr.shape[:-1], w2 // 2, 2))
    m = half.shape[1]
    nd = half.ndim - 1
    full = torch.zeros(half.shape[:-1] + (m,), dtype=torch.complex128)
    full[..., m // 2 :] = half[..., : m // 2]
    # -k on the centred axes (index i holds k = i - M/2, periodic): index (M - i) % M
    mirror = (m - torch.arange(m)) % m
    mirrored = half
    for axis in range(1, nd):
        mirrored = mirrored.index_select(axis, mirror)
    for x in range(1, m // 2 + 1):  # kx = -x from the column +x at -k
        full[..., m // 2 - x] = mirrored[..., x].conj()
    return full


class VdamRun(Class2DRun):
    """A :class:`Class2DRun` whose iterations are VDAM mini-batch steps."""

    #: RELION's 3D initial-model constants (schedule, significant-pose cap) when True
    is_3d = False

    def __init__(self, particles: ParticleSet, options: Class2DOptions, root: str, **kw) -> None:
        super().__init__(particles, options, root, **kw)
        self.schedule = VdamSchedule.create(options, self.n, is_3d=self.is_3d)
        self.max_significants = (
            options.max_significants
            if options.max_significants > 0
            else (100 if self.is_3d else 5) * options.K
        )
        self.moments: Moments | None = None
        self.subset = self.n

    def tau2_fudge_at(self, it: int) -> float:
        return self.schedule.tau2_fudge_at(it)

    def estimates_accuracy(self, it: int) -> bool:
        return it % 10 == 0 or it >= self.schedule.n_iter or it <= 1

    def writes(self, it: int) -> bool:
        return self.schedule.writes(it, self.options.grad_write_iter)

    def initialise(self) -> None:
        super().initialise()
        assert self.state is not None
        self.moments = Moments.initial(
            self.options.K, self.options.pad * self.box, self.device, self.space.ndim
        )

    def subset_rows(self, it: int) -> np.ndarray:
        """Sorted rows of this iteration's mini-batch (a fresh shuffle per iteration)."""
        size = self.schedule.subset_size(it)
        if size < 0:
            return np.arange(self.n)
        perm = np.random.default_rng([self.seed, it, 31]).permutation(self.n)
        return np.sort(perm[:size])

    def reconstruction_terms(
        self, fimg: torch.Tensor, fweight: torch.Tensor, proj: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """VDAM splats the residual ``fimg - fweight P`` (the gradient's data term), each
        pseudo-half against the same projections."""
        p = proj.to(torch.complex128)
        return fimg - fweight * torch.cat([p, p]), fweight

    def iterate(
        self, it: int, *, abort: Callable[[], bool] | None = None
    ) -> tuple[float, float, float]:
        o, st, sch = self.options, self.state, self.schedule
        assert st is not None and self.moments is not None
        rows = self.subset_rows(it)
        self.subset = len(rows)
        self.sampling.advance_perturbation(self.seed, it)
        step = self.expectation_step(
            it, rows, abort=abort, halves=True, max_significants=self.max_significants
        )
        k = st.n_classes
        t_fudge = self.tau2_fudge_at(it)
        r_max = step.current_size / 2
        sums = step.sums
        d, w = step.d, step.w
        update = (st.pdf_class > 0) & (w[:k].flatten(1).sum(1) > MIN_WEIGHT_SUM)
        u, noise = update_moments(
            self.moments, d, w, update=update, r_max=r_max, pad=o.pad, n_shells=self.nsh
        )
        avg_err = torch.where(update, (u.abs() ** 2).flatten(1).mean(1) * st.pdf_class, 0.0)
        state = replace(
            st,
            pdf_class=st.pdf_class.clone(),
            pdf_direction=st.pdf_direction.clone(),
            tau2=step.tau2.clone(),  # every class's spectrum, as RELION recomputes it each E-step
            data_vs_prior=st.data_vs_prior.clone(),
            refs=st.refs.clone(),
        )
        skip = self._replace_inactive(state, avg_err) if sch.replaces_classes(it) else -1
        eta = sch.class_step_sizes(it, state.pdf_class)
        new_refs = gradient_update(
            state.refs, u, noise, step=eta, tau2_fudge=t_fudge, r_max=r_max, pad=o.pad
        )
        updated = update.clone()
        if skip >= 0:
            updated[skip] = False
        sigma2_class, dvp, coverage = ssnr_arrays(
            w[:k], step.tau2, r_max=r_max, tau2_fudge=t_fudge, pad=o.pad
        )
        keep = ~updated[:, None]
        state = replace(
            state,
            refs=torch.where(_per_class(updated, new_refs.ndim - 1), new_refs, state.refs),
            data_vs_prior=torch.where(keep, state.data_vs_prior, dvp),
            fourier_coverage=torch.where(keep, state.fourier_coverage, coverage),
            sigma2_class=torch.where(keep, state.sigma2_class, sigma2_class),
        )
        self.state = mstep.update_other_parameters(
            state,
            sums,
            options=o,
            group_counts=self._group_counts(),
            do_scale=self.do_scale,
            mu=sch.mu(it, o.mu),
        )
        self._finish_iteration(it, st, step)
        return step.changes

    def _replace_inactive(self, state: ModelState, avg_err: torch.Tensor) -> int:
        """RELION's class substitution; returns the replaced class or -1."""
        thr = self.options.class_inactivity_threshold
        if thr <= 0:
            return -1
        pdf = state.pdf_class
        expand = int(torch.argmax(avg_err))
        drop = int(torch.argmin(pdf))
        active = int((pdf > 0).sum())
        if not float(pdf[drop]) < thr / max(active, 1):
            return -1
        # (RELION also "replaces" a class by itself when it is both; it is then not updated)
        self.log(
            f"  class {drop + 1} (fraction {float(pdf[drop]):.4f}) replaced by a copy of "
            f"class {expand + 1}"
        )
        for field in ("refs", "pdf_class", "pdf_direction", "tau2", "data_vs_prior"):
            t = getattr(state, field)
            t[drop] = t[expand].clone()
        assert self.moments is not None
        self.moments.copy_class(drop, expand)
        return drop

    def post_process(self, it: int = 0) -> torch.Tensor:
        o, st = self.options, self.state
        assert st is not None and self.moments is not None
        if o.center_classes and self.schedule.centres(it):
            com = mstep.class_centres(st.refs, o.offset_range)
            small = com.norm(dim=1) < max(0.01 * self.diameter / self.pixel, 2.0)
            com = torch.where(small[:, None], torch.zeros_like(com), com)
            if bool((~small).any()):
                moved = mstep.shift_classes(st.refs, com)
                st.refs = torch.where(small[:, None, None], st.refs, moved)
                shift_moments(self.moments, com)
        unmasked = st.refs.clone()
        if o.flatten_solvent:
            st.refs = mstep.flatten_solvent(st.refs, self.radius_px, o.maskedge)
        st.maxres = mstep.current_resolution_shell(st.data_vs_prior, st.pdf_class, o.minres_map)
        return unmasked

    def _moment_files(self, files) -> tuple[list[str], list[str]]:
        """Where the moments go: 2D, one stack each (``name@stack``); 3D, one map per class
        and half (``run_itNNN_1moment00k.mrc``, k = 1..2K; ``2moment00k``, k = 1..K)."""
        k = self.options.K
        if self.space.ndim == 2:
            m1, m2 = files.path("1moment", "mrcs"), files.path("2moment", "mrcs")
            return (
                [f"{c + 1:06d}@{m1}" for c in range(2 * k)],
                [f"{c + 1:06d}@{m2}" for c in range(k)],
            )
        return (
            [str(files.path(f"1moment{c + 1:03d}", "mrc")) for c in range(2 * k)],
            [str(files.path(f"2moment{c + 1:03d}", "mrc")) for c in range(k)],
        )

    def write(self, it: int, changes=(0.0, 0.0, 0.0)):
        assert self.moments is not None
        files = self.iteration_files(it)
        if not distributed.is_main():  # rank 0 writes; the others format data.star rows
            return super().write(it, changes)
        m1 = moments_to_half(self.moments.m1)
        m2 = moments_to_half(self.moments.m2 + 0j)
        if self.space.ndim == 2:
            write_mrc(files.path("1moment", "mrcs"), m1, self.pixel)
            write_mrc(files.path("2moment", "mrcs"), m2, self.pixel)
        else:
            n1, n2 = self._moment_files(files)
            for name, arr in zip(n1 + n2, list(m1) + list(m2), strict=True):
                write_mrc(name, arr, self.pixel, stack=False)
        return super().write(it, changes)

    def extra_optimiser_labels(self) -> dict:
        o, sch = self.options, self.schedule
        it = self.state.iteration if self.state is not None else 0
        return {
            "rlnDoGradientRefine": 1,
            "rlnDoStochasticGradientDescent": 1,
            "rlnGradEmIters": 0,
            "rlnGradHasConverged": 0,
            "rlnGradCurrentStepsize": sch.step_size(it),
            "rlnSgdInitialIterationsFraction": o.grad_ini_frac,
            "rlnSgdFinalIterationsFraction": o.grad_fin_frac,
            "rlnSgdInitialSubsetSize": sch.ini_subset,
            "rlnSgdFinalSubsetSize": sch.fin_subset,
            "rlnSgdMuFactor": o.mu,
            "rlnSgdClassInactivityThreshold": o.class_inactivity_threshold,
            "rlnSgdSubsetSize": sch.subset_size(it) if it > 0 else sch.ini_subset,
            "rlnSgdWriteEverySubset": o.grad_write_iter,
            "rlnSgdStepsize": o.grad_stepsize,
            # "" (RELION's own empty value) means RELION's default scheme; RELION reads any
            # other text as a scheme name and stops on one it does not know
            "rlnSgdStepsizeScheme": o.grad_stepsize_scheme,
            "rlnTau2FudgeScheme": o.tau2_fudge_scheme,
        }

    def extra_class_labels(self, files) -> dict:
        k = self.options.K
        n1, n2 = self._moment_files(files)
        return {"rlnGradMoment1": n1[:k], "rlnGradMoment2": n2}

    def restore(self, cont: ContinueState, data: pd.DataFrame) -> None:
        """The gradient moments of the continued iteration."""
        super().restore(cont, data)
        k = self.options.K
        m = self.options.pad * self.box
        nd = self.space.ndim
        continued = IterationFiles(cont.root, cont.iteration)
        if "rlnGradMoment1" not in cont.classes.columns:
            self.moments = Moments.initial(k, m, self.device, nd)
            self.log("no gradient moments in the model file: starting them afresh")
            return
        if nd == 2:
            stacks = []
            for label in ("rlnGradMoment1", "rlnGradMoment2"):
                name = str(cont.classes[label].iloc[0]).split("@", 1)[-1]
                if not Path(name).is_file():
                    raise InputFileError(
                        name, f"gradient moments named in the model file ({label}) are missing"
                    )
                arr, _ = read_mrc(name)
                stacks.append(arr if arr.ndim == 3 else arr[None])
            m1, m2 = stacks
        else:  # the continued run's files, which need not be under this run's --o
            n1, n2 = self._moment_files(continued)
            maps = []
            for name in n1 + n2:
                if not Path(name).is_file():
                    raise InputFileError(name, "gradient moments of the continued run are missing")
                maps.append(read_mrc(name)[0])
            m1, m2 = np.stack(maps[: 2 * k]), np.stack(maps[2 * k :])
        want = (2 * k,) + (m,) * (nd - 1) + (2 * (m // 2 + 1),)
        if m1.shape != want or m2.shape[0] != k:
            raise InputFileError(
                continued.optimiser,
                f"moments of shape {m1.shape} do not fit {k} classes of box {self.box}",
            )
        self.moments = Moments(
            m1=moments_from_half(m1).to(self.device),
            m2=moments_from_half(m2).real.contiguous().to(self.device),
        )
