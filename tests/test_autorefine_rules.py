"""RELION's auto-refine rules (auto-sampling, convergence, FSC -> tau2, resolution, half sets) on
scripted iteration histories, each value worked out by hand from RELION's code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tamis.errors import TamisError
from tamis.refine.autosampling import AutoSampling, HiddenChanges, refined_translations
from tamis.refine.gold_standard import random_halves, resolution_shell, ssnr_tau2_from_fsc


def test_refined_translations_by_hand():
    # step min(1.5, 0.75 * 1.0) * 2 = 1.5; range min(1.3 * 12, 5 * 2) = 10 > 4 steps -> 5
    assert refined_translations(3.0, 12.0, 1.0, 2.0, 1) == pytest.approx((1.5, 5.0))
    # a large offset change: range min(15.6, 50) = 15.6 -> 7.8 > 6 -> step 7.8 / 4 = 1.95
    assert refined_translations(3.0, 12.0, 1.0, 10.0, 1) == pytest.approx((1.95, 7.8))
    # the step would grow (3 > 2): the old pair is kept
    assert refined_translations(2.0, 8.0, 4.0, 1.0, 1) == (2.0, 8.0)
    # a tiny offset change: range at least 1.5 steps
    assert refined_translations(3.0, 12.0, 0.4, 0.01, 1) == pytest.approx((0.6, 0.9))


def _state(**kw) -> AutoSampling:
    base = dict(healpix_order=2, oversampling=1, offset_step=2.0, offset_range=10.0)
    base.update(kw)
    return AutoSampling(**base)


def test_hidden_variable_counter():
    s = _state()
    ch = HiddenChanges(orientations=5.0, offsets=1.0, classes=0.0)
    s = s.after_changes(ch)  # first: below every smallest seen -> reset, smallest recorded
    assert s.iters_without_large_changes == 0
    assert (s.smallest_orientation_changes, s.smallest_offset_changes) == (5.0, 1.0)
    s = s.after_changes(ch)  # the same again: settled
    assert s.iters_without_large_changes == 1
    # orientations drop by more than 3% and are above 40% of the fine step (7.5 deg): reset
    s = s.after_changes(HiddenChanges(orientations=4.0, offsets=1.0, classes=0.0))
    assert s.iters_without_large_changes == 0
    # a further drop, but below 40% of the fine step (3 deg): counts as settled
    s = s.after_changes(HiddenChanges(orientations=1.0, offsets=1.0, classes=0.0))
    assert s.iters_without_large_changes == 1


def test_hidden_variable_counter_reads_the_leaders_starting_steps():
    """RELION 5's MPI auto-refine (2,000 C4 particles, benchmarks/auto_refine.py): iterations
    6-7 at HEALPix order 3 (fine step 1.875 deg) changed 5.47 then 2.66 deg, and its optimiser
    file counted iteration 7 as settled (rlnNumberOfIterWithoutChangingAssignments 1): 2.66 deg
    is below 40% of 7.5 deg, the leader's starting step, not of 1.875 deg."""
    s = _state(healpix_order=3, offset_step=8.0 * 0.6)  # after the move to order 3
    start = (7.5, 4.0)  # order 2's fine step, the starting 8 A coarse offset step / 2
    s = s.after_changes(HiddenChanges(orientations=5.47, offsets=1.65, classes=0.0), start)
    assert s.iters_without_large_changes == 0  # the first after a change: classes reset it
    own = s.after_changes(HiddenChanges(orientations=2.66, offsets=0.75, classes=0.0))
    assert own.iters_without_large_changes == 0  # 2.66 / 1.875 > 0.4 and 2.66 < 0.97 x 5.47
    s = s.after_changes(HiddenChanges(orientations=2.66, offsets=0.75, classes=0.0), start)
    assert s.iters_without_large_changes == 1


def test_scripted_refinement_to_local_searches_and_convergence():
    kw = dict(particle_diameter=200.0, acc_trans=1.0, offset_change=1.0)
    s = _state()
    # iteration 2: the resolution improved, nothing changes
    s = s.after_resolution(1 / 20)
    s2 = s.updated(resolution=1 / 20, acc_rot=2.0, **kw)
    assert s2 == s
    # no gain and settled hidden variables: HEALPix order 3, translations refined
    s = s.after_resolution(1 / 20)
    ch = HiddenChanges(orientations=3.0, offsets=0.5, classes=0.0)
    s = s.after_changes(ch).after_changes(ch)
    assert (s.iters_without_resolution_gain, s.iters_without_large_changes) == (1, 1)
    s = s.updated(resolution=1 / 20, acc_rot=2.0, **kw)
    assert s.healpix_order == 3 and not s.local_searches and not s.fine_enough
    assert s.offset_step == pytest.approx(1.5) and s.offset_range == pytest.approx(5.0)
    assert (s.iters_without_resolution_gain, s.iters_without_large_changes) == (0, 0)
    assert s.smallest_orientation_changes == 999.0
    # again: order 4 = --auto_local_healpix_order: local searches, sigma 2 x 1.875 deg
    s = s.after_resolution(1 / 20).after_changes(ch).after_changes(ch)
    s = s.updated(resolution=1 / 20, acc_rot=2.0, **kw)
    assert s.healpix_order == 4 and s.sigma_ang == pytest.approx(3.75)
    assert not s.converged()
    # an accuracy of 3 deg: the fine step (1.875) is below 0.75 x 3: fine enough, and converged
    # as resolution and hidden variables have settled
    s = s.after_resolution(1 / 20).after_changes(ch).after_changes(ch)
    s = s.updated(resolution=1 / 20, acc_rot=3.0, **kw)
    assert s.healpix_order == 4 and s.fine_enough
    assert s.converged()
    assert not _state(fine_enough=True).converged()


def test_resolution_based_angles_proceed_despite_a_gain():
    s = _state(iters_without_large_changes=1)
    # 360 / ceil(pi * 200 * 0.05) = 11.25 deg: not finer than the fine step (7.5): no change
    kw = dict(particle_diameter=200.0, acc_rot=2.0, acc_trans=1.0, offset_change=1.0)
    assert s.updated(resolution=0.05, auto_resol_angles=True, **kw) == s
    # at 1/6 1/A: 360 / ceil(104.7) = 3.43 deg < 7.5: proceed to order 3
    assert s.updated(resolution=1 / 6, auto_resol_angles=True, **kw).healpix_order == 3
    # ... but not into the local-search order by this route
    s3 = _state(healpix_order=3, iters_without_large_changes=1)
    assert s3.updated(resolution=1 / 2, auto_resol_angles=True, **kw) == s3


def test_ssnr_tau2_from_fsc():
    fsc = torch.tensor([1.0, 0.95, 0.5, 0.143, 0.0005, -0.2], dtype=torch.float64)
    sigma2 = torch.tensor([2.0, 3.0, 4.0, 5.0, 6.0, 7.0], dtype=torch.float64)
    ssnr, tau2 = ssnr_tau2_from_fsc(fsc, sigma2, tau2_fudge=2.0)
    f = np.clip(np.maximum(fsc.numpy(), 0.001), None, 0.999)
    np.testing.assert_allclose(ssnr.numpy(), 2.0 * f / (1 - f))
    np.testing.assert_allclose(tau2.numpy(), ssnr.numpy() * sigma2.numpy())
    # joined halves (the final iteration): FSC 0.143 gives SSNR 1 with T = 1
    ssnr_j, _ = ssnr_tau2_from_fsc(
        torch.tensor([0.143], dtype=torch.float64), sigma2[:1], 1.0, True
    )
    assert float(ssnr_j[0]) == pytest.approx(1.0, rel=1e-3)


def test_resolution_shell():
    n = 40
    ssnr = torch.full((n // 2 + 1,), 0.5, dtype=torch.float64)
    ssnr[:12] = 3.0
    assert resolution_shell(ssnr, n, gold_standard=False) == 11
    # a dip at shell 8 (e.g. phase randomisation) with signal to 11: gold-standard runs look
    # from the high-resolution side and take 11 (more than 3 shells beyond 7)
    ssnr[8] = 0.5
    assert resolution_shell(ssnr, n, gold_standard=False) == 7
    assert resolution_shell(ssnr, n, gold_standard=True) == 11
    # a dip at 10 with signal to 11: 11 is not more than 3 shells beyond 9
    ssnr[8] = 3.0
    ssnr[10] = 0.5
    assert resolution_shell(ssnr, n, gold_standard=True) == 9
    assert resolution_shell(torch.zeros(21, dtype=torch.float64), n, gold_standard=True) == 5


def test_random_halves():
    h = random_halves(None, 1000, seed=3)
    assert set(np.unique(h)) == {1, 2} and 400 < (h == 1).sum() < 600
    np.testing.assert_array_equal(random_halves(None, 1000, seed=3), h)
    keep = np.array([2, 1, 1, 2])
    np.testing.assert_array_equal(random_halves(keep, 4, seed=0), keep)
    assert set(random_halves(np.zeros(50), 50, seed=1)) == {1, 2}
    with pytest.raises(TamisError, match="rlnRandomSubset"):
        random_halves(np.array([1, 0, 2]), 3, seed=0)


@pytest.mark.parametrize("sym", ["C1", "C4", "D2"])
def test_orientation_change_is_relions_mean_axis_angle(sym):
    """The change of orientation that auto-sampling reads is RELION's
    (``HealpixSampling::calculateAngularDistance``): per symmetry mate ``B R``, the mean over the
    three rows of the angle between the rows of ``A`` and ``B R``; the smallest over the mates.
    A loop written from that, and a turn by t about z (rows x and y move by t, z not): 2t/3."""
    from tamis.orientations import euler_to_matrix
    from tamis.refine.volume_run import axes_distances
    from tamis.symmetry import symmetry_operators

    gen = np.random.default_rng(5)
    n = 40
    ang_a = gen.uniform([-180, 0, -180], [180, 180, 180], (n, 3))
    ang_b = ang_a + gen.normal(0, 6, (n, 3))
    ang_b[:5] = gen.uniform([-180, 0, -180], [180, 180, 180], (5, 3))  # large changes too
    a = euler_to_matrix(*torch.from_numpy(ang_a).T)
    b = euler_to_matrix(*torch.from_numpy(ang_b).T)
    got = axes_distances(a, b, sym).numpy()
    ops = symmetry_operators(sym).to(torch.float64).numpy()
    for i in range(n):
        best = 3600.0
        for g in ops:
            mate = b[i].numpy() @ g
            rows = [
                np.degrees(np.arccos(np.clip(np.dot(a[i, r].numpy(), mate[r]), -1, 1)))
                for r in range(3)
            ]
            best = min(best, sum(rows) / 3)
        assert got[i] == pytest.approx(best, abs=1e-9)
    t = 9.0
    turn = euler_to_matrix(*torch.tensor([[t], [0.0], [0.0]], dtype=torch.float64))  # about z
    eye = torch.eye(3, dtype=torch.float64)[None]
    assert float(axes_distances(eye, turn, "C1")[0]) == pytest.approx(2 * t / 3)
