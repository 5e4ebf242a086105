"""Fuzzed inputs for every reader (issue 19): a reader returns or raises one TamisError line that
names the file, never another exception, never a hang; valid inputs round-trip exactly.

CI runs a few hundred cases per reader; ``scripts/fuzz_soak.py`` runs the long version."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.faults.fuzz import fuzz_reader, short
from tests.faults.readers import readers

READERS = {r.name: r for r in readers()}


@pytest.mark.parametrize("name", sorted(READERS))
def test_fuzzed_inputs_give_one_line_errors(name, tmp_path):
    r = READERS[name]
    rep = fuzz_reader(
        r.name, r.read, r.seeds, tmp_path, n=150, seed=7, binary=r.binary, timeout_s=20
    )
    assert rep.cases == 150
    if rep.findings:
        data, tb = rep.findings[0]
        pytest.fail(
            f"{len(rep.findings)} findings in {name} (hangs: {rep.hangs}); the first, on "
            f"{len(data)} bytes starting {data[:80]!r}:\n{short(tb, 12)}"
        )
    # the mutations reach both outcomes: some inputs still read, many are refused
    assert rep.accepted > 0 and rep.rejected > 0


def _same(a, b) -> None:
    assert list(a) == list(b)
    for k in a:
        if isinstance(a[k], pd.DataFrame):
            pd.testing.assert_frame_equal(
                a[k].reset_index(drop=True), b[k].reset_index(drop=True), check_dtype=False
            )
        else:
            assert {x: str(v) for x, v in a[k].items()} == {x: str(v) for x, v in b[k].items()}


@pytest.mark.parametrize("seed", range(len(READERS["star"].seeds)))
def test_valid_star_files_round_trip(seed, tmp_path):
    from tamis.io.star import read_star, write_star

    name, data = READERS["star"].seeds[seed]
    src = tmp_path / name
    src.write_bytes(data)
    first = read_star(src)
    write_star(first, tmp_path / "again.star")
    _same(first, read_star(tmp_path / "again.star"))


def test_valid_data_star_and_mrc_round_trip(tmp_path):
    from tamis.io.mrc import read_mrc, write_mrc
    from tamis.io.star import read_data_star, write_data_star

    for name, data in READERS["data_star"].seeds:
        src = tmp_path / name
        src.write_bytes(data)
        d = read_data_star(src)
        write_data_star(d, tmp_path / "again.star")
        e = read_data_star(tmp_path / "again.star")
        pd.testing.assert_frame_equal(d.table, e.table, check_dtype=False)
        pd.testing.assert_frame_equal(d.optics, e.optics, check_dtype=False)
    rng = np.random.default_rng(1)
    for shape in ((17, 23), (4, 9, 9), (8, 8, 8)):
        a = rng.normal(size=shape).astype(np.float32)
        write_mrc(tmp_path / "x.mrc", a, 1.37)
        b, pix = read_mrc(tmp_path / "x.mrc")
        np.testing.assert_array_equal(np.asarray(b), a)
        assert pix == pytest.approx(1.37, rel=1e-6)
