"""STAR files as RELION writes and reads them, on top of the ``starfile`` package.

A STAR file is an ordered mapping ``block name -> block``. A block is either a loop
(a :class:`pandas.DataFrame`, one column per label, without the leading underscore) or a
key-value list (a ``dict``). Unknown labels and the block order survive a round trip.

Data files (particles, micrographs, movies) come in two dialects:

* RELION 3.1+ : ``data_optics`` plus ``data_particles`` / ``data_micrographs`` / ``data_movies``;
* RELION 3.0 and earlier : a single table with voltage, Cs, amplitude contrast and pixel size
  per row, and ``rlnOriginX/Y`` in pixels.

:func:`read_data_star` returns either dialect as a :class:`DataStar` in the 3.1 layout.
"""

from __future__ import annotations

import contextlib
import errno
import linecache
import os
import shlex
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import starfile

from tamis.errors import InputFileError, TamisError

__all__ = [
    "write_relion_star",
    "Block",
    "DataStar",
    "read_star",
    "write_star",
    "read_data_star",
    "write_data_star",
    "require_columns",
    "parse_image_names",
    "format_image_names",
    "atomic_path",
    "LoopText",
    "format_loop_rows",
    "loop_file_parts",
]


@dataclass
class LoopText:
    """A loop whose rows are text already (tab-separated, as :func:`format_loop_rows` makes
    them): written as is. Lets several processes format their share of a large table."""

    columns: list[str]
    rows: str  # rows joined by newlines, no trailing newline ("" for no rows)


Block = pd.DataFrame | dict[str, Any] | LoopText

#: Data kinds, in the order RELION looks for them.
DATA_KINDS = ("particles", "micrographs", "movies", "tilt_images")

#: Per-row columns that RELION 3.1 moved into the optics table.
_OPTICS_FROM_30 = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Read once at import (setting the umask to read it is not thread-safe).
_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    A kill at any moment leaves either the old file or the complete new one, never a torn file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        _raise_if_disk(exc, path)
        raise
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600); give it the usual permissions (0666 & ~umask)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            _raise_if_disk(exc, path)
        raise


#: Write failures that are the machine's state, not a bug: one line naming the file.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def _raise_if_disk(exc: OSError, path: Path) -> None:
    if exc.errno in _DISK_ERRNOS:
        reason = exc.strerror or os.strerror(exc.errno)
        raise TamisError(f"{path}: cannot write ({reason})") from None


def read_star(path: str | Path) -> dict[str, Block]:
    """Read every block of a STAR file, in file order.

    Raises :class:`~tamis.errors.InputFileError` (one line, naming the file) when the file is
    missing, empty or not STAR.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "file not found" if not path.exists() else "not a file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError as exc:
        raise InputFileError(path, f"cannot read ({exc.strerror})") from None
    if b"\r\n" in head:
        # RELION rejects CR+LF outright; say so rather than accept a file RELION cannot open.
        raise InputFileError(path, "has Windows (CR+LF) line endings, which RELION rejects")
    if b"data_" not in head and path.stat().st_size <= len(head):
        raise InputFileError(path, "not a STAR file (no data_ block)")
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=[])
    except Exception as exc:  # starfile/pandas raise many types for malformed text
        where = _first_bad_line(path)
        raise InputFileError(path, f"malformed STAR file ({where or _one_line(exc)})") from None
    finally:
        # starfile reads lines through linecache and clears it only after a successful parse:
        # after a failure (a file read while being written) the next read of the same path
        # would get the old lines
        linecache.clearcache()
    if not blocks:
        raise InputFileError(path, "not a STAR file (no data_ block)")
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame) and block.columns.duplicated().any():
            dup = block.columns[block.columns.duplicated()][0]
            raise InputFileError(path, f"data_{name} has the label _{dup} more than once")
    return dict(blocks)


def write_star(
    blocks: Mapping[str, Block], path: str | Path, *, comment: str | None = None
) -> None:
    """Write blocks in order, atomically (temporary file, then rename).

    Loops end with a blank line, strings with spaces are quoted and the empty string is
    written as ``""``, as RELION expects. ``comment`` (which may span lines) becomes the file's
    first ``#`` lines, as in RELION's optimiser files.
    """
    out: dict[str, Block] = {}
    for name, block in blocks.items():
        if isinstance(block, LoopText):
            out[name] = block
        elif isinstance(block, pd.DataFrame):
            out[name] = _shortest_floats(block)
        elif isinstance(block, Mapping):
            out[name] = {k: _plain(v) for k, v in block.items()}
        else:
            raise TypeError(f"block {name!r}: expected a DataFrame or a dict, got {type(block)}")
    with atomic_path(path) as tmp:
        tmp.write_text(_star_text(out))
        if comment is not None:
            text = tmp.read_text()
            body = text.split("\n", 1)[1] if text.startswith("#") else text
            head = "\n".join(
                f"# {line}" if not line.startswith("#") else line for line in comment.splitlines()
            )
            tmp.write_text(head + "\n" + body)


def write_relion_star(
    path: str | Path,
    blocks: dict[str, dict[str, Any] | list[tuple[list[str], list[list[Any]]]] | tuple],
    *,
    version: int = 50001,
) -> None:
    """Write blocks in RELION's own layout, atomically: ``# version N`` before each block, a
    key/value list (``dict``) or a loop (``(labels, rows)``) per block, strings with spaces
    double-quoted and the empty string as ``""``, a blank line after every loop. Used for the
    pipeline and scheme files, where RELION 5 decides on conversions by the version line."""

    def q(v: Any) -> str:
        if isinstance(v, bool):
            return "1" if v else "0"
        text = str(v)
        if text == "":
            return '""'
        return f'"{text}"' if any(c.isspace() for c in text) else text

    lines = [""]
    for name, block in blocks.items():
        lines += [f"# version {version}", "", f"data_{name}", ""]
        if isinstance(block, dict):
            width = max((len(k) for k in block), default=0) + 2
            lines += [f"_{k:<{width}}{q(v)}" for k, v in block.items()]
        else:
            labels, rows = block
            lines.append("loop_ ")
            lines += [f"_{lab} #{i + 1} " for i, lab in enumerate(labels)]
            lines += [" ".join(q(v) for v in row) + " " for row in rows]
        lines += ["", ""]
    with atomic_path(Path(path)) as tmp:
        tmp.write_text("\n".join(lines))


def require_columns(
    table: pd.DataFrame, columns: Iterable[str], path: str | Path, block: str
) -> None:
    """Raise a one-line :class:`InputFileError` if ``table`` lacks any of ``columns``."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        names = ", ".join(missing)
        raise InputFileError(path, f"data_{block} lacks required column(s) {names}")


@dataclass
class DataStar:
    """A RELION data STAR file in the 3.1 layout.

    Attributes
    ----------
    optics
        One row per optics group, with ``rlnOpticsGroup`` numbered 1..N.
    table
        The particles/micrographs/movies table; ``rlnOpticsGroup`` refers to ``optics``.
    kind
        ``"particles"``, ``"micrographs"``, ``"movies"`` or ``"tilt_images"``.
    other
        Any further blocks of the file, kept for writing back.
    converted_from_30
        True when the file was in the RELION 3.0 layout and was converted on reading.
    """

    optics: pd.DataFrame
    table: pd.DataFrame
    kind: str
    other: dict[str, Block]
    converted_from_30: bool = False

    def blocks(self) -> dict[str, Block]:
        """The blocks to write: optics, the data table, then the others."""
        return {"optics": self.optics, self.kind: self.table, **self.other}


def read_data_star(path: str | Path, kind: str | None = None) -> DataStar:
    """Read a particles/micrographs/movies STAR file of any RELION dialect (3.0 to 5).

    Parameters
    ----------
    path
        The STAR file.
    kind
        The expected data block (``"particles"``, ...). ``None`` takes the first one present.
    """
    path = Path(path)
    blocks = read_star(path)
    try:
        return _read_data_blocks(path, blocks, kind)
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        # a value of the wrong type (text in a number column, NaN in an integer one, ...)
        raise InputFileError(path, f"malformed data table ({_one_line(exc)})") from None


def _read_data_blocks(path: Path, blocks: dict[str, Block], kind: str | None) -> DataStar:
    if "optics" in blocks:
        optics = blocks["optics"]
        if not isinstance(optics, pd.DataFrame):
            optics = pd.DataFrame([optics])
        kinds = [kind] if kind else list(DATA_KINDS)
        found = next((k for k in kinds if k in blocks), None)
        if found is None:
            want = f"data_{kind}" if kind else "a data_particles/micrographs/movies block"
            raise InputFileError(path, f"has data_optics but no {want}")
        table = blocks[found]
        if not isinstance(table, pd.DataFrame):
            table = pd.DataFrame([table])
        other = {k: v for k, v in blocks.items() if k not in ("optics", found)}
        require_columns(
            optics, ["rlnOpticsGroup", "rlnVoltage", "rlnSphericalAberration"], path, "optics"
        )
        if not any(
            c in optics.columns
            for c in (
                "rlnImagePixelSize",
                "rlnMicrographPixelSize",
                "rlnMicrographOriginalPixelSize",
            )
        ):
            raise InputFileError(
                path,
                "data_optics lacks a pixel size (rlnImagePixelSize, rlnMicrographPixelSize or "
                "rlnMicrographOriginalPixelSize)",
            )
        if "rlnOpticsGroup" not in table.columns:
            if len(optics) != 1:
                raise InputFileError(path, f"data_{found} lacks rlnOpticsGroup")
            table = table.assign(rlnOpticsGroup=1)
        known = set(_integers(optics["rlnOpticsGroup"], path, "optics"))
        unknown = sorted(set(_integers(table["rlnOpticsGroup"], path, found)) - known)
        if unknown:
            raise InputFileError(
                path, f"data_{found} refers to optics group(s) {unknown} missing from data_optics"
            )
        return DataStar(optics, table, found, other)

    # RELION 3.0: one loop block, conventionally unnamed ("data_").
    loops = [(k, v) for k, v in blocks.items() if isinstance(v, pd.DataFrame)]
    if not loops:
        raise InputFileError(path, "has no data table (loop_)")
    name, table = loops[0]
    if not len(table):
        raise InputFileError(path, "its data table has no rows")
    if kind is None:
        kind = _guess_kind(table)
    return _convert_30(path, table, kind, {k: v for k, v in blocks.items() if k != name})


def write_data_star(data: DataStar, path: str | Path) -> None:
    """Write a :class:`DataStar` in the RELION 3.1+ layout, atomically."""
    write_star(data.blocks(), path)


def parse_image_names(names: pd.Series | Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rlnImageName`` values ``"N@stack.mrcs"`` into 0-based indices and stack paths.

    A name without ``@`` is a single image (index 0). Zero-padded or plain numbers are accepted.
    """
    s = pd.Series(list(names) if not isinstance(names, pd.Series) else names, dtype=object)
    s = s.astype(str)
    if s.empty:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=object)
    has_at = s.str.contains("@", regex=False)
    parts = s.str.split("@", n=1, expand=True)
    if parts.shape[1] == 1:
        parts[1] = None
    idx_text = parts[0].where(has_at, "1")
    paths = parts[1].where(has_at, s)
    numeric = pd.to_numeric(idx_text, errors="coerce")
    bad = numeric.isna() | (numeric < 1)
    if bad.any():
        first = s[bad].iloc[0]
        raise ValueError(f"bad image name {first!r} (expected N@stack.mrcs with N >= 1)")
    return numeric.to_numpy(dtype=np.int64) - 1, paths.to_numpy(dtype=object)


def format_image_names(indices: Iterable[int], path: str | Path) -> list[str]:
    """``rlnImageName`` values for 0-based ``indices`` of one stack, RELION-style (6 digits)."""
    p = str(path)
    return [f"{i + 1:06d}@{p}" for i in indices]


# --------------------------------------------------------------------------------------------


def _star_text(blocks: Mapping[str, Block]) -> str:
    """What ``starfile.write`` writes for these blocks (its header comment, key/value blocks,
    loops as tab-separated rows), with the loops of plain columns (text, integers, booleans: the
    floats are text already) formatted column by column -- 4x faster than pandas' ``to_csv``
    through ``DataFrame.map``, which matters for data.star files of a million particles. Other
    loops go through starfile's own writer."""
    from starfile import writer

    lines = [writer.package_info(), "", ""]
    for name, block in blocks.items():
        if isinstance(block, LoopText):
            lines.extend((f"data_{name}", "", "loop_"))
            lines.extend(f"_{c} #{i}" for i, c in enumerate(block.columns, 1))
            if block.rows:
                lines.append(block.rows)
            lines.extend(("", ""))
        elif isinstance(block, pd.DataFrame):
            rows = _loop_rows(block)
            if rows is None:
                lines.extend(writer.loop_block(block_name=name, df=block))
                continue
            lines.append(f"data_{name}")
            lines.append("")
            lines.append("loop_")
            lines.extend(f"_{c} #{i}" for i, c in enumerate(block.columns, 1))
            lines.extend(rows)
            lines.extend(("", ""))
        else:
            lines.extend(writer.simple_block(block_name=name, data=block))
    return "".join(line + "\n" for line in lines)


def loop_file_parts(blocks: Mapping[str, Block], name: str, columns: list[str]) -> tuple[str, str]:
    """The text before and after the rows of a last loop ``name`` (after ``blocks``): a file
    is ``head + rows + "\\n" + tail`` (``head + tail`` without rows), as :func:`write_star`
    writes a :class:`LoopText` of those rows."""
    out = {
        k: (_shortest_floats(b) if isinstance(b, pd.DataFrame) else b) for k, b in blocks.items()
    }
    text = _star_text({**out, name: LoopText(list(columns), "")})
    return text[:-2], "\n\n"


def format_loop_rows(table: pd.DataFrame) -> str:
    """The rows of ``table`` as :func:`write_star` writes them (floats as their shortest text),
    joined by newlines: a :class:`LoopText`'s ``rows``."""
    text = _shortest_floats(table)
    rows = _loop_rows(text)
    if rows is None:  # a column starfile formats: let it, and keep its rows
        from starfile import writer

        rows = list(writer.loop_block(block_name="x", df=text))[3 + len(table.columns) : -2]
    return "\n".join(rows)


def _loop_rows(table: pd.DataFrame) -> list[str] | None:
    """A loop's rows as starfile writes them (strings with a space, or empty, in double quotes),
    or None when a column holds anything but text, integers or booleans."""
    columns = []
    for c in table.columns:
        values = table[c]
        kind = values.dtype.kind
        if kind in "iub":
            columns.append(list(map(str, values.tolist())))
            continue
        if kind != "O":
            return None
        items = values.tolist()
        if not all(type(x) is str and "\t" not in x and "\n" not in x for x in items):
            return None
        columns.append([x if x and " " not in x else f'"{x}"' for x in items])
    if not columns:
        return None
    return list(map("\t".join, zip(*columns, strict=True)))


def _shortest_floats(table: pd.DataFrame) -> pd.DataFrame:
    """Floats as the shortest text that reads back to the same value (float32 columns as float32),
    so a round trip changes no value and computed float32 data stays readable."""
    floats = [c for c in table.columns if pd.api.types.is_float_dtype(table[c])]
    if not floats:
        return table
    table = table.copy()
    for c in floats:
        values = table[c].to_numpy()
        if values.dtype == np.float32:
            table[c] = values.astype(str)
        else:
            table[c] = [repr(v) for v in values.astype(np.float64).tolist()]
    return table


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def _first_bad_line(path: Path) -> str | None:
    """Where a STAR file breaks the format, for the error message: bytes that are not UTF-8, text
    outside any block, a key without one value, a loop row with another number of fields than
    the loop has labels (None if none of these is found)."""
    try:
        raw_bytes = path.read_bytes()
    except OSError:
        return None
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw_bytes[: exc.start].count(b"\n") + 1
        return f"line {line}: bytes that are not UTF-8 text"
    labels = 0
    in_header = in_loop = False
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            fields = shlex.split(line, comments=True)
        except ValueError:
            return f"line {number}: unbalanced quotes"
        if not fields:
            continue
        if line.startswith("data_"):
            in_header = in_loop = False
        elif line.startswith("loop_"):
            in_header, in_loop, labels = True, True, 0
        elif line.startswith("_"):
            if in_loop and not in_header:
                return f"line {number}: label {fields[0]} after the loop's rows"
            if in_header:
                labels += 1
            elif len(fields) != 2:
                what = "no value" if len(fields) < 2 else f"{len(fields) - 1} values"
                return f"line {number}: {fields[0]} has {what}"
        elif in_loop:
            in_header = False
            if len(fields) != labels:
                return f"line {number}: {len(fields)} values in a loop of {labels} labels"
        else:
            return f"line {number}: {fields[0][:20]!r} outside any loop or label"
    return None


def _integers(column: pd.Series, path: Path, block: str) -> list[int]:
    """The values of an integer column, or one error naming the first value that is not one."""
    values = pd.to_numeric(column, errors="coerce")
    bad = ~np.isfinite(values.to_numpy(dtype=float)) | (values != values.round())
    if bad.any():
        first = column[bad].iloc[0]
        raise InputFileError(path, f"{column.name} in data_{block} holds {first}, not an integer")
    return values.astype(int).tolist()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _guess_kind(table: pd.DataFrame) -> str:
    if "rlnImageName" in table.columns:
        return "particles"
    if "rlnMicrographMovieName" in table.columns:
        return "movies"
    return "micrographs"


def _convert_30(path: Path, table: pd.DataFrame, kind: str, other: dict[str, Block]) -> DataStar:
    """RELION 3.0 -> 3.1: optics groups from unique (voltage, Cs, Q0, pixel size) rows."""
    table = table.copy()
    missing = [c for c in ("rlnVoltage", "rlnSphericalAberration") if c not in table.columns]
    if missing:
        raise InputFileError(
            path,
            f"has no data_optics block and its table lacks {', '.join(missing)} "
            "(neither RELION 3.1 nor 3.0 layout)",
        )
    if "rlnAmplitudeContrast" not in table.columns:
        table["rlnAmplitudeContrast"] = 0.1
    if "rlnImagePixelSize" in table.columns:
        pix = table["rlnImagePixelSize"].astype(float)
    elif "rlnDetectorPixelSize" in table.columns and "rlnMagnification" in table.columns:
        pix = (
            1e4
            * table["rlnDetectorPixelSize"].astype(float)
            / table["rlnMagnification"].astype(float)
        )
    else:
        raise InputFileError(
            path,
            "RELION 3.0 file without a pixel size (needs rlnDetectorPixelSize and rlnMagnification)",
        )
    pix = pix.round(6)
    key_cols = list(_OPTICS_FROM_30)
    keys = pd.DataFrame({c: table[c].astype(float) for c in key_cols}).assign(_pix=pix)
    groups = keys.drop_duplicates().reset_index(drop=True)
    group_of = keys.merge(groups.reset_index(), on=[*key_cols, "_pix"], how="left")["index"]
    optics = groups.rename(columns={"_pix": _pixel_label(kind)})
    optics.insert(0, "rlnOpticsGroup", np.arange(1, len(optics) + 1))
    optics.insert(0, "rlnOpticsGroupName", [f"opticsGroup{i}" for i in range(1, len(optics) + 1)])
    if kind == "particles":
        optics["rlnImageDimensionality"] = 2
    table["rlnOpticsGroup"] = group_of.to_numpy() + 1
    for axis in ("X", "Y"):
        old = f"rlnOrigin{axis}"
        if old in table.columns:
            table[f"rlnOrigin{axis}Angst"] = table[old].astype(float) * pix
            table = table.drop(columns=[old])
    drop = [
        c
        for c in (*_OPTICS_FROM_30, "rlnDetectorPixelSize", "rlnMagnification", "rlnImagePixelSize")
        if c in table.columns
    ]
    table = table.drop(columns=drop)
    return DataStar(optics, table, kind, other, converted_from_30=True)


def _pixel_label(kind: str) -> str:
    return "rlnImagePixelSize" if kind == "particles" else "rlnMicrographPixelSize"
