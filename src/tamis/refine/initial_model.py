"""RELION-4's de novo 3D initial model (``relion_refine --denovo_3dref --grad``): VDAM over 3D
references, on the same E-step and M-step as 2D classification.

What differs from 2D VDAM (``../shared/docs/relion-3d-inimodel-refine.md`` §3): references are
volumes (:class:`~tamis.refine.space.VolumeSpace`: sections, back-projection, symmetrisation);
orientations come from the HEALPix grid (:class:`~tamis.refine.sampling.Sampling3D`); the
initial references are random-angle reconstructions of the first particles turned into 3D
Gaussian blobs; RELION's 3D schedule constants (step 0.9 -> 0.5, mini-batches up to 5,000 /
50,000, ``100 K`` significant poses); every iteration ends with a spherical solvent mask to
zero; no norm, scale or centring.

Auto-sampling (``--auto_sampling``, on in the InitialModel job; RELION's
``updateAngularSampling`` for VDAM): at iterations 10, 20, ... when the resolution did not improve
in the last iteration and the fine angular step is not already below 75% of the best class's
expected rotational accuracy, the HEALPix order goes up by one (never to
``--auto_local_healpix_order``, 4: so at most 15 -> 7.5 -> 3.75 degrees fine) and the
translations are re-chosen from the translational accuracy and the offset changes. The accuracy
estimates (100 particles, one of rot / tilt / psi turned per particle, in turn where RELION draws
it at random) are made at iteration 1, at iterations 9, 19, ... (so that the decision at 10, 20,
... has them: RELION estimates at the start of iteration 10 with the references of that moment,
tamis at the start of iteration 9, one update earlier) and at the last iteration.

The E-step's orientation prior is RELION's learned ``pdf_direction`` per class and direction
(``1 / (K D)`` at the start and after each HEALPix order change, then ``0.9 old + 0.1`` the
mini-batch's share of each (class, direction); the last iteration, over every particle, takes
its share alone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tamis import distributed
from tamis.class2d.em import Class2DResult
from tamis.class2d.files import ContinueState
from tamis.class2d.job import run_class2d
from tamis.class2d.state import Class2DOptions
from tamis.class2d.vdam import VdamRun
from tamis.errors import TamisError
from tamis.io.particles import ParticleSet
from tamis.orientations import angular_sampling
from tamis.refine.autosampling import refined_translations
from tamis.refine.volume_run import VolumeRun, best_accuracy

__all__ = ["InitialModelOptions", "InitialModelRun", "InitialModelResult", "run_initial_model"]


@dataclass
class InitialModelOptions(Class2DOptions):
    """``relion_refine`` options of an InitialModel job; defaults as RELION's command for it
    (``--iter 200 --grad --denovo_3dref --K 3 --sym C1 --flatten_solvent --zero_mask --pad 1
    --oversampling 1 --healpix_order 1 --offset_range 6 --offset_step 2 --tau2_fudge 4``)."""

    K: int = 3
    iter: int = 200
    grad: bool = True
    denovo_3dref: bool = True
    sym: str = "C1"
    healpix_order: int = 1
    flatten_solvent: bool = True
    zero_mask: bool = True
    ctf: bool = True
    pad: int = 1
    oversampling: int = 1
    offset_range: float = 6.0
    offset_step: float = 2.0
    tau2_fudge: float = 4.0
    auto_sampling: bool = True  # the InitialModel job passes --auto_sampling
    auto_local_healpix_order: int = 4


class InitialModelRun(VolumeRun, VdamRun):
    """A VDAM run whose references are volumes."""

    def __init__(self, particles: ParticleSet, options: InitialModelOptions, root: str, **kw):
        if len(particles) == 0:
            raise TamisError(f"{particles.source or 'particles'}: no particles")
        if options.center_classes:
            raise TamisError("--center_classes is for 2D classes; the initial model is not centred")
        if options.K > len(particles):
            raise TamisError(f"--K {options.K}: more classes than particles ({len(particles)})")
        super().__init__(particles, options, root, **kw)
        self._init_volumes(particles, options.healpix_order)
        self.auto_sampling = options.auto_sampling
        self.iters_without_resolution_gain = 0
        self._last_maxres: int | None = None
        self._offset_change: float | None = None  # RMS offset change (A) of the last iteration

    def estimates_accuracy(self, it: int) -> bool:
        return it == 1 or (it + 1) % 10 == 0 or it == self.options.iter

    def iterate(self, it: int, *, abort=None) -> tuple[float, float, float]:
        self._update_sampling(it)
        changes = super().iterate(it, abort=abort)
        self._offset_change = changes[1]  # the mini-batch's RMS offset change (A)
        return changes

    def _update_sampling(self, it: int) -> None:
        """RELION's auto-sampling for VDAM (``updateAngularSampling``), before iteration ``it``."""
        st = self.state
        assert st is not None
        if self._last_maxres is not None:
            gained = st.maxres > self._last_maxres
            self.iters_without_resolution_gain = (
                0 if gained else self.iters_without_resolution_gain + 1
            )
        self._last_maxres = st.maxres
        if it < 10:
            self.iters_without_resolution_gain = 0
        if not (self.auto_sampling and it > 1 and it % 10 == 0):
            return
        if self.iters_without_resolution_gain < 1:
            return
        smp = self.sampling
        acc_rot = best_accuracy(st.acc_rot)
        if angular_sampling(smp.healpix_order, smp.oversampling) < 0.75 * acc_rot:
            return  # fine enough
        if smp.healpix_order + 1 >= self.options.auto_local_healpix_order:
            return  # VDAM never enters local searches
        self._update_translations(st)
        smp.set_order(smp.healpix_order + 1)
        self.iters_without_resolution_gain = 0
        self.log(
            f"auto-sampling: angular step {angular_sampling(smp.healpix_order, smp.oversampling):g} deg (HEALPix "
            f"order {smp.healpix_order}), offsets {smp.offset_range * self.pixel:.1f} A in steps "
            f"of {smp.offset_step * self.pixel:.1f} A (accuracy {acc_rot:.1f} deg)"
        )

    def _update_translations(self, st) -> None:
        """RELION's translational part of auto-sampling, in Angstrom."""
        smp, px = self.sampling, self.pixel
        old_step, old_range = smp.offset_step * px, smp.offset_range * px
        change = old_range if self._offset_change is None else self._offset_change
        step, rng = refined_translations(
            old_step, old_range, best_accuracy(st.acc_trans), change, smp.oversampling
        )
        smp.offset_step, smp.offset_range = step / px, rng / px

    def particle_table(self, rows: slice | None = None) -> pd.DataFrame:
        return self._volume_table(super().particle_table(rows), rows)

    def restore(self, cont: ContinueState, data: pd.DataFrame) -> None:
        """The moments (VDAM's), the first two Euler angles and the HEALPix order."""
        super().restore(cont, data)
        self._restore_volumes(cont, data)
        opt = cont.optimiser
        if "rlnDoAutoSampling" in opt:
            self.auto_sampling = bool(int(opt["rlnDoAutoSampling"]))
        self.iters_without_resolution_gain = int(opt.get("rlnNumberOfIterWithoutResolutionGain", 0))
        self._last_maxres = self.state.maxres if self.state is not None else None

    def extra_optimiser_labels(self) -> dict:
        return {
            **super().extra_optimiser_labels(),
            "rlnDoAutoSampling": int(self.auto_sampling),
            "rlnNumberOfIterWithoutResolutionGain": self.iters_without_resolution_gain,
        }


@dataclass
class InitialModelResult:
    """The run's last files, the chosen class and the written initial model."""

    run: Class2DResult
    initial_model: Path
    chosen_class: int  # 1-based
    symmetry_score: float | None  # unsymmetric share of the chosen map after alignment


def run_initial_model(
    particles_path: str | Path | None,
    output_root: str,
    options: InitialModelOptions,
    *,
    initial_model_sym: str | None = None,
    continue_from: str | Path | None = None,
    changed: frozenset[str] | set[str] = frozenset(),
    log: Callable[[str], None] = print,
    show_progress: bool = False,
) -> InitialModelResult:
    """The InitialModel job: ``relion_refine --denovo_3dref --grad`` into ``output_root``
    (``<job>/run``), then ``relion_align_symmetry --select_largest_class`` into
    ``<job>/initial_model.mrc`` (aligned to ``initial_model_sym`` and symmetrised when that is
    not C1; in C1 the largest class is copied)."""
    from tamis.refine.align_symmetry import align_symmetry_file
    from tamis.symmetry import canonical_symmetry

    if not options.grad:
        raise TamisError("the initial model is made with --grad (VDAM)")
    canonical_symmetry(options.sym)  # one clear error for an unknown group, before any work
    if initial_model_sym is not None:
        canonical_symmetry(initial_model_sym)
    result = run_class2d(
        particles_path,
        output_root,
        options,
        continue_from=continue_from,
        changed=changed,
        log=log,
        show_progress=show_progress,
        run_type=InitialModelRun,
    )
    # the job directory: where the run wrote its files (on --continue the root comes from there)
    out = Path(result.optimiser).parent / "initial_model.mrc"
    k = int(np.argmax(result.class_fractions)) + 1  # the class align_symmetry takes
    if not distributed.is_main():  # under torchrun rank 0 writes the model
        return InitialModelResult(
            run=result, initial_model=out, chosen_class=k, symmetry_score=None
        )
    sym = initial_model_sym or "C1"
    aligned = align_symmetry_file(result.model, out, sym, select="largest", apply_sym=True)
    score = None if canonical_symmetry(sym) == "C1" else aligned.score
    if score is not None:
        log(f"{sym} axes found in class {k}: {100 * score:.1f}% of its power unsymmetric")
    return InitialModelResult(run=result, initial_model=out, chosen_class=k, symmetry_score=score)
