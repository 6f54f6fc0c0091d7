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
