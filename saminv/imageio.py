"""Image files in and out: find inputs, load them as square RGB, convert to/from the [-1, 1] range, save safely.

Pillow + numpy only (no torch): arrays are numpy, images in memory are ``H x W x 3`` ``uint8`` RGB.

Every problem with a user's file is raised as :class:`saminv.errors.InputError` with one line that
starts with the file's path (``"photo.jpg: truncated or corrupt image (...)"``). Misuse by calling code
(wrong array shape or dtype, a bad ``resolution``) raises ``ValueError``.

Outputs are written atomically (a temp file in the destination directory, then ``os.replace``), so a
crash or a failed write never leaves a half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from saminv.errors import InputError

MAX_PIXELS: int = 64 * 2**20
"""Refuse to decode images with more pixels than this (decompression-bomb guard, checked on the header)."""

MIN_SIDE: int = 16
"""Refuse images whose shorter side is below this many pixels: too small to crop and upsample meaningfully."""

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
"""Suffixes (lower case) picked up when a directory is expanded by :func:`collect_images`."""

WHITE = (255, 255, 255)


# --------------------------------------------------------------------------------------------- inputs

def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """Expand command-line inputs into a list of image files, in order, without duplicates.

    * A directory contributes its files whose suffix (case-insensitive) is in ``IMAGE_SUFFIXES``,
      sorted by name, non-recursively; hidden files (``.name``, e.g. macOS ``._x.jpg``) are skipped.
    * A file named explicitly is kept whatever its suffix (:func:`load_image` judges its content).
    * The same file reached twice (named twice, or named and inside a named directory) is kept once.

    Raises InputError for an empty ``paths``, a path that does not exist, or a directory without images.
    """
    if not paths:
        raise InputError("no input images given")
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(_images_in_dir(path))
        elif path.exists():
            found.append(path)
        else:
            raise InputError(f"{path}: no such file or directory")
    return _unique(found)


def _images_in_dir(directory: Path) -> list[Path]:
    """The image files directly inside ``directory``, sorted by name. Raises InputError if there are none."""
    try:
        entries = sorted(directory.iterdir())
    except OSError as e:
        raise InputError(f"{directory}: cannot list directory ({e.strerror or e})") from None
    images = [p for p in entries
              if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()]
    if not images:
        raise InputError(f"{directory}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def _unique(paths: list[Path]) -> list[Path]:
    """``paths`` without repeats of the same file (compared by resolved path), first occurrence kept."""
    seen: set[Path] = set()
    kept = []
    for p in paths:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            kept.append(p)
    return kept


def load_image(path: str | Path, resolution: int) -> np.ndarray:
    """Load an image file as a ``resolution x resolution x 3`` ``uint8`` RGB array.

    Steps: open and fully decode (so truncated or corrupt files fail here, not later), apply the EXIF
    orientation, convert any colour mode to RGB (see :func:`_to_rgb`: transparency is composited over
    white, 16-bit and float images are rescaled to 8 bit), centre-crop to a square of the shorter side,
    and resize with Lanczos (Pillow first box-reduces by an integer factor for big downscales).
    Multi-frame files (GIF, TIFF) use their first frame.

    Raises InputError, with one line naming the file, when the file is missing, a directory or unreadable,
    is not an image (or a format Pillow cannot read), is truncated or corrupt, has more than
    ``MAX_PIXELS`` pixels (decompression bomb), or has a shorter side below ``MIN_SIDE`` pixels.
    Raises ValueError if ``resolution`` is not a positive int.
    """
    if not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    path = Path(path)
    img = _decode(path)
    img = _apply_exif_orientation(img)
    return resize_square(_to_rgb(img, path), resolution)


def resize_square(img: Image.Image | np.ndarray, resolution: int) -> np.ndarray:
    """Centre-crop an RGB image (PIL or H x W x 3 uint8) to a square and Lanczos-resize it to
    ``resolution`` -> ``resolution x resolution x 3`` uint8: the preprocessing of every input."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    square = _center_crop(img)
    if square.size != (resolution, resolution):
        square = square.resize((resolution, resolution), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.array(square, dtype=np.uint8)


def _decode(path: Path) -> Image.Image:
    """Open ``path`` and decode its (first frame's) pixels, mapping every failure to InputError."""
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not an image file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    with file, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on odd metadata: noise for users
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(file)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InputError(f"{path}: too many pixels to decode safely (decompression bomb?)") from None
        except UnidentifiedImageError:
            raise InputError(f"{path}: not an image, or an unsupported image format") from None
        except Exception as e:  # any decoder failure on user bytes is a problem with the file
            raise InputError(f"{path}: corrupt image header ({_reason(e)})") from None
        _check_size(img, path)
        try:
            img.load()
        except Exception as e:
            raise InputError(f"{path}: truncated or corrupt image ({_reason(e)})") from None
    return img


def _check_size(img: Image.Image, path: Path) -> None:
    """Reject (from the header alone, before decoding) images too large or too small to use."""
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise InputError(f"{path}: too many pixels ({width}x{height} > {MAX_PIXELS} pixels; decompression bomb?)")
    if min(width, height) < MIN_SIDE:
        raise InputError(f"{path}: image too small to crop ({width}x{height} px; the shorter side must be "
                         f">= {MIN_SIDE} px)")


def _reason(e: BaseException) -> str:
    """A short, single-line description of a decoder exception."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF orientation tag says. Broken EXIF data is ignored (the pixels are fine)."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """Convert a decoded image of any Pillow mode to mode ``RGB``.

    * alpha or a transparent colour (RGBA, LA, PA, P/L/RGB with ``transparency``): composited over white;
    * 16-bit, 32-bit integer and float greyscale (``I;16*``, ``I``, ``F``): rescaled, see :func:`_high_depth_to_8bit`;
    * everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ...): Pillow's own conversion.

    Raises InputError for a mode Pillow cannot convert.
    """
    try:
        if img.mode.startswith("I;16") or img.mode in ("I", "F"):
            grey = _high_depth_to_8bit(np.asarray(img))
            return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, WHITE + (255,))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")
    except ValueError as e:
        raise InputError(f"{path}: unsupported colour mode {img.mode} ({_reason(e)})") from None


def _high_depth_to_8bit(values: np.ndarray) -> np.ndarray:
    """HxW integer or float greyscale -> HxW uint8, scaling (not clipping) to the full 8-bit range.

    * integers in [0, 255] are kept as they are (8-bit data stored wide);
    * integers in [0, 65535] are 16-bit data: divided by 257 (65535 -> 255) and rounded;
    * floats in [0, 1] are multiplied by 255; floats in [0, 255] are kept;
    * anything else (negative values, 32-bit ranges) is min-max normalised to [0, 255].

    Non-finite float values become 0.
    """
    x = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if np.issubdtype(values.dtype, np.floating) and lo >= 0 and hi <= 1:
        x = x * 255
    elif lo >= 0 and hi <= 255:
        pass
    elif np.issubdtype(values.dtype, np.integer) and lo >= 0 and hi <= 65535:
        x = x / 257
    elif hi > lo:
        x = (x - lo) * (255 / (hi - lo))
    else:
        x = np.zeros_like(x)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _center_crop(img: Image.Image) -> Image.Image:
    """The largest centred square of ``img`` (left/top offsets rounded down)."""
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return img.crop((left, top, left + side, top + side))


# --------------------------------------------------------------------------------------------- ranges

def to_tensor_range(img: np.ndarray) -> np.ndarray:
    """``H x W x 3`` ``uint8`` RGB -> ``1 x 3 x H x W`` ``float32`` in [-1, 1] (NCHW; 0 -> -1, 255 -> 1).

    Raises ValueError for any other shape or dtype.
    """
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {img.shape} dtype {img.dtype}")
    x = img.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def from_tensor_range(x: np.ndarray) -> np.ndarray:
    """``3 x H x W`` or ``1 x 3 x H x W`` float in [-1, 1] -> ``H x W x 3`` ``uint8`` RGB.

    Values outside [-1, 1] are clipped, then rounded to the nearest level (the exact inverse of
    :func:`to_tensor_range`); NaN becomes mid-grey (128). Raises ValueError for any other shape.
    """
    x = np.asarray(x)
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a [3, H, W] or [1, 3, H, W] array, got shape {x.shape}")
    return images_to_uint8(x)


def images_to_uint8(x: np.ndarray) -> np.ndarray:
    """Batched :func:`from_tensor_range`: float [..., 3, H, W] in [-1, 1] -> uint8 [..., H, W, 3]
    (rounded, clipped; NaN becomes mid-grey)."""
    x = np.asarray(x)
    levels = (np.nan_to_num(x.astype(np.float32), nan=0.0) + 1) * 127.5
    return np.ascontiguousarray(np.moveaxis(np.clip(np.rint(levels), 0, 255).astype(np.uint8), -3, -1))


# --------------------------------------------------------------------------------------------- outputs

def atomic_write(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Create or replace ``path`` all at once: ``writer(tmp)`` writes a temp file that is then renamed.

    The temp file lies in the same directory as ``path`` (so ``os.replace`` is atomic) and has the same
    suffix (so format detection by suffix works); it is hidden (``.name.xxxx.suffix``). It gets the
    permissions a newly created file would get (an existing destination keeps its mode).

    On any failure the temp file is removed and ``path`` is left as it was. An ``OSError`` (directory
    missing or not writable, disk full, destination is a directory) becomes
    ``InputError("cannot write <path>: <reason>")``; any other exception from ``writer`` propagates.
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer(tmp)
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _mode_for(path: Path) -> int:
    """Permission bits for ``path``: those of the existing file, else 0o666 minus the process umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def save_png(path: str | Path, img: np.ndarray) -> None:
    """Write an ``H x W x 3`` (RGB) or ``H x W`` (grey) ``uint8`` array as a PNG, atomically.

    Raises ValueError for another shape or dtype, InputError if the file cannot be written.
    """
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"expected an HxWx3 or HxW uint8 image, got shape {img.shape} dtype {img.dtype}")
    picture = Image.fromarray(np.ascontiguousarray(img))
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def save_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON (indent 2, trailing newline), atomically.

    numpy scalars and arrays and ``Path`` objects are converted (to numbers, lists, strings).
    Raises TypeError for other non-serialisable objects (before touching the disk), InputError if
    the file cannot be written.
    """
    text = json.dumps(obj, indent=2, default=_json_default) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _json_default(obj: Any) -> Any:
    """``json.dumps`` fallback for numpy values and paths."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_array(path: str | Path) -> np.ndarray:
    """A ``.npy`` array (pickles refused). Raises InputError for a missing or unreadable file."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def unique_dir(base: str | Path) -> Path:
    """``base`` if nothing exists there yet, else the first free ``base-1``, ``base-2``, ...

    Only chooses the name (it does not create the directory), so outputs never silently overwrite an
    earlier run. Raises InputError if 10000 candidates are all taken.
    """
    base = Path(base)
    if not base.exists():
        return base
    for i in range(1, 10000):
        candidate = base.with_name(f"{base.name}-{i}")
        if not candidate.exists():
            return candidate
    raise InputError(f"{base}: no free output directory name (tried {base.name}-1 ... {base.name}-9999)")
