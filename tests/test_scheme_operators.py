"""Every scheme operator against its documented semantics (RELION 4/5), including the RELION
bugs tamis fixes on purpose (numeric literals, negative nth_word, *_idx)."""

from __future__ import annotations

import pytest

from tamis.errors import TamisError
from tamis.io.star import write_star
from tamis.schemes import Operator, Scheme, SchemeJob
from tamis.schemes.operators import Clock, perform, substitute_job_names


def run(s: Scheme, typ: str, out="o", in1="undefined", in2="undefined", **kw) -> bool:
    s.operators["op"] = Operator(typ, out, in1, in2)
    return perform(s, "op", **kw)


@pytest.fixture
def s(tmp_path):
    sch = Scheme("Schemes/proc/")
    sch.floats = {
        "a": (3.0, 3.0),
        "b": (2.0, 2.0),
        "o": (0.0, 0.0),
        "k": (-1.0, -1.0),
        "half": (2.5, 2.5),
    }
    sch.bools = {"t": (True, True), "f": (False, False), "o": (False, False)}
    sch.strings = {"o": ("", ""), "words": ("x,y,z", "x,y,z"), "sep": ("/", "/"), "path": ("Job/job001/f.star", ""),
                   "star": ("p.star,particles,rlnDefocusU", ""), "tab": ("particles", ""), "file": ("p.star", "")}  # fmt: skip
    import pandas as pd

    write_star({"optics": pd.DataFrame({"rlnOpticsGroup": [1]}),
                "particles": pd.DataFrame({"rlnDefocusU": [3.0, 1.0, 2.0], "rlnIsGood": [1, 0, 1]})}, tmp_path / "p.star")  # fmt: skip
    sch._tmp = tmp_path
    return sch


@pytest.mark.parametrize(
    "typ,in1,in2,want",
    [("bool=set", "t", "undefined", True), ("bool=and", "t", "f", False), ("bool=or", "t", "f", True),
     ("bool=not", "t", "undefined", False), ("bool=gt", "a", "b", True), ("bool=lt", "a", "b", False),
     ("bool=ge", "a", "3", True), ("bool=le", "a", "2.5", False), ("bool=eq", "a", "3.0", True)],
)  # fmt: skip
def test_bool_operators(s, typ, in1, in2, want):
    run(s, typ, "o", in1, in2)
    assert s.bools["o"][0] is want


@pytest.mark.parametrize(
    "typ,in1,in2,want",
    [("float=set", "a", "undefined", 3.0), ("float=plus", "a", "b", 5.0), ("float=minus", "a", "b", 1.0),
     ("float=mult", "a", "4", 12.0), ("float=divide", "a", "b", 1.5), ("float=round", "half", "undefined", 3.0)],
)  # fmt: skip
def test_float_arithmetic(s, typ, in1, in2, want):
    run(s, typ, "o", in1, in2)
    assert s.floats["o"][0] == pytest.approx(want)


def test_float_round_half_away_from_zero(s):
    s.floats["neg"] = (-2.5, 0.0)
    run(s, "float=round", "o", "neg")
    assert s.floats["o"][0] == -3.0


def test_star_operators(s):
    p = dict(project=s._tmp)
    run(s, "float=count_images", "o", "file", "tab", **p)
    assert s.floats["o"][0] == 3
    s.strings["missing"] = ("nope.star", "")
    run(s, "float=count_images", "o", "missing", **p)
    assert s.floats["o"][0] == 0
    run(s, "float=read_star", "o", "star", "b", **p)  # row 2
    assert s.floats["o"][0] == 2.0
    for typ, want in (("max", 3.0), ("min", 1.0), ("avg", 2.0), ("max_idx", 0), ("min_idx", 1)):
        run(s, f"float=star_table_{typ}", "o", "star", **p)
        assert s.floats["o"][0] == want, typ
    run(s, "float=star_table_sort_idx", "o", "star", "1", **p)  # smallest
    assert s.floats["o"][0] == 1
    run(s, "float=star_table_sort_idx", "o", "star", "k", **p)  # -1: largest
    assert s.floats["o"][0] == 0
    s.strings["good"] = ("p.star,particles,rlnIsGood", "")
    run(s, "bool=read_star", "o", "good", "1", **p)
    assert s.bools["o"][0] is False
    run(s, "string=read_star", "o", "star", **p)
    assert s.strings["o"][0] == "3.0"


def test_string_operators(s, tmp_path):
    run(s, "string=set", "o", "words")
    assert s.strings["o"][0] == "x,y,z"
    run(s, "string=join", "o", "words", "sep")
    assert s.strings["o"][0] == "x,y,z/"
    for typ, want in (
        ("before_first", "Job"),
        ("after_first", "job001/f.star"),
        ("before_last", "Job/job001"),
        ("after_last", "f.star"),
    ):
        run(s, f"string={typ}", "o", "path", "sep")
        assert s.strings["o"][0] == want
    run(s, "float=count_words", "o", "words")
    assert s.floats["o"][0] == 3
    run(s, "string=nth_word", "o", "words", "2")
    assert s.strings["o"][0] == "y"
    run(s, "string=nth_word", "o", "words", "k")  # -1: the last (RELION gives undefined)
    assert s.strings["o"][0] == "z"
    run(s, "string=nth_word", "o", "words", "7")
    assert s.strings["o"][0] == "undefined"
    (tmp_path / "m1.mrc").touch()
    (tmp_path / "m2.mrc").touch()
    s.strings["pattern"] = ("m*.mrc", "")
    run(s, "string=glob", "o", "pattern", project=tmp_path)
    assert s.strings["o"][0] == "m1.mrc,m2.mrc"
    s.strings["pattern"] = ("none*.x", "")
    run(s, "string=glob", "o", "pattern", project=tmp_path)
    assert s.strings["o"][0] == "undefined"


def test_file_operators(s, tmp_path):
    s.strings["f1"] = ("a/b.txt", "")
    s.strings["f2"] = ("c/d.txt", "")
    run(s, "touch_file", "undefined", "f1", project=tmp_path)
    assert (tmp_path / "a/b.txt").is_file()
    run(s, "bool=file_exists", "o", "f1", project=tmp_path)
    assert s.bools["o"][0]
    run(s, "copy_file", "undefined", "f1", "f2", project=tmp_path)
    assert (tmp_path / "c/d.txt").is_file() and (tmp_path / "a/b.txt").is_file()
    run(s, "delete_file", "undefined", "f2", project=tmp_path)
    assert not (tmp_path / "c/d.txt").exists()
    run(s, "move_file", "undefined", "f1", "f2", project=tmp_path)
    assert (tmp_path / "c/d.txt").is_file() and not (tmp_path / "a/b.txt").exists()


def test_wait_exit_maxtime_and_exit(s):
    t = [100.0]
    slept = []
    clock = Clock(now=lambda: t[0], sleep=lambda d: (slept.append(d), t.__setitem__(0, t[0] + d)))
    s.floats["w"] = (30.0, 30.0)
    assert run(s, "wait", "o", "w", clock=clock) and slept == []  # first wait starts the clock
    t[0] += 5
    run(s, "wait", "o", "w", clock=clock)
    assert sum(slept) == pytest.approx(25.0) and s.floats["o"][0] == pytest.approx(30.0)
    s.floats["h"] = (1.0, 1.0)
    assert run(s, "exit_maxtime", "undefined", "h", clock=clock)
    t[0] += 1800
    assert run(s, "exit_maxtime", "undefined", "h", clock=clock)
    t[0] += 3600
    assert not run(s, "exit_maxtime", "undefined", "h", clock=clock)
    assert not run(s, "exit")


def test_email_goes_through_the_configured_command(s, tmp_path):
    s.strings["email"] = ("me@example.org", "")
    out = tmp_path / "mail.txt"
    run(s, "email", "undefined", "a", email_command=f"cat > {out}; echo {{address}} >> {out}")
    text = out.read_text()
    assert "a = 3.0" in text and "me@example.org" in text


def test_job_name_substitution_and_errors(s):
    s.jobs = {
        "extract": SchemeJob("Extract/job007/", "continue", True),
        "fresh": SchemeJob("fresh"),
    }
    assert (
        substitute_job_names("Schemes/proc/extract/particles.star", s)
        == "Extract/job007/particles.star"
    )
    assert substitute_job_names("Schemes/proc/fresh/x.star", s) == "fresh/x.star"
    other = Scheme("Schemes/prep/", jobs={"ctffind": SchemeJob("CtfFind/job003/")})
    got = substitute_job_names(
        "Schemes/prep/ctffind/micrographs_ctf.star", s, lambda n: other if n == "prep" else None
    )
    assert got == "CtfFind/job003/micrographs_ctf.star"
    with pytest.raises(TamisError, match="unknown type"):
        run(s, "float=sqrt", "o", "a")
    with pytest.raises(TamisError, match="divides by zero"):
        run(s, "float=divide", "o", "a", "0")
    with pytest.raises(TamisError, match="no boolean"):
        run(s, "bool=set", "o", "nothing")
