"""Errors meant for the user: one line that names the file and the problem."""

from __future__ import annotations

from pathlib import Path

__all__ = ["TamisError", "InputFileError", "is_out_of_memory", "out_of_memory_error"]


class TamisError(Exception):
    """A user-facing error. The CLI prints its message as one line and exits non-zero."""


class InputFileError(TamisError):
    """A problem with an input file; the message starts with the file's path."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def is_out_of_memory(exc: BaseException) -> bool:
    """A failed allocation (CPU or GPU), as opposed to another runtime error."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def out_of_memory_error(exc: BaseException) -> TamisError:
    """One line for an allocation that failed where no smaller batch helps (the E-step retries
    on smaller batches first): what was asked for and what to change."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return TamisError(
        f"out of memory ({first[:160]}): lower --max_memory / the batch size, use fewer "
        "threads or ranks per node, a smaller box (--scale when extracting) or a device with "
        "more memory"
    )
