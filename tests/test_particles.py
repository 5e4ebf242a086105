"""ParticleSet: metadata -> tensors, lazy batched loading, path resolution, cryoSPARC import."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tamis.errors import InputFileError
from tamis.io.cryosparc import cryosparc_to_tables, read_cryosparc
from tamis.io.mrc import write_mrc
from tamis.io.particles import ParticleSet
from tamis.io.star import write_star

DATA = Path(__file__).parent / "data" / "star"


def make_project(root: Path, n_per_stack=(4, 3), box=8) -> tuple[Path, np.ndarray]:
    """Two stacks under root/Extract/job001/, a particles.star in root/Select/job002/."""
    images = []
    names = []
    for s, n in enumerate(n_per_stack):
        stack = np.stack([np.full((box, box), 10 * s + i, np.float32) for i in range(n)])
        rel = f"Extract/job001/Movies/mic{s}.mrcs"
        write_mrc(root / rel, stack, 1.5)
        images.extend(stack)
        names.extend(f"{i + 1:06d}@{rel}" for i in range(n))
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"],
            "rlnOpticsGroup": [1, 2],
            "rlnVoltage": [300.0, 200.0],
            "rlnSphericalAberration": [2.7, 2.0],
            "rlnAmplitudeContrast": [0.1, 0.07],
            "rlnImagePixelSize": [1.5, 1.5],
            "rlnImageSize": [box, box],
            "rlnImageDimensionality": [2, 2],
        }
    )
    n = len(names)
    parts = pd.DataFrame(
        {
            "rlnImageName": names,
            "rlnMicrographName": ["m"] * n,
            "rlnDefocusU": np.linspace(10000, 20000, n),
            "rlnDefocusV": np.linspace(9000, 19000, n),
            "rlnDefocusAngle": np.linspace(-30, 30, n),
            "rlnOpticsGroup": [1] * 4 + [2] * (n - 4),
            "rlnCustomColumn": np.arange(n),
        }
    )
    star = root / "Select" / "job002" / "particles.star"
    write_star({"optics": optics, "particles": parts}, star)
    return star, np.stack(images)


def test_from_star_resolves_project_dir_and_loads(tmp_path, monkeypatch):
    star, images = make_project(tmp_path)
    monkeypatch.chdir("/")  # not the project directory: it must be found from the STAR's place
    ps = ParticleSet.from_star(star)
    assert ps.root == tmp_path
    assert len(ps) == 7 and ps.box_size == 8 and ps.pixel_size == 1.5
    order = [6, 0, 4, 3]
    torch.testing.assert_close(ps.load_images(order), torch.from_numpy(images[order]))


def test_ctf_params_per_particle_and_per_group(tmp_path):
    star, _ = make_project(tmp_path)
    ps = ParticleSet.from_star(star)
    ctf = ps.ctf_params([0, 5])
    assert ctf.voltage.tolist() == [300.0, 200.0]
    assert ctf.spherical_aberration.tolist() == [2.7, 2.0]
    assert ctf.amplitude_contrast.tolist() == [0.1, 0.07]
    assert ctf.defocus_u.tolist() == pytest.approx([10000.0, 10000 + 5 * 10000 / 6])
    assert ctf.scale.tolist() == [1.0, 1.0] and ctf.bfactor.tolist() == [0.0, 0.0]
    assert ctf.pixel_size.dtype == torch.float64
    assert ctf.compute((8, 8)).shape == (2, 8, 5)


def test_batches_prefetch_and_preread_agree(tmp_path):
    star, images = make_project(tmp_path)
    ps = ParticleSet.from_star(star)
    order = np.array([3, 1, 6, 2, 0, 5, 4])
    got = [b for b in ps.batches(3, indices=order)]
    assert [len(b.indices) for b in got] == [3, 3, 1]
    torch.testing.assert_close(torch.cat([b.images for b in got]), torch.from_numpy(images[order]))
    ps.preread()
    again = torch.cat([b.images for b in ps.batches(2, indices=order)])
    torch.testing.assert_close(again, torch.from_numpy(images[order]))


def test_round_trip_keeps_unknown_columns(tmp_path):
    star, _ = make_project(tmp_path)
    ps = ParticleSet.from_star(star)
    ps.to_star(tmp_path / "again.star")
    ps2 = ParticleSet.from_star(tmp_path / "again.star", project_dir=tmp_path)
    assert ps2.particles["rlnCustomColumn"].tolist() == list(range(7))


def test_missing_stack_and_index_past_end_are_clear_errors(tmp_path):
    star, _ = make_project(tmp_path)
    table = ParticleSet.from_star(star).particles.copy()
    optics = ParticleSet.from_star(star).optics
    table.loc[2, "rlnImageName"] = "000009@Extract/job001/Movies/mic0.mrcs"
    write_star({"optics": optics, "particles": table}, star)
    with pytest.raises(InputFileError) as info:
        ParticleSet.from_star(star, project_dir=tmp_path)
    assert "image 9 requested" in str(info.value) and "holds 4 image(s)" in str(info.value)
    table.loc[2, "rlnImageName"] = "000001@Extract/job001/Movies/gone.mrcs"
    write_star({"optics": optics, "particles": table}, star)
    with pytest.raises(InputFileError) as info:
        ParticleSet.from_star(star, project_dir=tmp_path)
    assert "gone.mrcs" in str(info.value) and "not found" in str(info.value)


def test_optics_group_missing_is_an_error(tmp_path):
    star, _ = make_project(tmp_path)
    ps = ParticleSet.from_star(star)
    write_star({"optics": ps.optics.iloc[:1], "particles": ps.particles}, star)
    with pytest.raises(InputFileError, match=r"optics group\(s\) \[2\]"):
        ParticleSet.from_star(star)


def make_cs(stack_rel: str, n: int) -> np.ndarray:
    dtype = [
        ("uid", "<u8"),
        ("blob/path", "S40"),
        ("blob/idx", "<u4"),
        ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"),
        ("ctf/accel_kv", "<f4"),
        ("ctf/cs_mm", "<f4"),
        ("ctf/amp_contrast", "<f4"),
        ("ctf/df1_A", "<f4"),
        ("ctf/df2_A", "<f4"),
        ("ctf/df_angle_rad", "<f4"),
        ("ctf/phase_shift_rad", "<f4"),
        ("alignments2D/shift", "<f4", (2,)),
        ("alignments2D/pose", "<f4"),
        ("alignments2D/psize_A", "<f4"),
        ("alignments2D/class", "<u4"),
        ("location/micrograph_path", "S20"),
        ("location/micrograph_shape", "<u4", (2,)),
        ("location/center_x_frac", "<f4"),
        ("location/center_y_frac", "<f4"),
    ]
    cs = np.zeros(n, dtype=dtype)
    cs["blob/path"] = (">" + stack_rel).encode()
    cs["blob/idx"] = np.arange(n)[::-1]
    cs["blob/shape"] = 8
    cs["blob/psize_A"] = 1.5
    cs["ctf/accel_kv"] = 300
    cs["ctf/cs_mm"] = 2.7
    cs["ctf/amp_contrast"] = 0.1
    cs["ctf/df1_A"] = 15000
    cs["ctf/df2_A"] = 14000
    cs["ctf/df_angle_rad"] = np.pi / 4
    cs["ctf/phase_shift_rad"] = np.pi / 2
    cs["alignments2D/shift"] = [2.0, -1.0]
    cs["alignments2D/pose"] = np.pi / 2
    cs["alignments2D/psize_A"] = 3.0
    cs["alignments2D/class"] = np.arange(n) % 2
    cs["location/micrograph_path"] = b"mics/a.mrc"
    cs["location/micrograph_shape"] = [400, 600]  # (y, x)
    cs["location/center_x_frac"] = 0.25
    cs["location/center_y_frac"] = 0.5
    return cs


def test_cryosparc_import(tmp_path):
    star, images = make_project(tmp_path)
    cs = make_cs("Extract/job001/Movies/mic0.mrcs", 4)
    job = tmp_path / "J12"
    job.mkdir()
    np.save(job / "particles.cs", cs)
    os.replace(job / "particles.cs.npy", job / "particles.cs")
    ps = read_cryosparc(job / "particles.cs")
    assert ps.root == tmp_path
    assert ps.particles["rlnImageName"].tolist()[0] == "000004@Extract/job001/Movies/mic0.mrcs"
    torch.testing.assert_close(ps.load_images([0, 3]), torch.from_numpy(images[[3, 0]]))
    p = ps.particles
    assert p["rlnDefocusAngle"].iloc[0] == pytest.approx(45.0)
    assert p["rlnPhaseShift"].iloc[0] == pytest.approx(90.0)
    assert p["rlnOriginXAngst"].iloc[0] == pytest.approx(6.0)  # 2 px of 3 A alignment pixels
    assert p["rlnOriginYAngst"].iloc[0] == pytest.approx(-3.0)
    assert p["rlnAnglePsi"].iloc[0] == pytest.approx(90.0)
    assert p["rlnClassNumber"].tolist() == [1, 2, 1, 2]
    assert p["rlnCoordinateX"].iloc[0] == pytest.approx(150.0)
    assert p["rlnCoordinateY"].iloc[0] == pytest.approx(200.0)
    assert p["rlnMicrographName"].iloc[0] == "mics/a.mrc"
    assert ps.optics["rlnImageSize"].tolist() == [8]
    assert ps.optics["rlnVoltage"].tolist() == [300.0]
    _, flipped = cryosparc_to_tables(cs, flip_y=True)
    assert flipped["rlnCoordinateY"].iloc[0] == pytest.approx(200.0)  # 1 - 0.5


def test_real_cryosparc_header_without_blobs_is_a_clear_error():
    with pytest.raises(InputFileError, match="lacks field"):
        read_cryosparc(DATA / "cryosparc_4k_dataset_header_only.cs")
