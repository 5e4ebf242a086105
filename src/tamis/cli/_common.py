"""What every command shares: the console and turning user mistakes into one-line errors."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console

from tamis.errors import TamisError, is_out_of_memory, out_of_memory_error

P = ParamSpec("P")
R = TypeVar("R")

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` on one line to stderr and return the exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def user_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn user mistakes (bad files, bad values) into one error line and a non-zero exit.

    Bugs still raise with a traceback: those are ours to fix, not the user's.
    """

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except TamisError as exc:
            raise fail(str(exc)) from None
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            name = exc.filename or ""
            raise fail(f"{name}: {exc.strerror}" if name else str(exc)) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            sys.exit(130)
        except (RuntimeError, MemoryError) as exc:
            if is_out_of_memory(exc):  # the machine's limit, not a bug
                raise fail(str(out_of_memory_error(exc))) from None
            raise

    return wrapper


def offset_prior_option(centre: str):
    """``--offset_prior angst|relion`` (``Class2DOptions.offset_prior``); ``centre``: where
    RELION's form centres the prior (2D: its class centres; 3D: zero)."""
    return typer.Option(
        "angst",
        "--offset_prior",
        help="angst (default): a Gaussian on the total offset in A around each class's mean "
        "offset. relion: as relion_refine computes it, pixels and A mixed in the exponent (on "
        f"data of pixel size p A each iteration's translations held p times tighter), {centre}; "
        "a continued RELION run then gives RELION's own next iteration. A continued tamis run "
        "keeps its own unless given.",
    )


def offset_option():
    """``--offset``: the offsets' initial sigma (``Class2DOptions.offset``)."""
    return typer.Option(
        10.0, "--offset", help="Initial estimated stddev of the origin offsets (A; RELION's)."
    )


def fix_sigma_offset_option():
    """``--fix_sigma_offset`` (``Class2DOptions.fix_sigma_offset``)."""
    return typer.Option(
        False,
        "--fix_sigma_offset",
        help="Keep the offsets' stddev at --offset instead of re-estimating it every iteration "
        "(RELION's option).",
    )


def dask_workers_option():
    """``--dask_workers N``: micrographs on N dask worker processes (a LocalCluster here)."""
    import typer

    return typer.Option(
        1, "--dask_workers", help="Micrographs on N dask worker processes (1: this process)."
    )


def dask_cluster_option():
    import typer

    return typer.Option(
        "local",
        "--dask_cluster",
        help="With --dask_workers: local (LocalCluster), slurm (dask-jobqueue) or a scheduler "
        "address tcp://host:port.",
    )


def workers_of(n: int, cluster: str, threads: int = 1):
    from tamis.workers import Workers

    return Workers(n=max(1, n), threads=max(1, threads), cluster=cluster)
