"""Per-model calibration of tau, the invertibility threshold of SAM's space selection.

The paper's tau = 0.225 is on LPIPS-VGG at 256 px for 512-1024 px generators; error levels differ
for other models, metrics and sizes, so saminv calibrates tau per model on validation photos: tau
is the ``quantile`` of their per-segment W+ errors (measured after the default optimization). With
the default quantile 0.5, the typical validation segment stays in W+ (editable) and the harder half
moves to the F_k spaces, which is the paper's intent (Sec. 3.2) expressed in the model's own units.

Each inversion regime has its own tau (the encoders leave about ten times the optimization's error):
``regime="optimization"`` measures W+ errors after the default optimization and stores ``tau``;
``regime="encoder"`` measures the W+ encoder's errors (one pass) and stores ``tau_encoder``.

The default validation set is :func:`saminv.photos.validation_photos` (16 crops of real scikit-image
photos, disjoint from the face photos that tests and benchmarks evaluate on): sharp colour content
that no generator was trained on. (The 25 px LFW faces are too blurry for this: once upscaled they
are far easier to invert than a real 64 px photo, which put tau near zero.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from saminv.imageio import atomic_write
from saminv.inversion.feedforward import encoder_error_maps
from saminv.inversion.optimize import InversionConfig
from saminv.inversion.sam import invert_spaces, to_target
from saminv.inversion.selection import segment, segment_means
from saminv.models.lpips import LPIPS
from saminv.models.model_dir import TAU_KEYS, Model


def calibrate_tau(model: Model, lpips: LPIPS, images: list[np.ndarray], steps: int = 200, quantile: float = 0.5,
                  n_segments: int = 48, progress: bool = False, regime: str = "optimization") -> tuple[float, dict]:
    """tau of ``regime`` = ``quantile`` of per-segment W+ LPIPS errors of ``images`` (R x R x 3 uint8,
    already at the model's resolution), inverted by that regime (``steps``: optimization steps).
    Returns (tau, a record of how it was measured). Raises InputError (encoder regime) without encoders."""
    device = model.generator.mapping.w_avg.device
    target = torch.cat([to_target(im, device) for im in images])
    if regime == "encoder":
        error_maps = encoder_error_maps(model, lpips, target, ["W+"])[:, 0]
        how = "the W+ encoder"
    else:
        error_maps = invert_spaces(model, lpips, target, ["W+"], InversionConfig(steps=steps), progress=progress).error_maps[0]
        how = f"W+ optimization, {steps} steps"
    errors = np.concatenate([segment_means(error_maps[i][None].cpu().numpy(), segment(im, n_segments))[0]
                             for i, im in enumerate(images)])
    tau = float(np.quantile(errors, quantile))
    stats = {"method": f"quantile of per-segment W+ LPIPS errors on validation photos ({how})",
             "quantile": quantile, "images": len(images), "segments": int(errors.size),
             "error_quartiles": [round(float(q), 5) for q in np.quantile(errors, [0.25, 0.5, 0.75])]}
    return tau, stats


def store_tau(model_dir: Path, tau: float, stats: dict, regime: str = "optimization") -> None:
    """Write the tau of ``regime`` and its calibration record into ``model_dir/config.json`` (atomically)."""
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    key = TAU_KEYS[regime]
    cfg[key] = round(tau, 5)
    cfg[f"{key}_calibration"] = stats
    atomic_write(path, lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))
