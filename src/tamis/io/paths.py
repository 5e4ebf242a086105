"""Where a job may read from: inside a pipeline job, files that a STAR file names (particle
stacks, micrographs, movies, coordinate files) must lie inside the project, lexically -- a name that is absolute
outside the project or climbs out of it with ``..`` is refused with one line -- unless the user
asked otherwise (the job option ``tamis_allow_outside Yes`` or ``TAMIS_ALLOW_OUTSIDE=1``).

Links inside the project are followed wherever they point: linking raw data into the project
(``Movies -> /data/session``) is how RELION expects data to enter it. Outside a pipeline job
(the CLI on files, a notebook) nothing is confined.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from tamis.errors import InputFileError

__all__ = ["confined_to", "checked", "confinement"]

_ROOT: list[Path | None] = [None]


def confinement() -> Path | None:
    """The project reads are confined to, or None."""
    return _ROOT[0]


@contextlib.contextmanager
def confined_to(root: str | Path | None, allow_outside: bool = False) -> Iterator[None]:
    """Confine reads of named files to ``root`` (lexically) for the duration; ``allow_outside``
    (or ``TAMIS_ALLOW_OUTSIDE=1``) lifts it."""
    if os.environ.get("TAMIS_ALLOW_OUTSIDE", "") not in ("", "0"):
        allow_outside = True
    before = _ROOT[0]
    _ROOT[0] = None if (allow_outside or root is None) else Path(os.path.abspath(root))
    try:
        yield
    finally:
        _ROOT[0] = before


def checked(path: str | Path, named_in: str | Path | None) -> Path:
    """``path`` itself when reads are not confined or it lies inside the project (lexically,
    relative names from the current directory); else one :class:`InputFileError` naming the
    STAR file that named it."""
    root = _ROOT[0]
    p = Path(path)
    if root is None:
        return p
    full = Path(os.path.normpath(os.path.join(os.getcwd(), p)))
    real, real_root = Path(os.path.realpath(full)), Path(os.path.realpath(root))
    # inside as named (a link inside the project may point anywhere), or inside once both are
    # resolved (the project reached through a link of its own, e.g. /tmp -> /private/tmp)
    if full == root or root in full.parents or real == real_root or real_root in real.parents:
        return p
    raise InputFileError(
        named_in or p,
        f"names {path}, outside the project {root}: link the data into the project, or set the "
        "job option tamis_allow_outside Yes (or TAMIS_ALLOW_OUTSIDE=1) to read it there",
    )
