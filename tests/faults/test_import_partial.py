"""Files still being written when the pipeline looks are not imported until they are complete."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from tamis.errors import TamisError
from tamis.io.mrc import write_mrc
from tamis.io.star import read_star
from tamis.prep.importer import ImportOptions, import_micrographs


def test_import_waits_for_files_being_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mics = tmp_path / "Micrographs"
    mics.mkdir()
    img = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    for name in ("a.mrc", "b.mrc", "c.mrc"):
        write_mrc(mics / name, img, 1.0)
    full = (mics / "c.mrc").read_bytes()
    (mics / "c.mrc").write_bytes(full[: len(full) // 2])  # a copy in progress
    (mics / "d.mrc").write_bytes(b"\0" * 600)  # nothing but a start, no header yet
    (mics / "e.tif").write_bytes(b"II*\0")  # another format, written just now
    log: list[str] = []
    opts = ImportOptions(angpix=1.0)
    star = import_micrographs("Micrographs/*", tmp_path / "Import", opts, log=log.append)
    names = read_star(star)["micrographs"]["rlnMicrographName"].tolist()
    assert names == ["Micrographs/a.mrc", "Micrographs/b.mrc"]
    assert log == ["3 file(s) still being written, left for the next pass"]
    # the copy finishes, the TIFF has been quiet for a minute: the next pass takes them
    (mics / "c.mrc").write_bytes(full)
    old = time.time() - 60
    os.utime(mics / "e.tif", (old, old))
    star = import_micrographs("Micrographs/*", tmp_path / "Import", opts, log=log.append)
    names = read_star(star)["micrographs"]["rlnMicrographName"].tolist()
    assert names == ["Micrographs/a.mrc", "Micrographs/b.mrc", "Micrographs/c.mrc",
                     "Micrographs/e.tif"]  # fmt: skip
    with pytest.raises(TamisError, match="still being written"):
        import_micrographs("Micrographs/d.mrc", tmp_path / "I2", opts)


def test_a_continued_import_keeps_earlier_rows_first(tmp_path, monkeypatch):
    """RELION's --continue: rows already listed keep their order, new files follow (sorted),
    even when a new file sorts before the old ones."""
    import mrcfile
    import numpy as np

    from tamis.io.star import read_star

    monkeypatch.chdir(tmp_path)
    (tmp_path / "Micrographs").mkdir()

    def mic(name):
        with mrcfile.new(tmp_path / "Micrographs" / name) as m:
            m.set_data(np.zeros((8, 8), np.float32))

    mic("b.mrc")
    mic("d.mrc")
    opts = ImportOptions(angpix=1.0)
    star = import_micrographs("Micrographs/*.mrc", tmp_path / "Import", opts)
    mic("a.mrc")
    mic("c.mrc")
    star = import_micrographs("Micrographs/*.mrc", tmp_path / "Import", opts)
    names = read_star(star)["micrographs"]["rlnMicrographName"].tolist()
    assert names == ["Micrographs/b.mrc", "Micrographs/d.mrc", "Micrographs/a.mrc",
                     "Micrographs/c.mrc"]  # fmt: skip
