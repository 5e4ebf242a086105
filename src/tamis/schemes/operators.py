"""Scheme operators with RELION 4/5's semantics (``SchemerOperator::performOperation``).

Differences from RELION, on purpose (RELION's behaviour is a bug in each case):
- a numeric literal as ``input2`` is used as that number (RELION reads it as 0);
- ``string=nth_word`` with a negative N counts from the end, as RELION's documentation says;
- ``float=star_table_max_idx`` / ``min_idx`` are implemented (0-based row of the largest /
  smallest value); RELION declares but does not implement them.
Job-name substitution (``Schemes/NAME/JOB/file`` -> ``Type/jobNNN/file``) is applied to string
inputs that name files, as RELION does.
"""

from __future__ import annotations

import glob
import math
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tamis.errors import TamisError
from tamis.io.star import read_star
from tamis.schemes.scheme import UNDEFINED, Scheme

__all__ = ["Clock", "perform", "substitute_job_names", "OPERATOR_TYPES"]

OPERATOR_TYPES = {
    "bool=set", "bool=and", "bool=or", "bool=not", "bool=gt", "bool=lt", "bool=ge", "bool=le",
    "bool=eq", "bool=file_exists", "bool=read_star", "float=set", "float=plus", "float=minus",
    "float=mult", "float=divide", "float=round", "float=count_images", "float=count_words",
    "float=read_star", "float=star_table_max", "float=star_table_min", "float=star_table_avg",
    "float=star_table_sort_idx", "float=star_table_max_idx", "float=star_table_min_idx",
    "string=set", "string=join", "string=before_first", "string=after_first",
    "string=before_last", "string=after_last", "string=read_star", "string=glob",
    "string=nth_word", "touch_file", "copy_file", "move_file", "delete_file", "wait", "email",
    "exit_maxtime", "exit",
}  # fmt: skip


@dataclass
class Clock:
    """Per-process timers, as RELION keeps them: the last ``wait`` and the ``exit_maxtime``
    deadline (set by its first execution)."""

    now: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    last_wait: float | None = None
    deadline: float | None = None
    abort: Callable[[], bool] = field(default=lambda: False)


def substitute_job_names(
    text: str, scheme: Scheme, other: Callable[[str], Scheme | None] | None = None
) -> str:
    """RELION's ``changeStringForJobnames``: ``Schemes/NAME/KEY/...`` -> the job's current name
    (``KEY`` is everything between the scheme name and the last ``/``)."""
    if "Schemes/" not in text or "/" not in text:
        return text
    i = text.find("Schemes/")
    rest = text[i + len("Schemes/") :]
    sname, _, tail = rest.partition("/")
    key = tail.rsplit("/", 1)[0] if "/" in tail else ""
    if not key:
        return text
    target = scheme if scheme.short_name == sname else (other(sname) if other else None)
    if target is None or key not in target.jobs:
        return text
    current = target.jobs[key].current_name
    if not current.endswith("/"):
        current += "/"
    return text.replace(f"Schemes/{sname}/{key}/", current, 1)


def _float_arg(s: Scheme, name: str) -> float:
    if name in s.floats:
        return s.floats[name][0]
    try:
        return float(name)
    except ValueError:
        raise TamisError(
            f"scheme {s.name}: {name!r} is neither a float variable nor a number"
        ) from None


def _string_arg(s: Scheme, name: str) -> str:
    if name in s.strings:
        return s.strings[name][0]
    raise TamisError(f"scheme {s.name}: no string variable {name!r}")


def _bool_arg(s: Scheme, name: str) -> bool:
    if name in s.bools:
        return s.bools[name][0]
    raise TamisError(f"scheme {s.name}: no boolean variable {name!r}")


def _star_column(spec: str, project: Path) -> pd.Series:
    try:
        fname, table, label = [p.strip() for p in spec.split(",")]
    except ValueError:
        raise TamisError(f"{spec!r}: expected file,table,label") from None
    path = project / fname
    blocks = read_star(path)
    block = blocks.get(table)
    if block is None:
        raise TamisError(f"{path}: no table {table!r}")
    if isinstance(block, dict):
        block = pd.DataFrame([block])
    if label not in block.columns:
        raise TamisError(f"{path}: table {table} has no {label}")
    return block[label]


def _round_half_away(x: float) -> float:
    return float(math.floor(abs(x) + 0.5)) * (1 if x >= 0 else -1)


def perform(
    scheme: Scheme,
    name: str,
    *,
    project: str | Path = ".",
    clock: Clock | None = None,
    other: Callable[[str], Scheme | None] | None = None,
    email_command: str | None = None,
) -> bool:
    """Execute operator ``name``; returns False when the scheme should stop (``exit``,
    ``exit_maxtime`` past its deadline). Results go into the scheme's variables."""
    op = scheme.operators[name]
    t, out, in1, in2 = op.type, op.output, op.input1, op.input2
    proj = Path(project)
    clock = clock or Clock()
    s = scheme

    def path_of(var: str) -> Path:
        return proj / substitute_job_names(_string_arg(s, var), s, other)

    def set_float(v: float) -> None:
        s.floats[out] = (float(v), s.floats.get(out, (0.0, float(v)))[1])

    def set_bool(v: bool) -> None:
        s.bools[out] = (bool(v), s.bools.get(out, (False, bool(v)))[1])

    def set_string(v: str) -> None:
        s.strings[out] = (v, s.strings.get(out, (v, v))[1])

    if t not in OPERATOR_TYPES:
        raise TamisError(f"scheme {s.name}: operator {name} has unknown type {t!r}")
    if t == "bool=set":
        set_bool(_bool_arg(s, in1))
    elif t in ("bool=and", "bool=or"):
        a, b = _bool_arg(s, in1), _bool_arg(s, in2)
        set_bool(a and b if t == "bool=and" else a or b)
    elif t == "bool=not":
        set_bool(not _bool_arg(s, in1))
    elif t in ("bool=gt", "bool=lt", "bool=ge", "bool=le", "bool=eq"):
        a, b = _float_arg(s, in1), _float_arg(s, in2)
        set_bool({"bool=gt": a > b, "bool=lt": a < b, "bool=ge": a >= b, "bool=le": a <= b,
                  "bool=eq": abs(a - b) < 1e-8}[t])  # fmt: skip
    elif t == "bool=file_exists":
        set_bool(path_of(in1).exists())
    elif t.endswith("=read_star"):
        col = _star_column(substitute_job_names(_string_arg(s, in1), s, other), proj)
        row = int(_float_arg(s, in2)) if in2 not in (UNDEFINED, "") else 0
        value = col.iloc[row]
        if t == "bool=read_star":
            set_bool(bool(int(value)))
        elif t == "float=read_star":
            set_float(float(value))
        else:
            set_string(str(value))
    elif t == "float=set":
        set_float(_float_arg(s, in1))
    elif t in ("float=plus", "float=minus", "float=mult", "float=divide"):
        a, b = _float_arg(s, in1), _float_arg(s, in2)
        if t == "float=divide" and b == 0:
            raise TamisError(f"scheme {s.name}: operator {name} divides by zero")
        set_float(
            {"float=plus": a + b, "float=minus": a - b, "float=mult": a * b}.get(
                t, a / b if b else 0.0
            )
        )
    elif t == "float=round":
        set_float(_round_half_away(_float_arg(s, in1)))
    elif t == "float=count_images":
        path = path_of(in1)
        table = s.strings[in2][0] if in2 in s.strings else "particles"
        if not path.is_file():
            set_float(0)
        else:
            block = read_star(path).get(table)
            set_float(len(block) if isinstance(block, pd.DataFrame) else (1 if block else 0))
    elif t == "float=count_words":
        text = _string_arg(s, in1)
        set_float(0 if text in (UNDEFINED, "") else len(text.split(",")))
    elif t.startswith("float=star_table_"):
        col = pd.to_numeric(_star_column(substitute_job_names(_string_arg(s, in1), s, other), proj))
        kind = t[len("float=star_table_") :]
        if kind == "max":
            set_float(col.max())
        elif kind == "min":
            set_float(col.min())
        elif kind == "avg":
            set_float(col.mean())
        elif kind == "max_idx":
            set_float(int(col.to_numpy().argmax()))
        elif kind == "min_idx":
            set_float(int(col.to_numpy().argmin()))
        else:  # sort_idx: k = 1 smallest, 2 next ...; -1 largest
            k = int(_float_arg(s, in2))
            if k == 0 or abs(k) > len(col):
                raise TamisError(f"scheme {s.name}: {name}: sort index {k} out of range")
            order = col.to_numpy().argsort(kind="stable")
            set_float(int(order[k - 1] if k > 0 else order[k]))
    elif t == "string=set":
        set_string(_string_arg(s, in1))
    elif t == "string=join":
        set_string(_string_arg(s, in1) + _string_arg(s, in2))
    elif t in (
        "string=before_first",
        "string=after_first",
        "string=before_last",
        "string=after_last",
    ):
        text, sep = _string_arg(s, in1), _string_arg(s, in2)
        i = text.find(sep) if t.endswith("first") else text.rfind(sep)
        if i < 0:
            set_string(text)
        else:
            set_string(text[:i] if "before" in t else text[i + len(sep) :])
    elif t == "string=glob":
        hits = sorted(glob.glob(str(path_of(in1))))
        set_string(
            ",".join(
                str(Path(h).relative_to(proj)) if Path(h).is_relative_to(proj) else h for h in hits
            )
            or UNDEFINED
        )
    elif t == "string=nth_word":
        words = _string_arg(s, in1).split(",")
        n = int(_float_arg(s, in2))
        idx = n - 1 if n > 0 else len(words) + n
        set_string(words[idx] if 0 <= idx < len(words) and n != 0 else UNDEFINED)
    elif t == "touch_file":
        p = path_of(in1)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    elif t in ("copy_file", "move_file"):
        dest = path_of(in2)
        if "/" in _string_arg(s, in2):
            dest.parent.mkdir(parents=True, exist_ok=True)
        for src in sorted(glob.glob(str(path_of(in1)))):
            (shutil.copy2 if t == "copy_file" else shutil.move)(src, dest)
    elif t == "delete_file":
        for src in glob.glob(str(path_of(in1))):
            Path(src).unlink(missing_ok=True)
    elif t == "wait":
        seconds = _float_arg(s, in1)
        now = clock.now()
        if clock.last_wait is None:  # the first wait only starts the clock
            clock.last_wait = now
            return True
        while now - clock.last_wait < seconds and not clock.abort():
            clock.sleep(min(10.0, seconds - (now - clock.last_wait)))
            now = clock.now()
        if out not in (UNDEFINED, ""):
            set_float(now - clock.last_wait)
        clock.last_wait = now
    elif t == "email":
        if "email" in s.strings and email_command:
            values = [
                f"{v} = {s.strings.get(v, s.floats.get(v, s.bools.get(v, ('',))))[0]}"
                for v in (in1, in2)
                if v != UNDEFINED
            ]
            body = f"{time.ctime()}\n" + "\n".join(values) + "\n"
            cmd = email_command.format(address=s.strings["email"][0], subject=f"Scheme {s.name}")
            subprocess.run(cmd, shell=True, input=body, text=True, check=False)
    elif t == "exit_maxtime":
        hours = _float_arg(s, in1)
        if clock.deadline is None:
            clock.deadline = clock.now() + hours * 3600
        elif clock.now() > clock.deadline:
            return False
    elif t == "exit":
        return False
    return True
