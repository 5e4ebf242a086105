"""Class ranker: RELION's selection rules, target scores, and a small job end to end
(train on ground-truth labels, rank, RELION's output files)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tamis.class2d import Class2DOptions, run_class2d
from tamis.io.star import read_star
from tamis.rank.features import network_features
from tamis.rank.screen import ScreenOptions, screen_particles
from tamis.rank.select import (
    RankOptions,
    job_inputs,
    job_particle_fit,
    rank_classes,
    select_classes,
)
from tamis.rank.train import (
    RankTrainOptions,
    job_examples,
    selection_tiers,
    target_scores,
    tiers_from_truth,
    train_ranker,
)
from tests.helpers import tiny_particles


def _copy_job(optimiser, dest):
    """A copy of a 2D job's folder whose optimiser and model STAR files point into the copy;
    returns the copy and the files' stem (``run_itNNN``)."""
    import shutil

    shutil.copytree(optimiser.parent, dest)
    stem = optimiser.name.replace("_optimiser.star", "")
    for name in ("optimiser", "model"):
        f = dest / f"{stem}_{name}.star"
        f.write_text(f.read_text().replace(str(optimiser.parent), str(dest)))
    return dest, stem


def test_selection_follows_relion():
    scores = np.array([0.9, 0.2, -999.0, 0.6, 0.4])
    kept = [0, 1, 3, 4]
    n = {0: 100.0, 1: 300.0, 3: 50.0, 4: 200.0}
    chosen, above = select_classes(scores, kept, n, RankOptions(min_score=0.5))
    assert chosen == [0, 3] and above == 2
    # top up by particles: best remaining first until 400 particles (150 + 200 + 300)
    chosen, _ = select_classes(
        scores, kept, n, RankOptions(min_score=0.5, select_min_nr_particles=400)
    )
    assert chosen == [0, 3, 4, 1]
    chosen, _ = select_classes(scores, kept, n, RankOptions(min_score=0.5, select_min_nr_classes=3))
    assert chosen == [0, 3, 4]
    chosen, _ = select_classes(scores, kept, n, RankOptions(max_score=0.7, min_score=0.3))
    assert chosen == [3, 4]
    chosen, _ = select_classes(scores, kept, n, RankOptions(quantile=0.5))
    assert chosen == [0, 3]


def test_target_scores_are_relions():
    tiers = np.array([1, 1, 2, 3, 4, 0])
    res = np.array([8.0, 16.0, 8.0, 8.0, 8.0, 8.0])
    t = target_scores(tiers, res, job_score=0.8)
    np.testing.assert_allclose(t, 0.8 * np.array([1.0, 0.75 + 0.25 / 4, 0.75, 0.5, 0.25, 0.0]))
    # a class sharper than the best tier-1 class, or a job without tier 1: never above 1
    t = target_scores(np.array([1, 2, 3]), np.array([20.0, 5.0, 10.0]))
    np.testing.assert_allclose(t, [1.0, 0.75, 0.5])
    t = target_scores(np.array([2, 4, 0]), np.array([9.0, 12.0, 6.0]))
    np.testing.assert_allclose(t, [0.75, 0.25, 0.0])


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("rank")
    tiny_particles(out / "sim", n=300, seed=3, junk_fraction=0.2)
    opts = Class2DOptions.gui_em(
        K=5, iter=3, particle_diameter=130.0, psi_step=20.0, offset_range=3.0, offset_step=1.5,
        random_seed=2, batch_size=64,
    )  # fmt: skip
    result = run_class2d(
        out / "sim" / "particles.star", str(out / "c2d" / "run"), opts, log=lambda s: None
    )
    return out, result


def test_train_and_rank_a_job(job, tmp_path):
    out, result = job
    tiers = tiers_from_truth(result.optimiser, out / "sim" / "ground_truth.csv")
    assert len(tiers) == 5 and set(tiers) <= {0, 1, 2, 3, 4}
    ex = job_examples(result.optimiser, tiers)
    assert ex.images.shape[1:] == (64, 64) and ex.features.shape[1] == 24
    model = train_ranker(ex, tmp_path / "ranker", RankTrainOptions(epochs=2), log=lambda s: None)
    assert model.is_file() and model.with_suffix(".json").is_file()
    res = rank_classes(
        result.optimiser,
        tmp_path / "Select",
        RankOptions(min_score=-1e9, model=str(model), screen=None),
        log=lambda s: None,
    )
    sel = tmp_path / "Select"
    for name in ("rank_model.star", "rank_optimiser.star", "rank_data.star", "backup_selection.star",
                 "particles.star", "class_averages.star", "gallery.png", "class_scores.csv"):  # fmt: skip
        assert (sel / name).is_file(), name
    model_star = read_star(sel / "rank_model.star")
    assert list(model_star) == ["model_classes"]
    assert "rlnClassScore" in model_star["model_classes"].columns
    opt = read_star(sel / "rank_optimiser.star")["optimiser_general"]
    assert opt["rlnModelStarFile"].endswith("rank_model.star")
    # every scored class selected (threshold -1e9): the particles of those classes, in order
    data = read_star(result.data)["particles"]
    parts = read_star(sel / "particles.star")["particles"]
    want = data[data["rlnClassNumber"].isin(res.selected)]
    assert list(parts["rlnImageName"]) == list(want["rlnImageName"])
    backup = selection_tiers(sel / "backup_selection.star")
    assert len(backup) == 5
    scores = pd.read_csv(sel / "class_scores.csv")
    ok = scores["rlnClassScore"] > -999
    assert (
        (scores["tamisProbabilityGood"][ok] >= 0) & (scores["tamisProbabilityGood"][ok] <= 1)
    ).all()
    assert not (sel / "particle_screen.csv").exists()


def test_job_image_scale_makes_scores_independent_of_brightness(job, tmp_path):
    """In the job's intensity unit a ranker gives the same scores when every class average is
    twice as bright (another binning, dose or particle size); in absolute units it does not.
    A model record with an unknown unit is one clear error."""
    import json

    import mrcfile

    from tamis.errors import InputFileError
    from tamis.rank.select import job_class_features, load_ranker

    out, result = job
    tiers = tiers_from_truth(result.optimiser, out / "sim" / "ground_truth.csv")
    model = train_ranker(
        job_examples(result.optimiser, tiers, image_scale="job"),
        tmp_path / "ranker",
        RankTrainOptions(epochs=1, image_scale="job"),
        log=lambda s: None,
    )
    assert load_ranker(model)[1]["image_scale"] == "job"
    # a copy of the job whose class averages are all twice as bright
    c2d, stem = _copy_job(result.optimiser, tmp_path / "c2d")
    with mrcfile.open(c2d / f"{stem}_classes.mrcs", "r+") as m:
        m.data[...] *= 2
    a, b = job_inputs(result.optimiser), job_inputs(c2d / result.optimiser.name)
    assert np.allclose(b["images"], 2 * a["images"])
    fa, ia, _ = job_class_features(a, "job")
    fb, ib, _ = job_class_features(b, "job")
    np.testing.assert_allclose(np.stack(ia), np.stack(ib), rtol=1e-5, atol=1e-6)
    _, ia_abs, _ = job_class_features(a, "absolute")
    _, ib_abs, _ = job_class_features(b, "absolute")
    np.testing.assert_allclose(np.stack(ib_abs), 2 * np.stack(ia_abs), rtol=1e-5, atol=1e-6)
    opts = RankOptions(min_score=-1e9, model=str(model), screen=None, gallery=False)
    sa = rank_classes(result.optimiser, tmp_path / "A", opts, log=lambda s: None).scores
    sb = rank_classes(c2d / result.optimiser.name, tmp_path / "B", opts, log=lambda s: None).scores
    np.testing.assert_allclose(sa, sb, atol=1e-4)
    record = model.with_suffix(".json")
    meta = json.loads(record.read_text())
    record.write_text(json.dumps({**meta, "image_scale": "per-pixel"}))
    with pytest.raises(InputFileError, match="image_scale"):
        load_ranker(model)


def test_particle_screen_after_the_class_selection(job, tmp_path):
    """Every class selected, then the screen: it keeps most real particles of a real 2D job
    (poses and noise from tamis's own classification) and drops most junk, and its files agree
    with particles.star."""
    from tamis.simulate.truth import truth_for

    out, result = job
    res = rank_classes(
        result.optimiser, tmp_path / "S", RankOptions(min_score=-1e9, gallery=False),
        log=lambda s: None,
    )  # fmt: skip
    data = read_star(result.data)["particles"]
    members = data[data["rlnClassNumber"].isin(res.selected)]
    assert res.n_in_classes == len(members) and res.n_particles < len(members)
    # the report covers every particle of the job; particles.star is its kept rows, which
    # all pass the screen and belong to the selected classes
    report = pd.read_csv(tmp_path / "S" / "particle_screen.csv")
    assert list(report["rlnImageName"]) == list(data["rlnImageName"])
    parts = read_star(tmp_path / "S" / "particles.star")["particles"]
    kept = report[report["tamisKept"] == 1]
    assert list(parts["rlnImageName"]) == list(kept["rlnImageName"])
    assert (kept["tamisPassed"] == 1).all() and kept["rlnClassNumber"].isin(res.selected).all()
    # each class's passing share, as class_scores.csv and the result give it
    scores = pd.read_csv(tmp_path / "S" / "class_scores.csv")
    share = report.groupby("rlnClassNumber")["tamisPassed"].mean()
    np.testing.assert_allclose(scores.set_index("rlnClassNumber").loc[share.index,
                               "tamisScreenPassed"], share.to_numpy())  # fmt: skip
    np.testing.assert_allclose(res.screen_passed[share.index - 1], share.to_numpy())
    # on the particle-majority classes (a class selection from the truth): junk inside them has
    # the larger misfits (this short 3-iteration job separates them only partly; the simulated
    # benchmark jobs in BENCHMARKS.md are the measure), and the real particles stay
    from tamis.rank.evaluate import auroc

    kind = truth_for(data, out / "sim" / "ground_truth.csv")["kind"].to_numpy()
    real = kind == "particle"
    cls = data["rlnClassNumber"].to_numpy()
    good = [c for c in np.unique(cls) if real[cls == c].mean() > 0.5]
    rows = np.flatnonzero(np.isin(cls, good))
    assert (~real[rows]).sum() >= 10  # junk inside good classes, for the screen to find
    _, fit = job_particle_fit(job_inputs(result.optimiser), rows, ScreenOptions(device="cpu"))
    assert auroc(fit["misfit"].to_numpy(), ~real[rows]) > 0.75
    keep = screen_particles(fit, ScreenOptions())
    assert keep[real[rows]].mean() > 0.9


def test_cli_rank_errors(job, tmp_path):
    from typer.testing import CliRunner

    from tamis.cli.main import app

    _, result = job
    out = CliRunner().invoke(
        app,
        [
            "rank",
            "--opt",
            str(result.optimiser),
            "--o",
            str(tmp_path / "S"),
            "--model",
            str(tmp_path / "none.safetensors"),
        ],
    )
    assert out.exit_code == 1 and "none.safetensors" in out.output
    out = CliRunner().invoke(
        app, ["rank", "--opt", str(tmp_path / "missing_optimiser.star"), "--o", str(tmp_path / "S")]
    )
    assert out.exit_code == 1 and "missing_optimiser.star" in out.output


def test_auroc_against_pair_counting():
    from tamis.rank.evaluate import auroc

    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=60), 1)  # ties on purpose
    good = rng.random(60) < 0.4
    pos, neg = s[good], s[~good]
    slow = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert auroc(s, good) == pytest.approx(slow)
    assert auroc(s, np.ones(60, bool)) != auroc(s, np.ones(60, bool))  # nan: no bad classes


def test_particle_rates_count_the_truth(job):
    from tamis.rank.evaluate import particle_rates
    from tamis.simulate.truth import truth_for

    out, result = job
    data = read_star(result.data)["particles"]
    truth = truth_for(data, out / "sim" / "ground_truth.csv")
    positive = (truth["kind"] == "particle").to_numpy()
    chosen = data.iloc[::3]  # every third particle
    r = particle_rates(data, chosen, out / "sim" / "ground_truth.csv")
    sel = np.zeros(len(data), bool)
    sel[::3] = True
    assert r["tp"] == (sel & positive).sum() and r["fp"] == (sel & ~positive).sum()
    assert r["fn"] == (~sel & positive).sum() and r["tn"] == (~sel & ~positive).sum()
    assert r["false_positive_rate"] == pytest.approx(r["fp"] / (~positive).sum())
    assert r["false_negative_rate"] == pytest.approx(r["fn"] / positive.sum())


def test_granulometry_is_zeroed_for_the_network():
    from tamis.rank.features import network_features

    v = np.arange(48, dtype=np.float32).reshape(2, 24)
    n = network_features(v)
    assert (n[:, 15:21] == 0).all()
    assert (n[:, :15] == v[:, :15]).all() and (n[:, 21:] == v[:, 21:]).all()
    assert (v[:, 15:21] != 0).all()  # input untouched


def test_shipped_ranker_loads_with_its_record():
    from tamis.rank.network import RankerEnsemble
    from tamis.rank.select import SHIPPED_RANKER, load_ranker, recommended_min_score

    net, meta = load_ranker()
    # an ensemble of RELION-layout networks, seeing class images in the job's intensity unit
    assert isinstance(net, RankerEnsemble) and len(net.members) == 3
    assert all(sum(p.numel() for p in m.parameters()) == 589_003 for m in net.members)
    assert next(net.parameters()).dtype == torch.float32  # stored in float16
    assert meta["image_scale"] == "job" and meta["stored_dtype"] == "float16"
    assert meta["calibration"]["fitted"] and 0 < recommended_min_score(meta) < 1
    assert meta["test"]["test_auroc_good_vs_bad"] >= 0.95  # held-out jobs, see BENCHMARKS.md
    assert SHIPPED_RANKER.stat().st_size < 5_000_000


def test_classes_whose_particles_fail_the_screen_are_dropped(job, tmp_path, monkeypatch):
    """With the screen on, a class is selected by the ranker's score times its share of
    particles that pass (``selection_scores``): a class the network likes but whose every
    particle fails the screen is left out, the others keep their scores; without the screen
    RELION's selection by score alone stands."""
    import tamis.rank.select as select

    _, result = job
    opts = RankOptions(min_score=0.2, gallery=False)
    plain = rank_classes(
        result.optimiser, tmp_path / "N", RankOptions(min_score=0.2, gallery=False, screen=None),
        log=lambda s: None,
    )  # fmt: skip
    data = read_star(result.data)["particles"]
    sizes = data["rlnClassNumber"].value_counts()
    best = max(plain.selected, key=lambda c: (sizes.get(c, 0), plain.scores[c - 1]))
    real_screen = select.screen_particles

    def failing(fit, options, *, cuts_from=None):
        keep = real_screen(fit, options, cuts_from=cuts_from)
        return keep & (fit["class"].to_numpy() != best)

    monkeypatch.setattr(select, "screen_particles", failing)
    logs: list[str] = []
    res = rank_classes(result.optimiser, tmp_path / "S", opts, log=logs.append)
    assert best in plain.selected and best not in res.selected
    assert res.screen_passed[best - 1] == 0 and res.selection[best - 1] == 0
    np.testing.assert_array_equal(res.scores, plain.scores)  # the network's scores unchanged
    others = [c for c in plain.selected if c != best and res.screen_passed[c - 1] >= 0.75]
    assert set(others) <= set(res.selected)
    assert any(f"classes [{best}] dropped" in line for line in logs)
    scores = pd.read_csv(tmp_path / "S" / "class_scores.csv")
    assert scores.loc[best - 1, "rlnSelected"] == 0
    assert scores.loc[best - 1, "rlnClassScore"] == pytest.approx(plain.scores[best - 1])
    np.testing.assert_array_equal(plain.selection, plain.scores)


def test_particles_without_a_class_of_the_job_fail_the_screen(job, tmp_path):
    """A data.star row whose rlnClassNumber the job does not have (edited by hand, merged from
    elsewhere) cannot be compared with a class: the screen over every particle runs, and that
    row is neither screened nor kept."""
    from tamis.io.star import write_star

    _, result = job
    c2d, stem = _copy_job(result.optimiser, tmp_path / "c2d")
    star = read_star(result.data)
    star["particles"].loc[0, "rlnClassNumber"] = 99
    write_star(star, c2d / f"{stem}_data.star")
    opt = c2d / result.optimiser.name
    assert str(c2d / f"{stem}_data.star") in opt.read_text()
    res = rank_classes(opt, tmp_path / "S", RankOptions(min_score=-1e9, gallery=False),
                       log=lambda s: None)  # fmt: skip
    report = pd.read_csv(tmp_path / "S" / "particle_screen.csv")
    assert len(report) == len(star["particles"])
    assert report.loc[0, "tamisPassed"] == 0 and report.loc[0, "tamisKept"] == 0
    assert np.isnan(report.loc[0, "tamisMisfit"]) and report["tamisMisfit"][1:].notna().all()
    assert report["tamisAmplitudeLow"][1:].notna().all()
    assert report["tamisAmplitudePlain"][1:].notna().all()
    assert np.isnan(report.loc[0, "tamisAmplitudePlain"])
    assert 0 < res.n_particles < len(star["particles"])


def test_cli_rank_particle_screen_switch(job, tmp_path):
    from typer.testing import CliRunner

    from tamis.cli.main import app

    _, result = job
    base = ["rank", "--opt", str(result.optimiser), "--min_score", "-1e9", "--device", "cpu"]
    out = CliRunner().invoke(app, [*base, "--o", str(tmp_path / "A")])
    assert out.exit_code == 0, out.output
    assert "particle screen: " in out.output and " pass (amplitude >= " in out.output
    assert (tmp_path / "A" / "particle_screen.csv").is_file()
    out = CliRunner().invoke(app, [*base, "--o", str(tmp_path / "B"), "--no_particle_screen"])
    assert out.exit_code == 0, out.output
    assert not (tmp_path / "B" / "particle_screen.csv").exists()
    out = CliRunner().invoke(
        app, [*base, "--o", str(tmp_path / "C"), "--screen_min_amplitude", "2"]
    )
    assert out.exit_code == 1 and "screen_min_amplitude" in out.output
    out = CliRunner().invoke(app, [*base, "--o", str(tmp_path / "D"), "--screen_fixed"])
    assert out.exit_code == 0, out.output
    assert "fixed cuts" in out.output
    report = (tmp_path / "A" / "particle_screen.csv").read_text().splitlines()[0]
    assert "tamisAnglePsi" in report  # the re-aligned pose is reported
    out = CliRunner().invoke(app, [*base, "--o", str(tmp_path / "E"), "--screen_min_misfit", "6"])
    assert out.exit_code == 1 and "screen_min_misfit" in out.output


def test_ensemble_trains_saves_and_averages(job, tmp_path):
    """``members`` networks from different seeds in one file (``members.<i>.`` keys): loaded as
    an ensemble whose score is the members' mean, each member a RELION-layout network."""
    from safetensors.torch import load_file

    from tamis.rank.network import ClassRankerNet, RankerEnsemble
    from tamis.rank.select import load_ranker

    out, result = job
    tiers = tiers_from_truth(result.optimiser, out / "sim" / "ground_truth.csv")
    ex = job_examples(result.optimiser, tiers)
    model = train_ranker(
        ex, tmp_path / "ens", RankTrainOptions(epochs=1, members=3), log=lambda s: None
    )
    net, meta = load_ranker(model)
    assert isinstance(net, RankerEnsemble) and len(net.members) == 3
    assert len(meta["history"]) == 3 and meta["options"]["members"] == 3
    state = load_file(str(model))
    single = ClassRankerNet()
    single.load_state_dict(
        {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith("members.1.")}
    )
    single.eval()
    x = torch.from_numpy(ex.images)[:, None]
    f = torch.from_numpy(network_features(ex.features))
    with torch.no_grad():
        each = [m(x, f) for m in net.members]
        assert not torch.allclose(each[0], each[1])  # different seeds
        torch.testing.assert_close(single(x, f), each[1])
        torch.testing.assert_close(net(x, f), sum(each) / 3)
