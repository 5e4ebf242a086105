"""RELION's learned direction prior (``pdf_direction`` per class and direction, 3D global
searches): the M-step's per-(class, direction) sums against a loop, the E-step's log-priors,
and the reset when the number of directions changes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch

from tamis.class2d.em import Class2DRun, add_direction_sums
from tamis.class2d.likelihood import Hypotheses


def _hypotheses(rng: np.random.Generator, *, dense: bool, subset: bool) -> Hypotheses:
    m, tf, k, npf = 9, 4, 3, 12
    weight = torch.from_numpy(rng.uniform(size=(m, tf)) * (rng.uniform(size=(m, tf)) > 0.3))
    fields = dict(
        particle=torch.from_numpy(rng.integers(0, 2, size=m)),
        cls=torch.from_numpy(rng.integers(0, k, size=m)),
        psi=torch.from_numpy(rng.integers(0, npf, size=m)),
        weight=weight,
        best_cls=torch.zeros(2, dtype=torch.long),
        best_psi=torch.zeros(2, dtype=torch.long),
        best_trans=torch.zeros(2, dtype=torch.long),
        pmax=torch.zeros(2, dtype=torch.float64),
        n_significant=torch.zeros(2, dtype=torch.long),
        loglik=torch.zeros(2, dtype=torch.float64),
    )
    if dense:
        active = torch.tensor([0, 2])
        fields["dense"] = torch.from_numpy(rng.uniform(size=(2, tf, 2 * npf))).float()
        fields["active"] = active
        fields["dense_rows"] = torch.tensor([2, 3])
    if subset:
        # fine psi j * n_over + a refines coarse subset[j] (n_over 2: 6 coarse of the subset)
        fields["coarse_subset"] = torch.tensor([1, 4, 5, 9, 12, 13])
    return Hypotheses(**fields)


def _loop_sums(hyp: Hypotheses, k: int, d: int, n_over: int, nr_psi: int, ids) -> np.ndarray:
    out = np.zeros((k, d))

    def add(cls: int, fine: int, w: float) -> None:
        coarse = fine // n_over
        if hyp.coarse_subset is not None:
            coarse = int(hyp.coarse_subset[coarse])
        if ids is not None:
            coarse = int(ids[coarse])
        out[cls, coarse // nr_psi] += w

    for m in range(len(hyp.cls)):
        add(int(hyp.cls[m]), int(hyp.psi[m]), float(hyp.weight[m].sum()))
    if hyp.dense is not None:
        npf = hyp.dense.shape[2] // len(hyp.active)
        for r in range(hyp.dense.shape[2]):
            cls = int(hyp.active[r // npf])
            add(cls, r % npf, float(hyp.dense[:, :, r].double().sum()))
    return out


def test_direction_sums_match_a_loop():
    rng = np.random.default_rng(3)
    k, n_over, nr_psi = 3, 2, 4
    for dense in (False, True):
        for subset in (False, True):
            for local in (False, True):
                hyp = _hypotheses(rng, dense=dense, subset=subset)
                # a local search's coarse ids: the batch's union, ascending, of 48 coarse
                ids = torch.tensor(sorted(rng.choice(48, size=16, replace=False)))
                ids = ids if local else None
                d = 12 if (local or subset) else 6
                out = torch.zeros((k, d), dtype=torch.float64)
                add_direction_sums(out, hyp, n_over, nr_psi, batch_ids=ids)
                ref = _loop_sums(hyp, k, d, n_over, nr_psi, ids)
                np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6)
                assert float(out.sum()) > 0


def _run(d: int, nr_psi: int = 3) -> SimpleNamespace:
    run = SimpleNamespace(sampling=SimpleNamespace(nr_psi=nr_psi), n_directions=lambda: d)
    run.direction_prior = lambda st: Class2DRun.direction_prior(run, st)
    return run


def test_direction_prior_resets_when_the_directions_change():
    # a class prior per class (a new run, 2D-like files): spread evenly over the directions
    st = SimpleNamespace(pdf_direction=torch.tensor([[0.25], [0.75]], dtype=torch.float64))
    pdir = Class2DRun.direction_prior(_run(4), st)
    np.testing.assert_allclose(pdir.numpy(), [[0.0625] * 4, [0.1875] * 4])
    # learned over 4 directions, then 16 (a HEALPix order change): 1 / (K D) everywhere
    st.pdf_direction = torch.tensor([[0.1, 0.2, 0.05, 0.15], [0.3, 0.1, 0.05, 0.05]]).double()
    learned = st.pdf_direction.clone()
    assert torch.equal(Class2DRun.direction_prior(_run(4), st), learned)
    pdir = Class2DRun.direction_prior(_run(16), st)
    assert pdir.shape == (2, 16) and torch.allclose(pdir, torch.full((2, 16), 1 / 32).double())


def test_orientation_priors_are_the_learned_prior_per_coarse_orientation():
    d, nr_psi = 4, 3
    pdir = torch.tensor([[0.1, 0.2, 0.0, 0.15], [0.3, 0.1, 0.05, 0.05], [0.01] * 4]).double()
    st = SimpleNamespace(
        pdf_direction=pdir.clone(), pdf_class=torch.tensor([0.4, 0.6, 0.0]).double()
    )
    run = _run(d, nr_psi)
    log_pc, log_dir = Class2DRun._orientation_priors(run, st, False)
    assert log_dir.shape == (3, d * nr_psi)
    assert math.isinf(float(log_pc[2])) and float(log_pc[2]) < 0  # an empty class
    for kk in range(2):
        for j in range(d * nr_psi):
            p = float(pdir[kk, j // nr_psi])
            total = float(log_pc[kk] + log_dir[kk, j])
            if p == 0:
                assert total == -math.inf  # RELION skips directions of zero prior
            else:
                # the class's total times its direction's share of it: D times the prior
                assert math.isclose(total, math.log(d * p), rel_tol=1e-12)
    # flat within each class, a local search, or one direction (2D): the class part alone
    st.pdf_direction = torch.tensor([[0.1] * 4, [0.2] * 4, [0.0] * 4]).double()
    log_pc, log_dir = Class2DRun._orientation_priors(run, st, False)
    assert log_dir is None and math.isclose(float(log_pc[1] - log_pc[0]), math.log(2.0))
    assert math.isclose(float(log_pc[0]), math.log(0.4), rel_tol=1e-6)  # the class total
    st.pdf_direction = pdir.clone()
    assert Class2DRun._orientation_priors(run, st, True)[1] is None
    st.pdf_direction = torch.tensor([[0.4], [0.6], [0.0]]).double()
    log_pc, log_dir = Class2DRun._orientation_priors(_run(1), st, False)
    assert log_dir is None and torch.equal(log_pc[:2], torch.log(st.pdf_direction[:2, 0]))
