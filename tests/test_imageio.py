"""saminv.imageio on real files: every colour mode and format a user may hand us, and every broken input."""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from saminv import imageio
from saminv.errors import InputError
from saminv.imageio import (IMAGE_SUFFIXES, MAX_PIXELS, MIN_SIDE, atomic_write, collect_images,
                            from_tensor_range, load_image, save_json, save_png, to_tensor_range, unique_dir)

ORIENTATION = 0x0112


# ------------------------------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()  # 512 x 512 x 3


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    return data.chelsea()  # 300 x 451 x 3


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    return data.camera()  # 512 x 512, grey


def write(path: Path, img: Image.Image | np.ndarray, **save_args) -> Path:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    img.save(path, **save_args)
    return path


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def assert_input_error(path: Path, match: str, *args) -> InputError:
    """load_image(path, *args) raises InputError whose one-line message names the file and matches."""
    with pytest.raises(InputError, match=match) as info:
        load_image(path, *(args or (64,)))
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return info.value


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def write_huge_1bit_png(path: Path, width: int, height: int) -> Path:
    """A valid, all-black 1-bit PNG of width x height, built row by row: a few kB on disk, no big buffers."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    rows_per_chunk = 1000
    idat = b"".join(packer.compress(row * min(rows_per_chunk, height - y))
                    for y in range(0, height, rows_per_chunk))
    idat += packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    signature = b"\x89PNG\r\n\x1a\n"
    path.write_bytes(signature + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))
    return path


# ------------------------------------------------------------------------------------------ collect_images

def test_collect_images_expands_directories_sorted_and_keeps_named_files(tmp_path, astronaut):
    folder = tmp_path / "in"
    folder.mkdir()
    small = astronaut[:32, :32]
    for name in ["b.png", "a.JPG", "c.webp", ".hidden.png"]:
        write(folder / name, small)
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    write(folder / "sub" / "deep.png", small)
    named = tmp_path / "odd.name"  # explicitly named: kept whatever its suffix
    write(named, small, format="PNG")

    found = collect_images([folder, str(named), folder / "b.png"])  # b.png twice: kept once
    assert found == [folder / "a.JPG", folder / "b.png", folder / "c.webp", named]


def test_collect_images_missing_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(InputError, match="no such file") as info:
        collect_images([missing])
    assert str(missing) in str(info.value)


def test_collect_images_directory_without_images(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(InputError, match="no images") as info:
        collect_images([empty])
    assert str(empty) in str(info.value) and ".png" in str(info.value)


def test_collect_images_needs_something():
    with pytest.raises(InputError):
        collect_images([])


# ------------------------------------------------------------------------------------------ good inputs

def test_rgb_png_same_size_is_exact_and_resizes(tmp_path, astronaut):
    path = write(tmp_path / "a.png", astronaut)
    same = load_image(path, 512)
    assert same.dtype == np.uint8 and same.shape == (512, 512, 3)
    np.testing.assert_array_equal(same, astronaut)
    small = load_image(path, 64)
    assert small.shape == (64, 64, 3)
    # Lanczos of a box-averaged image: close to the block means.
    block_means = astronaut.reshape(64, 8, 64, 8, 3).mean(axis=(1, 3))
    assert np.abs(small.astype(float) - block_means).mean() < 6


def test_non_square_is_centre_cropped(tmp_path, chelsea):
    path = write(tmp_path / "cat.png", chelsea)  # 300 x 451
    out = load_image(path, 300)
    np.testing.assert_array_equal(out, chelsea[:, 75:375])
    assert load_image(path, 512).shape == (512, 512, 3)  # upsampling works too


@pytest.mark.parametrize("suffix,args", [(".jpg", {"quality": 95}), (".bmp", {}), (".webp", {"lossless": True}),
                                         (".tif", {}), (".gif", {})])
def test_other_formats(tmp_path, astronaut, suffix, args):
    path = write(tmp_path / f"a{suffix}", astronaut[::4, ::4], **args)
    out = load_image(path, 128)
    tolerance = 25 if suffix == ".gif" else 4  # GIF is palette-quantised
    assert np.abs(out.astype(float) - astronaut[::4, ::4]).mean() < tolerance


def test_grayscale_L(tmp_path, camera):
    path = write(tmp_path / "camera.png", camera)
    assert Image.open(path).mode == "L"
    out = load_image(path, 512)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], camera)


def test_rgba_transparency_is_composited_over_white(tmp_path, astronaut):
    alpha = np.full(astronaut.shape[:2], 255, np.uint8)
    alpha[:, :256] = 0                  # left half fully transparent
    alpha[:, 256:384] = 128             # then half transparent
    path = write(tmp_path / "rgba.png", np.dstack([astronaut, alpha]))
    assert Image.open(path).mode == "RGBA"
    out = load_image(path, 512)
    assert (out[:, :256] == 255).all()
    half = astronaut[:, 256:384].astype(float) * 128 / 255 + 255 * 127 / 255
    assert np.abs(out[:, 256:384] - half).max() <= 1
    np.testing.assert_array_equal(out[:, 384:], astronaut[:, 384:])


def test_la_transparency_is_composited_over_white(tmp_path, camera):
    alpha = np.where(np.arange(512)[None, :] < 100, 0, 255).astype(np.uint8).repeat(512, axis=0)
    path = write(tmp_path / "la.png", Image.fromarray(np.dstack([camera, alpha]), "LA"))
    out = load_image(path, 512)
    assert (out[:, :100] == 255).all()
    np.testing.assert_array_equal(out[:, 100:, 1], camera[:, 100:])


def test_palette_P(tmp_path, astronaut):
    small = astronaut[::2, ::2]
    quantised = Image.fromarray(small).quantize(64)
    path = write(tmp_path / "pal.png", quantised)
    assert Image.open(path).mode == "P"
    out = load_image(path, 256)
    np.testing.assert_array_equal(out, np.asarray(quantised.convert("RGB")))
    assert np.abs(out.astype(float) - small).mean() < 12


def test_palette_with_transparent_index_is_white(tmp_path, astronaut):
    quantised = Image.fromarray(astronaut[::2, ::2]).quantize(64)
    index = np.asarray(quantised)
    transparent = int(index[0, 0])
    path = write(tmp_path / "pal.gif", quantised, transparency=transparent)
    out = load_image(path, 256)
    assert (out[index == transparent] == 255).all()
    assert (out[index != transparent] != 255).any()


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path, camera):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 257, camera.shape)  # low-byte noise: x / 257 stays within [camera, camera + 1)
    wide = np.minimum(camera.astype(np.int64) * 257 + noise, 65535).astype(np.uint16)
    path = write(tmp_path / "camera16.png", wide)
    assert Image.open(path).mode.startswith("I;16")
    out = load_image(path, 512)
    diff = out[:, :, 0].astype(int) - camera
    assert diff.min() >= 0 and diff.max() <= 1 and np.abs(diff).mean() < 0.6
    exact = write(tmp_path / "exact16.png", camera.astype(np.uint16) * 257)
    np.testing.assert_array_equal(load_image(exact, 512)[:, :, 2], camera)


def test_32bit_int_and_float_tiffs(tmp_path, camera):
    as_int = write(tmp_path / "i.tif", Image.fromarray(camera.astype(np.int32) * 257, "I"))
    as_float = write(tmp_path / "f.tif", Image.fromarray(camera.astype(np.float32) / 255, "F"))
    assert Image.open(as_int).mode == "I" and Image.open(as_float).mode == "F"
    for path in (as_int, as_float):
        assert np.abs(load_image(path, 512)[:, :, 0].astype(int) - camera).max() <= 1


def test_1bit(tmp_path, camera):
    path = write(tmp_path / "bw.png", Image.fromarray(camera > 128))
    assert Image.open(path).mode == "1"
    out = load_image(path, 512)
    np.testing.assert_array_equal(out[:, :, 0], np.where(camera > 128, 255, 0))


def test_cmyk_jpeg(tmp_path, astronaut):
    path = write(tmp_path / "cmyk.jpg", Image.fromarray(astronaut).convert("CMYK"), quality=95)
    assert Image.open(path).mode == "CMYK"
    out = load_image(path, 512)
    assert np.abs(out.astype(float) - astronaut).mean() < 6


@pytest.mark.parametrize("orientation,turns", [(6, -1), (8, 1), (3, 2)])  # 6: 90 deg clockwise, 8: anticlockwise
def test_exif_orientation_jpeg(tmp_path, chelsea, orientation, turns):
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    tagged = write(tmp_path / "tagged.jpg", chelsea, exif=exif, quality=95)
    stored = np.asarray(Image.open(tagged).convert("RGB"))  # the pixels as stored, not rotated
    upright = write(tmp_path / "upright.png", np.ascontiguousarray(np.rot90(stored, turns)))
    unrotated = write(tmp_path / "unrotated.png", stored)

    out = load_image(tagged, 128)
    np.testing.assert_array_equal(out, load_image(upright, 128))
    assert np.abs(out.astype(int) - load_image(unrotated, 128)).mean() > 10


def test_exif_rotation_changes_the_crop_of_a_non_square_image(tmp_path, chelsea):
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    path = write(tmp_path / "portrait.png", chelsea, exif=exif)  # stored 451 wide, shown 451 tall
    np.testing.assert_array_equal(load_image(path, 300), np.rot90(chelsea, -1)[75:375])


# ------------------------------------------------------------------------------------------ bad inputs

def test_missing_file(tmp_path):
    assert_input_error(tmp_path / "missing.png", "no such file")


def test_directory_is_not_an_image(tmp_path):
    assert_input_error(tmp_path, "directory")


def test_text_named_png(tmp_path):
    path = tmp_path / "fake.png"
    path.write_text("this is not a picture\n")
    assert_input_error(path, "not an image")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert_input_error(path, "not an image")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated(tmp_path, astronaut, suffix):
    whole = write(tmp_path / f"whole{suffix}", astronaut)
    blob = whole.read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(blob[: len(blob) // 2])
    assert_input_error(path, "truncated or corrupt")


def test_corrupt_png(tmp_path, astronaut):
    blob = bytearray(write(tmp_path / "whole.png", astronaut).read_bytes())
    middle = len(blob) // 2
    blob[middle:middle + 2000] = np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    path = tmp_path / "garbled.png"
    path.write_bytes(bytes(blob))
    assert_input_error(path, "corrupt")


def test_too_small_to_crop(tmp_path, astronaut):
    path = write(tmp_path / "tiny.png", astronaut[:8, :8])
    assert_input_error(path, "too small")
    assert MIN_SIDE > 8
    strip = write(tmp_path / "strip.png", astronaut[:8, :])  # wide enough, but not tall enough
    assert_input_error(strip, "too small")


@pytest.mark.parametrize("side", [9000,    # over MAX_PIXELS, under Pillow's warning limit: our check
                                  10000,   # Pillow's DecompressionBombWarning
                                  16000])  # Pillow's DecompressionBombError
def test_decompression_bomb_is_refused_quickly(tmp_path, side):
    assert side * side > MAX_PIXELS
    path = write_huge_1bit_png(tmp_path / f"bomb{side}.png", side, side)
    assert path.stat().st_size < 200_000
    start = time.perf_counter()
    assert_input_error(path, "too many pixels")
    assert time.perf_counter() - start < 1.0


def test_unreadable_file(tmp_path, astronaut, monkeypatch):
    path = write(tmp_path / "secret.png", astronaut[:32, :32])

    def denied(file, mode="r", *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(imageio, "open", denied, raising=False)  # shadows the builtin in the module only
    assert_input_error(path, "cannot read.*Permission denied")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read anything")
def test_unreadable_file_for_real(tmp_path, astronaut):
    path = write(tmp_path / "secret.png", astronaut[:32, :32])
    path.chmod(0)
    assert_input_error(path, "cannot read")


def test_bad_resolution_is_a_programming_error(tmp_path, astronaut):
    path = write(tmp_path / "a.png", astronaut[:32, :32])
    with pytest.raises(ValueError):
        load_image(path, 0)


# ------------------------------------------------------------------------------------------ ranges

def test_tensor_range_round_trip():
    levels = np.arange(256, dtype=np.uint8)
    img = np.stack([np.tile(levels, (4, 1))] * 3, axis=2)  # 4 x 256 x 3
    x = to_tensor_range(img)
    assert x.shape == (1, 3, 4, 256) and x.dtype == np.float32 and x.flags.c_contiguous
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(from_tensor_range(x), img)
    np.testing.assert_array_equal(from_tensor_range(x[0]), img)


def test_from_tensor_range_clips_and_rounds():
    x = np.array([-3.0, -1.0, 0.0, 1.0, 5.0, np.nan], dtype=np.float32).reshape(3, 1, 2)
    out = from_tensor_range(x)
    assert out.shape == (1, 2, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 0] and out[0, :, 1].tolist() == [128, 255]
    assert out[0, :, 2].tolist() == [255, 128]


def test_range_shape_errors():
    with pytest.raises(ValueError):
        to_tensor_range(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError):
        to_tensor_range(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        from_tensor_range(np.zeros((2, 3, 4, 4), np.float32))


# ------------------------------------------------------------------------------------------ outputs

def test_atomic_write_uses_a_sibling_temp_with_the_same_suffix(tmp_path):
    dest = tmp_path / "out.png"
    seen = []

    def writer(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"new")

    atomic_write(dest, writer)
    assert seen[0].parent == tmp_path and seen[0].suffix == ".png" and seen[0] != dest
    assert dest.read_bytes() == b"new" and files_in(tmp_path) == ["out.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_replaces_and_keeps_mode(tmp_path):
    dest = tmp_path / "out.json"
    dest.write_text("old")
    dest.chmod(0o600)
    atomic_write(dest, lambda tmp: tmp.write_text("new"))
    assert dest.read_text() == "new" and dest.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("error,expected", [(RuntimeError("bug"), RuntimeError),
                                            (OSError(28, "No space left on device"), InputError),
                                            (KeyboardInterrupt(), KeyboardInterrupt)])
def test_atomic_write_failure_leaves_destination_and_no_temp(tmp_path, error, expected):
    dest = tmp_path / "out.png"
    dest.write_bytes(b"old")

    def writer(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise error

    with pytest.raises(expected):
        atomic_write(dest, writer)
    assert dest.read_bytes() == b"old" and files_in(tmp_path) == ["out.png"]


def test_unwritable_location_under_a_regular_file(tmp_path, astronaut):
    blocker = tmp_path / "file.txt"
    blocker.write_text("I am a file")
    dest = blocker / "out.png"
    with pytest.raises(InputError, match="cannot write") as info:
        save_png(dest, astronaut)
    assert str(dest) in str(info.value) and "\n" not in str(info.value)
    assert files_in(tmp_path) == ["file.txt"] and blocker.read_text() == "I am a file"


def test_missing_output_directory(tmp_path):
    dest = tmp_path / "no" / "such" / "dir" / "out.json"
    with pytest.raises(InputError, match="cannot write") as info:
        save_json(dest, {"a": 1})
    assert str(dest) in str(info.value)
    assert files_in(tmp_path) == []


def test_destination_is_a_directory(tmp_path, astronaut):
    dest = tmp_path / "taken.png"
    dest.mkdir()
    with pytest.raises(InputError, match="cannot write"):
        save_png(dest, astronaut[:16, :16])
    assert dest.is_dir() and files_in(tmp_path) == ["taken.png"] and files_in(dest) == []


def test_save_png_round_trip(tmp_path, astronaut, camera):
    save_png(tmp_path / "rgb.png", astronaut)
    save_png(tmp_path / "grey.png", camera)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "rgb.png")), astronaut)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grey.png")), camera)
    with pytest.raises(ValueError):
        save_png(tmp_path / "bad.png", astronaut.astype(np.float32))
    assert files_in(tmp_path) == ["grey.png", "rgb.png"]


def test_save_json(tmp_path):
    path = tmp_path / "meta.json"
    save_json(path, {"tau": np.float32(0.25), "shares": np.array([0.5, 0.5]), "n": np.int64(3),
                     "input": Path("x.png")})
    text = path.read_text()
    assert text.endswith("\n") and '\n  "tau": 0.25' in text
    assert json.loads(text) == {"tau": 0.25, "shares": [0.5, 0.5], "n": 3, "input": "x.png"}
    with pytest.raises(TypeError):
        save_json(tmp_path / "bad.json", {"x": object()})
    assert files_in(tmp_path) == ["meta.json"]


def test_unique_dir(tmp_path):
    base = tmp_path / "run"
    assert unique_dir(base) == base
    base.mkdir()
    assert unique_dir(base) == tmp_path / "run-1"
    (tmp_path / "run-1").mkdir()
    (tmp_path / "run-2").write_text("a file also takes the name")
    assert unique_dir(base) == tmp_path / "run-3"
    assert not (tmp_path / "run-3").exists()  # only chooses the name


def test_image_suffixes_are_lower_case_with_dot():
    assert all(s.startswith(".") and s == s.lower() for s in IMAGE_SUFFIXES)
    assert {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"} <= set(IMAGE_SUFFIXES)
