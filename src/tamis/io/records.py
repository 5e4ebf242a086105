"""JSON records beside model weights (calibration, provenance): read as data only."""

from __future__ import annotations

import json
from pathlib import Path

from tamis.errors import InputFileError

__all__ = ["read_model_record"]


def read_model_record(path: str | Path) -> dict:
    """The JSON object in ``path`` ({} when there is no file); a file that is not a JSON object
    (bad syntax, not UTF-8, another top-level type) is one error naming it."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))  # NaN allowed, as json.dumps writes it
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        first = str(exc).strip().splitlines()
        raise InputFileError(
            path, f"not a valid JSON record ({first[0] if first else exc!r})"
        ) from None
    if not isinstance(meta, dict):
        raise InputFileError(path, f"a JSON object is expected, not a {type(meta).__name__}")
    return meta
