"""Per-model calibration of tau, the invertibility threshold of SAM's space selection.

The paper's tau = 0.225 is on LPIPS-VGG at 256 px for 512-1024 px generators; error levels differ
for other models, metrics and sizes, so saminv calibrates tau per model on validation photos: tau
is the ``quantile`` of their per-segment W+ errors (measured after the default optimization). With
the default quantile 0.5, the typical validation segment stays in W+ (editable) and the harder half
moves to the F_k spaces, which is the paper's intent (Sec. 3.2) expressed in the model's own units.

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
from saminv.inversion.optimize import InversionConfig
from saminv.inversion.sam import invert_spaces, to_target
from saminv.inversion.selection import segment, segment_means
from saminv.models.lpips import LPIPS
from saminv.models.model_dir import Model


def calibrate_tau(model: Model, lpips: LPIPS, images: list[np.ndarray], steps: int = 200, quantile: float = 0.5,
                  n_segments: int = 48, progress: bool = False) -> tuple[float, dict]:
    """tau = ``quantile`` of per-segment W+ LPIPS errors of ``images`` (R x R x 3 uint8, already at
    the model's resolution). Returns (tau, a record of how it was measured)."""
    device = model.generator.mapping.w_avg.device
    target = torch.cat([to_target(im, device) for im in images])
    inv = invert_spaces(model, lpips, target, ["W+"], InversionConfig(steps=steps), progress=progress)
    errors = np.concatenate([segment_means(inv.error_maps[:, i].cpu().numpy(), segment(im, n_segments))[0]
                             for i, im in enumerate(images)])
    tau = float(np.quantile(errors, quantile))
    stats = {"method": "quantile of per-segment W+ LPIPS errors on validation photos",
             "quantile": quantile, "images": len(images), "steps": steps, "segments": int(errors.size),
             "error_quartiles": [round(float(q), 5) for q in np.quantile(errors, [0.25, 0.5, 0.75])]}
    return tau, stats


def store_tau(model_dir: Path, tau: float, stats: dict) -> None:
    """Write tau and its calibration record into ``model_dir/config.json`` (atomically)."""
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    cfg["tau"] = round(tau, 5)
    cfg["tau_calibration"] = stats
    atomic_write(path, lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))
