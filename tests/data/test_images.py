"""load_image: every colour mode to RGB, EXIF orientation, and a clear reason for every failure."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot.data import images as images_mod
from fewshot.data.images import is_image_file, load_image
from fewshot.errors import FewshotError, ImageReadError


@pytest.fixture(scope="module")
def grocery_jpeg(grocery_root: Path) -> Path:
    path = grocery_root / "dataset" / "train" / "Fruit" / "Apple" / "Granny-Smith" / "Granny-Smith_001.jpg"
    assert path.is_file()
    return path


def _rgb(im: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    assert im.mode == "RGB"
    return im.getpixel(xy)


def test_real_grocery_jpeg(grocery_jpeg: Path) -> None:
    im = load_image(grocery_jpeg)
    assert im.mode == "RGB" and im.size == (348, 348)
    # 348 px is below 2 x 224: draft keeps the full size
    assert load_image(grocery_jpeg, target_size=224).size == (348, 348)


def test_omniglot_one_bit_png(omniglot_root: Path) -> None:
    path = next((omniglot_root / "Korean").glob("*/*.png"))
    with Image.open(path) as raw:
        assert raw.mode == "1"
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (105, 105)


def test_greyscale(tmp_path: Path) -> None:
    p = tmp_path / "grey.png"
    Image.new("L", (10, 8), 77).save(p)
    im = load_image(p)
    assert im.size == (10, 8)
    assert _rgb(im) == (77, 77, 77)


def test_sixteen_bit(tmp_path: Path) -> None:
    arr = np.full((6, 9), 65535, dtype=np.uint16)
    arr[0, 0] = 0
    arr[0, 1] = 32896  # 128 * 257
    p = tmp_path / "sixteen.png"
    Image.fromarray(arr).save(p)
    with Image.open(p) as raw:
        assert raw.mode.startswith("I")
    im = load_image(p)
    assert im.size == (9, 6)
    assert _rgb(im, (0, 0)) == (0, 0, 0)
    assert _rgb(im, (1, 0)) == (128, 128, 128)
    assert _rgb(im, (2, 2)) == (255, 255, 255)  # not clipped garbage, not all-white by accident


def test_thirty_two_bit_integer_tiff(tmp_path: Path) -> None:
    arr = np.array([[0, 1000], [2000, 4000]], dtype=np.int32)
    p = tmp_path / "i32.tif"
    Image.fromarray(arr).save(p)
    im = load_image(p)
    assert im.mode == "RGB"
    assert _rgb(im, (0, 0))[0] < _rgb(im, (1, 1))[0]


def test_palette_with_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (4, 4), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    im.putpixel((1, 1), 1)
    im.info["transparency"] = 0  # index 0 (red) is transparent
    p = tmp_path / "palette.png"
    im.save(p, transparency=0)
    out = load_image(p)
    assert _rgb(out, (0, 0)) == (255, 255, 255)  # transparent -> white, not red
    assert _rgb(out, (1, 1)) == (0, 0, 255)


def test_palette_gif(tmp_path: Path) -> None:
    p = tmp_path / "anim.gif"
    Image.new("RGB", (5, 5), (0, 200, 0)).convert("P").save(p)
    assert load_image(p).size == (5, 5)


def test_cmyk_jpeg_and_tiff(tmp_path: Path) -> None:
    for name in ("cmyk.jpg", "cmyk.tif"):
        p = tmp_path / name
        Image.new("CMYK", (12, 10), (0, 255, 255, 0)).save(p)  # pure red in CMYK
        im = load_image(p)
        assert im.size == (12, 10)
        r, g, b = _rgb(im, (5, 5))
        assert r > 200 and g < 60 and b < 60, (name, (r, g, b))


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    im = Image.new("RGBA", (6, 6), (255, 0, 0, 0))
    im.putpixel((2, 2), (0, 0, 255, 255))
    im.putpixel((3, 3), (0, 0, 0, 128))
    p = tmp_path / "rgba.png"
    im.save(p)
    out = load_image(p)
    assert _rgb(out, (0, 0)) == (255, 255, 255)
    assert _rgb(out, (2, 2)) == (0, 0, 255)
    assert all(120 <= v <= 135 for v in _rgb(out, (3, 3)))


def test_la_composited_on_white(tmp_path: Path) -> None:
    p = tmp_path / "la.png"
    Image.new("LA", (3, 3), (0, 0)).save(p)
    assert _rgb(load_image(p)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    p = tmp_path / "rotated.jpg"
    im.save(p, exif=exif.tobytes())
    with Image.open(p) as raw:
        assert raw.size == (40, 20)
    out = load_image(p)
    assert out.size == (20, 40)
    drafted = load_image(p, target_size=8)  # decoded at 1/2 scale (still >= 8 px), then rotated
    assert drafted.size == (10, 20)


def test_very_large_jpeg_loads(tmp_path: Path) -> None:
    p = tmp_path / "big.jpg"
    Image.new("RGB", (8000, 6000), (200, 30, 30)).save(p, quality=70)
    im = load_image(p)
    assert im.size == (8000, 6000) and im.mode == "RGB"
    # with a target size the JPEG decoder scales down (1/8 here) but never below the target
    small = load_image(p, target_size=224)
    assert small.size == (1000, 750)
    assert min(load_image(p, target_size=2000).size) >= 2000


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [10_000, 20_000])  # Pillow warns at 1x its limit, raises at 2x
def test_decompression_bomb(tmp_path: Path, side: int) -> None:
    p = tmp_path / f"bomb{side}.png"
    p.write_bytes(_png_header_only(side, side))
    with pytest.raises(ImageReadError) as err:
        load_image(p)
    assert err.value.reason.startswith("decompression bomb")
    assert err.value.path == p


def test_module_pixel_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "small.png"
    Image.new("RGB", (100, 100)).save(p)
    monkeypatch.setattr(images_mod, "MAX_IMAGE_PIXELS", 50 * 50)
    with pytest.raises(ImageReadError, match="decompression bomb"):
        load_image(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError) as err:
        load_image(tmp_path / "nope.jpg")
    assert err.value.reason == "file not found"
    assert "nope.jpg" in str(err.value) and "fix:" in str(err.value)
    assert isinstance(err.value, FewshotError)


def test_zero_byte_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageReadError) as err:
        load_image(p)
    assert err.value.reason == "zero-byte file"


def test_truncated_jpeg(tmp_path: Path, grocery_jpeg: Path) -> None:
    data = grocery_jpeg.read_bytes()
    p = tmp_path / "half.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as err:
        load_image(p)
    assert err.value.reason.startswith("truncated or corrupt image data")


def test_truncated_png(tmp_path: Path) -> None:
    src = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src)
    data = src.read_bytes()
    p = tmp_path / "half.png"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        load_image(p)


def test_text_file_named_jpg(tmp_path: Path) -> None:
    p = tmp_path / "notes.jpg"
    p.write_text("this is not an image\n")
    with pytest.raises(ImageReadError) as err:
        load_image(p)
    assert err.value.reason == "not an image file (unrecognised format)"


def test_folder_is_not_an_image(tmp_path: Path) -> None:
    d = tmp_path / "folder.jpg"
    d.mkdir()
    with pytest.raises(ImageReadError, match="not a file"):
        load_image(d)


def test_is_image_file() -> None:
    assert is_image_file("a/B.JPG") and is_image_file("x.webp") and is_image_file("x.TIFF")
    assert not is_image_file("x.txt") and not is_image_file("jpg")
