"""Deep picker: loss and blob kernels against direct formulas, a short training run with its
files, the shipped model on simulated micrographs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from tamis.errors import InputFileError, TamisError
from tamis.io.micrographs import MicrographSet
from tamis.pick.deep.data import TARGET_RADIUS, target_map
from tamis.pick.deep.network import PickerNet
from tamis.pick.deep.predict import SHIPPED_MODEL, DeepPicker, blobs_to_centres, load_model
from tamis.pick.deep.train import THRESHOLD_GRID, TrainOptions, _loss, train_picker
from tamis.pick.evaluate import score_picks
from tamis.pick.micrograph import read_micrograph


def test_nnpu_and_weighted_bce_losses():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, generator=g)
    target = (torch.rand(2, 1, 8, 8, generator=g) > 0.8).float()
    o = TrainOptions(diameter=100, loss="pu")
    prior = 0.3
    pos, unl = target > 0.5, target <= 0.5
    rp_plus = np.mean([np.log1p(np.exp(-z)) for z in logits[pos].tolist()])
    rp_minus = np.mean([np.log1p(np.exp(z)) for z in logits[pos].tolist()])
    ru_minus = np.mean([np.log1p(np.exp(z)) for z in logits[unl].tolist()])
    neg = ru_minus - prior * rp_minus
    want = prior * rp_plus + neg if neg >= 0 else -neg
    assert float(_loss(logits, target, o, 1.0, prior)) == pytest.approx(want, rel=1e-5)
    o = TrainOptions(diameter=100)
    w = torch.where(target > 0.5, 3.0, 1.0)
    want = (w * F.binary_cross_entropy_with_logits(logits, target, reduction="none")).mean()
    assert float(_loss(logits, target, o, 3.0, 0.0)) == pytest.approx(float(want), rel=1e-6)


def test_targets_and_blobs_to_centres():
    t = target_map((40, 60), np.array([10.0, 45.3]), np.array([12.0, 20.7]))
    assert t[12, 10] == 1 and t[12, 10 + int(TARGET_RADIUS) + 1] == 0
    assert int(t.sum()) == pytest.approx(2 * np.pi * TARGET_RADIUS**2, rel=0.2)
    score = 0.9 * t
    # a merged region of two touching particles 10 px apart: split at its two peaks
    yy, xx = torch.meshgrid(torch.arange(40.0), torch.arange(60.0), indexing="ij")
    two = torch.exp(-((yy - 30) ** 2 + (xx - 20) ** 2) / 18) + torch.exp(
        -((yy - 30) ** 2 + (xx - 31) ** 2) / 18
    )
    score = torch.maximum(score, 0.95 * two / two.max())
    rows, cols, fom = blobs_to_centres(score, 0.5, 5.0)
    got = sorted(zip(np.round(rows).astype(int), np.round(cols).astype(int), strict=True))
    assert got == [(12, 10), (21, 45), (30, 20), (30, 31)]
    assert np.all(np.diff(fom) <= 0)


def test_network_is_fully_convolutional_and_state_dict_is_plain(tmp_path):
    net = PickerNet()
    assert net(torch.zeros(1, 1, 50, 70)).shape == (1, 1, 50, 70)
    assert sum(p.numel() for p in net.parameters()) < 200_000
    (tmp_path / "bad.safetensors").write_text("not a model")
    with pytest.raises(InputFileError, match="safetensors"):
        load_model(tmp_path / "bad.safetensors")


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from tamis.simulate.micrographs import MicrographSimulation, simulate_micrographs

    out = tmp_path_factory.mktemp("deep")
    simulate_micrographs(
        MicrographSimulation(
            n_micrographs=4,
            height_px=512,
            width_px=640,
            pixel_size=2.0,
            particles_per_micrograph=30,
            snr=0.08,
            seed=11,
        ),
        out,
    )
    ms = MicrographSet.from_star(out / "micrographs.star")
    gt = pd.read_csv(out / "ground_truth.csv")
    mics = [read_micrograph(ms.path(i), ms.pixel_size(i)) for i in range(len(ms))]
    xy = [
        gt[(gt.micrograph_name == n) & (gt.kind == "particle")][["x", "y"]].to_numpy()
        for n in ms.names
    ]
    return out, mics, xy


def test_short_training_writes_model_and_history(sim, tmp_path):
    _, mics, xy = sim
    opts = TrainOptions(diameter=114, epochs=2, steps_per_epoch=3, batch_size=4, patch=64)
    result = train_picker(mics[:3], xy[:3], tmp_path / "bce", opts, log=lambda s: None)
    for name in ("model.safetensors", "model.json", "history.csv", "history.png"):
        assert (tmp_path / "bce" / name).is_file()
    cols = ["epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy", "val_f1", "lr"]
    assert set(cols) <= set(result.history.columns) and len(result.history) == 2
    assert result.history["lr"].iloc[-1] == pytest.approx(2e-4, rel=1e-3)
    model, meta = load_model(result.model)
    assert meta["diameter_px"] == 20.0 and meta["n_validation_micrographs"] == 1
    picks = DeepPicker(model, meta, 114).pick(mics[3])
    assert picks.x.ndim == 1
    pu = TrainOptions(diameter=114, epochs=1, steps_per_epoch=2, batch_size=4, patch=64, loss="pu")
    res = train_picker(mics[:2], xy[:2], tmp_path / "pu", pu, log=lambda s: None)
    assert np.isfinite(res.history["train_loss"]).all()


@pytest.mark.skipif(not SHIPPED_MODEL.is_file(), reason="no shipped picker model")
def test_shipped_model_picks_simulated_micrographs(sim):
    _, mics, xy = sim
    model, meta = load_model()
    assert "provenance" in meta
    picker = DeepPicker(model, meta, 114)
    total = None
    for m, truth in zip(mics, xy, strict=True):
        p = picker.pick(m)
        s = score_picks(np.stack([p.x, p.y], 1), truth, 0.5 * 114 / 2.0)
        total = s if total is None else total + s
    assert total.f1 >= 0.8, (total.precision, total.recall)


@pytest.mark.skipif(not SHIPPED_MODEL.is_file(), reason="no shipped picker model")
def test_threshold_comes_from_the_model_record(sim):
    """Without a threshold the picker takes the model's recommended one (the shipped model's
    0.98, a record without one 0.5); a given threshold wins; from_model also takes the record's
    filtering. A higher threshold keeps fewer picks."""
    _, mics, _ = sim
    model, meta = load_model()
    assert meta["threshold"] == 0.98
    assert DeepPicker(model, meta, 114).threshold == 0.98
    assert DeepPicker(model, {}, 114).threshold == 0.5
    assert DeepPicker(model, meta, 114, 0.3).threshold == 0.3
    own = DeepPicker.from_model(model, {**meta, "lowpass": 20.0, "normalize": False}, 114)
    assert (own.threshold, own.lowpass, own.normalize) == (0.98, 20.0, False)
    by_record = DeepPicker(model, {**meta, "threshold": 0.9}, 114).pick(mics[0])
    given = DeepPicker(model, meta, 114, 0.9).pick(mics[0])
    np.testing.assert_array_equal(by_record.x, given.x)
    assert len(DeepPicker(model, meta, 114, 0.5).pick(mics[0]).x) > len(
        DeepPicker(model, meta, 114).pick(mics[0]).x
    )


@pytest.mark.skipif(not SHIPPED_MODEL.is_file(), reason="no shipped picker model")
def test_trained_model_records_its_threshold(sim, tmp_path):
    """Without --threshold a fine-tuned model records the threshold whose picks on its
    validation micrograph have the best F1 (checked against picking that micrograph at every
    threshold of the grid), and which micrograph that was; a given one is recorded as it is; a
    record with a threshold outside [0, 1) is refused."""
    _, mics, xy = sim
    short = dict(diameter=114, epochs=1, steps_per_epoch=1, batch_size=2, patch=64)
    runs = {
        "tuned": TrainOptions(**short, init=str(SHIPPED_MODEL)),
        "given": TrainOptions(**short, threshold=0.7),
    }
    meta = {}
    for name, opts in runs.items():
        res = train_picker(mics[:2], xy[:2], tmp_path / name, opts, log=lambda s: None)
        meta[name] = load_model(res.model)[1]
    assert (meta["given"]["threshold"], meta["given"]["threshold_rule"]) == (0.7, "given")
    tuned = meta["tuned"]
    assert tuned["threshold_rule"] == "best validation F1"
    (v,) = tuned["validation_micrographs"]
    assert tuned["validation_names"] == [mics[v].name]
    model, _ = load_model(tmp_path / "tuned" / "model.safetensors")
    f1 = []
    for t in THRESHOLD_GRID:
        p = DeepPicker.from_model(model, tuned, 114, t).pick(mics[v])
        f1.append(score_picks(np.stack([p.x, p.y], 1), xy[v], 0.5 * 114 / 2.0).f1)
    assert max(f1) > 0.5
    assert tuned["threshold"] == THRESHOLD_GRID[int(np.argmax(f1))]
    assert tuned["final"]["val_f1"] == pytest.approx(max(f1))
    record = tmp_path / "given" / "model.json"
    record.write_text(record.read_text().replace('"threshold": 0.7', '"threshold": NaN', 1))
    with pytest.raises(InputFileError, match="threshold"):
        load_model(tmp_path / "given" / "model.safetensors")
    with pytest.raises(TamisError, match="threshold"):
        TrainOptions(**short, threshold=1.5).check()


def test_best_threshold_on_drawn_score_maps():
    """best_threshold against F1 counted by hand: three labelled particles scored 0.9, 0.9 and
    0.6 and one unlabelled blob at 0.7 on a map binned differently along y and x; the lowest of
    tied thresholds wins whatever their order; no correct pick anywhere gives (None, None)."""
    from tamis.pick.deep.data import PreparedMicrograph
    from tamis.pick.deep.train import best_threshold

    sy, sx, pixel = 0.1, 0.25, 10.0  # network px per micrograph px; A per network px
    score = torch.zeros(120, 120)
    rr, cc = torch.meshgrid(torch.arange(120.0), torch.arange(120.0), indexing="ij")
    for (r, c), v in (((20, 50), 0.9), ((20, 90), 0.9), ((70, 40), 0.6), ((90, 100), 0.7)):
        score[(rr - r) ** 2 + (cc - c) ** 2 <= TARGET_RADIUS**2] = v
    prep = PreparedMicrograph(torch.zeros(120, 120), (sy, sx), pixel)
    labels = np.array([[50 / sx, 20 / sy], [90 / sx, 20 / sy], [40 / sx, 70 / sy]])
    grid = (0.8, 0.55, 0.95, 0.5, 0.65)
    t, best = best_threshold([score], [(prep, None, labels)], grid, 200.0)
    # 0.5 and 0.55: 3 of 4 picks right, all found (F1 6/7); 0.65: 2 of 3 (2/3); 0.8: 2 of 2,
    # 2 of 3 found (0.8); 0.95: no pick
    assert t == 0.5 and (best.n_picks, best.true_positives) == (4, 3)
    assert best.f1 == pytest.approx(6 / 7)
    t, best = best_threshold([score], [(prep, None, labels)], (0.65, 0.8), 200.0)
    assert t == 0.8 and best.f1 == pytest.approx(0.8)
    far = labels + 500.0
    assert best_threshold([score], [(prep, None, far)], grid, 200.0) == (None, None)


def test_cli_train_and_predict(sim, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tamis.cli.main import app
    from tamis.io.coords import read_coordinate_list

    out, _, _ = sim
    monkeypatch.chdir(tmp_path)
    run = CliRunner().invoke
    args = ["pick", "train", "--i", str(out / "micrographs.star"), "--odir", "AutoPick/job007"]
    args += ["--coords", str(out / "truth" / "coordinates.star"), "--particle_diameter", "114"]
    res = run(app, args + ["--epochs", "1", "--steps_per_epoch", "2", "--minibatch", "2", "--pu"])
    assert res.exit_code == 0, res.output
    assert "epoch   1" in res.output and (tmp_path / "AutoPick/job007/model.safetensors").is_file()
    args = ["pick", "predict", "--i", str(out / "micrographs.star"), "--odir", "AutoPick/job008"]
    args += ["--particle_diameter", "114", "--model", "AutoPick/job007/model.safetensors"]
    res = run(app, args + ["--overlays", "1"])
    assert res.exit_code == 0, res.output
    assert len(read_coordinate_list("AutoPick/job008/autopick.star")) == 4
    res = run(
        app,
        [
            "pick",
            "predict",
            "--i",
            str(out / "micrographs.star"),
            "--odir",
            "x",
            "--particle_diameter",
            "114",
            "--model",
            "nope.safetensors",
        ],
    )
    assert res.exit_code == 1 and "nope.safetensors" in res.output
