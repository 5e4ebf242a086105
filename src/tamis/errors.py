"""Errors meant for the user: one line that names the file and the problem."""

from __future__ import annotations

from pathlib import Path

__all__ = ["TamisError", "InputFileError"]


class TamisError(Exception):
    """A user-facing error. The CLI prints its message as one line and exits non-zero."""


class InputFileError(TamisError):
    """A problem with an input file; the message starts with the file's path."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")
