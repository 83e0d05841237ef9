"""What ``saminv invert`` writes per image (every file atomically):

* ``reconstruction.png``  the SAM reconstruction;
* ``layer_map.png``       each pixel coloured by its latent space, with a legend;
* ``side_by_side.png``    input | reconstruction | layer map (+ legend);
* ``codes.safetensors``   ``wplus`` [1, n_latent, w_dim] and per F_k ``delta.F<k>`` [1, C, r, r] and
                          ``mask.F<k>`` [1, 1, r, r]; metadata: model, spaces, tau;
* ``metrics.json``        PSNR, LPIPS, share of pixels per space, per-space single inversions, seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

from saminv.errors import InputError
from saminv.imageio import atomic_write, from_tensor_range, save_json, save_png
from saminv.inversion.optimize import Codes
from saminv.inversion.sam import SamResult
from saminv.models.model_dir import Model
from saminv.viz import layer_map_image, legend_image, side_by_side

PANEL_SCALE = 4  # 64 px images are shown at 256 px


def save_codes(path: Path, codes: Codes, names: list[str], model: Model, tau: float) -> None:
    """Write codes of one image to a .safetensors file (atomically)."""
    tensors = {"wplus": codes.wplus}
    for k in codes.deltas:
        tensors[f"delta.F{k}"] = codes.deltas[k]
        tensors[f"mask.F{k}"] = codes.masks[k]
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"model": model.name, "spaces": json.dumps(names), "tau": str(tau)}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def load_codes(path: Path) -> Codes:
    """Read codes written by :func:`save_codes`; raises InputError if the file is not such codes."""
    try:
        t = load_file(str(path))
        ks = sorted(int(k.split(".F")[1]) for k in t if k.startswith("delta.F"))
        return Codes(t["wplus"], {k: t[f"delta.F{k}"] for k in ks}, {k: t[f"mask.F{k}"] for k in ks})
    except Exception as e:  # safetensors raises several types for broken files
        raise InputError(f"{path}: not a saminv codes file ({str(e).splitlines()[0]})") from None


def write_inversion(out_dir: Path, image: np.ndarray, result: SamResult, model: Model) -> None:
    """Write the five outputs of one inverted image as a new directory ``out_dir``.

    The files are written into a hidden temporary directory beside it, which is renamed into place
    at the end, so an interrupted or failed write never leaves a partial ``out_dir``. Raises
    InputError (one line) when the location is not writable.
    """
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as e:
        raise InputError(f"cannot write {out_dir}: {e.strerror or e}") from None
    try:
        _write_files(tmp, image, result, model)
        os.rename(tmp, out_dir)
    except OSError as e:
        raise InputError(f"cannot write {out_dir}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_files(out_dir: Path, image: np.ndarray, result: SamResult, model: Model) -> None:
    recon = from_tensor_range(result.image.cpu().numpy())
    shares = [result.metrics["space_share"][n] for n in result.names]
    lmap = layer_map_image(result.labels, result.names)
    save_png(out_dir / "reconstruction.png", recon)
    big = lmap.repeat(PANEL_SCALE, 0).repeat(PANEL_SCALE, 1)
    save_png(out_dir / "layer_map.png", np.concatenate([big, legend_image(result.names, big.shape[0], shares)], axis=1))
    panel = side_by_side([image, recon, lmap], ["input", f"SAM {result.metrics['psnr']:.1f} dB", "layer map"],
                         scale=PANEL_SCALE)
    save_png(out_dir / "side_by_side.png",
             np.concatenate([panel, legend_image(result.names, panel.shape[0], shares)], axis=1))
    save_codes(out_dir / "codes.safetensors", result.codes, result.names, model, result.metrics["tau"])
    save_json(out_dir / "metrics.json", {"model": model.name, **result.metrics})
