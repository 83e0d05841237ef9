"""What ``saminv invert`` and ``saminv edit`` write per image; each output directory appears whole.

``saminv invert``:

* ``reconstruction.png``  the SAM reconstruction;
* ``layer_map.png``       each pixel coloured by its latent space, with a legend;
* ``side_by_side.png``    input | reconstruction | layer map (+ legend), with ``--edits N`` a grid of
                          the top-N GANSpace edits below;
* ``codes.safetensors``   ``wplus`` [1, n_latent, w_dim], per F_k ``delta.F<k>`` [1, C, r, r] and
                          ``mask.F<k>`` [1, 1, r, r], ``labels`` [R, R] int64 (index into the spaces);
                          metadata: model, spaces, tau;
* ``metrics.json``        PSNR, LPIPS, share of pixels per space, per-space single inversions, seconds.

``saminv edit``: ``edit_<i>_<strength>.png`` per strength, ``strip.png`` (layer map | edits),
``edit.gif`` (over the strengths, when there are several), ``direction.npy`` [n_latent, w_dim],
``codes.safetensors`` (the codes that were edited) and ``edit.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from saminv.errors import InputError
from saminv.imageio import atomic_write, from_tensor_range, save_json, save_png
from saminv.inversion.optimize import Codes
from saminv.inversion.sam import SamResult
from saminv.models.model_dir import Model
from saminv.viz import layer_map_image, legend_image, side_by_side

PANEL_SCALE = 4  # 64 px images are shown at 256 px


@dataclass
class SavedCodes:
    """The contents of a codes file: the codes of one image, its layer map [R, R] (index into ``names``),
    and the model name and tau it was inverted with (one, or one per space name)."""

    codes: Codes
    labels: np.ndarray
    names: list[str]
    model: str
    tau: float | dict[str, float]


def save_codes(path: Path, codes: Codes, labels: np.ndarray, names: list[str], model_name: str,
               tau: float | dict[str, float]) -> None:
    """Write codes of one image with its layer map to a .safetensors file (atomically); ``model_name``
    says which model (or bundle's model) they belong to."""
    tensors = {"wplus": codes.wplus, "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64))}
    for k in codes.deltas:
        tensors[f"delta.F{k}"] = codes.deltas[k]
        tensors[f"mask.F{k}"] = codes.masks[k]
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"model": model_name, "spaces": json.dumps(names), "tau": json.dumps(tau)}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def load_codes(path: Path) -> SavedCodes:
    """Read codes written by :func:`save_codes`; raises InputError if the file is not such codes."""
    try:
        t = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        ks = sorted(int(k.split(".F")[1]) for k in t if k.startswith("delta.F"))
        codes = Codes(t["wplus"], {k: t[f"delta.F{k}"] for k in ks}, {k: t[f"mask.F{k}"] for k in ks})
        return SavedCodes(codes, t["labels"].numpy(), json.loads(meta["spaces"]), meta["model"], json.loads(meta["tau"]))
    except Exception as e:  # safetensors raises several types for broken files
        raise InputError(f"{path}: not a saminv codes file ({str(e).splitlines()[0]})") from None


def write_dir(out_dir: Path, fill: Callable[[Path], None]) -> None:
    """Create the new directory ``out_dir`` with the files that ``fill(tmp)`` writes into ``tmp``.

    ``tmp`` is a hidden temporary directory beside ``out_dir``, renamed into place at the end, so an
    interrupted or failed write never leaves a partial ``out_dir``. Raises InputError (one line) when
    the location is not writable.
    """
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as e:
        raise InputError(f"cannot write {out_dir}: {e.strerror or e}") from None
    try:
        fill(tmp)
        os.rename(tmp, out_dir)
    except OSError as e:
        raise InputError(f"cannot write {out_dir}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_inversion(out_dir: Path, image: np.ndarray, result: SamResult, model_name: str,
                    edit_grid: np.ndarray | None = None) -> None:
    """Write the outputs of one inverted image as a new directory ``out_dir`` (see the module doc).
    ``edit_grid``: an optional H x W x 3 uint8 picture appended below the side-by-side."""
    write_dir(out_dir, lambda tmp: _write_inversion_files(tmp, image, result, model_name, edit_grid))


def _write_inversion_files(out_dir: Path, image: np.ndarray, result: SamResult, model_name: str,
                           edit_grid: np.ndarray | None) -> None:
    recon = from_tensor_range(result.image.cpu().numpy())
    shares = [result.metrics["space_share"][n] for n in result.names]
    lmap = layer_map_image(result.labels, result.names)
    save_png(out_dir / "reconstruction.png", recon)
    big = lmap.repeat(PANEL_SCALE, 0).repeat(PANEL_SCALE, 1)
    save_png(out_dir / "layer_map.png", np.concatenate([big, legend_image(result.names, big.shape[0], shares)], axis=1))
    panel = side_by_side([image, recon, lmap], ["input", f"SAM {result.metrics['psnr']:.1f} dB", "layer map"],
                         scale=PANEL_SCALE)
    panel = np.concatenate([panel, legend_image(result.names, panel.shape[0], shares)], axis=1)
    if edit_grid is not None:
        panel = stack_rows([panel, edit_grid])
    save_png(out_dir / "side_by_side.png", panel)
    save_codes(out_dir / "codes.safetensors", result.codes, result.labels, result.names, model_name, result.metrics["tau"])
    save_json(out_dir / "metrics.json", {"model": model_name, **result.metrics})


def stack_rows(pictures: list[np.ndarray], gap: int = 8) -> np.ndarray:
    """Stack H_i x W_i x 3 uint8 pictures top to bottom, left-aligned on white."""
    width = max(p.shape[1] for p in pictures)
    rows = []
    for i, p in enumerate(pictures):
        row = np.full((p.shape[0] + (gap if i else 0), width, 3), 255, dtype=np.uint8)
        row[row.shape[0] - p.shape[0]:, :p.shape[1]] = p
        rows.append(row)
    return np.concatenate(rows)


def edit_grid_image(rows: list[tuple[str, np.ndarray]], strengths: list[float]) -> np.ndarray:
    """A grid of edits: one titled row per direction, ``rows`` = (name, S x R x R x 3 uint8), one column
    per strength (titles "name  s=+2.0")."""
    strips = [side_by_side(list(images), [f"{name} {s:+g}" if j == 0 else f"{s:+g}" for j, s in enumerate(strengths)],
                           scale=PANEL_SCALE) for name, images in rows]
    return stack_rows(strips, gap=4)


def write_edit(out_dir: Path, images: np.ndarray, strengths: list[float], saved: SavedCodes, model: Model,
               direction_vector: np.ndarray, info: dict) -> None:
    """Write the outputs of one edit sweep (see the module doc) as a new directory ``out_dir``.
    ``images``: S x R x R x 3 uint8, one per strength."""

    def fill(tmp: Path) -> None:
        names = [f"edit_{i:02d}_{s:+.2f}.png" for i, s in enumerate(strengths)]
        for name, img in zip(names, images):
            save_png(tmp / name, img)
        lmap = layer_map_image(saved.labels, saved.names)
        strip = side_by_side([lmap, *images], ["layer map", *[f"{s:+g}" for s in strengths]], scale=PANEL_SCALE)
        save_png(tmp / "strip.png", strip)
        if len(images) > 1:
            frames = [Image.fromarray(img.repeat(PANEL_SCALE, 0).repeat(PANEL_SCALE, 1)) for img in images]
            frames = frames + frames[-2:0:-1]  # there and back
            atomic_write(tmp / "edit.gif", lambda p: frames[0].save(p, format="GIF", save_all=True,
                                                                    append_images=frames[1:], duration=120, loop=0))
        atomic_write(tmp / "direction.npy", lambda p: np.save(p, direction_vector.astype(np.float32)))
        save_codes(tmp / "codes.safetensors", saved.codes, saved.labels, saved.names, model.name, saved.tau)
        save_json(tmp / "edit.json", {**info, "strengths": strengths, "images": names})

    write_dir(out_dir, fill)
