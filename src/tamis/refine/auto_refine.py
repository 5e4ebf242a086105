"""RELION's 3D auto-refine (``relion_refine --auto_refine --split_random_halves``): gold-standard
EM refinement of one map, on the same E-step and M-step as 2D classification and the initial
model (``../shared/docs/relion-3d-inimodel-refine.md`` §5).

One iteration, as RELION's ``MlOptimiserMpi::iterate``:

1. the accuracy estimates (100 particles of half 1, with half 1's map), then auto-sampling
   (:class:`~tamis.refine.autosampling.AutoSampling`: finer HEALPix order and translations when
   the resolution and the hidden variables stopped improving; local searches with a Gaussian
   prior of ``sigma_ang`` = 2 fine steps from ``--auto_local_healpix_order`` on);
2. the E-step of each half against its own map (local searches: batches of particles with
   nearby orientations against the union of their neighbourhoods,
   :mod:`tamis.refine.local_search`);
3. the halves' sums are averaged below ``max(--low_resol_join_halves, current resolution)``,
   the gold-standard FSC of the down-sampled sums gives each half's SSNR and tau2, each half's map
   is reconstructed from its own sums alone, solvent-flattened (sphere or ``--solvent_mask``);
4. the current resolution (both halves: half 1's SSNR), the image-size increment, and the
   convergence counters.

When converged (fine enough sampling, no resolution gain, settled hidden variables; or at
``--iter``), the last iteration runs at the full image size, adds the halves' sums into one
MAP reconstruction with ``sqrt(2F / (1 + F))`` in tau2 (``run_class001.mrc``, not flattened), and
writes the unregularised half maps of the halves' own sums (``run_half{1,2}_class001_unfil.mrc``,
the input of post-processing).

Half-set independence: no quantity computed from half 2's particles reaches half 1 except the
FSC (a per-shell number) and the averaged sums below the join resolution, as in RELION.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tamis import distributed
from tamis.class2d import mstep
from tamis.class2d.em import (
    Class2DRun,
    JobAborted,
    accuracy_over_ranks,
    offset_change,
)
from tamis.class2d.files import (
    ContinueState,
    IterationFiles,
    continued_options,
    read_continue,
)
from tamis.class2d.fourier2d import FourierWindow
from tamis.class2d.init import low_pass
from tamis.class2d.job import ranked_job
from tamis.class2d.state import Class2DOptions, ModelState, WeightedSums
from tamis.errors import TamisError
from tamis.io.mrc import read_mrc, write_mrc
from tamis.io.particles import ParticleSet
from tamis.orientations import angular_sampling
from tamis.padded_grid import reconstruct, reference_grids, relion_round, ssnr_arrays
from tamis.refine.autosampling import AutoSampling, HiddenChanges
from tamis.refine.gold_standard import (
    half_sums_fsc,
    image_size_increment,
    join_low_resolution,
    join_shell,
    random_halves,
    resolution_shell,
    ssnr_tau2_from_fsc,
)
from tamis.refine.local_search import local_priors, orientation_order
from tamis.refine.maps import resize_map
from tamis.refine.postprocess import check_mask, masked_fscs, shell_fsc
from tamis.refine.volume_run import VolumeRun, best_accuracy
from tamis.symmetry import canonical_symmetry

__all__ = ["AutoRefineOptions", "AutoRefineRun", "AutoRefineResult", "run_auto_refine"]


@dataclass
class AutoRefineOptions(Class2DOptions):
    """``relion_refine --auto_refine --split_random_halves`` options; defaults as the Refine3D
    job of RELION's proc scheme (``--pad 2 --ctf --flatten_solvent --zero_mask --oversampling 1
    --healpix_order 2 --auto_local_healpix_order 4 --offset_range 5 --offset_step 2
    --low_resol_join_halves 40 --norm --scale``). ``iter`` is ``--auto_iter_max``."""

    K: int = 1
    iter: int = 999
    ref: str = ""
    ref_angpix: float = -1.0
    trust_ref_size: bool = True
    ini_high: float = -1.0
    firstiter_cc: bool = False
    sym: str = "C1"
    healpix_order: int = 2
    auto_local_healpix_order: int = 4
    offset_range: float = 5.0
    offset_step: float = 2.0
    oversampling: int = 1
    pad: int = 2
    tau2_fudge: float = 1.0
    ctf: bool = True
    flatten_solvent: bool = True
    zero_mask: bool = True
    norm: bool = True
    scale: bool = True
    low_resol_join_halves: float = 40.0
    solvent_mask: str = ""
    solvent_correct_fsc: bool = False
    auto_ignore_angles: bool = False
    auto_resol_angles: bool = False
    auto_refine: bool = True
    split_random_halves: bool = True


@dataclass
class _History:
    """What the driver keeps between iterations besides the two models."""

    converged: bool = False
    final: bool = False
    has_high_fsc_at_limit: bool = False
    fsc: np.ndarray = field(default_factory=lambda: np.zeros(0))


class AutoRefineRun(VolumeRun, Class2DRun):
    """Two half-set models refined side by side; ``self.state`` is the half being worked on."""

    def __init__(self, particles: ParticleSet, options: AutoRefineOptions, root: str, **kw):
        if options.K != 1:
            raise TamisError("auto-refine refines one map: --K must be 1")
        if not options.split_random_halves:
            raise TamisError("--auto_refine needs --split_random_halves (gold-standard halves)")
        if options.grad:
            raise TamisError("--auto_refine is EM; --grad is for the initial model")
        canonical_symmetry(options.sym)
        super().__init__(particles, options, root, **kw)
        self._init_volumes(particles, options.healpix_order)
        table = particles.particles
        existing = (
            table["rlnRandomSubset"].to_numpy()[self.order]
            if "rlnRandomSubset" in table.columns
            else None
        )
        try:
            self.half_of = random_halves(existing, self.n, self.seed)
        except TamisError as exc:
            raise TamisError(f"{particles.source or 'particles'}: {exc}") from None
        for h in (1, 2):
            if not len(self._rows_of(h)):
                raise TamisError(f"half set {h} has no particles (rlnRandomSubset)")
        px = self.pixel
        local = options.healpix_order >= options.auto_local_healpix_order
        self.auto = AutoSampling(
            healpix_order=options.healpix_order,
            oversampling=options.oversampling,
            offset_step=options.offset_step * px,
            offset_range=options.offset_range * px,
            auto_local_healpix_order=options.auto_local_healpix_order,
            sigma_ang=(
                2.0 * angular_sampling(options.healpix_order, options.oversampling) if local else 0
            ),
        )
        # the fine steps RELION's MPI leader judges hidden-variable changes by: its sampling as
        # the process started (AutoSampling.after_changes)
        self._leader_steps = (self.auto.fine_step, self.auto.fine_offset_step)
        self.states: list[ModelState] = []
        self.history = _History()
        self.incr_size = options.incr_size
        self._offset_change = 0.0  # RMS offset change (A) of the last iteration
        self.mask: torch.Tensor | None = None
        if options.solvent_mask:
            self.mask = self._read_mask(options.solvent_mask)
        if options.solvent_correct_fsc and self.mask is None:
            raise TamisError("--solvent_correct_fsc needs --solvent_mask")

    # ---- set-up ------------------------------------------------------------------------------

    def _read_mask(self, path: str) -> torch.Tensor:
        mask, _ = read_mrc(path)
        if mask.shape != (self.box,) * 3:
            raise TamisError(
                f"{path}: mask of {'x'.join(map(str, mask.shape))} voxels, the particles' box "
                f"is {self.box}^3"
            )
        m = check_mask(torch.as_tensor(mask), mask.shape, path, "the particles' box is")
        return m.to(self.device, torch.float32)

    def reference_map(self) -> torch.Tensor:
        """``--ref`` on the particles' grid (resized with a warning when its pixel size or box
        differ, as RELION with ``--trust_ref_size``), low-passed to ``--ini_high``."""
        o = self.options
        if not o.ref:
            raise TamisError("--ref is required: the starting map (e.g. the initial model)")
        if not Path(o.ref).is_file():
            raise TamisError(f"{o.ref}: reference map not found")
        vol, ref_px = read_mrc(o.ref)
        if vol.ndim != 3 or len(set(vol.shape)) != 1:
            raise TamisError(f"{o.ref}: not a cubic 3D map (shape {vol.shape})")
        if o.ref_angpix > 0:
            ref_px = o.ref_angpix
        if not ref_px or ref_px <= 0:
            ref_px = self.pixel
        ref = torch.as_tensor(vol, dtype=torch.float64)
        if abs(ref_px - self.pixel) > 1e-3 * self.pixel or vol.shape[0] != self.box:
            if not o.trust_ref_size:
                raise TamisError(
                    f"{o.ref}: {vol.shape[0]} voxels of {ref_px:g} A, the particles are "
                    f"{self.box} pixels of {self.pixel:g} A (--trust_ref_size rescales it)"
                )
            self.log(
                f"warning: {o.ref} is {vol.shape[0]} voxels of {ref_px:g} A; rescaled to "
                f"{self.box} voxels of {self.pixel:g} A"
            )
            ref = resize_map(ref, ref_px, self.pixel, self.box)
        if o.ini_high > 0:
            ref = low_pass(ref, self.box * self.pixel / o.ini_high, ndim=3)
        return ref.to(torch.float32)

    def initialise(self) -> None:
        """Each half's noise spectra from its own particles (RELION estimates one set from
        both; here nothing of half 2 reaches half 1 before the FSC), the reference for both.
        The first iteration's resolution is ``--ini_high``'s (or the reference's SSNR's)."""
        o = self.options
        ref = self.reference_map().to(self.device)[None]
        tau2 = self.reference_spectrum(ref.to(torch.float64)) / 2
        states = []
        for h in (1, 2):
            super().initialise(pool=self._rows_of(h))
            st = self.state
            assert st is not None
            dvp = self.n * tau2 / st.sigma2.mean(0).clamp(min=1e-30)[None]
            states.append(replace(st, refs=ref.clone(), tau2=tau2, data_vs_prior=dvp))
        if o.ini_high > 0:
            maxres = self._ini_high_shell()
        else:
            maxres = mstep.current_resolution_shell(
                states[0].data_vs_prior, states[0].pdf_class, o.minres_map
            )
        for st in states:
            st.maxres = maxres
        self.states = states
        self.state = self.states[0]
        self.cls[:] = 0

    def _ini_high_shell(self) -> int:
        return int(relion_round(torch.tensor(self.box * self.pixel / self.options.ini_high)))

    # ---- the hooks of the shared E-step ------------------------------------------------------

    def cross_correlation(self, it: int) -> bool:
        return self.options.firstiter_cc and it == 1

    def size_increment(self) -> int:
        """RELION's ``updateImageSizeAndResolutionPointers`` in gold-standard runs: a quarter of
        the box's radius once the FSC at an image's edge has been above 0.2
        (``has_high_fsc_at_limit``) while the last average Pmax is above 0.1, else ``incr_size``
        as the FSC has grown it (:func:`~tamis.refine.gold_standard.image_size_increment`)."""
        st = self.state
        assert st is not None
        if st.avg_pmax > 0.1 and self.history.has_high_fsc_at_limit:
            return int(relion_round(torch.tensor(0.25 * self.box / 2)))
        return self.incr_size

    def sizes(self) -> tuple[int, int]:
        cs, coarse = super().sizes()
        if self.history.final:  # the last iteration uses all data, up to Nyquist
            return self.box, coarse
        return cs, coarse

    def estimates_accuracy(self, it: int) -> bool:
        return False  # made before the E-step (_estimate_accuracy), for auto-sampling

    def local_searches(self) -> bool:
        return self.auto.local_searches

    def local_prior(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return local_priors(self.angles_of(rows), self.sampling, self.auto.sigma_ang)

    def local_union_size(self) -> int:
        """A batch's union of neighbourhoods: about 32 particles' worth (directions within 3
        sigma times psi within 3 sigma each), at most every coarse orientation."""
        smp = self.sampling
        step = smp.angular_step
        r = 3.0 * self.auto.sigma_ang
        dirs = max(1.0, math.pi * r * r / (step * step))
        psis = max(1.0, 2 * r / smp.psi_step)
        return int(min(smp.nr_directions * smp.nr_psi, 32 * dirs * psis))

    # ---- one iteration -----------------------------------------------------------------------

    def _rows_of(self, h: int) -> np.ndarray:
        """The sorted rows of half ``h`` (1 or 2)."""
        return np.flatnonzero(self.half_of == h)

    def _half_rows(self, h: int) -> np.ndarray:
        """Half ``h + 1``'s rows in E-step order (by orientation for local searches)."""
        rows = self._rows_of(h + 1)
        if self.local_searches():
            rows = rows[orientation_order(self.angles_of(rows), self.options.sym)]
        return rows

    def _estimate_accuracy(self, it: int) -> None:
        """RELION's accuracy estimates: 100 particles of half 1 against half 1's map, at this
        iteration's image size; both halves keep the result."""
        o = self.options
        self.state = self.states[0]
        cs, _ = self.sizes()
        window = FourierWindow.create(self.box, cs, device=self.device)
        rows = self._rows_of(1)[: self.accuracy_trials]
        images = self.ps.load_images(self.order[rows], device=self.device)
        data, _ = self._prepare(images, rows, window, it)
        grids = reference_grids(self.state.refs, pad=o.pad, r_max=cs / 2)
        angles = self.angles_of(rows)
        rot, tr = accuracy_over_ranks(
            grids,
            self.state.pdf_class,
            window,
            data.ctf,
            data.sigma2,
            angles,
            self.turned_orientations,
            space=self.space,
            pad=o.pad,
        )
        tr = torch.where(tr < 999, tr * self.pixel, tr)
        for st in self.states:
            st.acc_rot, st.acc_trans = rot, tr

    def _update_sampling(self, offset_change: float) -> None:
        """Auto-sampling before an iteration after the first (RELION's EM branch)."""
        o, old = self.options, self.auto
        st = self.states[0]
        self.auto = old.updated(
            resolution=st.maxres / (self.box * self.pixel),
            particle_diameter=self.diameter,
            acc_rot=best_accuracy(st.acc_rot),
            acc_trans=best_accuracy(st.acc_trans),
            offset_change=offset_change,
            auto_resol_angles=o.auto_resol_angles,
            auto_ignore_angles=o.auto_ignore_angles,
        )
        self._apply_sampling()
        a = self.auto
        if a.healpix_order != old.healpix_order:
            local = f", local searches (sigma {a.sigma_ang:g} deg)" if a.local_searches else ""
            self.log(
                f"auto-sampling: angular step {a.fine_step:g} deg (HEALPix order "
                f"{a.healpix_order}), offsets {a.offset_range:.2f} A in steps of "
                f"{a.offset_step:.2f} A{local}"
            )

    def _apply_sampling(self) -> None:
        smp, a = self.sampling, self.auto
        if smp.healpix_order != a.healpix_order:
            smp.set_order(a.healpix_order)
        smp.offset_step = a.offset_step / self.pixel
        smp.offset_range = a.offset_range / self.pixel

    def iterate(self, it: int, *, abort=None) -> tuple[float, float, float]:
        o = self.options
        hist = self.history
        hist.final = hist.converged or it >= o.iter
        if hist.final and not hist.converged:
            self.log(f"iteration {it} is --iter's last: joining the halves without convergence")
        cc = self.cross_correlation(it)
        if not cc:  # RELION has no accuracy estimate for its cross-correlation iteration
            self._estimate_accuracy(it)
        if it > 1 and not hist.final:
            self._update_sampling(self._offset_change)
        old_angles = self.angles_of(np.arange(self.n))
        old_origin = self.origin.copy()
        before = list(self.states)
        # one perturbation for both halves (RELION's expectationSetup, once per iteration)
        self.sampling.advance_perturbation(self.seed, it)
        steps = []
        for h in (0, 1):
            self.state = self.states[h]
            steps.append(self.expectation_step(it, self._half_rows(h), abort=abort))
        cs = steps[0].current_size
        d1, w1, d2, w2 = steps[0].d, steps[0].w, steps[1].d, steps[1].w
        res_angst = self.box * self.pixel / max(self.states[0].maxres, 1)
        shell = join_shell(self.box, self.pixel, o.low_resol_join_halves, res_angst)
        d1j, w1j, d2j, w2j = join_low_resolution(d1, w1, d2, w2, pad=o.pad, shell=shell)
        fsc = half_sums_fsc(d1j[0], w1j[0], d2j[0], w2j[0], pad=o.pad, box=self.box, r_max=cs / 2)
        if o.solvent_correct_fsc:
            fsc = self._solvent_corrected_fsc(d1j, w1j, d2j, w2j, cs, fsc)
        self.incr_size, high = image_size_increment(fsc, self.incr_size, cs)
        hist.has_high_fsc_at_limit = hist.has_high_fsc_at_limit or high
        hist.fsc = fsc.cpu().numpy()
        if hist.final:
            self._final_maps(d1, w1, d2, w2)
            joined = _add_sums(steps[0].sums, steps[1].sums)
            st = self._maximize(
                self.states[0], joined, d1 + d2, w1 + w2, fsc, cs, np.arange(self.n), True
            )
            self.states = [st, st]
        else:
            self.states = [
                self._maximize(
                    self.states[h], steps[h].sums, dj, wj, fsc, cs, self._rows_of(h + 1), False
                )
                for h, (dj, wj) in enumerate(((d1j, w1j), (d2j, w2j)))
            ]
            for st in self.states:
                self._flatten(st)
        ssnr = self.states[0].data_vs_prior[0]
        maxres = resolution_shell(ssnr, self.box, gold_standard=True, minres=o.minres_map)
        if cc:
            counts = [float(step.sums.pdf_class.sum()) for step in steps]
            if hist.final:  # one joined state from both halves' sums
                counts = [sum(counts)] * 2
            self.states = [
                self._after_cross_correlation(new, old, n)
                for new, old, n in zip(self.states, before, counts, strict=True)
            ]
            if o.ini_high > 0:
                maxres = self._ini_high_shell()
        avg_pmax = float(np.mean(self.pmax))
        for st in self.states:
            st.maxres = maxres
            st.iteration = it
            st.perturbation = self.sampling.perturbation
            st.avg_pmax = avg_pmax
        # hidden-variable changes over both halves
        ang = self.angle_change(np.arange(self.n), old_angles)
        rms_off = offset_change(self.origin, old_origin)
        self._offset_change = rms_off
        self.auto = self.auto.after_resolution(maxres / (self.box * self.pixel))
        self.auto = self.auto.after_changes(HiddenChanges(ang, rms_off, 0.0), self._leader_steps)
        if not hist.final:  # checked at the start of the next iteration, as RELION's
            hist.converged = self.auto.converged(o.auto_ignore_angles)
        self.state = self.states[0]
        self.current_size = cs
        return ang, rms_off, 0.0

    def _maximize(
        self,
        st: ModelState,
        sums: WeightedSums,
        d: torch.Tensor,
        w: torch.Tensor,
        fsc: torch.Tensor,
        cs: int,
        rows: np.ndarray,
        joined: bool,
    ) -> ModelState:
        """One half's M-step with tau2 from the gold-standard FSC (RELION's
        ``updateSSNRarrays`` with ``update_tau2_with_fsc``)."""
        o = self.options
        t = o.tau2_fudge if o.tau2_fudge > 0 else 1.0
        nsh = self.nsh
        sigma2, _, _ = ssnr_arrays(
            w, torch.ones((1, nsh), dtype=torch.float64, device=self.device), r_max=cs / 2,
            tau2_fudge=t, pad=o.pad,
        )  # fmt: skip
        ssnr, tau2 = ssnr_tau2_from_fsc(fsc.to(self.device), sigma2[0], t, joined=joined)
        counts = np.bincount(self.group_of[rows], minlength=len(self.groups)).astype(np.float64)
        new = mstep.maximize(
            st,
            sums,
            d,
            w,
            tau2=tau2[None],
            options=o,
            tau2_fudge=t,
            current_size=cs,
            group_counts=torch.as_tensor(counts, device=self.device),
            do_scale=self.do_scale,
            n_particles=len(rows),
        )
        return replace(new, data_vs_prior=ssnr[None], tau2=tau2[None], acc_rot=st.acc_rot,
                       acc_trans=st.acc_trans)  # fmt: skip

    def _after_cross_correlation(self, st: ModelState, old: ModelState, n: float) -> ModelState:
        """RELION's cross-correlation iteration (``--firstiter_cc``) leaves the noise spectra
        and the scale corrections as they were (its squared differences were against a
        reference on another grey scale), stores the average CC as the log-likelihood, and
        low-passes the new maps to ``--ini_high`` again (not the final, joined map)."""
        refs = st.refs
        if self.options.ini_high > 0 and not self.history.final:
            refs = low_pass(refs, self.box * self.pixel / self.options.ini_high, ndim=3)
        return replace(
            st, sigma2=old.sigma2, scale=old.scale, loglik=st.loglik / max(n, 1.0), refs=refs
        )

    def _flatten(self, st: ModelState) -> None:
        """RELION's ``solventFlatten``: the sphere of the particle diameter with a soft edge to
        zero, or times ``--solvent_mask``."""
        o = self.options
        if self.mask is not None:
            st.refs = st.refs * self.mask[None]
        elif o.flatten_solvent:
            st.refs = mstep.flatten_solvent(st.refs, self.radius_px, o.maskedge)

    def _final_maps(self, d1, w1, d2, w2) -> None:
        """The unregularised half maps from each half's own sums (before the join)."""
        o = self.options
        if not distributed.is_main():
            return
        for h, (d, w) in enumerate(((d1, w1), (d2, w2))):
            unfil = reconstruct(d, w, box=self.box, r_max=self.box / 2, tau2=None, pad=o.pad)
            write_mrc(
                Path(f"{self.root}_half{h + 1}_class001_unfil.mrc"),
                unfil[0].cpu().numpy(),
                self.pixel,
                stack=False,
            )

    def _solvent_corrected_fsc(self, d1, w1, d2, w2, cs: int, fsc: torch.Tensor) -> torch.Tensor:
        """``--solvent_correct_fsc``: the FSC of the unregularised half maps in the mask,
        corrected by phase randomisation beyond the first shell where the unmasked FSC drops
        below 0.8 (post-processing's :func:`masked_fscs`), 0 where the randomised FSC exceeds
        the masked one and beyond the current size."""
        o = self.options
        h1, h2 = (
            reconstruct(d, w, box=self.box, r_max=cs / 2, tau2=None, pad=o.pad)[0]
            for d, w in ((d1, w1), (d2, w2))
        )
        below = torch.nonzero(shell_fsc(h1, h2)[1:] < 0.8).squeeze(1)
        at = int(below[0]) + 1 if len(below) else self.nsh - 1
        masked, rnd, corr = masked_fscs(
            h1.to(torch.float64), h2.to(torch.float64), self.mask.to(torch.float64), at, self.seed
        )
        shells = torch.arange(len(corr), device=corr.device)
        corr = torch.where((rnd > masked) | (shells > cs // 2), torch.zeros_like(corr), corr)
        corr[0] = 1.0
        return corr.to(fsc.device, torch.float64)

    def post_process(self, it: int = 0) -> torch.Tensor:
        return self.state.refs  # flattening and the resolution are done in iterate()

    # ---- files -------------------------------------------------------------------------------

    def particle_table(self, rows: slice | None = None) -> pd.DataFrame:
        table = self._volume_table(super().particle_table(rows), rows)
        table["rlnRandomSubset"] = self.half_of[slice(None) if rows is None else rows]
        return table

    def _general(self) -> dict:
        s = self.auto.sigma_ang
        return {
            "rlnOrientationalPriorMode": 1 if s > 0 else 0,
            "rlnSigmaPriorRotAngle": s,
            "rlnSigmaPriorTiltAngle": s,
            "rlnSigmaPriorPsiAngle": s,
        }

    def _optimiser(self, files: IterationFiles, model2: Path | None) -> dict:
        a, h = self.auto, self.history
        labels = {
            "rlnDoAutoRefine": 1,
            "rlnDoAutoSampling": 1,  # RELION sets it with --auto_refine
            "rlnDoSplitRandomHalves": 1,
            "rlnJoinHalvesUntilThisResolution": self.options.low_resol_join_halves,
            "rlnAutoLocalSearchesHealpixOrder": a.auto_local_healpix_order,
            "rlnNumberOfIterWithoutResolutionGain": a.iters_without_resolution_gain,
            "rlnBestResolutionThusFar": a.resolution,
            "rlnNumberOfIterWithoutChangingAssignments": a.iters_without_large_changes,
            "rlnSmallestChangesOrientations": a.smallest_orientation_changes,
            "rlnSmallestChangesOffsets": a.smallest_offset_changes,
            "rlnSmallestChangesClasses": a.smallest_class_changes,
            "rlnHasConverged": int(h.converged),
            "rlnHasHighFscAtResolLimit": int(h.has_high_fsc_at_limit),
            "rlnIncrementImageSize": self.incr_size,
            "rlnDoSolventFscCorrection": int(self.options.solvent_correct_fsc),
            "rlnSolventMaskName": self.options.solvent_mask or "None",
        }
        if model2 is not None:
            labels["rlnModelStarFile2"] = str(model2)
        return labels

    def _auto_block(self) -> dict:
        """The auto-sampling state tamis needs to continue exactly (RELION reads only
        data_optimiser_general)."""
        a = self.auto
        return {
            "tamis_auto_refine": {
                "rlnHealpixOrder": a.healpix_order,
                "rlnOffsetStep": a.offset_step,
                "rlnOffsetRange": a.offset_range,
                "rlnSigmaPriorRotAngle": a.sigma_ang,
                "tamisFineEnough": int(a.fine_enough),
                "tamisOffsetChange": self._offset_change,
                "tamisFinal": int(self.history.final),
            }
        }

    def _write(self, files: IterationFiles, st: ModelState, **kw) -> None:
        self.write_files(
            files,
            st,
            tau2_fudge=self.options.tau2_fudge,
            fsc=self.history.fsc if len(self.history.fsc) else None,
            extra_general=self._general(),
            **kw,
        )

    def write(self, it: int, changes=(0.0, 0.0, 0.0)) -> IterationFiles:
        """``run_itNNN_half{1,2}_class001.mrc`` and ``_model.star``, and the iteration's data,
        sampling and optimiser files; after the final iteration the un-numbered ones."""
        if self.history.final and it > 0:
            files = RefineFiles(self.root, -1)
            self._write(
                files,
                self.states[0],
                changes=changes,
                extra_optimiser={**self._optimiser(files, None), "rlnCurrentIteration": it},
                extra_blocks=self._auto_block(),
            )
            return files
        f2 = RefineFiles(self.root, it, half=2)
        self._write(f2, self.states[1], model_only=True)
        f1 = RefineFiles(self.root, it, half=1)
        self._write(
            f1,
            self.states[0],
            changes=changes,
            extra_optimiser=self._optimiser(f1, f2.model),
            extra_blocks=self._auto_block(),
        )
        return f1

    # ---- continuation ------------------------------------------------------------------------

    def load_continue(self, optimiser: str | Path) -> None:
        super().load_continue(optimiser)
        cont2 = read_continue(optimiser, model_label="rlnModelStarFile2")
        st2 = self.state_from_continue(cont2)
        self.states = [self.state, st2]
        opt = cont2.optimiser
        extra = cont2.tamis_blocks.get("tamis_auto_refine") or {}
        a = self.auto
        self.auto = replace(
            a,
            healpix_order=int(extra.get("rlnHealpixOrder", self.sampling.healpix_order)),
            offset_step=float(extra.get("rlnOffsetStep", a.offset_step)),
            offset_range=float(extra.get("rlnOffsetRange", a.offset_range)),
            sigma_ang=float(extra.get("rlnSigmaPriorRotAngle", 0.0)),
            fine_enough=bool(int(extra.get("tamisFineEnough", 0))),
            iters_without_resolution_gain=int(opt.get("rlnNumberOfIterWithoutResolutionGain", 0)),
            iters_without_large_changes=int(
                opt.get("rlnNumberOfIterWithoutChangingAssignments", 0)
            ),
            smallest_orientation_changes=float(opt.get("rlnSmallestChangesOrientations", 999.0)),
            smallest_offset_changes=float(opt.get("rlnSmallestChangesOffsets", 999.0)),
            smallest_class_changes=float(opt.get("rlnSmallestChangesClasses", 9999999.0)),
            resolution=float(opt.get("rlnBestResolutionThusFar", 0.0)),
        )
        self._offset_change = float(extra.get("tamisOffsetChange", 0.0))
        self._apply_sampling()
        self._leader_steps = (self.auto.fine_step, self.auto.fine_offset_step)
        self.history.converged = bool(int(opt.get("rlnHasConverged", 0)))
        self.history.final = bool(int(extra.get("tamisFinal", 0)))
        self.history.has_high_fsc_at_limit = bool(int(opt.get("rlnHasHighFscAtResolLimit", 0)))
        self.incr_size = int(opt.get("rlnIncrementImageSize", self.options.incr_size))
        self.history.fsc = cont2.class_tables[0]["rlnGoldStandardFsc"].to_numpy(float)

    def restore(self, cont: ContinueState, data: pd.DataFrame) -> None:
        self._restore_volumes(cont, data)
        if "rlnRandomSubset" not in data.columns:
            raise TamisError(f"{cont.data_path}: no rlnRandomSubset column (the half sets)")
        self.half_of = data["rlnRandomSubset"].to_numpy(np.int64)


@dataclass
class RefineFiles(IterationFiles):
    """Auto-refine's names: ``run_itNNN_half{h}_model.star`` and ``..._half{h}_class001.mrc``
    per half, ``run_itNNN_data.star`` etc. shared; iteration -1 is the final, un-numbered set."""

    half: int = 0

    def path(self, what: str, ext: str = "star") -> Path:
        it = f"_it{self.iteration:03d}" if self.iteration >= 0 else ""
        per_half = what == "model" or what.startswith("class")
        h = f"_half{self.half}" if self.half and per_half else ""
        return Path(f"{self.root}{it}{h}_{what}.{ext}")


def _add_sums(a: WeightedSums, b: WeightedSums) -> WeightedSums:
    """Both halves' sums (the final iteration's other parameters); the reconstruction sums
    (``fimg``, ``fweight``) are already in the grids and stay as they are."""
    added = {
        f.name: getattr(a, f.name) + getattr(b, f.name)
        for f in fields(WeightedSums)
        if f.name not in ("fimg", "fweight") and getattr(a, f.name) is not None
    }
    return replace(a, **added)


@dataclass
class AutoRefineResult:
    """The final files of an auto-refine run."""

    map: Path
    half_maps: tuple[Path, Path]
    model: Path
    data: Path
    optimiser: Path
    iteration: int
    resolution: float  # Å, the joined iteration's (FSC 0.143, unmasked)
    fsc: np.ndarray
    converged: bool


def run_auto_refine(
    particles_path: str | Path | None,
    output_root: str,
    options: AutoRefineOptions,
    *,
    continue_from: str | Path | None = None,
    changed: frozenset[str] | set[str] = frozenset(),
    log: Callable[[str], None] = print,
    show_progress: bool = False,
) -> AutoRefineResult:
    """Gold-standard 3D auto-refine into ``output_root`` (``Refine3D/jobNNN/run``); see the
    module's docstring. ``continue_from``: a ``run_itNNN_optimiser.star`` of this run."""
    with ranked_job(options, log, show_progress) as (ranks, abort_requested, log, show_progress):
        main = ranks.rank == 0
        parallel = ranks.size > 1
        if continue_from is not None:
            cont = read_continue(continue_from)
            root = output_root or cont.root
            ps = ParticleSet.from_file(cont.data_path)
            options = continued_options(cont, options, changed)
            run = AutoRefineRun(ps, options, root, log=log, show_progress=show_progress)
            run.load_continue(continue_from)
            start = run.state.iteration + 1
            if run.history.final:
                raise TamisError(f"{continue_from}: this refinement has finished already")
        else:
            if particles_path is None:
                raise TamisError("--i is required (or --continue)")
            ps = ParticleSet.from_file(particles_path)
            Path(output_root).parent.mkdir(parents=True, exist_ok=True)
            run = AutoRefineRun(ps, options, output_root, log=log, show_progress=show_progress)
            run.initialise()
            for st in run.states:
                distributed.broadcast_tensors(st)
            run.current_size = run.sizes()[0]
            run.write(0)  # every rank: rank 0 writes, the others format their rows
            start = 1
        files = None
        for it in range(start, options.iter + 1):
            t0 = time.perf_counter()
            # under torchrun one check for all ranks at the start of each iteration
            if parallel and distributed.any_flag(main and abort_requested()):
                raise JobAborted
            changes = run.iterate(it, abort=None if parallel else abort_requested)
            for st in run.states:
                distributed.broadcast_tensors(st)
            files = run.write(it, changes)
            st = run.state
            a = run.auto
            log(
                f"iteration {it:3d}: resolution {run.box * run.pixel / max(st.maxres, 1):6.2f} A, "
                f"size {run.current_size}, angular step {a.fine_step:g} deg"
                f"{' (local)' if a.local_searches else ''}, acc {best_accuracy(st.acc_rot):.2f} deg"
                f" / {best_accuracy(st.acc_trans):.2f} A, orientation changes {changes[0]:.2f} deg, "
                f"pmax {st.avg_pmax:.2f}, {run.n / (time.perf_counter() - t0):,.0f} particles/s"
            )
            if run.history.final:
                break
        if files is None or not run.history.final:
            raise TamisError("no iteration was run (--iter is not above the continued iteration)")
        fsc = run.history.fsc
        res = run.box * run.pixel / max(run.state.maxres, 1)
        if best_accuracy(run.state.acc_rot) > 10:
            log(
                "warning: the angular accuracy is worse than 10 degrees: the particles may not be "
                "aligned (too small, too noisy or too heterogeneous)"
            )
        return AutoRefineResult(
            map=files.class_map(1),
            half_maps=(
                Path(f"{run.root}_half1_class001_unfil.mrc"),
                Path(f"{run.root}_half2_class001_unfil.mrc"),
            ),
            model=files.model,
            data=files.data,
            optimiser=files.optimiser,
            iteration=run.state.iteration,
            resolution=res,
            fsc=fsc,
            converged=run.history.converged,
        )
