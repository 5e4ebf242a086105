"""Options, model state and weighted sums of 2D classification (plain dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["Class2DOptions", "ModelState", "WeightedSums", "OFFSET_PRIORS"]

#: ``--offset_prior`` values (Class2DOptions.offset_prior)
OFFSET_PRIORS = ("angst", "relion")


@dataclass
class Class2DOptions:
    """RELION ``relion_refine`` options for 2D classification, with RELION's defaults.

    Sampling is in pixels/degrees as on RELION's command line (``--offset_range``,
    ``--offset_step`` in pixels; ``--psi_step`` in degrees). The GUI passes twice its displayed
    angular and offset steps with ``--oversampling 1``; see ``tamis class2d --help``.
    """

    K: int = 1
    iter: int = 25
    tau2_fudge: float = -1.0  # -1: RELION's default, 1 for EM and 4 for VDAM
    particle_diameter: float | None = None  # Å; default (N - 5) * p
    zero_mask: bool = False
    ctf: bool = False
    ctf_intact_first_peak: bool = False
    ctf_phase_flipped: bool = False
    only_flip_phases: bool = False
    strict_highres_exp: float = -1.0
    flatten_solvent: bool = False
    center_classes: bool = False
    norm: bool = False
    scale: bool = False
    psi_step: float = 10.0
    offset_range: float = 6.0
    offset_step: float = 2.0
    oversampling: int = 1
    random_seed: int | None = None
    pool: int = 1
    preread_images: bool = False
    j: int = 1
    device: str = "auto"
    batch_size: int | None = None
    max_memory: float | None = None  # GB the batches may use; None: 1 on the CPU, half a GPU's free
    # tamis: the M-step's sums over translations as bfloat16 GEMMs (float32 sums across
    # batches): ~4x the float32 rate on CPUs with AVX512-BF16 and on GPUs, each batch's partial
    # sums rounded to 8 significant bits; off by default (BENCHMARKS.md)
    mstep_bf16: bool = False
    adaptive_fraction: float = 0.999
    max_significants: int = -1
    incr_size: int = 10
    pad: int = 2
    maskedge: float = 5.0
    offset: float = 10.0  # initial sigma of offsets, Å
    # RELION's --fix_sigma_offset: sigma_offset stays at --offset (the M-step does not update it)
    fix_sigma_offset: bool = False
    init_blobs: bool = True
    nr_parts_sigma2noise: int = 1000
    minres_map: int = 5
    perturb: float = 0.5
    # The offset prior (one of OFFSET_PRIORS): "angst" (tamis's default), a Gaussian on the total
    # offset in Å around each class's mean offset (3D classes too); "relion", as relion_refine
    # computes it: the exponent mixes pixels and Å (translations held p times tighter on data of
    # pixel size p Å), RELION 5's class centres (shrunk by the class fraction), 3D centred on a
    # zero offset. "relion" is written to the optimiser file (data_tamis_options) and read back
    # on --continue. README, 2D classification, has the measurements behind the default.
    offset_prior: str = "angst"
    pipeline_control: Path | None = None
    # VDAM (--grad): RELION-4's gradient algorithm; see tamis.class2d.vdam
    grad: bool = False
    grad_ini_frac: float = 0.3
    grad_fin_frac: float = 0.2
    grad_ini_subset: int = -1  # -1: max(min(0.005 N, 10000), 200)
    grad_fin_subset: int = -1  # -1: max(min(0.05 N, 100000), 1000)
    grad_stepsize: float = -1.0  # -1: 0.3 for 2D
    grad_stepsize_scheme: str = ""  # "": "<0.9/stepsize>-step"; or "plain", "<inflate>-step"
    tau2_fudge_scheme: str = ""  # "": "<T>-step" (T rises from 1 to --tau2_fudge); or "plain"
    grad_write_iter: int = 10
    class_inactivity_threshold: float = 0.0
    mu: float = 0.9

    @property
    def relion_offset_prior(self) -> bool:
        """``--offset_prior relion``: the offset prior as RELION computes it."""
        return self.offset_prior == "relion"

    @classmethod
    def gui_em(cls, **overrides: object) -> Class2DOptions:
        """What RELION's GUI passes for an EM 2D job with its defaults (``--iter 25 --ctf
        --tau2_fudge 2 --flatten_solvent --zero_mask --center_classes --oversampling 1
        --psi_step 12 --offset_range 5 --offset_step 2 --norm --scale``), then ``overrides``."""
        base: dict[str, object] = dict(
            iter=25,
            ctf=True,
            tau2_fudge=2.0,
            flatten_solvent=True,
            zero_mask=True,
            center_classes=True,
            oversampling=1,
            psi_step=12.0,
            offset_range=5.0,
            offset_step=2.0,
            norm=True,
            scale=True,
        )
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]

    @classmethod
    def gui_vdam(cls, **overrides: object) -> Class2DOptions:
        """What RELION's GUI passes for a VDAM 2D job (its default algorithm): the EM options
        with ``--grad --class_inactivity_threshold 0.1 --grad_write_iter 10 --iter 200``."""
        base: dict[str, object] = dict(
            iter=200, grad=True, class_inactivity_threshold=0.1, grad_write_iter=10
        )
        base.update(overrides)
        return cls.gui_em(**base)


@dataclass
class ModelState:
    """Everything the next iteration needs (besides the per-particle table)."""

    refs: torch.Tensor  # (K, N, N) float32
    sigma2: torch.Tensor  # (n_optics, N//2+1) float64
    pdf_class: torch.Tensor  # (K,)
    pdf_direction: torch.Tensor  # (K, D): RELION's E-step prior per class and direction
    prior_offset: torch.Tensor  # (K, 2) Å
    sigma2_offset: float  # Å²
    avg_norm: float
    scale: torch.Tensor  # (n_groups,)
    data_vs_prior: torch.Tensor  # (K, N//2+1)
    fourier_coverage: torch.Tensor  # (K, N//2+1)
    sigma2_class: torch.Tensor  # (K, N//2+1)
    tau2: torch.Tensor  # (K, N//2+1), spectrum of the references that went into this iteration
    maxres: int  # shell of the current resolution
    iteration: int = 0
    perturbation: float = 0.0
    loglik: float = 0.0
    avg_pmax: float = 0.0
    acc_rot: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    acc_trans: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    @property
    def n_classes(self) -> int:
        return self.refs.shape[0]

    @property
    def box(self) -> int:
        return self.refs.shape[-1]


@dataclass
class WeightedSums:
    """Sums over particles gathered by the E-step, consumed by the M-step."""

    fimg: torch.Tensor  # (S, Pf, C) complex128: sum w c X_unmasked^t / sigma2 (S = K or 2K)
    fweight: torch.Tensor  # (S, Pf, C) float64: sum w c² / sigma2
    sigma2_noise: torch.Tensor  # (n_optics, nsh)
    sumw_optics: torch.Tensor  # (n_optics,)
    pdf_class: torch.Tensor  # (K,)
    prior_offset: torch.Tensor  # (K, 2) Å
    sigma2_offset: float = 0.0
    xa: torch.Tensor | None = None  # (n_groups,)
    aa: torch.Tensor | None = None
    norm_sum: float = 0.0
    loglik: float = 0.0
    pmax_sum: float = 0.0
    pdf_direction: torch.Tensor | None = None  # (K, D) in 3D; 2D's is ``pdf_class``

    @classmethod
    def zeros(
        cls,
        k: int,
        n_psi: int,
        n_pix: int,
        n_optics: int,
        nsh: int,
        n_groups: int,
        device,
        n_slots: int | None = None,
        n_directions: int = 1,
    ) -> WeightedSums:
        """``n_slots`` reconstruction sums (default ``k``; ``2k`` for VDAM's pseudo half-sets);
        per-direction class sums when there are several directions (3D)."""
        f64 = {"dtype": torch.float64, "device": device}
        slots = k if n_slots is None else n_slots
        return cls(
            fimg=torch.zeros((slots, n_psi, n_pix), dtype=torch.complex128, device=device),
            fweight=torch.zeros((slots, n_psi, n_pix), **f64),
            sigma2_noise=torch.zeros((n_optics, nsh), **f64),
            sumw_optics=torch.zeros(n_optics, **f64),
            pdf_class=torch.zeros(k, **f64),
            prior_offset=torch.zeros((k, 2), **f64),
            xa=torch.zeros(n_groups, **f64),
            aa=torch.zeros(n_groups, **f64),
            pdf_direction=torch.zeros((k, n_directions), **f64) if n_directions > 1 else None,
        )
