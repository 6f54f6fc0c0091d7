"""The decoding rule (service/decode.py): formats, modes, resizing, and refusals before decoding."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from service.decode import decode_image, decode_many
from service.errors import ApiError
from tests.service_fixtures import bomb_png, encode, noise_image

S, MAXPIX = 32, 4_000_000


def dec(data: bytes) -> np.ndarray:
    return decode_image(data, size=S, max_pixels=MAXPIX)


def refused(data: bytes) -> ApiError:
    with pytest.raises(ApiError) as e:
        dec(data)
    return e.value


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("BMP", {}), ("WEBP", {"lossless": True})])
def test_lossless_32x32_rgb_passes_bit_for_bit(fmt, kw):
    im = noise_image()
    out = dec(encode(im, fmt, **kw))
    assert out.shape == (3, S, S) and out.dtype == np.float32
    assert np.array_equal(out, np.asarray(im).transpose(2, 0, 1) / np.float32(255))


def test_jpeg_decodes_close_to_the_source():
    im = Image.new("RGB", (S, S), (200, 40, 90))
    out = dec(encode(im, "JPEG", quality=95))
    assert np.allclose(out.mean(axis=(1, 2)), np.array([200, 40, 90]) / 255, atol=0.02)


def test_grayscale_and_bilevel_are_replicated_to_three_channels():
    for im in (Image.new("L", (S, S), 77), Image.new("1", (S, S), 1)):
        out = dec(encode(im, "PNG"))
        want = 77 / 255 if im.mode == "L" else 1.0
        assert np.allclose(out, want)


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    a = np.full((S, S), 32768, dtype=np.uint16)  # mid grey in 16 bits
    im = Image.fromarray(a)
    assert im.mode.startswith("I")
    out = dec(encode(im, "PNG"))
    assert np.allclose(out, 128 / 255)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (S, S), (255, 0, 0, 255))
    for x in range(S // 2):
        for y in range(S):
            rgba.putpixel((x, y), (0, 0, 0, 0))  # left half fully transparent (black underneath)
    out = dec(encode(rgba, "PNG"))
    assert np.allclose(out[:, :, : S // 2], 1.0)  # white, not the hidden black
    assert np.allclose(out[:, :, S // 2 :], np.array([1, 0, 0])[:, None, None])
    la = Image.new("LA", (S, S), (0, 0))
    assert np.allclose(dec(encode(la, "PNG")), 1.0)
    half = Image.new("RGBA", (S, S), (0, 0, 0, 128))
    assert np.allclose(dec(encode(half, "PNG")), 127 / 255, atol=1 / 255)


def test_palette_with_and_without_transparency():
    p = Image.new("P", (S, S), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert np.allclose(dec(encode(p, "PNG")), np.array([10, 200, 30])[:, None, None] / 255)
    p.info["transparency"] = 1
    assert np.allclose(dec(encode(p, "PNG", transparency=1)), 1.0)


def test_cmyk_jpeg_is_converted():
    im = Image.new("CMYK", (S, S), (0, 255, 255, 0))  # pure red in CMYK
    out = dec(encode(im, "JPEG", quality=95))
    assert out[0].mean() > 0.9 and out[1].mean() < 0.1 and out[2].mean() < 0.1


def test_non_square_images_are_centre_cropped_then_resized():
    im = Image.new("RGB", (300, 100), (0, 0, 255))  # blue sides, red centre square
    im.paste((255, 0, 0), (100, 0, 200, 100))
    out = dec(encode(im, "PNG"))
    assert out.shape == (3, S, S)
    assert np.allclose(out[:, 2:-2, 2:-2], np.array([1, 0, 0])[:, None, None], atol=0.02)
    small = dec(encode(Image.new("RGB", (8, 8), (0, 255, 0)), "PNG"))  # upscaled
    assert np.allclose(small, np.array([0, 1, 0])[:, None, None], atol=0.01)


def test_big_jpeg_uses_draft_and_keeps_content():
    im = Image.new("RGB", (2000, 1000), (30, 60, 90))
    out = dec(encode(im, "JPEG", quality=90))
    assert np.allclose(out.mean(axis=(1, 2)), np.array([30, 60, 90]) / 255, atol=0.02)


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (64, 32), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 64, 16))  # top half blue, bottom red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW when shown: top becomes right
    out = dec(encode(im, "JPEG", quality=95, exif=exif.tobytes()))
    assert out[2, :, -4:].mean() > 0.8 and out[0, :, :4].mean() > 0.8


def test_animated_webp_uses_its_first_frame():
    frames = [Image.new("RGB", (S, S), c) for c in ((255, 0, 0), (0, 255, 0))]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert np.allclose(dec(data), np.array([1, 0, 0])[:, None, None], atol=0.01)


def test_decompression_bomb_is_refused_from_the_header():
    e = refused(bomb_png(3000, 3000))
    assert (e.status, e.code) == (413, "image_too_large") and "3000x3000" in e.message
    e = refused(bomb_png(200_000, 200_000))  # beyond Pillow's own bomb limit too
    assert (e.status, e.code) == (413, "image_too_large")


@pytest.mark.parametrize(
    "data,status,code",
    [
        (b"", 400, "invalid_image"),
        (b"definitely not an image", 400, "invalid_image"),
        (encode(Image.new("RGB", (4, 4)), "GIF"), 415, "unsupported_image_format"),
        (encode(Image.new("RGB", (4, 4)), "TIFF"), 415, "unsupported_image_format"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", 415, "unsupported_image_format"),
    ],
)
def test_bad_bytes(data, status, code):
    e = refused(data)
    assert (e.status, e.code) == (status, code)


def test_truncated_and_corrupt_images_are_400():
    good = encode(noise_image(64, 64), "PNG")
    assert refused(good[: len(good) // 2]).code == "invalid_image"
    jpg = bytearray(encode(noise_image(64, 64), "JPEG"))
    assert refused(bytes(jpg[:200])).status == 400


def test_decode_many_names_the_failing_image():
    with pytest.raises(ApiError) as e:
        decode_many([encode(noise_image(), "PNG"), b"junk"], size=S, max_pixels=MAXPIX)
    assert e.value.message.startswith("image 1:")


def test_images_opened_by_small_images_decode_the_same_and_keep_the_server_limit():
    """The route reads a small request's headers once (small_images) and decodes from them:
    the same pixels as decoding the bytes afresh, and the server's own pixel limit still holds."""
    from service.decode import small_images

    blobs = [encode(noise_image(), "PNG"), encode(noise_image(48, 40), "JPEG", quality=90)]
    opened = small_images(blobs, S)
    assert opened is not None and len(opened) == 2
    direct = decode_many(blobs, size=S, max_pixels=MAXPIX)
    assert np.array_equal(decode_many(blobs, size=S, max_pixels=MAXPIX, opened=opened), direct)
    with pytest.raises(ApiError) as e:  # a server configured below INLINE_PIXELS
        decode_many(blobs, size=S, max_pixels=1000, opened=small_images(blobs, S))
    assert e.value.status == 413 and e.value.message.startswith("image 0:")


def _pillow(data: bytes) -> np.ndarray:
    """The pixels by Pillow's path alone (rules 1-6 as written), for comparison."""
    from service.decode import _pillow_pixels

    return _pillow_pixels(data, S, MAXPIX, None).transpose(2, 0, 1) / np.float32(255)


def _jpeg_variants():
    rng = np.random.default_rng(3)
    smooth = np.repeat(np.linspace(0, 255, S, dtype=np.uint8)[None, :, None], S, 0).repeat(3, 2)
    for i, arr in enumerate([(rng.random((S, S, 3)) * 255).astype(np.uint8), smooth]):
        for sub in (0, 1, 2):
            for mode in ("RGB", "L"):
                for progressive in (False, True):
                    q = int(rng.integers(20, 100))
                    im = Image.fromarray(arr).convert(mode)
                    yield (
                        f"{i}-{mode}-sub{sub}-q{q}-p{int(progressive)}",
                        encode(im, "JPEG", quality=q, subsampling=sub, progressive=progressive),
                    )


@pytest.mark.parametrize("name,data", list(_jpeg_variants()))
def test_plain_jpegs_take_libjpeg_turbo_directly_with_pillows_pixels(name, data):
    """A JPEG already S x S with nothing to orient skips Pillow (atop.imaging.plain_jpeg): the
    pixels must be Pillow's to the bit, whatever the subsampling, mode, quality or progression."""
    from atop.imaging import plain_jpeg

    pytest.importorskip("simplejpeg")
    assert plain_jpeg(data, S) is not None, name
    assert np.array_equal(dec(data), _pillow(data)), name


def test_jpegs_the_fast_path_must_not_take_go_through_pillow():
    """Orientation (EXIF, or XMP, both in APP1), another size, CMYK, and corrupt or truncated
    data: plain_jpeg declines them, and the answer is Pillow's (an oriented image rotated, a
    truncated one refused as before)."""
    from atop.imaging import plain_jpeg

    im = noise_image()
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    oriented = encode(im, "JPEG", quality=95, exif=exif)
    xmp = encode(
        im, "JPEG", quality=95, xmp=b'<x:xmpmeta><rdf:Description tiff:Orientation="3"/></x:xmpmeta>'
    )
    other_size = encode(noise_image(48, 40), "JPEG", quality=90)
    cmyk = encode(im.convert("CMYK"), "JPEG", quality=90)
    for data in (oriented, xmp, other_size, cmyk):
        assert plain_jpeg(data, S) is None
        assert np.array_equal(dec(data), _pillow(data))
    plain = encode(im, "JPEG", quality=95)
    assert not np.array_equal(dec(oriented), dec(plain))  # the orientation was applied
    for cut in (len(plain) // 2, len(plain) - 2, 200):
        assert plain_jpeg(plain[:cut], S) is None
        assert refused(plain[:cut]).status == 400


def test_small_images_marks_plain_jpegs_and_the_pixel_limit_still_holds():
    from service.decode import small_images

    pytest.importorskip("simplejpeg")
    blobs = [encode(noise_image(), "JPEG", quality=90), encode(noise_image(), "PNG")]
    opened = small_images(blobs, S)
    assert opened is not None and isinstance(opened[0], np.ndarray) and isinstance(opened[1], Image.Image)
    assert np.array_equal(
        decode_many(blobs, size=S, max_pixels=MAXPIX, opened=opened),
        decode_many(blobs, size=S, max_pixels=MAXPIX),
    )
    with pytest.raises(ApiError) as e:  # a server whose pixel limit is below S x S
        decode_many(blobs[:1], size=S, max_pixels=S * S - 1, opened=small_images(blobs[:1], S))
    assert e.value.status == 413
