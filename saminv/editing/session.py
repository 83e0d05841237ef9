"""Editing as users call it: load codes (a codes file or a photo to invert), resolve a direction, sweep
strengths. Shared by ``saminv edit``, ``saminv invert --edits`` and the Python API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from saminv.editing.directions import Direction, resolve
from saminv.editing.edit import Editor
from saminv.errors import InputError
from saminv.imageio import images_to_uint8
from saminv.inversion.optimize import Codes
from saminv.models.model_dir import Model
from saminv.outputs import SavedCodes

GRID_STRENGTHS = [-2.0, -1.0, 0.0, 1.0, 2.0]  # in standard deviations of W (GANSpace scale)


def check_codes(codes: Codes, model: Model) -> None:
    """Raise InputError unless ``codes`` hold one image made for ``model`` (w+ and delta_f shapes)."""
    G = model.generator
    if codes.wplus.shape[0] != 1:
        raise InputError(f"codes hold {codes.wplus.shape[0]} images; editing takes the codes of one")
    if codes.wplus.ndim != 3 or codes.wplus.shape[1:] != (G.cfg.n_latent, G.cfg.w_dim):
        raise InputError(f"codes have w+ of shape {tuple(codes.wplus.shape)}, but model {model.name} needs "
                         f"(N, {G.cfg.n_latent}, {G.cfg.w_dim})")
    for k, d in codes.deltas.items():
        try:
            shape = G.space(f"F{k}").shape
        except KeyError:
            raise InputError(f"codes hold F{k}, which model {model.name} does not have") from None
        if d.shape[1:] != shape or codes.masks[k].shape[2:] != shape[1:]:
            raise InputError(f"codes F{k} has shape {tuple(d.shape[1:])}, model {model.name} needs {shape}")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[..., 3, R, R] in [-1, 1] -> [..., R, R, 3] uint8."""
    return images_to_uint8(images.detach().cpu().numpy())


def sweep_images(model: Model, saved: SavedCodes, direction: Direction, strengths: list[float]) -> np.ndarray:
    """Edited images S x R x R x 3 uint8 of the (single-image) codes, one per strength."""
    check_codes(saved.codes, model)
    editor = Editor(model, saved.codes)
    return to_uint8(editor.sweep(direction, strengths)[:, 0])


def ganspace_grid_rows(model: Model, codes: Codes, n: int, strengths: list[float] = GRID_STRENGTHS
                       ) -> list[tuple[str, np.ndarray]]:
    """The top-``n`` GANSpace edits of one image's codes: [(name, S x R x R x 3 uint8)]."""
    editor = Editor(model, codes)
    return [(f"ganspace:{i}", to_uint8(editor.sweep(resolve(model, f"ganspace:{i}"), strengths)[:, 0]))
            for i in range(n)]


def parse_strengths(strength: float | None, strengths: str | None) -> list[float]:
    """``--strength S`` or ``--strengths START:STOP:COUNT`` (evenly spaced) -> list of floats."""
    if strength is not None and strengths is not None:
        raise InputError("give --strength or --strengths, not both")
    if strengths is None:
        return [2.0 if strength is None else float(strength)]
    parts = strengths.split(":")
    try:
        a, b, n = float(parts[0]), float(parts[1]), int(parts[2])
        if len(parts) != 3 or not 1 <= n <= 64 or not (np.isfinite(a) and np.isfinite(b)):
            raise ValueError
    except (ValueError, IndexError):
        raise InputError(f"--strengths {strengths!r}: expected START:STOP:COUNT, e.g. -3:3:7 (COUNT from 1 to 64)") from None
    return [round(float(v), 6) for v in np.linspace(a, b, n)]


def load_edit_input(path: Path, model_spec: str | None, steps: int, device: str = "cpu") -> tuple[Model, SavedCodes, str]:
    """A codes file (its model unless ``model_spec`` is given) or a photo (inverted with SAM first, with
    ``model_spec`` or faces64). Returns the model, the codes and a word on where they came from."""
    from saminv.models.model_dir import load_model
    from saminv.outputs import load_codes

    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        saved = load_codes(path)
        model = load_model(model_spec or saved.model, device)
        check_codes(saved.codes, model)
        return model, saved, f"codes {path}"
    from saminv.imageio import load_image
    from saminv.inversion.optimize import InversionConfig
    from saminv.inversion.sam import sam_invert
    from saminv.models.lpips import LPIPS

    model = load_model(model_spec or "faces64", device)
    image = load_image(path, model.generator.cfg.resolution)
    result = sam_invert(model, LPIPS().to(device), image, cfg=InversionConfig(steps=steps), progress=True)
    return model, SavedCodes(result.codes, result.labels, result.names, model.name, result.metrics["tau"]), \
        f"photo {path} (SAM inversion, {steps} steps, {result.metrics['psnr']:.2f} dB)"
