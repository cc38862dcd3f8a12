"""Decode one image file into an RGB :class:`PIL.Image.Image`, or say clearly why not.

:func:`load_image` is the only way the rest of the library opens images. It normalises
every colour mode a catalogue folder is likely to contain to 8-bit RGB:

* greyscale (``L``, ``1``) -> grey RGB;
* 16-/32-bit integer and float greyscale (``I;16*``, ``I``, ``F``) -> scaled to 8 bits
  (16-bit data by its full range; ``I``/``F`` by their value range, see
  :func:`_to_8bit_grey`);
* palette (``P``), with or without a transparent colour -> RGB (transparent parts white);
* ``CMYK`` (including Adobe-inverted JPEGs), ``YCbCr`` -> RGB;
* ``RGBA`` / ``LA`` / ``PA`` / premultiplied modes -> alpha-composited on white;
* the EXIF ``Orientation`` tag is applied (a phone photo stored sideways comes out upright).

Any failure raises :class:`fewshot.errors.ImageReadError` with a short reason
(``"file not found"``, ``"zero-byte file"``, ``"truncated or corrupt image data"``,
``"not an image file (unrecognised format)"``, ``"decompression bomb ..."``); no bare
Pillow/OS error escapes. This module does not import torch.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageReadError

__all__ = ["load_image", "MAX_IMAGE_PIXELS", "IMAGE_EXTENSIONS", "is_image_file"]

log = logging.getLogger(__name__)

#: Largest image (width x height) accepted. Pillow's own default (about 89.5 megapixels,
#: e.g. 9459 x 9459): large camera photos (6000 x 4000, 8000 x 6000) pass, while a
#: small file that claims e.g. 20000 x 20000 pixels is refused as a decompression bomb.
#: Pillow's global ``Image.MAX_IMAGE_PIXELS`` is not modified.
MAX_IMAGE_PIXELS: int = 89_478_485

#: File name suffixes (lower case) treated as images by the dataset loaders.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)

_WHITE = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


def is_image_file(name: str | os.PathLike) -> bool:
    """True when ``name`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(os.fspath(name))[1].lower() in IMAGE_EXTENSIONS


def load_image(path: str | os.PathLike, target_size: int | None = None) -> Image.Image:
    """Open ``path`` and return a fully decoded 8-bit RGB image.

    Args:
        path: the image file.
        target_size: optional hint, in pixels, of the size the caller will resize to.
            For JPEG files Pillow's ``draft`` mode then decodes at a reduced DCT scale
            (1/2, 1/4 or 1/8) as long as BOTH sides stay ``>= target_size``; this makes
            large camera JPEGs several times faster to decode. No other resizing is
            done: the caller still resizes the result.

    Returns:
        A loaded ``PIL.Image.Image`` in mode ``"RGB"``, EXIF orientation applied, with no
        open file handle behind it.

    Raises:
        ImageReadError: the file is missing, not a regular file, unreadable, zero bytes,
            not in a recognised image format, larger than :data:`MAX_IMAGE_PIXELS`
            (``"decompression bomb"``), truncated or corrupt, or in a colour mode that
            cannot be converted to RGB. ``err.path`` and ``err.reason`` say which and why.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot access file ({exc.strerror or exc})") from None
    if path.is_dir():
        raise ImageReadError(path, "not a file (it is a folder)")
    if st.st_size == 0:
        raise ImageReadError(path, "zero-byte file")

    try:
        fh = open(path, "rb")
    except PermissionError:
        raise ImageReadError(path, "permission denied") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot open file ({exc.strerror or exc})") from None

    with fh:
        im = _open(fh, path)
        if target_size:
            try:
                im.draft(None, (int(target_size), int(target_size)))
            except Exception as exc:  # draft is only an optimisation
                log.debug("draft failed for %s: %s", path, exc)
        try:
            im.load()
        except MemoryError:
            raise ImageReadError(path, "out of memory while decoding") from None
        except Exception as exc:  # OSError, SyntaxError, ValueError, struct.error, EOFError...
            raise ImageReadError(path, f"truncated or corrupt image data ({_short(exc)})") from None

        try:
            ImageOps.exif_transpose(im, in_place=True)
        except Exception as exc:  # a broken EXIF block must not lose an otherwise good image
            log.debug("ignoring unreadable EXIF orientation in %s: %s", path, exc)

        try:
            out = _to_rgb(im)
        except MemoryError:
            raise ImageReadError(path, "out of memory while converting") from None
        except Exception as exc:
            raise ImageReadError(path, f"cannot convert colour mode {im.mode!r} to RGB ({_short(exc)})") from None
    return out


def _open(fh, path: Path) -> Image.Image:
    """``Image.open`` with every failure mapped to :class:`ImageReadError`."""
    try:
        with warnings.catch_warnings():
            # Pillow warns between 1x and 2x its limit and raises above 2x: refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fh)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(path, f"decompression bomb ({_short(exc)})") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image file (unrecognised format)") from None
    except MemoryError:
        raise ImageReadError(path, "out of memory while reading the header") from None
    except Exception as exc:
        raise ImageReadError(path, f"truncated or corrupt image data ({_short(exc)})") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageReadError(path, f"truncated or corrupt image data (size {w}x{h})")
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageReadError(
            path, f"decompression bomb ({w}x{h} = {w * h} pixels > limit {MAX_IMAGE_PIXELS})"
        )
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert a loaded image of any mode to 8-bit RGB (alpha composited on white)."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        return _to_8bit_grey(im).convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _to_8bit_grey(im: Image.Image) -> Image.Image:
    """Map 16-bit / 32-bit-integer / float greyscale to mode ``L``.

    ``I;16*`` uses its full 0..65535 range (value / 257). ``I`` and ``F`` data already in
    0..255 is kept, ``F`` data in 0..1 is scaled by 255, ``I`` data in 0..65535 is treated
    as 16-bit, anything else is stretched from
    its minimum to its maximum.
    """
    import numpy as np

    arr = np.asarray(im)
    if arr.ndim != 2:  # pragma: no cover - defensive
        raise ValueError(f"unexpected array shape {arr.shape}")
    arr = arr.astype(np.float64)
    if arr.size == 0:  # pragma: no cover - defensive
        return Image.new("L", im.size)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if im.mode in _SIXTEEN_BIT or (lo >= 0 and 255 < hi <= 65535 and im.mode == "I"):
        out = arr / 257.0
    elif im.mode == "F" and lo >= 0 and hi <= 1.0:
        out = arr * 255.0
    elif lo >= 0 and hi <= 255:
        out = arr
    elif hi > lo:
        out = (arr - lo) * (255.0 / (hi - lo))
    else:
        out = np.zeros_like(arr)
    out = np.nan_to_num(out, nan=0.0)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
