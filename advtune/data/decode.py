"""Decoding one image file safely: regular files only, size checked from the header, converted to RGB."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

#: Images with more pixels (width × height, read from the file's header) are skipped
#: before decoding: Pillow's own decompression-bomb threshold (89,478,485 pixels, about
#: 9459 × 9459; 256 MiB as 8-bit RGB), so one file cannot exhaust a worker's memory.
#: (Pillow itself refuses files over twice its threshold while reading the header.)
MAX_IMAGE_PIXELS = 89_478_485


def decode_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as 8-bit RGB, upright.

    EXIF orientation is applied. Transparent pixels are composited on white. 16-bit and
    32-bit integer grayscale (``I;16*``, ``I``) are scaled from 0..65535; float images
    (``F``) from 0..1 when all values lie there, else clipped to 0..255. CMYK and the
    other modes use Pillow's conversion. No colour management (ICC profiles are ignored).

    The file is checked before anything is decoded: it must be a regular file (a FIFO,
    socket or device named like an image is refused without reading from it; a broken
    symbolic link too) and its header's width × height must not exceed
    :data:`MAX_IMAGE_PIXELS`.

    Raises:
        SkipImage: not a regular file, or too many pixels (the reason is the message).
        Whatever Pillow raises for an undecodable file (``OSError`` and others).
    """
    with _open_regular(path) as fh, warnings.catch_warnings():
        # Pillow warns between 1x and 2x its threshold; ours refuses those below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(fh)
        except Image.UnidentifiedImageError:
            # Pillow would name the file object, not the file.
            raise Image.UnidentifiedImageError(
                f"cannot identify image file {os.fspath(path)!r}"
            ) from None
        with img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise SkipImage(
                    f"{width}x{height} = {width * height:,} pixels, over the limit of "
                    f"{MAX_IMAGE_PIXELS:,} (advtune.data.MAX_IMAGE_PIXELS)"
                )
            img.load()
            upright = ImageOps.exif_transpose(img)
    return _to_rgb(upright)


class SkipImage(ValueError):
    """A file that is not read as an image; the message is the reason."""


def _reason(err: Exception) -> str:
    """One line saying why a file was skipped."""
    text = str(err) if isinstance(err, SkipImage) else f"{type(err).__name__}: {err}"
    return " ".join(text.split())


def _decode_error(path: Path) -> str | None:
    """Why ``path`` cannot be decoded, or ``None`` when it can (silently: Pillow's
    warnings come when the file is read for real)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decode_image(path)
    except Exception as err:  # as in ImageDataset._load
        return _reason(err)
    return None


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


def _not_regular(mode: int) -> str:
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return f"{kind}, not a regular file" if kind != "not a regular file" else kind


def _open_regular(path: str | os.PathLike) -> Any:
    """Open ``path`` for reading only if it is a regular file, never blocking on it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            target = os.readlink(os.fspath(path))
            raise SkipImage(f"broken symbolic link to {target!r}") from None
        raise
    if not stat.S_ISREG(st.st_mode):
        raise SkipImage(_not_regular(st.st_mode))
    # O_NONBLOCK: should the file have been swapped for a FIFO since the stat, opening it
    # still returns at once, and the fstat below refuses it.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SkipImage(_not_regular(st.st_mode))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img.convert("I") if mode != "I" else img, dtype=np.float64)
        gray = np.clip(values, 0, 65535) * (255 / 65535)
        return Image.fromarray(np.round(gray).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255
        gray = np.clip(values, 0, 255)
        return Image.fromarray(np.round(gray).astype(np.uint8), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
