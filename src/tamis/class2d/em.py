"""RELION's regularised-likelihood 2D classification (EM), as a short driver over batched steps.

One iteration (RELION's ``MlOptimiser::iterate``): set image sizes from the resolution; perturb
the sampling; project every class at every psi; for each batch of particles prepare spectra,
run both E-step passes (:mod:`tamis.class2d.likelihood`) and add to the weighted sums; then
back-rotate and reconstruct (:mod:`tamis.class2d.fourier2d`), update the other parameters
(:mod:`tamis.class2d.mstep`), centre, flatten, update the resolution and write
``run_itNNN_*`` (:mod:`tamis.class2d.files`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tamis import distributed
from tamis._progress import progress_bar
from tamis.class2d import mstep
from tamis.class2d.accuracy import expected_accuracy
from tamis.class2d.cross_correlation import cc_expectation
from tamis.class2d.files import (
    ContinueState,
    IterationFiles,
    read_continue,
    write_iteration,
)
from tamis.class2d.fourier2d import (
    FourierWindow,
    grid_tau2,
    reference_grids,
    relion_round,
)
from tamis.class2d.init import initial_sigma2_and_references, random_psi
from tamis.class2d.likelihood import (
    GEMM_STATS,
    BatchData,
    Hypotheses,
    PreparedRefs,
    expectation,
    noise_weights,
    norm_terms,
    prepare_refs,
)
from tamis.class2d.sampling import Sampling
from tamis.class2d.shifts import ColumnSums, SeparableShifts
from tamis.class2d.space import InPlaneSpace, ReferenceSpace
from tamis.class2d.state import OFFSET_PRIORS, Class2DOptions, ModelState, WeightedSums
from tamis.errors import TamisError, is_out_of_memory
from tamis.fourier import (
    duplicate_half_column,
    irfft2_centered,
    rfft2_centered,
    shell_index,
    shift_phases,
)
from tamis.io.particles import ParticleSet
from tamis.io.star import format_loop_rows, loop_file_parts, read_data_star
from tamis.masks import radius_map, soft_mask_outside
from tamis.padded_grid import GridSplat

__all__ = ["Class2DResult", "Class2DRun", "JobAborted", "choose_device"]


@dataclass
class Class2DResult:
    """The last iteration's files and a few numbers to report."""

    optimiser: Path
    model: Path
    data: Path
    classes: Path  # 2D: the classes stack; 3D: the first class map
    iteration: int
    resolution: float
    class_fractions: np.ndarray
    particles_evaluated: int = 0  # particle E-steps run by this call (all iterations)


def choose_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else CPU; otherwise the torch device named."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TamisError(f"--device {name}: no CUDA device available")
    return distributed.local_device(torch.device(name))


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # memory torch's allocator holds but does not use is free for tamis too
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


#: Particles per batch in local angular searches (the union of their neighbourhoods is searched).
LOCAL_BATCH = 16


class JobAborted(Exception):
    """RELION_JOB_ABORT_NOW seen: :func:`tamis.class2d.job.pipeline_control` marks the job
    aborted."""


@dataclass
class EStep:
    """What one E-step hands to the M-step."""

    sums: WeightedSums  # fimg/fweight empty: the reconstruction sums are already in d, w
    d: torch.Tensor  # (S, M, ..., M) padded grids of the run's reconstruction terms
    w: torch.Tensor  # (S, M, ..., M) (symmetrised in 3D; S = K, or 2K with pseudo-halves)
    window: FourierWindow
    grids: torch.Tensor  # padded Fourier grids of the references used
    tau2: torch.Tensor  # (K, nsh) spectrum of those references
    current_size: int
    changes: tuple[float, float, float]
    acc_inputs: tuple | None
    streamed: bool = False  # fine projections made on demand, sums splatted batch by batch


#: Pass 0's A terms are made ahead for several batches from this many (class, coarse
#: orientation) projections on (3D at HEALPix order 3, order 2 with several classes), for at
#: most this many particles and bytes at a time (or one batch, when it is larger).
NORMS_AHEAD_MIN_REFS = 8192
NORMS_AHEAD_ROWS = 64
NORMS_AHEAD_BYTES = 64 << 20


class _NormsAhead:
    """Pass 0's A terms made ahead (:meth:`Class2DRun._coarse_norm_terms`) for the next
    ``ahead`` particles of ``rows`` at a time, as positions ``[lo, hi)``; :meth:`at` gives a
    batch's part, or ``None`` once making them ran out of memory (batch by batch from then)."""

    def __init__(self, rows: np.ndarray, ahead: int, make: Callable[[np.ndarray], torch.Tensor]):
        self.rows, self.ahead, self.make = rows, ahead, make
        self.lo = self.hi = 0
        self.norms: torch.Tensor | None = None

    def at(self, pos: int, n: int) -> torch.Tensor | None:
        """The A terms of ``rows[pos : pos + n]``."""
        if self.ahead and not (self.lo <= pos and pos + n <= self.hi):
            self.lo, self.hi = pos, min(len(self.rows), pos + self.ahead)
            self.norms = None  # (freed before the next are made)
            try:
                self.norms = self.make(self.rows[self.lo : self.hi])
            except (RuntimeError, MemoryError) as exc:
                if not is_out_of_memory(exc):
                    raise
                self.ahead = 0
        if not self.ahead:
            return None
        return self.norms[pos - self.lo : pos - self.lo + n]


class _FineOnDemand:
    """Fine projections made when the E-step knows which coarse orientations a batch needs:
    called with those coarse indices ``(U,)`` and which ``(K, U)`` (class, coarse orientation)
    pairs any particle needs, takes their fine children ``children(coarse)`` (in the E-step's
    compact order: ``n_over`` per coarse one), projects each class at its needed ones (zeros
    elsewhere: never read, their weights are zero) and keeps both (``used``, ``proj``)."""

    def __init__(self, space, grids, children, window, pad: int) -> None:
        self.space, self.grids, self.children = space, grids, children
        self.window, self.pad = window, pad
        self.used: torch.Tensor | None = None
        self.proj: torch.Tensor | None = None

    def __call__(self, coarse: torch.Tensor, need: torch.Tensor | None = None) -> torch.Tensor:
        self.used = self.children(coarse)
        if need is None or bool(need.all()):
            self.proj = self.space.project(self.grids, self.used, self.window, self.pad)
            return self.proj
        k, n_over = len(self.grids), self.used.shape[0] // max(len(coarse), 1)
        proj = torch.zeros(
            (k, self.used.shape[0], len(self.window)), dtype=torch.complex64, device=need.device
        )
        for kk in range(k):
            ids = _child_ids(torch.nonzero(need[kk]).squeeze(1), n_over)
            if len(ids):
                one = self.space.project(
                    self.grids[kk : kk + 1], self.used[ids.to(self.used.device)], self.window,
                    self.pad,
                )  # fmt: skip
                proj[kk, ids] = one[0]
        self.proj = proj
        return proj


def offset_change(new: np.ndarray, old: np.ndarray) -> float:
    """RELION's ``rlnChangesOptimalOffsets`` of particles whose offsets (Å, ``(N, 2)``) went from
    ``old`` to ``new``: the RMS change per coordinate, ``sqrt(sum |new - old|² / 2N)``."""
    moved = np.asarray(new, dtype=float) - np.asarray(old, dtype=float)
    return float(np.sqrt(np.mean(moved**2))) if moved.size else 0.0


def add_direction_sums(
    out: torch.Tensor,
    hyp: Hypotheses,
    n_over: int,
    nr_psi: int,
    batch_ids: torch.Tensor | None = None,
) -> None:
    """RELION's ``wsum_pdf_direction``: each (class, direction)'s sum of a batch's normalised
    weights, added to ``out`` ``(K, D)``. A fine orientation ``psi`` of the hypotheses refines
    coarse ``psi // n_over`` (an index into ``hyp.coarse_subset`` when the fine projections
    were made on demand, and into ``batch_ids`` in a local search); coarse ``j`` is direction
    ``j // nr_psi``."""
    d = out.shape[1]
    cls, fine, w = hyp.cls, hyp.psi, hyp.weight.sum(1)
    if hyp.dense is not None:
        ra = hyp.dense.shape[2]
        npf = ra // len(hyp.active)
        r = torch.arange(ra, device=hyp.dense.device)
        cls = torch.cat([cls, hyp.active[r // npf]])
        fine = torch.cat([fine, r % npf])
        w = torch.cat([w, hyp.dense.sum((0, 1), dtype=torch.float64)])
    coarse = fine // n_over
    if hyp.coarse_subset is not None:
        coarse = hyp.coarse_subset[coarse]
    if batch_ids is not None:
        coarse = batch_ids[coarse]
    out.view(-1).index_add_(0, cls * d + coarse // nr_psi, w.to(out.dtype))


def _child_ids(coarse: torch.Tensor, n_over: int) -> torch.Tensor:
    """Indices ``j * n_over + a`` (``a < n_over``) of the fine children of coarse indices ``j``,
    in the E-step's compact order."""
    sub = torch.arange(n_over, device=coarse.device)
    return (coarse[:, None] * n_over + sub[None]).reshape(-1)


def _children_of(fine: torch.Tensor, n_over: int):
    """The fine orientations ``fine`` (every one, ``j * n_over + a`` refining coarse ``j``) of
    given coarse indices."""

    def children(coarse: torch.Tensor) -> torch.Tensor:
        return fine[_child_ids(coarse, n_over).to(fine.device)]

    return children


class Class2DRun:
    """State of one run: particles, options, model, per-particle assignments."""

    def __init__(
        self,
        particles: ParticleSet,
        options: Class2DOptions,
        root: str,
        *,
        log: Callable[[str], None] = print,
        show_progress: bool = False,
    ) -> None:
        self.options = options
        self.root = root
        self.log = log
        self.show_progress = show_progress
        if options.offset_prior not in OFFSET_PRIORS:
            raise TamisError(
                f"--offset_prior {options.offset_prior!r}: expected {' or '.join(OFFSET_PRIORS)}"
            )
        if options.max_memory is not None and options.max_memory <= 0:
            raise TamisError(f"--max_memory {options.max_memory}: must be positive (GB)")
        if not options.offset > 0:
            raise TamisError(f"--offset {options.offset}: must be positive (A)")
        self.device = choose_device(options.device)
        if options.j > 0 and self.device.type == "cpu":
            torch.set_num_threads(options.j)
        # RELION's order: stable sort by micrograph name.
        table = particles.particles
        if "rlnMicrographName" in table.columns:
            order = np.argsort(table["rlnMicrographName"].astype(str).to_numpy(), kind="stable")
        else:
            order = np.arange(len(table))
        self.order = order
        self.ps = particles
        self.n = len(particles)
        if self.n == 0:
            raise TamisError("no particles")
        self.box = particles.box_size
        self.pixel = particles.pixel_size
        self.nsh = self.box // 2 + 1
        self.diameter = options.particle_diameter or (self.box - 5) * self.pixel
        self.radius_px = self.diameter / (2 * self.pixel)
        self.optics_of = particles.optics_group_index[order]
        self.n_optics = len(particles.optics)
        group_names = (
            (
                table["rlnGroupName"]
                if "rlnGroupName" in table.columns
                else table.get("rlnMicrographName", pd.Series(["group"] * self.n))
            )
            .astype(str)
            .to_numpy()[order]
        )
        codes, uniq = pd.factorize(pd.Series(group_names), sort=False)
        self.group_of = codes.astype(np.int64)
        self.groups = pd.DataFrame({"name": uniq, "count": np.bincount(codes, minlength=len(uniq))})
        self.do_scale = options.scale and len(uniq) > 1
        # per-particle assignments, in sorted order
        self.psi = np.zeros(self.n)
        self.origin = np.zeros((self.n, 2))  # Å
        self.cls = np.zeros(self.n, dtype=np.int64)  # 0-based; -1 = unassigned
        self.norm = np.ones(self.n)
        self.loglik = np.zeros(self.n)
        self.pmax = np.zeros(self.n)
        self.nsig = np.zeros(self.n, dtype=np.int64)
        if "rlnOriginXAngst" in table.columns:
            self.origin[:, 0] = table["rlnOriginXAngst"].to_numpy(dtype=float)[order]
            self.origin[:, 1] = table["rlnOriginYAngst"].to_numpy(dtype=float)[order]
        if "rlnNormCorrection" in table.columns:  # kept (used only with --norm)
            self.norm = table["rlnNormCorrection"].to_numpy(dtype=float)[order].copy()
        self.ctf_all = particles.ctf_params()  # float64 on CPU; rows in original order
        self.shells_full = shell_index((self.box, self.box), device=self.device)
        self.sampling = Sampling(
            psi_step=options.psi_step,
            offset_range=options.offset_range,
            offset_step=options.offset_step,
            oversampling=options.oversampling,
            perturb_factor=options.perturb,
        )
        self.sampling.start_perturbation()
        # a seed from the clock is rank 0's on every rank (under torchrun)
        self.seed = (
            options.random_seed
            if options.random_seed is not None
            else distributed.broadcast_object(int(time.time()))
        )
        self.state: ModelState | None = None
        self.current_size = self.box
        self.space: ReferenceSpace = InPlaneSpace()
        if options.preread_images:
            particles.preread()

    # ---- helpers -----------------------------------------------------------------------------

    def _sigma2_half_plane(self, rows: np.ndarray) -> torch.Tensor:
        """The noise spectra of sorted rows' optics groups on the half plane ``(B, N, N//2+1)``."""
        optics = torch.as_tensor(self.optics_of[rows], device=self.device)
        return self.state.sigma2[optics][:, self.shells_full.clamp(max=self.nsh - 1)]

    def _scaled_ctf(self, rows: np.ndarray) -> torch.Tensor:
        """The CTF ``(B, N, N//2+1)`` of sorted rows times their group's scale correction."""
        ctf = self._ctf_half_plane(rows)
        if self.do_scale:
            st = self.state
            groups = torch.as_tensor(self.group_of[rows], device=self.device)
            ctf = ctf * st.scale[groups][:, None, None]
        return ctf

    def _coarse_norm_terms(
        self, rows: np.ndarray, window: FourierWindow, pixels: torch.Tensor, refs: PreparedRefs
    ) -> torch.Tensor:
        """Pass 0's ``A(i, r) = sum_k c² / (2 sigma²) |P_r(k)|²`` ``(B, R)`` of sorted rows
        against every prepared coarse projection, from the same single-precision terms as the
        E-step's batches (:class:`BatchData`), for several batches in one GEMM: with many
        projections (3D) the GEMM of one batch's few rows is bound by reading them."""
        sigma2 = window.gather(self._sigma2_half_plane(rows)).to(torch.float32)
        w2 = noise_weights(sigma2, (window.kx == 0) & (window.ky == 0))
        ctf = window.gather(self._scaled_ctf(rows)).to(torch.float32)
        w2c, ctfc = w2[:, pixels], ctf[:, pixels]
        return norm_terms(w2c * ctfc * ctfc, refs)

    def _ctf_half_plane(self, rows: np.ndarray) -> torch.Tensor:
        """CTF ``(B, N, N//2+1)`` for sorted rows (ones without --ctf)."""
        o = self.options
        if not o.ctf:
            return torch.ones((len(rows), self.box, self.box // 2 + 1), device=self.device)
        idx = torch.as_tensor(self.order[rows])
        return (
            self.ctf_all[idx]
            .to(self.device)
            .compute(
                (self.box, self.box),
                intact_first_peak=o.ctf_intact_first_peak,
                phase_flipped=o.ctf_phase_flipped,
                only_flip_phases=o.only_flip_phases,
            )
        )

    def _batch_size(
        self, n_pix: int, n_hyp: int, n_fine: int, n_trans: int, hyp_bytes: int = 8
    ) -> int:
        """Particles per batch from the memory budget (``--max_memory``, at most half the free
        memory): per particle the dense fine weights and their E-step temporaries, the shifted
        images of both passes, pass 0's log-weights (``hyp_bytes`` per coarse hypothesis: float32
        in place, or float64 temporaries when pass 0 is the last) and the image preparation."""
        if self.options.batch_size:
            return self.options.batch_size
        per_particle = (
            8 * n_fine
            + 16 * n_trans * n_pix
            + hyp_bytes * n_hyp
            + 64 * self.box * self.box
            + 64 * n_pix
        )
        return int(max(8, min(256, self._work_budget() // max(per_particle, 1))))

    def _work_budget(self) -> int:
        """Bytes the batches may use: three quarters of ``--max_memory`` (1 GB on the CPU, half
        a GPU's free memory when not given; never more than half of what is free, shared by the
        ranks of this node on the CPU), the rest left to the M-step's and the significance
        step's fixed-size pieces."""
        free_half = _available_bytes(self.device) // 2
        if self.device.type == "cpu":  # ranks on this node share its memory
            free_half //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        gb = self.options.max_memory
        if gb is None:
            budget = free_half if self.device.type == "cuda" else min(1 << 30, free_half)
        else:
            budget = min(int(gb * (1 << 30)), free_half)
        return max(64 << 20, budget * 3 // 4)

    def _batches(self, rows: np.ndarray, size: int):
        return self.ps.batches(size, indices=self.order[rows], device=self.device)

    # ---- initialisation ----------------------------------------------------------------------

    def initialise(self, pool: np.ndarray | None = None) -> None:
        """Noise spectra and initial references from the first ``--nr_parts_sigma2noise``
        particles of each optics group (among the sorted rows ``pool`` when given)."""
        o = self.options
        take = []
        for g in range(self.n_optics):
            rows = np.flatnonzero(self.optics_of == g)
            if pool is not None:
                rows = rows[np.isin(rows, pool)]
            rows = rows[: o.nr_parts_sigma2noise]
            take.append(rows)
        rows = np.sort(np.concatenate(take))

        bg = radius_map(self.box, device=self.device) > round(self.radius_px)
        odd = [0, 0]

        def gen():
            size = 256
            for s in range(0, len(rows), size):
                chunk = rows[s : s + size]
                images = self.ps.load_images(self.order[chunk], device=self.device)
                # RELION's check: background mean within 0.5 std of 0 and std in [0.5, 2]
                pix = images[:, bg].to(torch.float64)
                mean, std = pix.mean(1), pix.std(1)
                bad = ((mean / std).abs() > 0.5) | (std < 0.5) | (std > 2.0)
                odd[0] += int(bad.sum())
                odd[1] += len(chunk)
                yield (
                    torch.as_tensor(chunk),
                    images,
                    self._ctf_half_plane(chunk),
                    torch.as_tensor(self.optics_of[chunk]),
                    torch.as_tensor(self.order[chunk]),
                )

        sigma2, refs, used = initial_sigma2_and_references(
            gen(),
            n_classes=o.K,
            box=self.box,
            n_optics=self.n_optics,
            diameter_px=self.radius_px * 2,
            zero_mask=o.zero_mask,
            init_blobs=o.init_blobs,
            seed=self.seed,
            pad=o.pad,
            device=self.device,
            space=self.space,
            random_orientation=self.random_orientation,
        )
        if odd[0]:
            self.log(
                f"warning: {odd[0]} of the first {odd[1]} particles are not normalised as RELION "
                "expects (background outside the mask diameter: mean 0, standard deviation 1); "
                "norm correction and VDAM assume it (relion_preprocess --norm, or tamis extract)"
            )
        k = o.K
        cs0 = int(relion_round(torch.tensor(0.07 * self.box)))
        tau2 = self.reference_spectrum(refs.to(torch.float64)) / 2
        # it000 as RELION's initialiseDataVersusPrior: tau2 = T spectrum / 2
        t0 = self.tau2_fudge_at(0)
        dvp = self.n / k * t0 * tau2 / sigma2.mean(0).clamp(min=1e-30)[None]
        self.state = ModelState(
            refs=refs.to(self.device),
            sigma2=sigma2,
            pdf_class=torch.full((k,), 1.0 / k, dtype=torch.float64, device=self.device),
            pdf_direction=torch.full((k, 1), 1.0 / k, dtype=torch.float64, device=self.device),
            prior_offset=torch.zeros((k, 2), dtype=torch.float64, device=self.device),
            sigma2_offset=o.offset**2,
            avg_norm=1.0,
            scale=torch.ones(len(self.groups), dtype=torch.float64, device=self.device),
            data_vs_prior=dvp,
            fourier_coverage=torch.zeros_like(dvp),
            sigma2_class=torch.zeros_like(dvp),
            tau2=t0 * tau2,
            maxres=cs0,
        )
        self.cls[:] = -1
        self.log(f"initialised {k} references and noise spectra from {used} particles")

    def load_continue(self, optimiser: str | Path) -> None:
        cont = read_continue(optimiser)
        self.state = self.state_from_continue(cont)
        self.seed = cont.seed
        self.sampling.perturbation = float(cont.sampling.get("rlnSamplingPerturbInstance", 0.0))
        data = read_data_star(cont.data_path, "particles").table
        if len(data) != self.n:
            raise TamisError(f"{cont.data_path}: {len(data)} particles, expected {self.n}")
        # data.star rows are in sorted order already
        self.psi = data["rlnAnglePsi"].to_numpy(float).copy()
        self.origin = np.stack(
            [data["rlnOriginXAngst"].to_numpy(float), data["rlnOriginYAngst"].to_numpy(float)], 1
        )
        self.cls = data["rlnClassNumber"].to_numpy(np.int64) - 1
        self.norm = data["rlnNormCorrection"].to_numpy(float).copy()
        self.restore(cont, data)
        self.log(f"continuing from iteration {cont.iteration} ({optimiser})")

    def state_from_continue(self, cont: ContinueState) -> ModelState:
        """The model state written in a continued run's model.star (and optimiser file)."""
        k = len(cont.classes)
        dev = self.device
        pdf = torch.tensor(
            cont.classes["rlnClassDistribution"].to_numpy(float), dtype=torch.float64, device=dev
        )
        prior = torch.tensor(
            np.stack(
                [
                    cont.classes.get("rlnClassPriorOffsetX", pd.Series(np.zeros(k))).to_numpy(
                        float
                    ),
                    cont.classes.get("rlnClassPriorOffsetY", pd.Series(np.zeros(k))).to_numpy(
                        float
                    ),
                ],
                1,
            ),
            dtype=torch.float64,
            device=dev,
        )
        if self.options.relion_offset_prior and self.space.ndim == 3:
            prior.zero_()  # RELION: no offset prior of 3D references' own (a tamis run's are)
        sigma2 = torch.zeros((self.n_optics, self.nsh), dtype=torch.float64, device=dev)
        for og, table in cont.sigma2.items():
            if og - 1 < self.n_optics:
                idx = np.array(table["rlnSpectralIndex"], dtype=np.int64)
                sigma2[og - 1, idx] = torch.tensor(
                    np.array(table["rlnSigma2Noise"], dtype=float), device=dev
                )
        sigma2 = mstep.fill_low_shells(sigma2)

        def per_class(label: str) -> torch.Tensor:
            rows = [np.array(t[label], dtype=np.float64) for t in cont.class_tables]
            return torch.tensor(np.stack(rows), dtype=torch.float64, device=dev)

        dvp = per_class("rlnSsnrMap")
        cov = per_class("rlnFourierCompleteness")
        tau2 = per_class("rlnReferenceTau2")
        s2c = per_class("rlnReferenceSigma2")
        scale = torch.ones(len(self.groups), dtype=torch.float64, device=dev)
        if len(cont.groups) == len(self.groups) and "rlnGroupScaleCorrection" in cont.groups:
            scale = torch.tensor(cont.groups["rlnGroupScaleCorrection"].to_numpy(float), device=dev)
        g = cont.model_general
        res_angst = float(g.get("rlnCurrentResolution", 0.0))  # written in Å (RELION's quirk)
        maxres = int(round(self.box * self.pixel / res_angst)) if res_angst > 0 else 5
        return ModelState(
            refs=cont.refs.to(dev, torch.float32),
            sigma2=sigma2,
            pdf_class=pdf,
            pdf_direction=self._continued_direction_prior(cont, pdf),
            prior_offset=prior,
            sigma2_offset=float(g.get("rlnSigmaOffsetsAngst", self.options.offset)) ** 2,
            avg_norm=float(g.get("rlnNormCorrectionAverage", 1.0)),
            scale=scale,
            data_vs_prior=dvp,
            fourier_coverage=cov,
            sigma2_class=s2c,
            tau2=tau2,
            maxres=maxres,
            iteration=cont.iteration,
            loglik=float(g.get("rlnLogLikelihood", 0.0)),
            avg_pmax=float(g.get("rlnAveragePmax", 0.0)),
        )

    def restore(self, cont: ContinueState, data: pd.DataFrame) -> None:
        """What a subclass keeps beyond the 2D EM state, from the continued files (read once by
        :meth:`load_continue`). Nothing here."""

    # ---- one iteration -----------------------------------------------------------------------

    def sizes(self) -> tuple[int, int]:
        o, st = self.options, self.state
        assert st is not None
        cs = min(self.box, 2 * (st.maxres + self.size_increment()))
        if o.strict_highres_exp > 0:
            coarse = min(
                cs,
                2 * int(relion_round(torch.tensor(self.box * self.pixel / o.strict_highres_exp))),
            )
        elif o.oversampling > 0:
            rotated = self.sampling.psi_step / 360.0 * math.pi * self.diameter
            coarse_res = rotated / self.coarse_safety
            coarse = min(cs, 2 * math.ceil(self.pixel * self.box / coarse_res))
        else:
            coarse = cs
        return cs, max(coarse, 2)

    def size_increment(self) -> int:
        """Fourier shells beyond the current resolution that the E-step uses (``--incr_size``;
        gold-standard refinement adapts it)."""
        return self.options.incr_size

    def tau2_fudge_at(self, it: int) -> float:
        """T used in iteration ``it`` (EM: ``--tau2_fudge``, 1 when not given)."""
        t = self.options.tau2_fudge
        return t if t > 0 else 1.0

    def iterate(
        self, it: int, *, abort: Callable[[], bool] | None = None
    ) -> tuple[float, float, float]:
        """One EM iteration over every particle: E-step, then the M-step."""
        o, st = self.options, self.state
        assert st is not None
        self.sampling.advance_perturbation(self.seed, it)
        step = self.expectation_step(it, np.arange(self.n), abort=abort)
        self.state = mstep.maximize(
            st,
            step.sums,
            step.d,
            step.w,
            tau2=step.tau2,
            options=o,
            tau2_fudge=self.tau2_fudge_at(it),
            current_size=step.current_size,
            group_counts=self._group_counts(),
            do_scale=self.do_scale,
            n_particles=self.n,
        )
        self._finish_iteration(it, st, step)
        return step.changes

    def _group_counts(self) -> torch.Tensor:
        return torch.tensor(self.groups["count"].to_numpy(dtype=np.float64), device=self.device)

    def _finish_iteration(self, it: int, old: ModelState, step: EStep) -> None:
        """Iteration number, perturbation and accuracy estimates into the new state."""
        assert self.state is not None
        self.state.iteration = it
        self.state.perturbation = self.sampling.perturbation
        if step.acc_inputs is not None and self.estimates_accuracy(it):
            ctf10, sig10, angles10 = step.acc_inputs
            rot, tr = accuracy_over_ranks(
                step.grids,
                old.pdf_class,
                step.window,
                ctf10,
                sig10,
                angles10,
                self.turned_orientations,
                space=self.space,
                pad=self.options.pad,
            )
            self.state.acc_rot = rot
            self.state.acc_trans = torch.where(tr < 999, tr * self.pixel, tr)

    def estimates_accuracy(self, it: int) -> bool:
        return True

    def cross_correlation(self, it: int) -> bool:
        """Whether iteration ``it`` takes each particle's best cross-correlation instead of
        weighing by likelihood (RELION's ``--firstiter_cc`` in iteration 1; 3D auto-refine)."""
        return False

    def local_searches(self) -> bool:
        """Whether this iteration searches locally around each particle's orientation (3D
        auto-refine from ``--auto_local_healpix_order`` on); then :meth:`local_prior` gives a
        batch's coarse orientations and their priors."""
        return False

    def local_prior(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Coarse orientation indices ``(U,)`` near the particles at ``rows`` and each one's
        log-prior over them ``(B, U)``."""
        raise NotImplementedError

    def local_union_size(self) -> int:
        """An estimate of how many coarse orientations a batch's union holds (batch size)."""
        raise NotImplementedError

    def _continued_direction_prior(self, cont: ContinueState, pdf: torch.Tensor) -> torch.Tensor:
        """A continued run's ``pdf_direction``: model.star's ``model_pdf_orient_class_N``
        tables (3D, as RELION reads them), else the optimiser file's class priors (tamis's VDAM),
        else the class distribution; :meth:`direction_prior` fits it to the sampling."""
        dev = pdf.device
        if cont.direction_priors is not None and cont.direction_priors.shape[1] > 1:
            return torch.tensor(cont.direction_priors, dtype=torch.float64, device=dev)
        if cont.class_priors is not None:
            return torch.tensor(cont.class_priors, dtype=torch.float64, device=dev)[:, None]
        return pdf.clone()[:, None]

    def n_directions(self) -> int:
        """RELION's number of directions (``HealpixSampling::NrDirections``): 1 in 2D."""
        return 1

    def direction_prior(self, st: ModelState) -> torch.Tensor:
        """``st.pdf_direction`` ``(K, D)`` for the current sampling's ``D`` directions.

        RELION's ``MlModel::initialisePdfDirection``: when the number of directions changes
        (a HEALPix order change), every class and direction gets ``1 / (K D)``. A state with one
        value per class (a new run, a file without the per-direction tables) spreads each
        class's value evenly over the directions instead (``1 / (K D)`` at the start)."""
        d = self.n_directions()
        pd_ = st.pdf_direction
        if pd_.shape[1] != d:
            if pd_.shape[1] == 1:
                st.pdf_direction = pd_.expand(-1, d) / d
            else:
                k = pd_.shape[0]
                st.pdf_direction = torch.full(
                    (k, d), 1.0 / (k * d), dtype=torch.float64, device=pd_.device
                )
        return st.pdf_direction

    def _orientation_priors(
        self, st: ModelState, local: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The E-step's log-priors: per class ``(K,)``, the class's total over the directions
        (``-inf`` for empty classes), and, where the learned direction prior is not flat within
        each class (3D global searches), per class and coarse orientation ``(K, D * nr_psi)``
        each direction's prior over the class's mean (``-inf`` where it is zero: RELION skips
        such directions). Together ``log(D pdf_direction[k][idir])``: RELION's E-step prior is
        ``pdf_direction[k][idir]`` over its mean, the same up to a constant, and the class part
        keeps the reported log-likelihoods on the scale of the class prior. Local searches use
        their own Gaussian prior instead (``PRIOR_ROTTILT_PSI``)."""
        pdir = self.direction_prior(st)
        total = pdir.sum(1)
        inf = torch.full_like(total, -math.inf)
        log_pc = torch.where(st.pdf_class > 0, torch.log(total.clamp(min=1e-300)), inf)
        if pdir.shape[1] == 1 or local or bool((pdir == pdir[:, :1]).all()):
            return log_pc, None
        ratio = pdir * (pdir.shape[1] / total.clamp(min=1e-300))[:, None]
        rel = torch.where(pdir > 0, torch.log(ratio.clamp(min=1e-300)), -math.inf)
        return log_pc, rel.repeat_interleave(self.sampling.nr_psi, 1)

    def expectation_step(
        self,
        it: int,
        rows_all: np.ndarray,
        *,
        abort: Callable[[], bool] | None = None,
        halves: bool = False,
        max_significants: int | None = None,
    ) -> EStep:
        """E-step over the (sorted) particle rows ``rows_all``; weighted sums for the M-step.

        ``halves``: the reconstruction sums go to ``2K`` slots, class ``k`` of particles at even
        rows into ``k`` and odd rows into ``k + K`` (RELION's pseudo half-sets for VDAM).
        """
        o, st = self.options, self.state
        assert st is not None
        dev = self.device
        cs, ccs = self.sizes()
        self.current_size = cs
        window = FourierWindow.create(self.box, cs, device=dev)
        cwin = FourierWindow.create(self.box, ccs, device=dev)
        coarse_pixels = window.subset(ccs)
        estep_pixels = (
            coarse_pixels if o.strict_highres_exp > 0 else torch.arange(len(window), device=dev)
        )
        smp = self.sampling
        grids = reference_grids(st.refs, pad=o.pad, r_max=cs / 2)
        tau2 = grid_tau2(grids, cs / 2, self.nsh, pad=o.pad)
        # Local searches (auto-refine): each batch is compared with the coarse orientations
        # near its particles' previous ones (``local_prior``), fine children made on demand.
        local = self.local_searches()
        if local:
            if o.oversampling < 1:
                raise TamisError("local angular searches need --oversampling 1 or more")
            psi_c = psi_f = None
            n_over_orient = smp.n_over_orient
        else:
            psi_c, psi_f, n_over_orient = self.orientation_samples()
        oversampled = o.oversampling > 0
        space = self.space
        sources = space.prepare(grids, window, o.pad)  # what every projection reads
        k = st.n_classes
        slots = 2 * k if halves else k
        # Fine projections and per-orientation sums of every fine orientation (held beside the
        # batches' budget), or, when they would need more than two thirds of the work budget,
        # only of the children of the coarse orientations that some particle of the batch
        # needs, splatted batch by batch (3D at HEALPix order 2 and 3).
        n_pf = 0 if local else psi_f.shape[0] if oversampled else psi_c.shape[0]
        dense_bytes = int(k * n_pf * len(window) * (8 + 24 * slots / k))
        stream = local or (oversampled and dense_bytes > self._work_budget() * 2 // 3)
        proj_c = None if local else space.project(sources, psi_c, cwin, o.pad)
        proj_f = (
            space.project(sources, psi_f, window, o.pad) if oversampled and not stream else None
        )
        t_c = torch.as_tensor(smp.coarse_translations(), device=dev)
        t_c0 = torch.as_tensor(smp.coarse_translations(perturbed=False), device=dev)
        t_f = torch.as_tensor(smp.fine_translations(), device=dev) if oversampled else t_c
        ramps_c = _ramps(t_c, cwin, self.box)
        ramps_f = _ramps(t_f, window, self.box)
        # The dense passes' sums over translations as two small DFTs where the translation grid
        # allows (tamis.class2d.shifts). On the CPU only: measured there; on a GPU each GEMM they
        # replace is one launch and they are many small ones, not yet measured there.
        shifts_f = shifts_c = col_sums = None
        if dev.type == "cpu":
            e_kx, e_ky = window.kx[estep_pixels], window.ky[estep_pixels]
            shifts_f = SeparableShifts.create(t_f, e_kx, e_ky, self.box)
            if oversampled:
                shifts_c = SeparableShifts.create(t_c, cwin.kx, cwin.ky, self.box)
            # the M-step's, on every pixel of the window (its dense sums and its class blocks)
            col_sums = ColumnSums.create(t_f, window.kx, window.ky, self.box)
        if not oversampled:
            # single pass at the current size, on the E-step's pixels (the M-step's on all)
            proj_f = space.project(sources, psi_c, window, o.pad)
            proj_c = proj_f[..., estep_pixels] if o.strict_highres_exp > 0 else proj_f
            coarse_pixels = estep_pixels
            ramps_c = ramps_f[:, estep_pixels] if o.strict_highres_exp > 0 else ramps_f
            shifts_c = shifts_f
        psi_fine_deg = psi_f if oversampled else psi_c
        # pass 0's projections as its GEMMs read them, once for every batch
        coarse_refs = (
            None if local else prepare_refs(proj_c.reshape(-1, proj_c.shape[-1]), shifts_c)
        )
        log_pc, log_pdir = self._orientation_priors(st, local)
        sums = WeightedSums.zeros(
            k,
            0 if stream else n_pf,
            len(window),
            self.n_optics,
            self.nsh,
            len(self.groups),
            dev,
            n_slots=slots,
            n_directions=self.n_directions(),
        )
        acc = GridSplat.for_window(slots, window, o.pad, space.ndim, dev)

        def splat_sums(proj: torch.Tensor, orientations: torch.Tensor) -> None:
            """The per-orientation sums into the grids; the sums are emptied."""
            dd, ww = self.reconstruction_terms(sums.fimg, sums.fweight, proj)
            space.splat(acc, dd, ww, orientations, window, o.pad)
            sums.fimg, sums.fweight = sums.fimg[:, :0], sums.fweight[:, :0]

        ssnr_mask = st.data_vs_prior[:, window.shell.clamp(max=self.nsh - 1)] > 3  # (K, C)
        n_coarse = self.local_union_size() if local else proj_c.shape[1]
        n_hyp = k * n_coarse * len(t_c)
        # streaming: a batch is assumed to need at most an eighth of the orientations
        n_batch_pf = n_coarse * n_over_orient // 8 if stream else n_pf
        bsize = self._batch_size(
            len(window),
            n_hyp,
            k * n_batch_pf * len(t_f),
            len(t_f),
            8 if oversampled else 40,
        )
        if local and not o.batch_size:
            # a batch's union of neighbourhoods grows with the batch: small batches of
            # particles with nearby orientations waste the least (measured: 16)
            bsize = min(bsize, LOCAL_BATCH)
        old_cls = self.cls[rows_all].copy()
        old_angles = self.angles_of(rows_all)
        old_origin = self.origin[rows_all].copy()
        max_sig = o.max_significants if max_significants is None else max_significants
        cc = self.cross_correlation(it)
        # rows (particle x translation) per M-step GEMM: a quarter of the budget
        m_rows = max(256, self._work_budget() // 4 // (16 * len(window) + 4 * k * n_batch_pf))
        acc_inputs = None
        # Ranks (torchrun) take contiguous runs of whole batches: each particle sees the same
        # batch as in a single process, and only the sums' order of addition differs.
        ranks = distributed.world()
        lo, hi = distributed.share(-(-len(rows_all) // bsize), ranks)
        lo, hi = lo * bsize, min(hi * bsize, len(rows_all))
        rows_mine = rows_all[lo:hi]
        # Pass 0's A terms of several batches in one GEMM when the coarse projections are many
        # (3D global searches at HEALPix order 3, and order 2 with several classes: one batch's
        # GEMM is bound by reading them).
        ahead = 0
        if coarse_refs is not None and oversampled and not cc:
            n_refs = coarse_refs.norm2.shape[0]
            if n_refs >= NORMS_AHEAD_MIN_REFS:
                ahead = max(bsize, min(NORMS_AHEAD_ROWS, NORMS_AHEAD_BYTES // (4 * n_refs)))
        norms_ahead = _NormsAhead(
            rows_mine,
            ahead,
            lambda rows: self._coarse_norm_terms(rows, window, coarse_pixels, coarse_refs),
        )
        with progress_bar(len(rows_mine), f"iteration {it:3d}", enabled=self.show_progress) as bar:
            start = 0
            for batch in self._batches(rows_mine, bsize):
                batch_rows = rows_mine[start : start + len(batch.indices)]
                # a batch that runs out of memory in the E-step (nothing added to the sums yet)
                # is split in two and retried, down to one particle
                pending = [(start, batch_rows, batch.images)]
                start += len(batch_rows)
                while pending:
                    pos, rows, images = pending.pop(0)
                    if abort is not None and abort():
                        raise JobAborted
                    data, full_power = self._prepare(images, rows, window, it)
                    if acc_inputs is None:  # RELION uses the first 10 (3D: 100) particles
                        n_acc = self.accuracy_trials
                        acc_inputs = (
                            data.ctf[:n_acc],
                            data.sigma2[:n_acc],
                            self.angles_of(rows[:n_acc]),
                        )
                    off_px = data.offset_px
                    lpo = _log_prior_offset(
                        off_px, t_c0, st.prior_offset, st.sigma2_offset, self.pixel,
                        mixed_units=o.relion_offset_prior,
                    )  # fmt: skip
                    proj_cb, refs_b, lp_orient = proj_c, coarse_refs, None
                    if local:
                        ids, lp = self.local_prior(rows)
                        proj_cb = space.project(
                            sources, smp.coarse_rotations(ids).to(dev), cwin, o.pad
                        )
                        lp_orient = lp.to(dev)
                        fine = _FineOnDemand(
                            space, sources,
                            lambda j, ids=ids: smp.fine_rotations_of(ids[j.cpu()]).to(dev),
                            window, o.pad,
                        )  # fmt: skip
                    elif stream:
                        fine = _FineOnDemand(
                            space, sources, _children_of(psi_f, n_over_orient), window, o.pad
                        )
                    else:
                        fine = None
                    t_e = time.perf_counter()
                    norms = norms_ahead.at(pos, len(rows))
                    try:
                        hyp = (cc_expectation if cc else expectation)(
                            data,
                            proj_coarse=proj_cb,
                            # (the single pass: the same projections, so it is the final one)
                            proj_fine=proj_c if not oversampled else fine if stream else proj_f,
                            coarse_pixels=coarse_pixels,
                            estep_pixels=estep_pixels,
                            ramps_coarse=ramps_c,
                            ramps_fine=ramps_f,
                            log_prior_offset=lpo,
                            log_prior_class=log_pc,
                            n_over_psi=n_over_orient if oversampled else 1,
                            n_over_trans=smp.n_over_trans if oversampled else 1,
                            fraction=o.adaptive_fraction,
                            max_significant=max_sig,
                            coarse_refs=refs_b,
                            log_prior_orient=lp_orient,
                            shifts_coarse=shifts_c,
                            shifts_fine=shifts_f,
                            log_prior_dir=log_pdir,
                            coarse_norms=norms,
                        )
                    except (RuntimeError, MemoryError) as exc:
                        if not is_out_of_memory(exc):
                            raise
                        if len(rows) == 1:
                            raise TamisError(
                                "out of memory with one particle per batch: this box and "
                                "sampling need more memory than the device has"
                            ) from None
                        del data, full_power, fine
                        _release_memory(dev)
                        h = len(rows) // 2
                        pending[:0] = [
                            (pos, rows[:h], images[:h]),
                            (pos + h, rows[h:], images[h:]),
                        ]
                        self.log(
                            f"out of memory with {len(rows)} particles per batch: "
                            f"retrying as {h} + {len(rows) - h}"
                        )
                        continue
                    _add_seconds("estep_seconds", t_e, dev)
                    t_m = time.perf_counter()
                    if sums.pdf_direction is not None:
                        add_direction_sums(
                            sums.pdf_direction,
                            hyp,
                            n_over_orient if oversampled else 1,
                            smp.nr_psi,
                            batch_ids=ids.to(dev) if local else None,
                        )
                    if stream:  # this batch's sums, over the fine orientations it weighted
                        hyp, keep = hyp.weighted_orientations(fine.proj.shape[1])
                        batch_proj, batch_orient = fine.proj[:, keep], fine.used[keep]
                        shape = (slots,) + batch_proj.shape[1:]
                        sums.fimg = torch.zeros(shape, dtype=torch.complex128, device=dev)
                        sums.fweight = torch.zeros(shape, dtype=torch.float64, device=dev)
                    else:
                        batch_proj, batch_orient = proj_f, psi_fine_deg
                    new_norm = mstep.accumulate(
                        sums,
                        data,
                        hyp,
                        batch_proj,
                        ramps_f,
                        window,
                        full_power=full_power,
                        optics=torch.as_tensor(self.optics_of[rows], device=dev),
                        groups=torch.as_tensor(self.group_of[rows], device=dev),
                        scale=st.scale,
                        ssnr_mask=ssnr_mask if self.do_scale else None,
                        translations_px=t_f,
                        # RELION sums p² |mu - o - t|² with mu in Å and o + t in pixels
                        # (pitfall P12): the Å sums' formula with mu scaled by p
                        prior_offset=st.prior_offset
                        * (self.pixel if o.relion_offset_prior else 1.0),
                        pixel_size=self.pixel,
                        old_norm=torch.as_tensor(self.norm[rows], device=dev),
                        avg_norm=st.avg_norm,
                        nsh=self.nsh,
                        half=torch.as_tensor(rows % 2, device=dev) if halves else None,
                        max_rows=m_rows,
                        gemm_dtype=torch.bfloat16 if o.mstep_bf16 else torch.float32,
                        col_sums=col_sums,
                    )
                    if stream:
                        splat_sums(batch_proj, batch_orient)
                    _add_seconds("mstep_seconds", t_m, dev)
                    self._store(rows, hyp, batch_orient, t_f, off_px, new_norm)
                    del hyp, fine  # the dense weights go before the next batch's are made
                    bar.advance(len(rows))
        if not stream:
            splat_sums(proj_f, psi_fine_deg)
        if ranks.size > 1:
            acc_inputs = self._share_estep(rows_all, lo, hi, sums, acc, acc_inputs)
        d, w = space.finish(acc, cs / 2, o.pad)
        changes = (
            self.angle_change(rows_all, old_angles),
            offset_change(self.origin[rows_all], old_origin),
            float(np.mean(self.cls[rows_all] != old_cls)),
        )
        return EStep(
            sums=sums,
            d=d,
            w=w,
            window=window,
            grids=grids,
            tau2=tau2,
            current_size=cs,
            changes=changes,
            acc_inputs=acc_inputs,
            streamed=stream,
        )

    def row_arrays(self) -> list[np.ndarray]:
        """The per-particle arrays the E-step writes (indexed by sorted row); a subclass that
        stores more per particle adds its arrays."""
        return [self.psi, self.origin, self.cls, self.norm, self.loglik, self.pmax, self.nsig]

    def _share_estep(self, rows_all, lo, hi, sums, acc, acc_inputs):
        """After each rank's E-step over ``rows_all[lo:hi]``: the weighted sums added up over
        ranks (the reconstruction sums as each rank's splatted grids, smaller than the sums per
        orientation), every rank's particle results on every rank (so that any rank can take
        any particle next time and rank 0 writes them all), and rank 0's accuracy inputs (the
        first particles) everywhere."""
        distributed.all_sum(
            [
                acc.flat,
                acc.at_origin,
                sums.sigma2_noise,
                sums.sumw_optics,
                sums.pdf_class,
                sums.prior_offset,
                sums.xa,
                sums.aa,
                *([] if sums.pdf_direction is None else [sums.pdf_direction]),
            ]
        )
        (sums.sigma2_offset, sums.norm_sum, sums.loglik, sums.pmax_sum) = (
            distributed.all_sum_floats(
                [sums.sigma2_offset, sums.norm_sum, sums.loglik, sums.pmax_sum]
            )
        )
        arrays = self.row_arrays()
        n = len(rows_all)
        cols = [a[rows_all].reshape(n, -1).astype(np.float64) for a in arrays]
        block = np.concatenate(cols, axis=1)
        block[:lo] = 0.0
        block[hi:] = 0.0
        table = torch.from_numpy(block)
        distributed.all_sum([table])
        block = table.numpy()
        c = 0
        for a, col in zip(arrays, cols, strict=True):
            width = col.shape[1]
            a[rows_all] = block[:, c : c + width].reshape(a[rows_all].shape).astype(a.dtype)
            c += width
        if acc_inputs is not None:
            acc_inputs = tuple(x.cpu() if isinstance(x, torch.Tensor) else x for x in acc_inputs)
        acc_inputs = distributed.broadcast_object(acc_inputs)
        if acc_inputs is not None:
            acc_inputs = tuple(
                x.to(self.device) if isinstance(x, torch.Tensor) else x for x in acc_inputs
            )
        return acc_inputs

    def _prepare(
        self, images: torch.Tensor, rows: np.ndarray, window: FourierWindow, it: int
    ) -> tuple[BatchData, torch.Tensor]:
        o, st = self.options, self.state
        assert st is not None
        dev = self.device
        b = images.shape[0]
        img = images.to(torch.float64)
        if o.norm:
            img = img * (st.avg_norm / torch.as_tensor(self.norm[rows], device=dev))[:, None, None]
        off = self.origin[rows] / self.pixel  # RELION rounds halves away from zero
        off_px = torch.as_tensor(np.sign(off) * np.floor(np.abs(off) + 0.5), device=dev)
        img = _integer_shift(img, off_px)
        spec_u = rfft2_centered(img)
        sig_full = self._sigma2_half_plane(rows)
        if o.zero_mask:
            masked = soft_mask_outside(img, self.radius_px, o.maskedge)
        else:
            noise = _noise_images(
                sig_full, self.shells_full, self.nsh, self.order[rows], self.seed, it
            )
            masked = soft_mask_outside(img, self.radius_px, o.maskedge, background=noise)
        spec = rfft2_centered(masked)
        ctf = self._scaled_ctf(rows)
        # Power of the masked particle per shell (duplicate half column excluded), for the
        # shells beyond the current size.
        dup = duplicate_half_column((self.box, self.box), device=dev)
        p2 = (spec.real**2 + spec.imag**2).masked_fill(dup, 0.0)
        sh = self.shells_full.reshape(-1).clamp(max=self.nsh)
        full_power = torch.zeros((b, self.nsh + 1), dtype=torch.float64, device=dev)
        full_power.index_add_(1, sh, p2.reshape(b, -1))
        full_power = full_power[:, : self.nsh]
        beyond = torch.arange(self.nsh, device=dev) > window.size // 2
        high = (full_power * beyond).sum(1)
        data = BatchData(
            x=window.gather(spec).to(torch.complex64),
            xu=window.gather(spec_u).to(torch.complex64),
            ctf=window.gather(ctf).to(torch.float32),
            sigma2=window.gather(sig_full).to(torch.float32),
            dc=(window.kx == 0) & (window.ky == 0),
            high_xi2=high,
            offset_px=off_px,
        )
        return data, full_power

    #: A random orientation for the initial references from a generator (2D: a psi).
    random_orientation = staticmethod(random_psi)

    def reference_spectrum(self, refs: torch.Tensor) -> torch.Tensor:
        """Per-shell mean ``|F|²`` of the references ``(K, nsh)`` (RELION's getSpectrum)."""
        return mstep.spectrum(refs, self.shells_full, self.nsh)

    def orientation_samples(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This iteration's coarse and fine orientations (2D: psi in degrees) and the number
        of fine children per coarse one (fine ``j * n + a`` refines coarse ``j``)."""
        smp, dev = self.sampling, self.device
        coarse = torch.as_tensor(smp.coarse_psi(), device=dev)
        fine = torch.as_tensor(smp.fine_psi(), device=dev)
        return coarse, fine, smp.n_over_psi

    def angles_of(self, rows: np.ndarray) -> np.ndarray:
        """A copy of the particles' angles (2D: psi), to measure their change."""
        return self.psi[rows].copy()

    #: Particles the accuracy estimates use (RELION: 10 in 2D, 100 in 3D).
    accuracy_trials = 10
    #: RELION's keep-safe factor of the coarse image size (2D references 1.5, 3D 1.2).
    coarse_safety = 1.5

    def turned_orientations(
        self, angles: np.ndarray, turns: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For the accuracy estimates: the particles' orientations ``(P, ...)`` and the same
        turned by each of ``turns`` degrees ``(P * A, ...)`` (2D: psi + turn)."""
        psi = torch.as_tensor(angles, device=self.device, dtype=torch.float64)
        return psi, (psi[:, None] + turns[None]).reshape(-1)

    def reconstruction_terms(
        self, fimg: torch.Tensor, fweight: torch.Tensor, proj: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What is splatted into the reconstruction grids from the per-orientation sums
        ``(S, P, C)`` and the projections they were weighed against (EM: the sums)."""
        return fimg, fweight

    def angle_change(self, rows: np.ndarray, old: np.ndarray) -> float:
        """Mean change of the particles' orientation since ``old`` (degrees)."""
        return float(np.mean(np.abs((self.psi[rows] - old + 180) % 360 - 180)))

    def set_angles(self, rows: np.ndarray, ok: np.ndarray, best: torch.Tensor) -> None:
        """Store the best fine orientations ``best`` of the particles at ``rows`` (where ``ok``)."""
        psi = (best.cpu().numpy() + 180.0) % 360.0 - 180.0
        self.psi[rows] = np.where(ok, psi, self.psi[rows])

    def _store(self, rows, hyp, orientations, t_f, off_px, new_norm) -> None:
        ok = (hyp.best_cls >= 0).cpu().numpy()
        cls = hyp.best_cls.clamp(min=0)
        tr = t_f[hyp.best_trans.clamp(min=0)].cpu().numpy()
        off = off_px.cpu().numpy()
        self.cls[rows] = np.where(ok, cls.cpu().numpy(), self.cls[rows])
        self.set_angles(rows, ok, orientations[hyp.best_psi.clamp(min=0)])
        self.origin[rows] = np.where(ok[:, None], (off + tr) * self.pixel, self.origin[rows])
        self.pmax[rows] = hyp.pmax.cpu().numpy()
        self.nsig[rows] = hyp.n_significant.cpu().numpy()
        self.loglik[rows] = hyp.loglik.cpu().numpy()
        if self.options.norm:
            self.norm[rows] = new_norm.cpu().numpy()

    # ---- after the M-step --------------------------------------------------------------------

    def post_process(self, it: int = 0) -> torch.Tensor:
        """Centre and flatten the classes; return the unmasked (centred) ones."""
        o, st = self.options, self.state
        assert st is not None
        if o.center_classes:
            st.refs = mstep.center_classes(st.refs, o.offset_range)
        unmasked = st.refs.clone()
        if o.flatten_solvent:
            st.refs = mstep.flatten_solvent(st.refs, self.radius_px, o.maskedge)
        st.maxres = mstep.current_resolution_shell(st.data_vs_prior, st.pdf_class, o.minres_map)
        return unmasked

    def particle_table(self, rows: slice | None = None) -> pd.DataFrame:
        """data.star's particle rows (in sorted order), all or the sorted ``rows``."""
        sel = slice(None) if rows is None else rows
        src = self.order[sel]
        table = self.ps.particles.iloc[src].copy()
        table["rlnImageName"] = self.ps.image_names_from(Path.cwd(), src).to_numpy()
        table = table.reset_index(drop=True)
        table["rlnGroupNumber"] = self.group_of[sel] + 1
        if "rlnAngleRot" not in table.columns:
            table["rlnAngleRot"] = 0.0
        if "rlnAngleTilt" not in table.columns:
            table["rlnAngleTilt"] = 0.0
        table["rlnAnglePsi"] = self.psi[sel]
        table["rlnOriginXAngst"] = self.origin[sel, 0]
        table["rlnOriginYAngst"] = self.origin[sel, 1]
        table["rlnClassNumber"] = self.cls[sel] + 1
        table["rlnNormCorrection"] = self.norm[sel]
        table["rlnLogLikeliContribution"] = self.loglik[sel]
        table["rlnMaxValueProbDistribution"] = self.pmax[sel]
        table["rlnNrOfSignificantSamples"] = self.nsig[sel]
        return table

    def writes(self, it: int) -> bool:
        """Whether iteration ``it``'s files are written (EM: every iteration)."""
        return True

    def iteration_files(self, it: int) -> IterationFiles:
        return IterationFiles(self.root, it)

    def extra_optimiser_labels(self) -> dict:
        return {}

    def extra_class_labels(self, files: IterationFiles) -> dict:
        return {}

    def write_files(self, files: IterationFiles, state: ModelState, **labels) -> None:
        """RELION's files of ``state`` (and this run's particles and sampling) as ``files``;
        ``labels`` go to :func:`write_iteration`. Under torchrun every rank calls it (each
        formats its share of data.star's rows) and rank 0 writes."""
        particles = None if labels.get("model_only") else self._particle_rows()
        if not distributed.is_main():
            if particles is not None:  # this rank's share of data.star, with rank 0
                particles(files.data, None)
            return
        write_iteration(
            files,
            state=state,
            options=self.options,
            sampling=self.sampling,
            optics=self.ps.optics,
            particles=particles,
            groups=self.groups,
            pixel_size=self.pixel,
            current_size=self.current_size,
            diameter=self.diameter,
            seed=self.seed,
            **labels,
        )

    def _particle_rows(self):
        """data.star's particle rows: the table in one process. Under torchrun a writer that
        every rank calls at the same point: each builds and formats its share of the rows (the
        slow part at a million particles) and writes it at its offset of one shared file, which
        rank 0 then renames into place (:func:`tamis.distributed.write_shared`)."""
        ranks = distributed.world()
        if ranks.size == 1:
            return self.particle_table()
        lo, hi = distributed.share(self.n, ranks)
        table = self.particle_table(slice(lo, hi))
        chunk = format_loop_rows(table)
        columns = list(table.columns)

        def write(path, optics) -> None:
            head = tail = ""
            if optics is not None:
                head, tail = loop_file_parts({"optics": optics}, "particles", columns)
            distributed.write_shared(path, head, chunk, tail)

        return write

    def write(self, it: int, changes=(0.0, 0.0, 0.0)) -> IterationFiles:
        assert self.state is not None
        files = self.iteration_files(it)
        self.write_files(
            files,
            self.state,
            changes=changes,
            tau2_fudge=self.tau2_fudge_at(it),
            extra_optimiser=self.extra_optimiser_labels(),
            extra_classes=self.extra_class_labels(files),
            class_priors=self.options.grad,
        )
        return files


def accuracy_over_ranks(
    grids, pdf_class, window, ctf, sigma2, angles, turned_of, *, space, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`expected_accuracy` of the particles ``ctf``/``sigma2``/``angles`` (10 in 2D, 100
    in 3D), each rank estimating its share of them; the per-class means joined over ranks
    (``turned_of(angles, turns)`` as :meth:`Class2DRun.turned_orientations`)."""
    ranks = distributed.world()
    if ranks.size == 1:
        return expected_accuracy(
            grids, pdf_class, window, ctf, sigma2, lambda t: turned_of(angles, t),
            space=space, pad=pad,
        )  # fmt: skip
    p = ctf.shape[0]
    lo, hi = distributed.share(p, ranks)
    k = grids.shape[0]
    rot = torch.zeros(k, dtype=torch.float64, device=grids.device)
    tr = torch.zeros_like(rot)
    if hi > lo:
        mine = angles[lo:hi]
        r, t = expected_accuracy(
            grids, pdf_class, window, ctf[lo:hi], sigma2[lo:hi],
            lambda turns: turned_of(mine, turns), space=space, pad=pad,
        )  # fmt: skip
        rot, tr = r * (hi - lo), t * (hi - lo)
    distributed.all_sum([rot, tr])
    return rot / p, tr / p


# ---- vectorised helpers ----------------------------------------------------------------------


def _release_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _add_seconds(key: str, start: float, device: torch.device) -> None:
    """Add the time since ``start`` (the device's work finished) to ``GEMM_STATS[key]``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    GEMM_STATS[key] += time.perf_counter() - start


def _ramps(t_px: torch.Tensor, window: FourierWindow, box: int) -> torch.Tensor:
    """Phase ramps ``(T, C)`` on the window's pixels that move content by ``+t``."""
    phases = shift_phases(t_px.to(torch.float64)[:, None, :], window.kx, window.ky, (box, box))
    return phases.to(torch.complex64)


def _log_prior_offset(
    off_px: torch.Tensor,
    t_px: torch.Tensor,
    mu: torch.Tensor,
    sigma2: float,
    pixel: float,
    *,
    mixed_units: bool = False,
) -> torch.Tensor:
    """``(B, K, T)`` log Gaussian prior of the offset ``o + t`` (old offset ``o``, translation
    ``t``, both in pixels) around the class priors ``mu`` (Å), ``sigma2`` in Å².

    ``-|p (o + t) - mu|² / (2 sigma2)``, in Å throughout; with ``mixed_units`` (``--offset_prior
    relion``) as RELION computes it (its pitfall P12), ``-p² |o + p t - mu|² / (2 sigma2)``: the
    old offset in pixels but the translation and prior in Å, so that with a pixel size ``p``
    above 1 Å the translations around the old offset are held ``p`` times tighter than
    ``sigma2`` says.
    """
    if mixed_units:
        total = off_px[:, None, :] + pixel * t_px[None]  # (B, T, 2): px + Å, as RELION
        scale = pixel * pixel
    else:
        total = pixel * (off_px[:, None, :] + t_px[None])  # (B, T, 2) Å
        scale = 1.0
    d = total[:, None, :, :] - mu[None, :, None, :]  # (B, K, T, 2)
    return -scale * (d**2).sum(-1) / (2 * sigma2) - math.log(2 * math.pi * sigma2)


def _integer_shift(img: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """Shift content by whole pixels ``off`` ``(B, 2)`` (x, y), zero fill (RELION's DONT_WRAP)."""
    b, n, _ = img.shape
    ar = torch.arange(n, device=img.device)
    dx = off[:, 0].long()[:, None]
    dy = off[:, 1].long()[:, None]
    src_x = ar[None] - dx  # (B, N)
    src_y = ar[None] - dy
    vx = (src_x >= 0) & (src_x < n)
    vy = (src_y >= 0) & (src_y < n)
    g = img[
        torch.arange(b, device=img.device)[:, None, None],
        src_y.clamp(0, n - 1)[:, :, None],
        src_x.clamp(0, n - 1)[:, None, :],
    ]
    return g * (vy[:, :, None] & vx[:, None, :])


def _noise_images(
    sig_full: torch.Tensor, shells: torch.Tensor, nsh: int, ids: np.ndarray, seed: int, it: int
) -> torch.Tensor:
    """Coloured noise backgrounds ``(B, N, N)`` with per-shell variance sigma2 (RELION's
    non-zero-mask background), seeded per particle so results do not depend on batching."""
    b, n, m = sig_full.shape
    out = torch.empty((b, n, m), dtype=torch.complex128, device=sig_full.device)
    for row, pid in enumerate(ids.tolist()):
        g = np.random.default_rng([seed, it, int(pid)])
        z = g.standard_normal((2, n, m))
        out[row] = torch.complex(torch.from_numpy(z[0]), torch.from_numpy(z[1])).to(out.device)
    std = torch.sqrt(sig_full.to(torch.float64)) * (shells <= nsh - 1)
    return irfft2_centered(out * std, (n, n))
