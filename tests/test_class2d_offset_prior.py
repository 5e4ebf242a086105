"""The offset prior as RELION computes it (pixels and Å mixed, its pitfall P12) against loops
written from RELION's code, and one continued iteration of a RELION run against RELION's own."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tamis.class2d import mstep
from tamis.class2d.em import _log_prior_offset
from tamis.class2d.files import continued_options, read_continue
from tamis.class2d.job import _run_class
from tamis.class2d.sampling import Sampling
from tamis.class2d.state import Class2DOptions, WeightedSums
from tamis.errors import TamisError
from tamis.io.particles import ParticleSet

FIXTURE = Path(__file__).parent / "data" / "relion_class2d_hard"
#: rlnSamplingPerturbInstance of RELION's iteration 2 (its run_it002_sampling.star)
RELION_IT2_PERTURBATION = 0.314608


def _relion_log_pdf_offset(off_px, t_px, mu, sigma2, pixel):
    """``convertAllSquaredDifferencesToWeights`` (2D), one hypothesis at a time: ``offset = old
    offset (px) + sampling.translations (Å)``, ``tdiff2 = -|offset - prior|² / (2 sigma2)``,
    then ``tdiff2 *= pixel²``; ``pdf = exp(tdiff2) / (2 pi sigma2)``."""
    b, t, k = off_px.shape[0], t_px.shape[0], mu.shape[0]
    out = np.zeros((b, k, t))
    for i in range(b):
        for c in range(k):
            for j in range(t):
                tdiff2 = 0.0
                for a in range(2):
                    offset = off_px[i, a] + t_px[j, a] * pixel  # translations_x are in Å
                    tdiff2 += (offset - mu[c, a]) ** 2 / (-2.0 * sigma2)
                tdiff2 *= pixel * pixel
                out[i, c, j] = tdiff2 - math.log(2 * math.pi * sigma2)
    return out


@pytest.mark.parametrize("pixel", [1.0, 2.5, 4.0])
def test_offset_prior_as_relion_writes_it(pixel):
    rng = np.random.default_rng(5)
    off = np.round(rng.normal(scale=2.0, size=(3, 2)))  # rounded old offsets, px
    t = Sampling(offset_range=5, offset_step=2).coarse_translations(perturbed=False)
    mu = rng.normal(scale=1.5, size=(4, 2))  # class priors, Å
    sigma2 = 40.0
    args = (torch.from_numpy(off), torch.from_numpy(t), torch.from_numpy(mu), sigma2, pixel)
    got = _log_prior_offset(*args, mixed_units=True).numpy()
    np.testing.assert_allclose(got, _relion_log_pdf_offset(off, t, mu, sigma2, pixel), rtol=1e-12)
    # --offset_prior angst (the default): the total offset in Å around the prior
    angst = _log_prior_offset(*args).numpy()
    total = pixel * (off[:, None, None, :] + t[None, None])  # (B, 1, T, 2)
    ref = -((total - mu[None, :, None, :]) ** 2).sum(-1) / (2 * sigma2)
    np.testing.assert_allclose(angst, ref - math.log(2 * math.pi * sigma2), rtol=1e-12)
    if pixel == 1.0:
        np.testing.assert_allclose(got, angst, rtol=1e-12)
    else:  # RELION's translations are held tighter: the prior falls off faster with |t|
        far = np.argmax((t**2).sum(1))
        assert np.all(got[..., far] < angst[..., far])


def test_offset_sums_with_the_prior_times_pixel_are_relions():
    """``storeWeightedSums``: ``prior_offset_class += w p (o + t)`` (Å) and ``sigma2_offset += w
    p² |prior - o - t|²`` with the prior in Å and o + t in pixels; tamis passes ``p prior``."""
    rng = np.random.default_rng(8)
    n, tf, k, pixel = 7, 9, 3, 3.5
    w = torch.from_numpy(rng.random((n, tf)))
    particle = torch.from_numpy(rng.integers(0, 4, n))
    cls = torch.from_numpy(rng.integers(0, k, n))
    off = torch.from_numpy(np.round(rng.normal(scale=2, size=(4, 2))))
    t = torch.from_numpy(rng.normal(scale=3, size=(tf, 2)))
    mu = torch.from_numpy(rng.normal(scale=1.5, size=(k, 2)))
    sums = WeightedSums.zeros(k, 1, 1, 1, 8, 1, "cpu")
    mstep._offset_sums(sums, w, particle, cls, off, t, mu * pixel, pixel)
    prior_ref, sigma_ref = np.zeros((k, 2)), 0.0
    for m in range(n):
        for j in range(tf):
            wt = float(w[m, j])
            o, c = off[int(particle[m])].numpy(), int(cls[m])
            prior_ref[c] += wt * pixel * (o + t[j].numpy())
            for a in range(2):
                diff = float(mu[c, a]) - o[a] - float(t[j, a])
                sigma_ref += wt * pixel * pixel * diff * diff
    np.testing.assert_allclose(sums.prior_offset.numpy(), prior_ref, rtol=1e-12)
    assert sums.sigma2_offset == pytest.approx(sigma_ref, rel=1e-12)


def test_class_offset_priors_as_relion_5_and_as_class_means(in_fixture):
    """--offset_prior relion, as RELION 5's ``maximizationOtherParameters``:
    ``prior_offset_class[k] = wsum[k] / sum of all weights`` (2D); angst: each class's mean."""
    run = _fixture_run(Class2DOptions(j=1, device="cpu"), in_fixture)
    st, k = run.state, run.state.n_classes
    n_groups = len(run.groups)
    sums = WeightedSums.zeros(k, 1, 1, 1, 33, n_groups, "cpu")
    sums.pdf_class[:] = torch.linspace(1.0, 3.0, k, dtype=torch.float64)
    sums.prior_offset[:] = torch.arange(2 * k, dtype=torch.float64).view(k, 2)
    sums.sigma2_offset = 50.0
    counts = torch.ones(n_groups, dtype=torch.float64)
    for prior, norm in (("relion", sums.pdf_class.sum()), ("angst", sums.pdf_class[:, None])):
        o = replace(run.options, offset_prior=prior)
        new = mstep.update_other_parameters(
            st, sums, options=o, group_counts=counts, do_scale=False, mu=0.0
        )
        np.testing.assert_allclose(new.prior_offset.numpy(), (sums.prior_offset / norm).numpy())
    # 3D references: RELION centres the prior on a zero total offset (no class prior), also
    # when a continued tamis run had one and VDAM's momentum would keep part of it
    st3 = replace(st, refs=torch.zeros((k, 8, 8, 8)), prior_offset=torch.ones((k, 2)))
    for mu in (0.0, 0.9):
        new = mstep.update_other_parameters(
            st3, sums, options=replace(run.options, offset_prior="relion"),
            group_counts=counts, do_scale=False, mu=mu,
        )  # fmt: skip
        assert torch.count_nonzero(new.prior_offset) == 0


def _fixture_run(given: Class2DOptions, work: Path):
    """The RELION run's iteration 1 (30 of its particles), continued from the project
    directory ``work`` (the fixture's paths are relative to it)."""
    cont = read_continue("run_it001_optimiser.star")
    options = continued_options(cont, given, frozenset())
    particles = ParticleSet.from_file(cont.data_path)
    run = _run_class(options)(particles, options, str(work / "out" / "run"), log=lambda _: None)
    run.load_continue("run_it001_optimiser.star")
    return run


@pytest.fixture
def in_fixture(tmp_path, monkeypatch):
    work = tmp_path / "project"
    shutil.copytree(FIXTURE, work)
    monkeypatch.chdir(work)
    return work


def _continue_one_iteration(work: Path, monkeypatch, **options):
    """Iteration 2 continued from the fixture (its perturbation drawn from RELION's seed as
    RELION draws it); the particle table and the run (written as iteration 2 under
    ``work/out``), and the class offset priors the M-step's sums were given."""
    run = _fixture_run(Class2DOptions(j=1, device="cpu", **options), work)
    given = []
    accumulate = mstep.accumulate

    def spy(*args, **kw):
        given.append(kw["prior_offset"].clone())
        return accumulate(*args, **kw)

    monkeypatch.setattr(mstep, "accumulate", spy)
    before = run.state.prior_offset.clone()
    run.iterate(2)
    assert run.sampling.perturbation == pytest.approx(RELION_IT2_PERTURBATION, abs=1e-5)
    run.write(2)
    # RELION's sigma_offset sum is p² |mu - o - t|² (mu in Å, o + t in pixels): the Å sums of
    # p mu; the Å prior passes mu itself
    scale = run.pixel if run.options.offset_prior == "relion" else 1.0
    assert given and all(torch.equal(g, before * scale) for g in given)
    return run.particle_table(), run


def test_continued_iteration_matches_relions_own(in_fixture, monkeypatch):
    """RELION 5.0.1's EM iteration 2 of the hard recipe (pixel 4 Å, posteriors still broad),
    continued by tamis from RELION's iteration-1 files on 30 of its particles with RELION's
    sampling perturbation and --offset_prior relion: every particle's significant coarse
    samples, class, psi, origin, norm correction and Pmax as RELION wrote them (on the machine
    that made the fixture all 30 exactly; a sample at the 0.999 cut may flip with another CPU's
    float32 rounding, so one particle may differ). The default Å-consistent prior keeps several
    times as many samples significant."""
    ref = pd.read_csv(in_fixture / "relion_it002_particles.csv")
    got, _ = _continue_one_iteration(in_fixture, monkeypatch, offset_prior="relion")
    assert list(got["rlnImageName"]) == list(ref["rlnImageName"])
    nsig, ref_nsig = got["rlnNrOfSignificantSamples"].to_numpy(), ref["rlnNrOfSignificantSamples"]
    assert np.mean(nsig == ref_nsig) >= 0.95
    np.testing.assert_allclose(nsig, ref_nsig, rtol=0.01)
    same = got["rlnClassNumber"].to_numpy() == ref["rlnClassNumber"].to_numpy()
    assert same.mean() >= 0.95
    g, r = got[same], ref[same]
    dpsi = (g["rlnAnglePsi"].to_numpy() - r["rlnAnglePsi"].to_numpy() + 180) % 360 - 180
    assert np.mean(np.abs(dpsi) < 1e-3) >= 0.95
    for label in ("rlnOriginXAngst", "rlnOriginYAngst"):
        assert np.mean(np.abs(g[label].to_numpy() - r[label].to_numpy()) < 1e-3) >= 0.95
    np.testing.assert_allclose(g["rlnNormCorrection"], r["rlnNormCorrection"], rtol=1e-4)
    np.testing.assert_allclose(
        g["rlnMaxValueProbDistribution"], r["rlnMaxValueProbDistribution"], rtol=1e-3
    )
    angst, _ = _continue_one_iteration(in_fixture, monkeypatch)
    ratio = angst["rlnNrOfSignificantSamples"] / ref["rlnNrOfSignificantSamples"]
    assert ratio.median() > 2


def test_an_unknown_offset_prior_is_a_clear_error(in_fixture):
    with pytest.raises(TamisError, match="--offset_prior 'pixels': expected angst or relion"):
        _fixture_run(Class2DOptions(j=1, offset_prior="pixels"), in_fixture)
    with pytest.raises(TamisError, match="--offset 0.0: must be positive"):
        _fixture_run(Class2DOptions(j=1, offset=0.0), in_fixture)


def test_a_continued_run_keeps_its_offset_prior(in_fixture, monkeypatch):
    """Written to the optimiser file (data_tamis_options) and read back unless typed again; a
    RELION run's files have none (the option given applies)."""
    _, run = _continue_one_iteration(in_fixture, monkeypatch, offset_prior="relion")
    cont = read_continue(in_fixture / "out" / "run_it002_optimiser.star")
    assert continued_options(cont, Class2DOptions(), frozenset()).offset_prior == "relion"
    typed = continued_options(cont, Class2DOptions(offset_prior="angst"), {"offset_prior"})
    assert typed.offset_prior == "angst"
    relion_files = read_continue("run_it001_optimiser.star")
    given = Class2DOptions(offset_prior="relion")
    assert continued_options(relion_files, given, frozenset()).offset_prior == "relion"


def test_fix_sigma_offset_keeps_the_initial_sigma(in_fixture):
    """RELION's --fix_sigma_offset: the M-step leaves sigma_offset as it was (without it, the
    sums' estimate replaces it); written to the optimiser file and read back on --continue."""
    run = _fixture_run(Class2DOptions(j=1, device="cpu"), in_fixture)
    st, k = run.state, run.state.n_classes
    sums = WeightedSums.zeros(k, 1, 1, 1, 33, len(run.groups), "cpu")
    sums.pdf_class[:] = 1.0
    sums.sigma2_offset = 50.0 * 2 * k  # an estimate of 50 Å²
    counts = torch.ones(len(run.groups), dtype=torch.float64)
    for fixed, expected in ((False, 50.0), (True, st.sigma2_offset)):
        o = replace(run.options, fix_sigma_offset=fixed)
        new = mstep.update_other_parameters(
            st, sums, options=o, group_counts=counts, do_scale=False, mu=0.0
        )
        assert new.sigma2_offset == pytest.approx(expected, rel=1e-12)
    assert st.sigma2_offset != pytest.approx(50.0)
    run.options = replace(run.options, fix_sigma_offset=True)
    run.write(2)
    cont = read_continue(in_fixture / "out" / "run_it002_optimiser.star")
    assert cont.optimiser["rlnFixSigmaOffsetEstimates"] == 1
    assert continued_options(cont, Class2DOptions(), frozenset()).fix_sigma_offset
    typed = continued_options(cont, Class2DOptions(), {"fix_sigma_offset"})
    assert not typed.fix_sigma_offset
