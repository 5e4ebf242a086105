"""Movies from the microscope: MRC stacks, TIFF (multi-page; LZW, deflate, zstd; IMOD's 4-bit
packed super-resolution pages) and EER (Falcon 4), read frame by frame; gain references, defect
files and hot-pixel repair, all in the frame grid *as RELION reads it*.

Conventions (RELION's, ``relion-motioncorr-mdcatch.md`` §A1):

- Frames are ``(n, ny, nx)`` float32 with x the fast axis; frame numbers are 0-based here.
- TIFF pages are flipped upside down on reading (MRC's origin is bottom-left, TIFF's top-left;
  IMOD, SerialEM, MotionCor2 and RELION all flip), EER and MRC are not.
- EER: ``eer_grouping`` raw frames are summed into one fraction, the remainder at the end is
  dropped; ``eer_upsampling`` 1 renders the 4K sensor grid, 2 the 8K grid (sub-pixel codes).
- Gain: multiplied into every frame. For EER a ``.gain`` file (EPU's TIFF) is multiplicative
  and any other file divisive (``mean(gain) / gain``); zeros mark defects in both.
  ``--gain_rot`` then ``--gain_flip`` act on the gain as read, numbered as RELION's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tamis.errors import InputFileError, TamisError

__all__ = [
    "Movie",
    "open_movie",
    "read_gain",
    "transform_gain",
    "read_defects",
    "hot_pixel_mask",
    "fill_bad_pixels",
    "unpack_4bit",
    "MOVIE_SUFFIXES",
]

MOVIE_SUFFIXES = (".mrc", ".mrcs", ".tif", ".tiff", ".eer")

#: IMOD's 4-bit packed super-resolution TIFF pages (width, height as stored): K3 and K2.
_PACKED_4BIT = {
    (5760, 8184),
    (8184, 5760),
    (4092, 11520),
    (11520, 4092),
    (3710, 7676),
    (7676, 3710),
    (3838, 7420),
    (7420, 3838),
}


def unpack_4bit(page: np.ndarray) -> np.ndarray:
    """IMOD's packed 4-bit pages: each byte holds two pixels, the low nibble first
    (``(h, w)`` uint8 -> ``(h, 2w)`` uint8)."""
    out = np.empty(page.shape[:-1] + (page.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = page & 15
    out[..., 1::2] = page >> 4
    return out


@dataclass
class Movie:
    """An open movie: ``n_frames`` frames (EER: fractions) of ``shape`` = ``(ny, nx)`` pixels.

    ``read(first, stop)`` returns frames ``first..stop-1`` as float32 ``(n, ny, nx)``; nothing is
    read before it is asked for (MRC is memory-mapped, TIFF and EER decoded page by page).
    ``pixel_size`` is the header's (Å; 0 when absent).
    """

    path: Path
    kind: str  # "mrc", "tiff" or "eer"
    n_frames: int
    shape: tuple[int, int]
    pixel_size: float
    eer_grouping: int = 0
    eer_upsampling: int = 1
    _handle: object = None
    _pages: list = field(default_factory=list)  # EER: its compressed pages, listed once

    def read(
        self, first: int = 0, stop: int | None = None, dtype: type | None = np.float32
    ) -> np.ndarray:
        """Frames ``first..stop-1`` ``(n, ny, nx)``, as ``dtype`` (None: as stored; TIFF pages
        then come as a flipped view)."""
        stop = self.n_frames if stop is None else stop
        if not 0 <= first <= stop <= self.n_frames:
            raise InputFileError(
                self.path, f"frames {first + 1}-{stop} asked, the movie has {self.n_frames}"
            )
        try:
            if self.kind == "mrc":
                out = self._handle.frames(first, stop)  # type: ignore[attr-defined]
            elif self.kind == "tiff":
                out = self._read_tiff(first, stop)
            else:
                out = self._read_eer(first, stop)
            return out if dtype is None else np.asarray(out, dtype=dtype)
        except InputFileError:
            raise
        except Exception as exc:  # a truncated or corrupt file: codecs raise many kinds
            raise InputFileError(
                self.path, f"cannot read frames {first + 1}-{stop}: {_why(exc)}"
            ) from None

    def _read_tiff(self, first: int, stop: int) -> np.ndarray:
        """Pages as stored (tifffile decodes them two at a time), flipped upside down as a
        view: TIFF's origin is top-left, MRC's (and RELION's frames') bottom-left."""
        tif = self._handle
        try:
            data = tif.asarray(key=slice(first, stop), maxworkers=2)  # type: ignore[attr-defined]
        except ValueError as exc:  # pages of different sizes
            raise InputFileError(self.path, f"frames {first + 1}-{stop}: {_why(exc)}") from None
        if data.ndim == 2:
            data = data[None]
        if data.shape[-1] * 2 == self.shape[1] and data.dtype == np.uint8:
            data = unpack_4bit(data)
        if data.shape[1:] != self.shape:
            raise InputFileError(
                self.path, f"frames {first + 1}-{stop} are {data.shape[1:]}, expected {self.shape}"
            )
        return data[:, ::-1]

    def _read_eer(self, first: int, stop: int) -> np.ndarray:
        g = self.eer_grouping
        out = np.zeros((stop - first, *self.shape), dtype=np.uint16 if g < 65536 else np.float32)
        pages = self._pages
        for i in range(first, stop):
            for raw in range(i * g, (i + 1) * g):
                frame = pages[raw].asarray()
                if frame.shape != self.shape:
                    raise InputFileError(
                        self.path,
                        f"EER frame {raw + 1} decodes to {frame.shape}, expected {self.shape}",
                    )
                out[i - first] += frame
        return out

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()  # type: ignore[attr-defined]

    def __enter__(self) -> Movie:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def open_movie(path: str | Path, *, eer_grouping: int = 0, eer_upsampling: int = 1) -> Movie:
    """Open a movie by its extension (``.mrc``/``.mrcs``, ``.tif``/``.tiff``, ``.eer``).

    EER movies need ``eer_grouping`` (raw frames per fraction, >= 1); ``eer_upsampling`` is 1
    (4K) or 2 (8K). A file that is truncated, of mixed frame sizes or of an unknown kind raises
    :class:`InputFileError`.
    """
    p = Path(path)
    if not p.is_file():
        raise InputFileError(p, "movie not found")
    suffix = p.suffix.lower()
    try:
        if suffix in (".mrc", ".mrcs"):
            return _open_mrc(p)
        if suffix in (".tif", ".tiff"):
            return _open_tiff(p)
        if suffix == ".eer":
            return _open_eer(p, eer_grouping, eer_upsampling)
    except InputFileError:
        raise
    except Exception as exc:  # a corrupt header: tifffile/mrcfile raise many kinds
        raise InputFileError(p, f"not a readable movie: {_why(exc)}") from None
    if suffix in (".dm3", ".dm4"):
        raise InputFileError(p, "DM3/DM4 movies are not read (as in RELION): convert them to MRC")
    raise InputFileError(p, f"unknown movie format {suffix!r} (have {', '.join(MOVIE_SUFFIXES)})")


def _open_mrc(p: Path) -> Movie:
    from tamis.io.mrc import open_stack

    stack = open_stack(p)  # memory-mapped; truncation and unsupported modes refused there
    n, h, w = stack.shape
    return Movie(p, "mrc", n, (h, w), stack.pixel_size, _handle=stack)


def _open_tiff(p: Path) -> Movie:
    import tifffile

    try:
        tif = tifffile.TiffFile(p)
        pages = tif.pages
        first = pages.first
        n = len(pages)
    except (tifffile.TiffFileError, OSError, ValueError, KeyError) as exc:
        raise InputFileError(p, f"not a readable TIFF movie: {_why(exc)}") from None
    h, w = first.shape[-2:]
    if first.compression in (65000, 65001, 65002):
        tif.close()
        raise InputFileError(p, "an EER movie with a .tif name: rename it to .eer")
    if first.bitspersample == 8 and (w, h) in _PACKED_4BIT:
        w *= 2
    for i in (n // 2, n - 1):  # mixed frame sizes: a cheap check on two more pages
        page = pages[i]
        pw = page.shape[-1] * (2 if (w != first.shape[-1]) else 1)
        if (page.shape[-2], pw) != (h, w):
            tif.close()
            raise InputFileError(p, f"frame {i + 1} is {page.shape}, the first one {(h, w)}")
    return Movie(p, "tiff", n, (int(h), int(w)), _tiff_pixel_size(first), _handle=tif)


def _tiff_pixel_size(page) -> float:
    """RELION's rule: 2.54e8 / XResolution (inch) or 1e8 / XResolution (cm); 0 when absent."""
    tag = page.tags.get("XResolution")
    unit = page.tags.get("ResolutionUnit")
    if tag is None or unit is None:
        return 0.0
    num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
    if not num or not den:
        return 0.0
    xres = num / den
    u = int(unit.value)
    if u == 2:
        return 2.54e8 / xres
    if u == 3:
        return 1e8 / xres
    return 0.0


def _eer_pages(tif: object) -> list:
    """The EER-compressed pages of an open TIFF. The page count comes first: counting them is
    where tifffile notices a chain of pages that loops back on itself (a corrupt file), which
    iterating the pages alone would follow until memory runs out."""
    pages = tif.pages  # type: ignore[attr-defined]
    every = [pages[i] for i in range(len(pages))]
    return [pg for pg in every if pg.compression in (65000, 65001, 65002)]


def _open_eer(p: Path, grouping: int, upsampling: int) -> Movie:
    import tifffile

    if grouping < 1:
        raise InputFileError(p, "EER movie: give --eer_grouping (raw frames per fraction, >= 1)")
    if upsampling not in (1, 2):
        raise InputFileError(p, f"--eer_upsampling {upsampling}: use 1 (4K) or 2 (8K)")
    try:
        tif = tifffile.TiffFile(p, superres=upsampling - 1)
        pages = _eer_pages(tif)
    except (tifffile.TiffFileError, OSError, ValueError, KeyError) as exc:
        raise InputFileError(p, f"not a readable EER movie: {_why(exc)}") from None
    if not pages:
        tif.close()
        raise InputFileError(p, "no EER-compressed frames (compression 65000-65002)")
    h, w = pages[0].shape[-2:]  # the rendering grid (tifffile applies the super-resolution)
    n = len(pages) // grouping
    if n < 1:
        tif.close()
        raise InputFileError(p, f"{len(pages)} EER frames, fewer than --eer_grouping {grouping}")
    return Movie(
        p, "eer", n, (int(h), int(w)), 0.0, grouping, upsampling, _handle=tif, _pages=pages
    )


# ---------------------------------------------------------------------------------------------
# Gain, defects, hot pixels


def transform_gain(gain: np.ndarray, rot: int = 0, flip: int = 0) -> np.ndarray:
    """RELION's ``--gain_rot`` (0 none, 1 90° clockwise, 2 180°, 3 90° counter-clockwise, as
    shown with row 0 at the top) then ``--gain_flip`` (1 upside down, 2 left to right)."""
    if rot not in (0, 1, 2, 3):
        raise TamisError(f"--gain_rot {rot}: use 0, 1, 2 or 3")
    if flip not in (0, 1, 2):
        raise TamisError(f"--gain_flip {flip}: use 0, 1 or 2")
    g = np.rot90(gain, -rot) if rot else gain
    if flip == 1:
        g = g[::-1, :]
    elif flip == 2:
        g = g[:, ::-1]
    return np.ascontiguousarray(g, dtype=np.float32)


def _read_image(p: Path, what: str, flip_tiff: bool = True) -> np.ndarray:
    """The first image of an MRC or TIFF file (``.gain`` is TIFF) as float32, TIFF flipped
    upside down as RELION reads TIFF (unless ``flip_tiff`` is False); one error line otherwise."""
    try:
        if p.suffix.lower() in (".tif", ".tiff", ".gain"):
            import tifffile

            img = np.asarray(tifffile.imread(p), dtype=np.float32)
            img = img[0] if img.ndim == 3 else img
            return img[::-1] if flip_tiff else img
        from tamis.io.mrc import read_mrc

        img, _ = read_mrc(p)
        return img[0] if img.ndim == 3 else img
    except InputFileError:
        raise
    except Exception as exc:  # a corrupt file: tifffile/mrcfile raise many kinds
        raise InputFileError(p, f"cannot read the {what}: {_why(exc)}") from None


def read_gain(
    path: str | Path,
    *,
    eer: bool = False,
    eer_upsampling: int = 1,
    rot: int = 0,
    flip: int = 0,
) -> np.ndarray:
    """The gain to *multiply* into each frame, in the frame grid as read (float32 ``(ny, nx)``);
    0 marks a defective pixel.

    MRC gains are read as they are, TIFF gains flipped upside down (as TIFF movies). For EER a
    ``.gain`` file is multiplicative, any other is divisive (``mean / gain``, zeros kept) and is
    resized to the rendering grid (4K -> 8K by replication, 8K -> 4K by 2x2 sums).
    """
    p = Path(path)
    if not p.is_file():
        raise InputFileError(p, "gain reference not found")
    suffix = p.suffix.lower()
    if suffix in (".dm3", ".dm4"):
        raise InputFileError(p, "DM3/DM4 gain references are not read: convert to MRC")
    if suffix not in (".mrc", ".mrcs", ".tif", ".tiff", ".gain"):
        raise InputFileError(p, f"unknown gain format {suffix!r} (MRC, TIFF or EPU .gain)")
    # EPU's EER .gain is in the EER frames' grid: no TIFF flip
    g = _read_image(p, "gain reference", flip_tiff=not (eer and suffix == ".gain"))
    g = np.asarray(g, dtype=np.float32)
    if not np.all(np.isfinite(g)):
        raise InputFileError(p, "the gain reference holds NaN or infinite values")
    if eer:
        if suffix != ".gain":  # divisive: mean / gain, zero stays zero
            good = g != 0
            g = np.where(good, float(g[good].mean()) / np.where(good, g, 1), 0).astype(np.float32)
        grid = 4096 << (eer_upsampling - 1) if g.shape[0] in (4096, 8192) else None
        if grid is not None and g.shape[0] != grid:
            if g.shape[0] * 2 == grid:
                g = np.repeat(np.repeat(g, 2, 0), 2, 1)
            elif g.shape[0] == grid * 2:
                g = g.reshape(grid, 2, grid, 2).sum(axis=(1, 3))
    return transform_gain(g, rot, flip)


def read_defects(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """A defect mask (True = bad) from a MotionCor2 text file (``x y w h`` per line, 0-based, in
    the frame as read) or an image of the movie's size (non-zero = bad)."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError(p, "defect file not found")
    mask = np.zeros(shape, dtype=bool)
    if p.suffix.lower() == ".txt":
        text = p.read_text(errors="replace")
        if any(k in text for k in ("CameraSize", "RotationAndFlip", "K2Type", "Bad")):
            raise InputFileError(
                p, "a SerialEM defect list: convert it to a defect map with IMOD's clip defect"
            )
        for n, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            try:
                x, y, w, h = (int(float(v)) for v in parts[:4])
            except ValueError:
                raise InputFileError(p, f"line {n}: expected 'x y w h', got {line!r}") from None
            if len(parts) < 4 or w < 0 or h < 0:
                raise InputFileError(p, f"line {n}: expected 'x y w h', got {line!r}")
            mask[max(y, 0) : max(y + h, 0), max(x, 0) : max(x + w, 0)] = True
        return mask
    img = _read_image(p, "defect map")
    if img.shape != shape:
        raise InputFileError(p, f"defect map is {img.shape}, the movie frames {shape}")
    return np.asarray(img != 0)


def hot_pixel_mask(frame_sum: np.ndarray, sigma: float = 6.0) -> np.ndarray:
    """Pixels of the (gain-corrected) frame sum above ``mean + sigma * std`` (RELION: 6)."""
    s = np.asarray(frame_sum, dtype=np.float64)
    return s > s.mean() + sigma * s.std()


def fill_bad_pixels(
    frames: np.ndarray, bad: np.ndarray, seed: int, half_width: int = 2, min_good: int = 6
) -> None:
    """Replace bad pixels in place, frame by frame, as RELION does but reproducibly: each bad
    pixel takes the value of a good pixel drawn (seeded) from the ``(2*half_width+1)²`` window
    around it when more than ``min_good`` are good; otherwise a Gaussian draw with the frames'
    mean and ``std / sqrt(n_frames)`` of the sum's spread (RELION divides by n; a slip).

    ``frames`` is ``(n, ny, nx)``; the same neighbour is used in every frame, so the draw does
    not add noise between frames.
    """
    ys, xs = np.nonzero(bad)
    if ys.size == 0:
        return
    n, ny, nx = frames.shape
    rng = np.random.default_rng(seed)
    d = np.arange(-half_width, half_width + 1)
    oy = (ys[:, None, None] + d[None, :, None]).repeat(d.size, 2)  # (m, w, w)
    ox = (xs[:, None, None] + d[None, None, :]).repeat(d.size, 1)
    inside = (oy >= 0) & (oy < ny) & (ox >= 0) & (ox < nx)
    cy, cx = np.clip(oy, 0, ny - 1), np.clip(ox, 0, nx - 1)
    good = inside & ~bad[cy, cx]
    count = good.reshape(len(ys), -1).sum(1)
    # one good neighbour per bad pixel: the k-th good one, k drawn uniformly
    k = np.floor(rng.random(len(ys)) * np.maximum(count, 1)).astype(np.int64)
    order = np.cumsum(good.reshape(len(ys), -1), axis=1) - 1
    pick = np.argmax((order == k[:, None]) & good.reshape(len(ys), -1), axis=1)
    py, px = (
        cy.reshape(len(ys), -1)[np.arange(len(ys)), pick],
        cx.reshape(len(ys), -1)[np.arange(len(ys)), pick],
    )
    ok = count > min_good
    frames[:, ys[ok], xs[ok]] = frames[:, py[ok], px[ok]]
    if (~ok).any():
        s = frames.sum(0, dtype=np.float64)
        mean, std = s[~bad].mean() / n, s[~bad].std() / np.sqrt(n)
        frames[:, ys[~ok], xs[~ok]] = rng.normal(mean, std, size=(n, int((~ok).sum())))
