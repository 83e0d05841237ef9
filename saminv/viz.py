"""Pictures for reports: the per-pixel latent-space map, its legend, side-by-side strips and grids.

Pillow + numpy only (no torch). Every image here is an ``H x W x 3`` ``uint8`` RGB array on a white
background; wrong shapes, dtypes or arguments raise ``ValueError``. Text uses Pillow's built-in font
(``ImageFont.load_default``), so no font files are needed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Color = tuple[int, int, int]

SPACE_COLORS: dict[str, Color] = {
    "W+": (0, 114, 178),     # blue
    "F2": (86, 180, 233),    # sky blue
    "F4": (0, 158, 115),     # bluish green
    "F6": (240, 228, 66),    # yellow
    "F8": (230, 159, 0),     # orange
    "F10": (213, 94, 0),     # vermillion
    "F12": (204, 121, 167),  # reddish purple
    "W": (80, 80, 80),       # dark grey
}
"""Fixed colour per latent space, from the colour-blind-safe Okabe-Ito palette: cool colours for the
most editable spaces (W+, small F_k), warm ones for the least editable (large F_k)."""

FALLBACK_COLORS: tuple[Color, ...] = tuple(SPACE_COLORS.values())
"""Colours for names not in SPACE_COLORS, picked by the name's position in ``names``."""

WHITE: Color = (255, 255, 255)
TEXT: Color = (0, 0, 0)
OUTLINE: Color = (64, 64, 64)
TITLE_FONT_SIZE = 14


def space_color(name: str, index: int) -> Color:
    """The colour of latent space ``name`` (at position ``index`` in its list of names)."""
    return SPACE_COLORS.get(name, FALLBACK_COLORS[index % len(FALLBACK_COLORS)])


# ------------------------------------------------------------------------------------------ layer map

def layer_map_image(labels: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Colour each pixel by its latent space.

    ``labels``: ``H x W`` integer array, each value an index into ``names`` (e.g.
    ``["W+", "F4", "F6", "F8"]``, most editable first). Returns ``H x W x 3`` ``uint8``, the pixels
    labelled ``i`` painted ``space_color(names[i], i)``.
    Raises ValueError if ``labels`` is not a 2-D integer array or holds a value outside ``[0, len(names))``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an HxW integer array, got shape {labels.shape} dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise ValueError(f"labels must lie in [0, {len(names)}), got [{labels.min()}, {labels.max()}]")
    palette = np.array([space_color(n, i) for i, n in enumerate(names)], dtype=np.uint8).reshape(-1, 3)
    return palette[labels]


# ------------------------------------------------------------------------------------------ text

@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font at ``size`` px (its fixed bitmap font if Pillow lacks FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _text_size(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> tuple[int, int]:
    """Width and height in pixels of ``text`` drawn in ``font`` (ink box from the drawing origin)."""
    left, top, right, bottom = font.getbbox(text)
    return int(right), int(bottom)


def _fit_text(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> str:
    """``text``, shortened with "..." if needed so that it fits in ``width`` pixels."""
    if _text_size(text, font)[0] <= width:
        return text
    for end in range(len(text) - 1, 0, -1):
        shorter = text[:end].rstrip() + "..."
        if _text_size(shorter, font)[0] <= width:
            return shorter
    return ""


def _draw_text(draw: ImageDraw.ImageDraw, x: int, y_center: int, text: str,
               font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> None:
    """Draw ``text`` with its left edge at ``x``, centred vertically on ``y_center``."""
    _, top, _, bottom = font.getbbox(text or "A")
    draw.text((x, y_center - (top + bottom) // 2), text, fill=TEXT, font=font)


# ------------------------------------------------------------------------------------------ legend

def legend_image(names: Sequence[str], height: int, shares: Sequence[float] | None = None) -> np.ndarray:
    """A vertical legend strip: one row per space, a colour swatch, the name and optionally its share.

    ``names``: the spaces in label order (as for :func:`layer_map_image`). ``shares``: optional fraction
    of pixels per space in [0, 1], shown as a whole percentage ("43%"). Returns ``height x W x 3``
    ``uint8`` on white, ``W`` just wide enough for the text. Rows are at most 24 px tall (font up to
    14 px), stacked near the top. Raises ValueError if ``names`` is empty, ``shares`` does not match it,
    or ``height`` leaves fewer than 12 px per row (text would be unreadable).
    """
    n = len(names)
    if n == 0:
        raise ValueError("legend_image needs at least one name")
    if shares is not None and len(shares) != n:
        raise ValueError(f"got {len(shares)} shares for {n} names")
    row = min(24, height // n)
    if row < 12:
        raise ValueError(f"legend height {height} is too small for {n} entries (needs >= {12 * n} px)")

    font = _font(min(14, row - 4))
    pad, swatch = 4, row - 6
    labels = [str(name) for name in names]
    percents = [f"{round(100 * float(s))}%" for s in shares] if shares is not None else []
    name_x = pad + swatch + 6
    share_right = name_x + max(_text_size(t, font)[0] for t in labels) + 8 + (
        max(_text_size(t, font)[0] for t in percents) if percents else 0)
    width = share_right + pad

    canvas = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(canvas)
    top = min(pad, (height - n * row) // 2)
    for i, label in enumerate(labels):
        y0 = top + i * row
        y_center = y0 + row // 2
        sy = y_center - swatch // 2
        draw.rectangle((pad, sy, pad + swatch - 1, sy + swatch - 1), fill=space_color(names[i], i), outline=OUTLINE)
        _draw_text(draw, name_x, y_center, label, font)
        if percents:
            _draw_text(draw, share_right - _text_size(percents[i], font)[0], y_center, percents[i], font)
    return np.array(canvas, dtype=np.uint8)


# ------------------------------------------------------------------------------------------ layouts

def _check_image(img: np.ndarray, what: str) -> np.ndarray:
    """``img`` as an ``H x W x 3`` ``uint8`` array, or ValueError naming ``what``."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{what} must be an HxWx3 uint8 image, got shape {img.shape} dtype {img.dtype}")
    return img


def side_by_side(panels: Sequence[np.ndarray], titles: Sequence[str] | None = None,
                 scale: int = 1, gap: int = 4) -> np.ndarray:
    """Place equal-height panels in a row, left to right, each with an optional title above it.

    ``panels``: ``H x W_i x 3`` ``uint8`` images, all of height ``H``; each is enlarged ``scale`` times with
    nearest-neighbour (pixels stay sharp, e.g. for a small layer map). ``gap`` white pixels separate the
    panels. With ``titles`` (one per panel, shortened with "..." to the panel's width) a title row is added
    on top, text centred over each panel. Returns ``(T + H*scale) x (sum(W_i*scale) + gap*(n-1)) x 3``
    ``uint8`` on white, ``T`` the title row's height (0 without titles).
    Raises ValueError for no panels, unequal heights, bad shapes, ``scale < 1``, ``gap < 0`` or a
    ``titles`` list of the wrong length.
    """
    if not panels:
        raise ValueError("side_by_side needs at least one panel")
    if scale < 1 or gap < 0:
        raise ValueError(f"need scale >= 1 and gap >= 0, got scale={scale} gap={gap}")
    if titles is not None and len(titles) != len(panels):
        raise ValueError(f"got {len(titles)} titles for {len(panels)} panels")
    panels = [_check_image(p, f"panel {i}") for i, p in enumerate(panels)]
    if len({p.shape[0] for p in panels}) > 1:
        raise ValueError(f"panels must have equal heights, got {[p.shape[0] for p in panels]}")

    big = [p.repeat(scale, axis=0).repeat(scale, axis=1) for p in panels]
    font = _font(TITLE_FONT_SIZE)
    title_h = _text_size("Ag", font)[1] + 8 if titles is not None else 0
    height = title_h + big[0].shape[0]
    width = sum(b.shape[1] for b in big) + gap * (len(big) - 1)

    canvas = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(canvas)
    x = 0
    for i, b in enumerate(big):
        canvas.paste(Image.fromarray(b), (x, title_h))
        if titles is not None:
            text = _fit_text(str(titles[i]), font, b.shape[1])
            _draw_text(draw, x + (b.shape[1] - _text_size(text, font)[0]) // 2, title_h // 2, text, font)
        x += b.shape[1] + gap
    return np.array(canvas, dtype=np.uint8)


def image_grid(images: np.ndarray | Sequence[np.ndarray], cols: int, gap: int = 2) -> np.ndarray:
    """Tile equal-size images row by row, left to right, ``gap`` white pixels between them.

    ``images``: ``N x H x W x 3`` ``uint8`` (an array or a list of ``H x W x 3``). Uses ``min(cols, N)``
    columns and ``ceil(N / cols)`` rows; unused cells of the last row stay white. Returns
    ``(rows*H + (rows-1)*gap) x (cols*W + (cols-1)*gap) x 3`` ``uint8``.
    Raises ValueError for no images, unequal sizes, bad shapes, ``cols < 1`` or ``gap < 0``.
    """
    if cols < 1 or gap < 0:
        raise ValueError(f"need cols >= 1 and gap >= 0, got cols={cols} gap={gap}")
    items = [_check_image(img, f"image {i}") for i, img in enumerate(images)]
    if not items:
        raise ValueError("image_grid needs at least one image")
    if len({img.shape for img in items}) > 1:
        raise ValueError(f"images must have equal sizes, got {sorted({img.shape for img in items})}")

    h, w, _ = items[0].shape
    cols = min(cols, len(items))
    rows = -(-len(items) // cols)
    grid = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 255, dtype=np.uint8)
    for i, img in enumerate(items):
        y, x = (i // cols) * (h + gap), (i % cols) * (w + gap)
        grid[y:y + h, x:x + w] = img
    return grid
