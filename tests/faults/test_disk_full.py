"""A full disk (ENOSPC) or a read-only one in the middle of a write: one error line naming the
file, no partial file under its final name, the old version kept, no temporary left behind, and a
pipeline job marked failed."""

from __future__ import annotations

import errno
import os

import numpy as np
import pandas as pd
import pytest

from tamis.errors import TamisError


def _full_disk_after(n_bytes: int):
    """A stand-in for ``mrcfile.new``: writes ``n_bytes`` to the (temporary) file it is given,
    then fails as a full disk does."""

    def fail(path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"x" * n_bytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    return fail


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_star_write_on_a_full_disk(tmp_path, monkeypatch, err):
    from pathlib import Path

    from tamis.io.star import read_star, write_star

    target = tmp_path / "particles.star"
    write_star({"particles": pd.DataFrame({"rlnCoordinateX": [1.0, 2.0]})}, target)
    before = target.read_bytes()

    def fail(path, text, *a, **k):  # the disk fills part-way through the text
        with open(path, "wb") as fh:
            fh.write(text.encode()[: len(text) // 2])
        raise OSError(err, os.strerror(err), str(path))

    monkeypatch.setattr(Path, "write_text", fail)
    with pytest.raises(TamisError) as info:
        write_star({"particles": pd.DataFrame({"rlnCoordinateX": [3.0]})}, target)
    msg = str(info.value)
    assert msg.startswith(str(target)) and os.strerror(err) in msg and "\n" not in msg
    assert target.read_bytes() == before  # the old file, whole
    assert read_star(target)["particles"]["rlnCoordinateX"].tolist() == [1.0, 2.0]
    assert [p.name for p in tmp_path.iterdir()] == ["particles.star"]  # no temporary left


def test_mrc_write_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    import mrcfile

    from tamis.io.mrc import write_mrc

    monkeypatch.setattr(mrcfile, "new", _full_disk_after(4096))
    with pytest.raises(TamisError, match="No space left on device"):
        write_mrc(tmp_path / "map.mrc", np.zeros((8, 8, 8), np.float32), 1.0)
    assert list(tmp_path.iterdir()) == []


def test_job_on_a_full_disk_is_marked_failed(tmp_path, monkeypatch):
    import mrcfile

    from tamis.io.mrc import write_mrc
    from tamis.pipeline.job import JobStar, exit_status
    from tamis.pipeline.jobs import run_job

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    vol = np.zeros((24, 24, 24), np.float32)
    vol[8:16, 8:16, 8:16] = 1.0
    vol += rng.normal(scale=0.01, size=vol.shape).astype(np.float32)
    (tmp_path / "Refine3D/job001").mkdir(parents=True)
    write_mrc("Refine3D/job001/run_class001.mrc", vol, 2.0)
    d = tmp_path / "MaskCreate/job002"
    d.mkdir(parents=True)
    JobStar(
        "relion.maskcreate",
        options={"fn_in": "Refine3D/job001/run_class001.mrc", "lowpass_filter": "0",
                 "inimask_threshold": "0.5"},
    ).write(d)  # fmt: skip
    monkeypatch.setattr(mrcfile, "new", _full_disk_after(1000))
    assert run_job(d) == "Failed"
    assert exit_status(d) == "Failed"
    assert not (d / "mask.mrc").exists()
    assert "No space left on device" in (d / "run.err").read_text()
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]
    # the disk has room again: the same job runs through
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert run_job(d) == "Succeeded", (d / "run.err").read_text()
    assert (d / "mask.mrc").exists()


def test_cli_reports_a_full_disk_in_one_line(tmp_path, monkeypatch):
    import mrcfile
    from typer.testing import CliRunner

    from tamis.cli.main import app
    from tamis.io.mrc import write_mrc

    vol = np.zeros((16, 16, 16), np.float32)
    vol[4:12, 4:12, 4:12] = 1.0
    write_mrc(tmp_path / "map.mrc", vol, 2.0)
    monkeypatch.setattr(mrcfile, "new", _full_disk_after(100))
    r = CliRunner().invoke(
        app, ["mask_create", "--i", str(tmp_path / "map.mrc"), "--o", str(tmp_path / "mask.mrc")]
    )
    assert r.exit_code == 1
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "mask.mrc: cannot write (No space left on device)" in lines[0]
    assert "Traceback" not in r.output
