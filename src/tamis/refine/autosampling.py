"""RELION's auto-sampling and convergence rules for 3D (``MlOptimiser::updateAngularSampling``,
``updateOverallChangesInHiddenVariables``, ``checkConvergence``), as pure functions of the run's
history so that every decision can be replayed and tested on scripted iterations.

Two callers: the initial model (VDAM's branch: every tenth iteration, never into local searches)
and gold-standard auto-refine (the EM branch: every iteration after the first, local searches from
``--auto_local_healpix_order`` on). Translations are in Å throughout, as RELION's since 3.1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tamis.orientations import angular_sampling

__all__ = [
    "refined_translations",
    "HiddenChanges",
    "AutoSampling",
]

#: ``MAX_NR_ITER_WO_RESOL_GAIN`` and ``MAX_NR_ITER_WO_LARGE_HIDDEN_VARIABLE_CHANGES``
#: (``ml_optimiser.h``).
MAX_ITER_WITHOUT_GAIN = 1
MAX_ITER_WITHOUT_CHANGES = 1


def refined_translations(
    old_step: float,
    old_range: float,
    acc_trans: float,
    offset_change: float,
    oversampling: int,
) -> tuple[float, float]:
    """RELION's translational auto-sampling (coarse step and range, Å) for particle images:
    step ``min(1.5, 0.75 acc_trans) 2^os``, range ``min(1.3 old_range, 5 RMS offset change)``,
    at least 1.5 steps, halved above 4 steps (and the step raised to range / 4 if still above);
    the old pair is kept if the step would grow."""
    step = min(1.5, 0.75 * acc_trans) * 2.0**oversampling
    rng = min(1.3 * old_range, 5.0 * offset_change)
    rng = max(rng, 1.5 * step)
    if rng > 4 * step:
        rng /= 2.0
    if rng > 4 * step:
        step = rng / 4.0
    if step > old_step:
        return old_step, old_range
    return step, rng


@dataclass(frozen=True)
class HiddenChanges:
    """One iteration's mean changes of the hidden variables (``monitorHiddenVariableChanges``):
    orientation (deg, symmetry-aware), RMS offset per coordinate (Å), fraction of class changes."""

    orientations: float
    offsets: float
    classes: float


@dataclass(frozen=True)
class AutoSampling:
    """The auto-sampling state of a gold-standard refinement, advanced one iteration at a time.

    ``healpix_order`` is the coarse order (the fine step is one oversampling finer);
    ``offset_step``/``offset_range`` are the coarse translations (Å). ``sigma_ang`` > 0 once local
    searches are on (the prior's sigma on rot, tilt and psi, deg).
    """

    healpix_order: int
    oversampling: int
    offset_step: float
    offset_range: float
    auto_local_healpix_order: int = 4
    iters_without_resolution_gain: int = 0
    iters_without_large_changes: int = 0
    smallest_class_changes: float = 9999999.0
    smallest_offset_changes: float = 999.0
    smallest_orientation_changes: float = 999.0
    fine_enough: bool = False
    sigma_ang: float = 0.0
    resolution: float = 0.0  # 1/Å, the current resolution (the gain counter compares with it)

    @property
    def fine_step(self) -> float:
        return angular_sampling(self.healpix_order, self.oversampling)

    @property
    def fine_offset_step(self) -> float:
        return self.offset_step / 2.0**self.oversampling

    @property
    def local_searches(self) -> bool:
        return self.sigma_ang > 0

    def after_resolution(self, resolution: float) -> AutoSampling:
        """``updateCurrentResolution``'s counter: an iteration whose new resolution (1/Å) is not
        more than 1e-4 1/Å above the current one counts as without gain; a gain resets it."""
        gained = resolution > self.resolution + 1e-4
        return replace(
            self,
            resolution=resolution,
            iters_without_resolution_gain=0 if gained else self.iters_without_resolution_gain + 1,
        )

    def after_changes(
        self, changes: HiddenChanges, steps: tuple[float, float] | None = None
    ) -> AutoSampling:
        """``updateOverallChangesInHiddenVariables``: the counter grows when none of the class,
        offset and orientation changes fell below 97% of the smallest seen (offsets and
        orientations also count as settled below 40% of a fine step), and resets otherwise.

        The fine steps of that 40% are the current ones, or ``steps`` (angular deg, offset Å):
        RELION's gold-standard refinement runs only under MPI, and there the leader, which
        applies this rule, never updates its own sampling (only the followers do, in
        ``expectationSetup``), so the steps it reads are those it started with (read from the
        optimiser files on ``--continue``). Seen in RELION 5's run files: a change of 2.5 deg at
        the 1.875 deg step counted as settled (2.5 / 7.5, the starting step, < 0.4)."""
        angular, offset = steps if steps is not None else (self.fine_step, self.fine_offset_step)
        ratio_orient = changes.orientations / angular
        ratio_trans = changes.offsets / offset
        settled = (
            1.03 * changes.classes >= self.smallest_class_changes
            and (ratio_trans < 0.40 or 1.03 * changes.offsets >= self.smallest_offset_changes)
            and (
                ratio_orient < 0.40
                or 1.03 * changes.orientations >= self.smallest_orientation_changes
            )
        )
        return replace(
            self,
            iters_without_large_changes=self.iters_without_large_changes + 1 if settled else 0,
            smallest_class_changes=(
                float(round(changes.classes))
                if changes.classes < self.smallest_class_changes
                else self.smallest_class_changes
            ),
            smallest_offset_changes=min(changes.offsets, self.smallest_offset_changes),
            smallest_orientation_changes=min(
                changes.orientations, self.smallest_orientation_changes
            ),
        )

    def converged(self, auto_ignore_angles: bool = False) -> bool:
        """``checkConvergence``: fine enough sampling, no resolution gain, and settled hidden
        variables (unless ``--auto_ignore_angles``)."""
        return (
            self.fine_enough
            and self.iters_without_resolution_gain >= MAX_ITER_WITHOUT_GAIN
            and (auto_ignore_angles or self.iters_without_large_changes >= MAX_ITER_WITHOUT_CHANGES)
        )

    def updated(
        self,
        *,
        resolution: float,
        particle_diameter: float,
        acc_rot: float,
        acc_trans: float,
        offset_change: float,
        auto_resol_angles: bool = False,
        auto_ignore_angles: bool = False,
    ) -> AutoSampling:
        """The EM branch of ``updateAngularSampling`` (every iteration after the first):
        ``resolution`` in 1/Å, ``particle_diameter`` in Å, accuracies in deg and Å, the RMS offset
        change in Å."""
        old_step = self.fine_step
        res_step = 360.0 / math.ceil(math.pi * particle_diameter * resolution)
        proceed_res = (
            auto_resol_angles
            and res_step < old_step
            and self.healpix_order + 1 != self.auto_local_healpix_order
        ) or self.iters_without_resolution_gain >= MAX_ITER_WITHOUT_GAIN
        proceed_hid = (
            auto_ignore_angles or self.iters_without_large_changes >= MAX_ITER_WITHOUT_CHANGES
        )
        if not (proceed_res and proceed_hid):
            return self
        if old_step < 0.75 * acc_rot:
            return replace(self, fine_enough=True)
        step, rng = refined_translations(
            self.offset_step, self.offset_range, acc_trans, offset_change, self.oversampling
        )
        order = self.healpix_order + 1
        new_fine = angular_sampling(order, self.oversampling)
        sigma = 2.0 * new_fine if order >= self.auto_local_healpix_order else self.sigma_ang
        return replace(
            self,
            healpix_order=order,
            offset_step=step,
            offset_range=rng,
            fine_enough=False,
            iters_without_resolution_gain=0,
            iters_without_large_changes=0,
            smallest_class_changes=9999999.0,
            smallest_offset_changes=999.0,
            smallest_orientation_changes=999.0,
            sigma_ang=sigma,
        )
