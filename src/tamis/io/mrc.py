"""MRC images and stacks through ``mrcfile``.

Reads modes 0 (int8), 1 (int16), 2 (float32), 6 (uint16) and 12 (float16, RELION's
``--float16``); writes float32 or float16. Stacks are memory-mapped so that only the images
asked for are read. Pixel sizes come from and go to the header (``voxel_size``, in Å).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path
from threading import Lock

import mrcfile
import numpy as np

from tamis.errors import InputFileError
from tamis.io.star import atomic_path

__all__ = [
    "MrcStack",
    "open_stack",
    "read_mrc",
    "write_mrc",
    "StackCache",
    "expected_size",
    "mrc_is_complete",
]

#: Bytes per voxel of the modes tamis reads.
_MODE_BYTES = {0: 1, 1: 2, 2: 4, 6: 2, 12: 2}


class MrcStack:
    """A memory-mapped stack of 2D images, shape ``(n, h, w)``.

    A single 2D image is a stack of one. Indexing returns float32 numpy arrays.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._mrc = _open_mmap(self.path)
        data = self._mrc.data
        if data.ndim == 2:
            data = data[None]
        elif data.ndim != 3:
            self._mrc.close()
            raise InputFileError(
                self.path, f"expected a 2D image or a stack, got shape {data.shape}"
            )
        self._data = data
        self.pixel_size = _pixel_size(self._mrc)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self._data.shape)  # type: ignore[return-value]

    def __len__(self) -> int:
        return self._data.shape[0]

    def read(self, indices: np.ndarray | list[int] | slice) -> np.ndarray:
        """Images at 0-based ``indices`` as float32, shape ``(len(indices), h, w)``."""
        if isinstance(indices, slice):
            return np.asarray(self._data[indices], dtype=np.float32)
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            bad = int(idx[(idx < 0) | (idx >= len(self))][0])
            raise InputFileError(
                self.path,
                f"image {bad + 1} requested but the stack holds {len(self)} image(s)",
            )
        if idx.size > 1 and np.all(np.diff(idx) == 1):
            return np.asarray(self._data[idx[0] : idx[-1] + 1], dtype=np.float32)
        return np.asarray(self._data[idx], dtype=np.float32)

    def frames(self, start: int, stop: int) -> np.ndarray:
        """Images ``start..stop-1`` as stored (the memory map's dtype, no copy)."""
        return self._data[start:stop]

    def close(self) -> None:
        self._mrc.close()

    def __enter__(self) -> MrcStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_stack(path: str | Path) -> MrcStack:
    """Open an MRC image or stack, memory-mapped, read-only."""
    return MrcStack(path)


def read_mrc(path: str | Path) -> tuple[np.ndarray, float]:
    """Read a whole MRC file as float32 and its pixel size in Å (0 if the header has none)."""
    path = Path(path)
    with _open_mmap(path) as mrc:
        return np.array(mrc.data, dtype=np.float32), _pixel_size(mrc)


def write_mrc(
    path: str | Path,
    data: np.ndarray,
    pixel_size: float,
    *,
    float16: bool = False,
    stack: bool | None = None,
) -> None:
    """Write an image, stack or volume atomically.

    Parameters
    ----------
    data
        ``(h, w)`` image, ``(n, h, w)`` stack or volume.
    pixel_size
        Å per pixel, stored in the header.
    float16
        Write mode 12 (half the size; what RELION's ``--float16`` writes).
    stack
        Mark a 3D array as an image stack (ispg 0) rather than a volume. Default: True for
        ``.mrcs`` files.
    """
    path = Path(path)
    arr = np.ascontiguousarray(data, dtype=np.float16 if float16 else np.float32)
    if stack is None:
        stack = path.suffix == ".mrcs"
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(arr)
            if arr.ndim == 3 and stack:
                mrc.set_image_stack()
            mrc.voxel_size = float(pixel_size)
            mrc.update_header_stats()


class StackCache:
    """A bounded set of open stacks, so batches touching many files do not exhaust handles."""

    def __init__(self, max_open: int = 128) -> None:
        self.max_open = max_open
        self._open: OrderedDict[Path, MrcStack] = OrderedDict()
        self._lock = Lock()

    def get(self, path: str | Path) -> MrcStack:
        path = Path(path)
        with self._lock:
            stack = self._open.get(path)
            if stack is not None:
                self._open.move_to_end(path)
                return stack
            stack = MrcStack(path)
            self._open[path] = stack
            while len(self._open) > self.max_open:
                _, old = self._open.popitem(last=False)
                old.close()
            return stack

    def close(self) -> None:
        with self._lock:
            for stack in self._open.values():
                stack.close()
            self._open.clear()


# --------------------------------------------------------------------------------------------


def _open_mmap(path: Path) -> mrcfile.mrcfile.MrcFile:
    if not path.is_file():
        raise InputFileError(path, "file not found" if not path.exists() else "not a file")
    _check_size(path)
    try:
        mrc = mrcfile.mmap(path, mode="r", permissive=False)
    except ValueError as exc:
        text = str(exc)
        if "Expected" in text and "bytes" in text:
            raise InputFileError(path, f"truncated MRC file ({text.rstrip('.')})") from None
        raise InputFileError(path, f"not a valid MRC file ({text.splitlines()[0]})") from None
    except OSError as exc:
        raise InputFileError(path, f"cannot read ({exc.strerror or exc})") from None
    except (OverflowError, MemoryError) as exc:
        # sizes in the header that no file can have (negative, or beyond the address space)
        raise InputFileError(path, f"not a valid MRC file (header sizes: {exc})") from None
    mode = int(mrc.header.mode)
    if mode not in _MODE_BYTES:
        mrc.close()
        raise InputFileError(path, f"MRC mode {mode} is not supported (0, 1, 2, 6, 12 are)")
    return mrc


def expected_size(path: str | Path) -> int | None:
    """The file size (bytes) an MRC header promises: 1024 + extended header + voxels; None when
    the header cannot be read or does not describe data tamis reads (a file still being written
    may have no header yet)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
                h = mrc.header
                if h is None:
                    return None
                mode, nsymbt = int(h.mode), int(h.nsymbt)
                voxels = int(h.nx) * int(h.ny) * int(h.nz)
    except Exception:
        return None
    if mode not in _MODE_BYTES or voxels <= 0 or nsymbt < 0:
        return None
    return 1024 + nsymbt + voxels * _MODE_BYTES[mode]


def mrc_is_complete(path: str | Path) -> bool:
    """True when the file holds every byte its header promises (a copy or a write in progress
    is not complete)."""
    expected = expected_size(path)
    return expected is not None and Path(path).stat().st_size >= expected


def _check_size(path: Path) -> None:
    """A truncated file (an interrupted copy or write) is named as such before mapping it."""
    expected = expected_size(path)
    if expected is None:
        return  # not readable as a header at all: the full open below says why
    actual = path.stat().st_size
    if actual < expected:
        raise InputFileError(
            path, f"truncated MRC file (header says {expected} bytes, file has {actual})"
        )


def _pixel_size(mrc: mrcfile.mrcfile.MrcFile) -> float:
    return float(mrc.voxel_size.x)
