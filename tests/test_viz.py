"""saminv.viz: colours, sizes and placement of the report pictures."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from saminv.viz import (FALLBACK_COLORS, SPACE_COLORS, image_grid, layer_map_image, legend_image,
                        side_by_side, space_color)

NAMES = ["W+", "F4", "F6", "F8", "F10"]


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.ascontiguousarray(data.astronaut()[::8, ::8])  # 64 x 64 x 3


def stripes(height: int, width: int, n: int) -> np.ndarray:
    """HxW labels: n vertical stripes 0..n-1."""
    return np.broadcast_to(np.arange(width) * n // width, (height, width)).copy()


def is_white(region: np.ndarray) -> bool:
    return bool((region == 255).all())


# ------------------------------------------------------------------------------------------ palette

def test_palette_is_fixed_distinct_and_starts_with_w_plus():
    assert next(iter(SPACE_COLORS)) == "W+"
    colors = list(SPACE_COLORS.values())
    assert len(set(colors)) == len(colors)
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in colors)
    assert space_color("F6", 3) == SPACE_COLORS["F6"]
    assert space_color("mystery", 1) == FALLBACK_COLORS[1]


# ------------------------------------------------------------------------------------------ layer map

def test_layer_map_colours_every_pixel_by_its_space():
    labels = stripes(20, 50, len(NAMES))
    labels[0, 0] = 4
    out = layer_map_image(labels, NAMES)
    assert out.shape == (20, 50, 3) and out.dtype == np.uint8
    for i, name in enumerate(NAMES):
        assert (out[labels == i] == SPACE_COLORS[name]).all()


def test_layer_map_unknown_names_get_fallback_colours():
    out = layer_map_image(np.array([[0, 1]]), ["A", "B"])
    assert tuple(out[0, 0]) == FALLBACK_COLORS[0] and tuple(out[0, 1]) == FALLBACK_COLORS[1]


@pytest.mark.parametrize("labels", [np.array([[0, 5]]), np.array([[-1, 0]]), np.zeros((2, 2, 2), int),
                                    np.zeros((2, 2), float)])
def test_layer_map_rejects_bad_labels(labels):
    with pytest.raises(ValueError):
        layer_map_image(labels, NAMES)


# ------------------------------------------------------------------------------------------ legend

@pytest.mark.parametrize("height", [60, 128, 512])
def test_legend_has_the_requested_height_and_a_swatch_per_name(height):
    out = legend_image(NAMES, height)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[0] == height and out.shape[2] == 3
    assert 20 < out.shape[1] < 200
    for name in NAMES:
        assert (out == SPACE_COLORS[name]).all(axis=2).sum() >= 9  # at least a 3x3 swatch interior
    assert is_white(out[-1])


def test_legend_shares_make_it_wider_and_add_text():
    plain = legend_image(NAMES, 128)
    with_shares = legend_image(NAMES, 128, shares=[0.43, 0.2, 0.1, 0.27, 0.0])
    assert with_shares.shape[0] == 128 and with_shares.shape[1] > plain.shape[1]
    extra = with_shares[:, plain.shape[1]:]
    assert (extra < 128).any()  # dark text pixels in the percentage column


def test_legend_errors():
    with pytest.raises(ValueError):
        legend_image([], 100)
    with pytest.raises(ValueError):
        legend_image(NAMES, 100, shares=[0.5])
    with pytest.raises(ValueError):
        legend_image(NAMES, 30)  # 6 px per row: unreadable


# ------------------------------------------------------------------------------------------ side by side

def test_side_by_side_widths_heights_and_nearest_upscaling(photo):
    labels = layer_map_image(stripes(64, 32, 4), NAMES[:4])  # 64 x 32
    out = side_by_side([photo, labels], scale=3, gap=5)
    assert out.shape == (64 * 3, 64 * 3 + 5 + 32 * 3, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :192], photo.repeat(3, axis=0).repeat(3, axis=1))
    assert is_white(out[:, 192:197])
    np.testing.assert_array_equal(out[:, 197:], labels.repeat(3, axis=0).repeat(3, axis=1))


def test_side_by_side_titles_go_above_on_white(photo):
    out = side_by_side([photo, photo, photo], titles=["target", "a title much too long to fit", ""], gap=4)
    title_h = out.shape[0] - 64
    assert 10 <= title_h <= 40 and out.shape[1] == 3 * 64 + 2 * 4
    np.testing.assert_array_equal(out[title_h:, :64], photo)
    titles = out[:title_h]
    assert (titles[:, :64] < 128).any() and (titles[:, 68:132] < 128).any()  # text drawn
    assert is_white(titles[:, 136:])  # empty title
    assert is_white(titles[:, 64:68])  # long title shortened, not spilling into the gap


def test_side_by_side_legend_panel(photo):
    legend = legend_image(NAMES, 64)
    out = side_by_side([photo, legend])
    assert out.shape == (64, 64 + 4 + legend.shape[1], 3)


def rgb(h: int, w: int) -> np.ndarray:
    return np.zeros((h, w, 3), np.uint8)


@pytest.mark.parametrize("kwargs", [dict(panels=[]),
                                    dict(panels=[rgb(4, 4), rgb(5, 4)]),
                                    dict(panels=[np.zeros((4, 4), np.uint8)]),
                                    dict(panels=[rgb(4, 4)], scale=0),
                                    dict(panels=[rgb(4, 4)], titles=["a", "b"])])
def test_side_by_side_errors(kwargs):
    with pytest.raises(ValueError):
        side_by_side(**kwargs)


# ------------------------------------------------------------------------------------------ grid

def test_image_grid_places_images_row_by_row(photo):
    images = np.stack([np.full_like(photo, 10 * i) for i in range(5)])  # 5 x 64 x 64 x 3
    out = image_grid(images, cols=3, gap=2)
    assert out.shape == (2 * 64 + 2, 3 * 64 + 2 * 2, 3) and out.dtype == np.uint8
    for i in range(5):
        y, x = (i // 3) * 66, (i % 3) * 66
        assert (out[y:y + 64, x:x + 64] == 10 * i).all()
    assert is_white(out[64:66]) and is_white(out[66:, 132:])  # gap row, empty last cell


def test_image_grid_from_a_list_with_fewer_images_than_columns(photo):
    out = image_grid([photo, photo], cols=8, gap=0)
    assert out.shape == (64, 128, 3)
    np.testing.assert_array_equal(out[:, 64:], photo)


@pytest.mark.parametrize("images,cols", [([], 2),
                                         ([rgb(4, 4), rgb(4, 5)], 2),
                                         ([rgb(4, 4)], 0),
                                         ([np.zeros((4, 4, 3), np.float32)], 1)])
def test_image_grid_errors(images, cols):
    with pytest.raises(ValueError):
        image_grid(images, cols)
