"""Pixels as the model sees them: the conversion rule shared by training and serving.

Training data and served requests go through the same two steps, so a model sees the same
pixels for the same picture whichever way it arrives (``service/decode.py`` documents the
whole request rule around them, with the numbering used here):

4. Mode to RGB: grayscale and bilevel are replicated to three channels; palette images take their
   palette colours; CMYK uses Pillow's conversion; 16-bit grayscale is scaled 0..65535 -> 0..255;
   anything with transparency is composited onto white (the colour under a transparent pixel is
   arbitrary, and a browser shows it on white).
5. Size: the centred square with the shorter side is cropped, then resized to S x S with Pillow's
   antialiased bicubic filter. An S x S RGB image passes through unchanged, bit for bit.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(im: Image.Image) -> Image.Image:
    """Rule 4: any mode to 8-bit RGB."""
    if im.mode in _SIXTEEN_BIT:
        a = np.asarray(im).astype(np.float64)
        a = np.clip(a / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def fit_square(im: Image.Image, size: int) -> Image.Image:
    """Rule 5: centred square crop, then antialiased bicubic resize to size x size."""
    if im.size == (size, size):
        return im
    return ImageOps.fit(im, (size, size), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))


def model_pixels(im: Image.Image, size: int) -> np.ndarray:
    """A decoded image -> uint8 [size, size, 3]: EXIF orientation, then rules 4 and 5."""
    return np.asarray(fit_square(to_rgb(ImageOps.exif_transpose(im)), size), dtype=np.uint8)


try:  # libjpeg-turbo without Pillow's Python-level parsing: ~9 us for a 32x32 JPEG against ~50
    import simplejpeg
except ImportError:  # optional: every image then takes Pillow's path, with the same pixels
    simplejpeg = None


def _app1_or_unreadable(data: bytes) -> bool:
    """Whether the JPEG's header segments (before the first scan) include an APP1 (EXIF or XMP:
    Pillow takes the orientation from either), or cannot be walked."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return True
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # start of scan: no more header segments
            return False
        if marker == 0xE1:
            return True
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return True


def plain_jpeg(data: bytes, size: int) -> np.ndarray | None:
    """The commonest request, rules 1-5 in one call to libjpeg-turbo (simplejpeg): a JPEG of
    exactly ``size`` x ``size``, YCbCr or grayscale, with no APP1 segment (no EXIF or XMP, so
    no orientation) -> uint8 [size, size, 3]. Those are the pixels Pillow gives (the same
    library, the same DCT and upsampling; tests/test_service_decode.py compares them). Anything
    else, including data libjpeg-turbo warns about, is None: Pillow's path decides."""
    if simplejpeg is None or data[:3] != b"\xff\xd8\xff" or _app1_or_unreadable(data):
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if (h, w) != (size, size) or colorspace not in ("YCbCr", "Gray"):
            return None
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except (ValueError, RuntimeError):
        return None
