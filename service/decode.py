"""Image bytes -> float32 [3, S, S] in [0, 1]: the one documented conversion rule.

1. The format is identified from the bytes (never from a file name or a declared type):
   PNG, JPEG, WebP and BMP are accepted; GIF, TIFF, ICO, AVIF/HEIC, PDF, SVG get 415; bytes
   that are no image at all get 400. Animated files use their first frame.
2. Decompression bombs are refused from the header alone: width x height above ``max_pixels``
   is 413 before a single pixel is decoded.
3. JPEGs decode at a reduced DCT scale when that still leaves both sides >= S (cheap for big
   photos); the EXIF orientation is applied.
4. Mode to RGB: grayscale and bilevel are replicated to three channels; palette images take their
   palette colours; CMYK uses Pillow's conversion; 16-bit grayscale is scaled 0..65535 -> 0..255;
   anything with transparency (RGBA, LA, PA, palette or RGB with a transparent colour) is
   **composited onto white**, as a browser shows it on a white page (not alpha dropped: the
   colour under a transparent pixel is arbitrary).
5. Size: the centred square with the shorter side is cropped, then resized to S x S with
   Pillow's antialiased bicubic filter. An S x S RGB image passes through unchanged, bit for bit.
6. Values are divided by 255: float32 in [0, 1], channels first.

The commonest request, a JPEG already S x S with nothing to orient, is decoded by libjpeg-turbo
directly (``atop.imaging.plain_jpeg``): the same pixels, without Pillow's header parsing in Python.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from atop.imaging import model_pixels, plain_jpeg  # rules 4 and 5, shared with training
from service.errors import ApiError

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
# Signatures of formats we recognise but do not accept (415 rather than "not an image", 400).
_REFUSED_SIGNATURES = {
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"\x00\x00\x01\x00": "ICO",
    b"%PDF": "PDF",
    b"<svg": "SVG",
    b"<?xml": "SVG/XML",
    b"8BPS": "PSD",
}


def _refused_format(data: bytes) -> str | None:
    head = data[:16].lstrip()
    for sig, name in _REFUSED_SIGNATURES.items():
        if head.startswith(sig):
            return name
    if data[4:8] == b"ftyp":  # ISO media: AVIF, HEIC
        return "AVIF/HEIC"
    return None


def open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the image and check its size from the header; nothing is decoded yet."""
    if not data:
        raise ApiError(400, "invalid_image", "empty image")
    refused = _refused_format(data)
    if refused:
        raise ApiError(
            415, "unsupported_image_format", f"{refused} images are not accepted (use PNG, JPEG, WebP or BMP)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as e:
        raise ApiError(
            413, "image_too_large", f"image dimensions exceed the limit of {max_pixels} pixels"
        ) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ApiError(400, "invalid_image", "not a decodable PNG, JPEG, WebP or BMP image") from e
    return _check_size(im, max_pixels)


def _check_size(im: Image.Image, max_pixels: int) -> Image.Image:
    w, h = im.size
    if w < 1 or h < 1:
        raise ApiError(400, "invalid_image", "image has no pixels")
    if w * h > max_pixels:
        raise ApiError(
            413, "image_too_large", f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}"
        )
    return im


# A request whose images add up to at most this many pixels (by their headers) is decoded on the
# event loop: a 32x32 JPEG decodes in ~0.05 ms, less than the hand-over to the threadpool and back
# costs; anything larger (up to ``max_pixels``) goes to the threadpool so the loop never stalls.
INLINE_PIXELS = 128 * 128


def small_images(blobs: list[bytes], size: int) -> list[Image.Image | np.ndarray] | None:
    """Per image, the pixels of a plain S x S JPEG (``plain_jpeg``: decoding one costs less than
    parsing its header twice) or the opened image (``open_checked``: rules 1-2, header only,
    nothing decoded), when every one passes and together they have <= INLINE_PIXELS pixels, for
    ``decode_many(opened=...)``; else None, and the threadpool path opens them again and reports
    what is wrong."""
    total, opened = 0, []
    for data in blobs:
        im = plain_jpeg(data, size)
        if im is not None:
            pixels = size * size
        else:
            try:
                im = open_checked(data, INLINE_PIXELS)
            except ApiError:
                return None
            pixels = im.size[0] * im.size[1]
        total += pixels
        if total > INLINE_PIXELS:
            return None
        opened.append(im)
    return opened


def decode_image(
    data: bytes, *, size: int, max_pixels: int, opened: Image.Image | np.ndarray | None = None
) -> np.ndarray:
    """Bytes of one image -> float32 [3, size, size] in [0, 1]; ApiError on bad input.
    ``opened``: ``small_images``' answer for the same bytes: an opened image (its header is not
    read again) or the pixels of a plain JPEG."""
    pil = opened if isinstance(opened, Image.Image) else None
    arr = None
    if pil is None and size * size <= max_pixels:  # a plain JPEG: its pixels, given or decoded here
        arr = opened if opened is not None else plain_jpeg(data, size)
    if arr is None:
        arr = _pillow_pixels(data, size, max_pixels, pil)
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32) / 255.0


def _pillow_pixels(data: bytes, size: int, max_pixels: int, opened: Image.Image | None) -> np.ndarray:
    im = open_checked(data, max_pixels) if opened is None else _check_size(opened, max_pixels)
    try:
        if im.format == "JPEG":
            im.draft("RGB", (size, size))
        im.load()
        return model_pixels(im, size)  # EXIF orientation, rules 4 and 5
    except ApiError:
        raise
    except Exception as e:  # truncated data, corrupt chunks, decoder errors of any kind
        raise ApiError(400, "invalid_image", "the image data is corrupt or truncated") from e


def decode_many(
    blobs: list[bytes], *, size: int, max_pixels: int, opened: list[Image.Image | np.ndarray] | None = None
) -> np.ndarray:
    """Several images -> float32 [N, 3, size, size]; the error message names the failing image.
    ``opened``: ``small_images``' answer for these blobs, when it gave one."""
    out = np.empty((len(blobs), 3, size, size), dtype=np.float32)
    for i, data in enumerate(blobs):
        try:
            im = None if opened is None else opened[i]
            out[i] = decode_image(data, size=size, max_pixels=max_pixels, opened=im)
        except ApiError as e:
            if len(blobs) > 1:
                e.message = f"image {i}: {e.message}"
            raise
    return out
