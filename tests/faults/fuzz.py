"""A seeded mutation fuzzer for tamis's file readers (no dependency beyond numpy).

Each reader gets valid seed files (RELION-written STAR files of several versions, MRC images and
stacks, coordinate files, job.star and scheme.star) and mutated copies: bit flips, byte runs
inserted, deleted or duplicated, truncation, lines shuffled, duplicated or dropped, numbers replaced
by NaN/inf/huge/negative values, labels duplicated or renamed, Windows line ends, non-UTF-8 bytes,
empty loops, and for MRC headers fields set to odd values (mode, nx/ny/nz, nsymbt, extended header
sizes). A reader passes a case when it returns or raises :class:`tamis.errors.TamisError` (one line
naming the file), within the time limit; anything else is a finding.
"""

from __future__ import annotations

import io
import re
import signal
import struct
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tamis.errors import TamisError

ODD_NUMBERS = [b"nan", b"NaN", b"inf", b"-inf", b"1e308", b"-1e308", b"1e-320", b"0", b"-1",
               b"99999999999999999999", b"", b"\"\"", b"1.2.3", b"0x10", b"-0"]  # fmt: skip
ODD_BYTES = [b"\xff\xfe", b"\x00", b"\xc3\x28", b"\r\n", b"\r", b"\t", b"#", b"_", b"loop_", b"data_",
             b"\"", b"'", b" ", b"\n\n\n"]  # fmt: skip


def _mutate_text(rng: np.random.Generator, data: bytes) -> bytes:
    lines = data.split(b"\n")
    kind = int(rng.integers(9))
    if kind == 0 and lines:  # drop, duplicate or swap lines
        i = int(rng.integers(len(lines)))
        op = int(rng.integers(3))
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[i])
        else:
            j = int(rng.integers(len(lines)))
            lines[i], lines[j] = lines[j], lines[i]
        return b"\n".join(lines)
    if kind == 1:  # replace a number
        nums = list(re.finditer(rb"-?\d+(\.\d+)?([eE][-+]?\d+)?", data))
        if nums:
            m = nums[int(rng.integers(len(nums)))]
            odd = ODD_NUMBERS[int(rng.integers(len(ODD_NUMBERS)))]
            return data[: m.start()] + odd + data[m.end() :]
    if kind == 2:  # rename or duplicate a label
        labels = list(re.finditer(rb"_rln\w+", data))
        if labels:
            m = labels[int(rng.integers(len(labels)))]
            if rng.random() < 0.5:
                return data[: m.end()] + b"\n" + m.group() + data[m.end() :]
            return data[: m.start()] + b"_rlnNoSuchLabel" + data[m.end() :]
    if kind == 3:  # Windows line ends
        return data.replace(b"\n", b"\r\n")
    if kind == 4:  # odd bytes inserted
        i = int(rng.integers(len(data) + 1))
        return data[:i] + ODD_BYTES[int(rng.integers(len(ODD_BYTES)))] + data[i:]
    if kind == 5:  # an empty loop: keep the header of the first loop only
        m = re.search(rb"loop_\s*\n((?:\s*_rln\w+[^\n]*\n)+)", data)
        if m:
            return data[: m.end()]
    if kind == 6:  # truncate
        return data[: int(rng.integers(len(data) + 1))]
    return _mutate_bytes(rng, data)


def _mutate_bytes(rng: np.random.Generator, data: bytes) -> bytes:
    b = bytearray(data)
    kind = int(rng.integers(5))
    n = len(b)
    if kind == 0 and n:  # flip a few bits
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(n))
            b[i] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # insert random bytes
        i = int(rng.integers(n + 1))
        b[i:i] = rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    elif kind == 2 and n:  # delete a run
        i = int(rng.integers(n))
        del b[i : i + int(rng.integers(1, 256))]
    elif kind == 3 and n:  # duplicate a run
        i = int(rng.integers(n))
        b[i:i] = b[i : i + int(rng.integers(1, 256))]
    else:  # truncate
        del b[int(rng.integers(n + 1)) :]
    return bytes(b)


def _mutate_mrc(rng: np.random.Generator, data: bytes) -> bytes:
    if len(data) < 1024 or rng.random() < 0.3:
        return _mutate_bytes(rng, data)
    b = bytearray(data)
    # header words: nx ny nz mode (0-3), mx my mz (7-9), cella (10-12), mapc/r/s (16-18),
    # nsymbt (23), exttyp (26, 4 chars), nversion (27)
    word = int(rng.choice([0, 1, 2, 3, 7, 8, 9, 10, 16, 17, 18, 23, 26, 27]))
    value = int(rng.choice([0, -1, 1, 2, 3, 4, 6, 12, 101, 2**31 - 1, -(2**31), 65536, 1024]))
    if word == 10:
        b[40:44] = struct.pack("<f", float(rng.choice([0.0, -1.0, np.nan, np.inf, 1e30])))
    else:
        b[4 * word : 4 * word + 4] = struct.pack("<i", value)
    if rng.random() < 0.3:  # NaN pixels
        i = 1024 + 4 * int(rng.integers(max((len(b) - 1024) // 4, 1)))
        b[i : i + 4] = struct.pack("<f", np.nan)
    return bytes(b)


@dataclass
class FuzzReport:
    """Counts per reader, and the findings (input bytes and traceback) kept for a re-run."""

    reader: str
    cases: int = 0
    accepted: int = 0
    rejected: int = 0  # a TamisError
    findings: list[tuple[bytes, str]] = field(default_factory=list)
    hangs: int = 0


class _Timeout(Exception):
    pass


def _alarm(signum, frame):  # pragma: no cover - only on a hang
    raise _Timeout


def fuzz_reader(
    name: str,
    read: Callable[[Path], object],
    seeds: list[tuple[str, bytes]],
    work: Path,
    n: int,
    seed: int,
    *,
    binary: bool = False,
    timeout_s: int = 10,
) -> FuzzReport:
    """Feed ``n`` mutated copies of the seed files (one to four mutations each) to ``read``
    (which takes the path of a file written in ``work``)."""
    rng = np.random.default_rng(seed)
    report = FuzzReport(name)
    mutate = _mutate_mrc if binary else _mutate_text
    old = signal.signal(signal.SIGALRM, _alarm)
    # odd headers make mrcfile warn; the readers' answers are what is judged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _run_cases(read, work, _cases(rng, seeds, mutate, n), report, timeout_s)
        finally:
            signal.signal(signal.SIGALRM, old)
    return report


def _run_cases(read, work: Path, cases, report: FuzzReport, timeout_s: int) -> None:
    for case in cases:
        fname, data = case
        path = work / fname
        path.write_bytes(data)
        report.cases += 1
        signal.alarm(timeout_s)
        try:
            read(path)
            report.accepted += 1
        except TamisError as exc:
            msg = str(exc)
            if "\n" in msg.strip():
                report.findings.append((data, f"multi-line error: {msg!r}"))
            else:
                report.rejected += 1
        except _Timeout:
            report.hangs += 1
            report.findings.append((data, "hang"))
        except Exception:  # noqa: BLE001 - every other exception is a finding
            report.findings.append((data, traceback.format_exc(limit=12)))
        finally:
            signal.alarm(0)


def _cases(rng, seeds, mutate, n) -> Iterator[tuple[str, bytes]]:
    for _ in range(n):
        fname, data = seeds[int(rng.integers(len(seeds)))]
        for _ in range(int(rng.integers(1, 5))):
            data = mutate(rng, data)
        yield fname, data


def mrc_bytes(data: np.ndarray, pixel: float = 1.5, stack: bool = False) -> bytes:
    """An MRC file's bytes as tamis writes it (via a temporary file)."""
    import tempfile

    from tamis.io.mrc import write_mrc

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / ("x.mrcs" if stack else "x.mrc")
        write_mrc(p, data, pixel, stack=stack)
        return p.read_bytes()


def short(text: str, lines: int = 8) -> str:
    out = io.StringIO()
    for line in text.strip().splitlines()[-lines:]:
        out.write(line + "\n")
    return out.getvalue()
