"""Checking uploaded images before anything is stored, decoding them as the worker trains
on them, and rendering array items as PNG."""

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import ImageTooLarge, InvalidImage, UnsupportedMediaType
from service.models import BlobFormat

FORMATS = {"PNG": BlobFormat.png, "JPEG": BlobFormat.jpeg}
MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
MEDIA_TYPES = {BlobFormat.png: "image/png", BlobFormat.jpeg: "image/jpeg"}
# Modes decoded as one grey channel (alpha dropped); every other 8-bit mode becomes RGB.
GREY_MODES = frozenset({"1", "L", "LA"})
# 16-bit and float pixels have no lossless uint8 form: refused rather than guessed at.
UNSUPPORTED_MODES = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N"})


@dataclass(frozen=True)
class ImageInfo:
    format: BlobFormat
    shape: list[int]  # [H, W] or [H, W, 3], as decode_array gives it
    dtype: str  # uint8


def _pixels(image: Image.Image) -> np.ndarray:
    """uint8 [H, W] for grey modes, [H, W, 3] for the others; ValueError for 16-bit/float."""
    if image.mode in UNSUPPORTED_MODES:
        raise ValueError(f"{image.mode} pixels (16-bit or float) are not supported; use 8 bits")
    if image.mode in GREY_MODES:
        return np.asarray(image.convert("L"))
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def decode_array(data: bytes) -> np.ndarray:
    """A stored PNG or JPEG as the model sees it: uint8 [H, W] (grey) or [H, W, 3] (colour).

    The one rule for both sides: the API records this shape at upload, the worker trains on
    these arrays. Raises ValueError for 16-bit and float images (refused at upload).
    """
    with Image.open(io.BytesIO(data), formats=list(FORMATS)) as image:
        return _pixels(image)


def inspect_image(data: bytes, name: str, max_bytes: int, max_pixels: int) -> ImageInfo:
    """The format and shape of a PNG or JPEG upload, after decoding it fully.

    The byte and pixel limits are checked before decoding: the header alone gives the size,
    so a decompression bomb is refused without allocating its pixels.
    """
    if len(data) > max_bytes:
        raise ImageTooLarge(f"{name}: {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    if not data:
        raise InvalidImage(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # We apply our own, lower, pixel limit below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{name}: {e}") from e
    except Exception as e:  # Pillow raises many types on a bad header
        if data.startswith(MAGIC):
            reason = "" if isinstance(e, UnidentifiedImageError) else f" ({e})"
            raise InvalidImage(f"{name}: corrupt or truncated image{reason}") from e
        raise InvalidImage(f"{name}: not a PNG or JPEG image") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLarge(
                f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of "
                f"{max_pixels} pixels"
            )
        if width == 0 or height == 0:
            raise InvalidImage(f"{name}: empty image")
        try:
            image.load()
        except Exception as e:
            raise InvalidImage(f"{name}: corrupt or truncated image ({e})") from e
        try:
            pixels = _pixels(image)
        except ValueError as e:
            raise UnsupportedMediaType(f"{name}: {e}") from None
        return ImageInfo(
            format=FORMATS[image.format], shape=list(pixels.shape), dtype=str(pixels.dtype)
        )


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as .npy bytes; the same array always gives the same bytes (and blob key)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def png_from_array(array: np.ndarray) -> bytes:
    """A uint8 [H, W] or [H, W, 3] array as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
