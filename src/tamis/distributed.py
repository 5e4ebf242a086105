"""Data-parallel runs over ranks with ``torch.distributed`` (launched by ``torchrun``, locally or
through SLURM): one rank per GPU, or several CPU ranks on gloo.

A run started by ``torchrun`` finds ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` in its environment;
:func:`session` joins the process group (NCCL for CUDA tensors, gloo on the CPU) and leaves it at
the end. Each rank takes a contiguous share of the particles (:func:`share`), the E-step's sums
are added up over ranks (:func:`all_sum`), and every rank then runs the same M-step on the same
sums. Rank 0 alone writes files and logs. Outside ``torchrun`` every function here is the
identity of a single process, so the same code runs serially.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields, is_dataclass

import torch

from tamis.errors import TamisError

__all__ = [
    "Ranks",
    "world",
    "is_main",
    "session",
    "share",
    "all_sum",
    "all_sum_floats",
    "any_flag",
    "broadcast_tensors",
    "broadcast_object",
    "write_shared",
    "launch_command",
    "COMM_STATS",
]

#: Bytes and seconds spent in :func:`all_sum` by this process (benchmarks read them).
COMM_STATS = {"bytes": 0, "seconds": 0.0, "calls": 0}

#: Tensors below this many bytes are added up in one flat buffer per dtype (one collective
#: instead of many small ones); larger ones go on their own, without a copy.
_COALESCE_BYTES = 1 << 20


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    size: int = 1


def _dist() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world() -> Ranks:
    """This process's rank and the number of ranks (``Ranks(0, 1)`` outside a process group)."""
    if not _dist():
        return Ranks()
    import torch.distributed as dist

    return Ranks(dist.get_rank(), dist.get_world_size())


def is_main() -> bool:
    """Rank 0, or a process outside ``torchrun`` (also before or after the process group)."""
    if _dist():
        return world().rank == 0
    return os.environ.get("RANK", "0") == "0"


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise TamisError(f"WORLD_SIZE {os.environ['WORLD_SIZE']!r}: not a number") from None


def local_device(device: torch.device) -> torch.device:
    """Under ``torchrun``, CUDA means this rank's GPU (``LOCAL_RANK``), one rank per GPU."""
    if device.type != "cuda" or device.index is not None or _env_world_size() <= 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise TamisError(
            f"rank {os.environ.get('RANK')} wants GPU {local} but this node has "
            f"{torch.cuda.device_count()}: start at most one rank per GPU (--nproc-per-node)"
        )
    return torch.device("cuda", local)


def _raise_on_sigterm(signum, frame) -> None:  # pragma: no cover - signal path
    # torchrun ends the other ranks with SIGTERM when one fails: turn it into an error so that
    # the pipeliner's failure marker and a line saying why are written on the way out.
    raise TamisError(
        f"rank {os.environ.get('RANK', '?')} stopped by SIGTERM (under torchrun: another rank "
        "failed or was killed; torchrun's report is in run.out)"
    )


@contextlib.contextmanager
def session(device: torch.device, *, timeout_minutes: float | None = None) -> Iterator[Ranks]:
    """Join the process group ``torchrun`` describes (nothing to do when ``WORLD_SIZE`` is 1 or a
    group exists already); yields this process's :class:`Ranks` and leaves the group at the end.
    ``timeout_minutes`` bounds every collective (default ``TAMIS_DIST_TIMEOUT`` minutes, 30)."""
    size = _env_world_size()
    if size <= 1 or _dist():
        yield world()
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise TamisError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    minutes = timeout_minutes or float(os.environ.get("TAMIS_DIST_TIMEOUT", "30"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=minutes), **kwargs)
    except (RuntimeError, ValueError) as exc:
        raise TamisError(f"joining the ranks of this run ({backend}) failed: {exc}") from None
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        yield world()
    except BaseException:
        raise  # no barrier: the others may be in another collective; leaving ends this rank
    else:
        with contextlib.suppress(Exception):
            dist.barrier()  # all ranks done before the group goes
    finally:
        signal.signal(signal.SIGTERM, previous)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def share(n: int, ranks: Ranks | None = None) -> tuple[int, int]:
    """This rank's contiguous share ``[lo, hi)`` of ``n`` items (sizes differ by at most one)."""
    r = ranks or world()
    return n * r.rank // r.size, n * (r.rank + 1) // r.size


def _comm_device() -> torch.device | None:
    """Where tensors must be for the collectives (NCCL: this rank's GPU; gloo: anywhere)."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def _as_real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def all_sum(tensors: Iterable[torch.Tensor | None]) -> None:
    """Replace each tensor by its sum over ranks, in place (complex as pairs of reals; ``None``
    and empty tensors skipped). Small tensors travel together in one buffer per dtype."""
    if not _dist():
        return
    import time

    import torch.distributed as dist

    t0 = time.perf_counter()
    comm = _comm_device()
    small: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        real = _as_real(t)
        if real.dtype == torch.bool:
            raise TypeError("all_sum: boolean tensors cannot be summed")
        if real.numel() * real.element_size() < _COALESCE_BYTES:
            small.setdefault((real.dtype, real.device), []).append(real)
            continue
        COMM_STATS["bytes"] += real.numel() * real.element_size()
        COMM_STATS["calls"] += 1
        if comm is None and real.is_contiguous():
            dist.all_reduce(real)
        else:
            buf = real.to(comm or real.device).contiguous()
            dist.all_reduce(buf)
            real.copy_(buf)
    for (_dtype, dev), group in small.items():
        flat = torch.cat([g.reshape(-1) for g in group]).to(comm or dev)
        COMM_STATS["bytes"] += flat.numel() * flat.element_size()
        COMM_STATS["calls"] += 1
        dist.all_reduce(flat)
        start = 0
        for g in group:
            g.copy_(flat[start : start + g.numel()].view(g.shape))
            start += g.numel()
    COMM_STATS["seconds"] += time.perf_counter() - t0


def all_sum_floats(values: Sequence[float]) -> list[float]:
    """Python numbers summed over ranks (float64)."""
    if not _dist():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    all_sum([t])
    return t.tolist()


def any_flag(flag: bool) -> bool:
    """True on every rank when it is true on any (a collective: every rank must call it)."""
    if not _dist():
        return bool(flag)
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
    comm = _comm_device()
    if comm is not None:
        t = t.to(comm)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_tensors(obj) -> None:
    """Every tensor field of the dataclass ``obj`` (or every tensor of a list) replaced, in place,
    by rank 0's: ranks that ran the same M-step keep bit-identical models whatever their
    threads' summation order."""
    if not _dist():
        return
    import torch.distributed as dist

    if is_dataclass(obj):
        items = [getattr(obj, f.name) for f in fields(obj)]
    else:
        items = list(obj)
    comm = _comm_device()
    for t in items:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        real = _as_real(t)
        if comm is None and real.is_contiguous():
            dist.broadcast(real, src=0)
        else:
            buf = real.to(comm or real.device).contiguous()
            dist.broadcast(buf, src=0)
            real.copy_(buf)


def broadcast_object(obj):
    """Rank 0's (picklable) object on every rank."""
    if not _dist():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def write_shared(path, head: str, chunk: str, tail: str) -> None:
    """One text file from every rank's ``chunk`` (rows, without the final newline) in rank
    order, between rank 0's ``head`` and ``tail``: each rank writes its bytes at its offset of
    one temporary file beside ``path`` (a shared file system across nodes), and rank 0 renames it
    into place once all have written (atomic, as :func:`tamis.io.star.atomic_path`). A rank that
    cannot write fails every rank with one error; nothing is left under ``path``'s name."""
    from pathlib import Path

    from tamis.io.star import atomic_path

    data = (chunk + "\n").encode() if chunk else b""
    path = Path(path)
    if not _dist():
        with atomic_path(path) as tmp:
            tmp.write_bytes(head.encode() + data + tail.encode())
        return
    import torch.distributed as dist

    rank = dist.get_rank()
    sizes = [0] * dist.get_world_size()
    dist.all_gather_object(sizes, len(data))

    def put(tmp: str, offset: int) -> str | None:
        try:
            with open(tmp, "r+b") as f:
                f.seek(offset)
                f.write(data)
        except OSError as exc:
            return f"{path}: cannot write ({exc.strerror})"
        return None

    def finish(error: str | None) -> None:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)  # also: every rank has written
        failed = [e for e in errors if e]
        if failed:
            raise TamisError(failed[0])

    if rank != 0:
        where = broadcast_object(None)
        if isinstance(where, str):  # rank 0 could not make the file
            raise TamisError(where)
        tmp, start = where
        finish(put(tmp, start + sum(sizes[:rank])))
        return
    head_b, tail_b = head.encode(), tail.encode()
    with atomic_path(path) as tmp:
        start = len(head_b)
        try:
            with open(tmp, "r+b") as f:
                f.write(head_b)
                f.truncate(start + sum(sizes) + len(tail_b))
                f.seek(start + sum(sizes))
                f.write(tail_b)
        except OSError as exc:
            broadcast_object(f"{path}: cannot write ({exc.strerror})")
            raise
        broadcast_object((str(tmp), start))
        finish(put(str(tmp), start))  # rank 0's rows come first


def launch_command(n_ranks: int, module: str, args: Sequence[str]) -> list[str]:
    """The command that runs ``python -m module args`` as ``n_ranks`` ranks on this machine
    (``torchrun --standalone``: a free port, no rendezvous server to set up)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={int(n_ranks)}",
        "-m",
        module,
        *args,
    ]
