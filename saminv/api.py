"""The Python API: ``saminv.invert`` and ``saminv.edit`` (the same code paths as the CLI)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from saminv.editing.directions import Direction, from_array, resolve
from saminv.editing.edit import Editor
from saminv.editing.session import check_codes, to_uint8
from saminv.imageio import load_image, resize_square
from saminv.inversion.optimize import Codes, InversionConfig
from saminv.inversion.sam import SamResult, sam_invert
from saminv.models.lpips import LPIPS
from saminv.models.model_dir import Model, load_model
from saminv.outputs import load_codes

ModelLike = str | Path | Model


def _model(model: ModelLike) -> Model:
    return model if isinstance(model, Model) else load_model(model)


def invert(image: str | Path | Image.Image | np.ndarray, model: ModelLike = "faces64", mode: str | None = None,
           tau: float | dict[str, float] | None = None, steps: int = 200, maps: str | None = None) -> SamResult:
    """SAM inversion of one photo (a path, a PIL image or an H x W x 3 uint8 array; centre-cropped and
    resized to the model's resolution). ``mode``: "encoder" (one feed-forward pass), "optimize",
    "hybrid" (encoder start, then ``steps`` of joint optimization); default: hybrid when the model has
    trained encoders, else optimize. ``maps``: "predicted" or "measured" invertibility maps of the mode's
    regime (default: predicted when the model has that regime's predictor); ``tau``: one threshold or one
    per space name, default the model's calibrated tau for those maps (``Model.tau_for``; optimize mode anchors
    its predicted maps to its W+ inversion and cuts them at ``saminv.inversion.selection.anchored_taus`` of ``tau``). Returns a SamResult: ``image`` [3, R, R] in [-1, 1],
    ``codes``, ``labels`` [R, R], ``names``, ``metrics``. Raises InputError for unreadable images or a
    mode the model lacks networks for."""
    m = _model(model)
    r = m.generator.cfg.resolution
    if isinstance(image, (str, Path)):
        pixels = load_image(image, r)
    else:
        pixels = resize_square(image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)), r)
    return sam_invert(m, LPIPS(), pixels, tau=tau, cfg=InversionConfig(steps=steps), mode=mode, maps=maps)


def edit(codes: Codes | SamResult | str | Path, direction: str | Direction | np.ndarray,
         strength: float | Sequence[float], model: ModelLike | None = None,
         layers: tuple[int, int] | None = None) -> np.ndarray:
    """Edit SAM codes along ``direction`` by the per-layer rule (paper Sec. 3.4).

    ``codes``: Codes of one image, a SamResult, or a ``codes.safetensors`` path (whose model is used
    unless ``model`` is given; otherwise faces64). ``direction``: a library name, ``ganspace:K``,
    ``sefa:K``, a ``.npy`` path, a Direction, or an array (n_latent, w_dim) / (w_dim,). Returns
    R x R x 3 uint8 for one strength, S x R x R x 3 for a sequence. Raises InputError for unknown
    directions, wrong shapes or codes of another model.
    """
    if isinstance(codes, SamResult):
        codes = codes.codes
    if isinstance(codes, (str, Path)):
        saved = load_codes(Path(codes))
        codes, model = saved.codes, model or saved.model
    m = _model(model or "faces64")
    check_codes(codes, m)
    if isinstance(direction, np.ndarray):
        direction = from_array(direction, "array", m.generator, layers)
    elif isinstance(direction, str):
        direction = resolve(m, direction, layers)
    else:
        direction = direction.with_layers(layers)
    editor = Editor(m, codes)
    values = [float(strength)] if np.isscalar(strength) else [float(s) for s in strength]
    images = to_uint8(editor.sweep(direction, values)[:, 0])
    return images[0] if np.isscalar(strength) else images
