"""Per-model calibration of tau, the invertibility threshold of SAM's space selection.

The paper's tau = 0.225 is on LPIPS-VGG at 256 px for 512-1024 px generators; error levels differ
for other models, metrics and sizes, so saminv calibrates tau per model on validation photos: tau
is the ``quantile`` of their per-segment W+ errors (measured after the default optimization). With
the default quantile 0.5, the typical validation segment stays in W+ (editable) and the harder half
moves to the F_k spaces, which is the paper's intent (Sec. 3.2) expressed in the model's own units.

A tau belongs to the error scale of the maps it cuts (:data:`saminv.models.model_dir.TAU_KEYS`):
``regime="optimization"`` measures W+ errors after the default optimization and stores ``tau``;
``regime="encoder"`` measures the W+ encoder's errors (one pass) and stores ``tau_encoder`` (the
encoders leave about ten times the optimization's error). ``maps="predicted"`` stores ``tau_predicted``
for the optimization ``predictor``'s maps, one per space: the predictor learned its data set's step
budget, whose errors exceed the default optimization's by a factor that differs per space (faces64:
W+ 1.7x, F8 4.6x in the median), so one threshold cannot match them all. Each space's tau is the quantile
of the predicted per-segment errors at the share of segments whose measured error (after the default
optimization, every space) is <= ``tau``: the predicted maps then pass each space on the validation
photos as often as the measured maps do (quantile matching; W+ gets the median, as ``tau`` does).
Calibrate ``tau`` first; this costs single-space optimizations in every space. Those measured pass rates depend on
the generator, ``tau``, the photos and the steps, not on the predictor: a retrained predictor's taus are matched again
to the rates its predecessor's calibration recorded (:func:`rematch_predicted_taus`, seconds instead of 41 minutes
on faces64's 36 validation faces).

Validation sets (``saminv calibrate --validation``): :func:`saminv.photos.validation_photos` (the default;
16 crops of real scikit-image photos, no faces, disjoint from the photos that tests and benchmarks evaluate
on; needs nothing fetched) and :func:`saminv.photos.validation_faces` (36 real face crops of other people than
the held-out faces). tau is the error level of the content it is calibrated on, so a face model gets the faces:
faces64 inverts faces better in W+ than scenes, so a scene tau would keep most of a face in W+. (A first version used
scikit-image's ``lfw_subset`` items 100-115, believing them faces; they are near-uniform background patches,
almost perfectly invertible, which put tau near zero.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from saminv.imageio import atomic_write
from saminv.errors import InputError
from saminv.inversion.feedforward import encoder_error_maps, predicted_maps
from saminv.inversion.optimize import InversionConfig
from saminv.inversion.sam import invert_spaces, to_target
from saminv.inversion.selection import segment, segment_means
from saminv.models.lpips import LPIPS
from saminv.models.model_dir import PREDICTORS, Model


def quantile_matched_taus(predicted: np.ndarray, pass_rates: np.ndarray) -> np.ndarray:
    """Per-space thresholds for predicted per-segment errors [S, K]: returns [S] taus such that each space's
    predicted errors pass (<= tau_s) on the share ``pass_rates`` [S] of the segments (in [0, 1]; in
    :func:`calibrate_tau`, the share whose measured errors pass ``tau``)."""
    return np.array([np.quantile(p, r) for p, r in zip(predicted, pass_rates)])


def calibrate_tau(model: Model, lpips: LPIPS | None, images: list[np.ndarray], steps: int = 200, quantile: float = 0.5,
                  n_segments: int = 48, progress: bool = False, regime: str = "optimization",
                  maps: str = "measured", pass_rates: dict[str, float] | None = None) -> tuple[float | dict[str, float], dict]:
    """tau for ``maps`` of ``regime`` on ``images`` (R x R x 3 uint8, already at the model's resolution;
    ``steps``: optimization steps): measured maps get the ``quantile`` of the per-segment W+ LPIPS errors
    after that regime's inversion; the optimization predictor's maps get one tau per space name
    (:func:`quantile_matched_taus` against the measured maps of every space at the model's ``tau``; with
    ``pass_rates``, the share of segments per space name whose measured error passes, as an earlier calibration
    on the same images, steps and tau found them, no inversion runs and ``lpips`` may be None).
    Returns (tau, a record of how it was measured). Raises InputError without the encoders or predictor
    it needs, and for the encoder regime's predicted maps (anchored to the measured W+ error, they use
    the measured maps' ``tau_encoder``)."""
    if (regime, maps) == ("encoder", "predicted"):
        raise InputError("encoder mode anchors its predicted maps to the measured W+ error: they use tau_encoder "
                         "(saminv calibrate --regime encoder --maps measured)")
    device = model.generator.mapping.w_avg.device
    target = torch.cat([to_target(im, device) for im in images])
    segments = [segment(im, n_segments) for im in images]

    def pooled(error_maps: torch.Tensor) -> np.ndarray:  # [N, S, R, R] -> per-segment errors [S, K of all images]
        return np.concatenate([segment_means(e.cpu().numpy(), seg) for e, seg in zip(error_maps, segments)], axis=1)

    def optimized(names: list[str]) -> np.ndarray:  # single-space optimizations, 8 photos per batch (faster on CPU)
        return pooled(torch.cat([invert_spaces(model, lpips, target[i:i + 8], names, InversionConfig(steps=steps),
                                               progress=progress).error_maps.transpose(0, 1)
                                 for i in range(0, len(images), 8)]))

    record = {"images": len(images)}
    if maps == "predicted":
        names = [s.name for s in model.generator.spaces]
        predicted = pooled(predicted_maps(model, target, names, regime))
        measured_tau = model.tau_for(regime)
        if pass_rates is None:
            rates = (optimized(names) <= measured_tau).mean(axis=1)
        else:  # stored to 4 decimals: the counts of passing segments behind them are exact for < 10,000 segments
            rates = np.array([round(pass_rates[n] * predicted.shape[1]) / predicted.shape[1] for n in names])
        taus = quantile_matched_taus(predicted, rates)
        record.update(method=f"per space: quantile of the {PREDICTORS[regime]}'s per-segment errors at the share of "
                             f"segments whose measured error ({steps}-step optimization) is <= tau",
                      tau=measured_tau, steps=steps, segments=int(predicted.shape[1]),
                      measured_pass_rates={n: round(float(r), 4) for n, r in zip(names, rates)})
        return {n: round(float(t), 5) for n, t in zip(names, taus)}, record
    if regime == "encoder":
        errors = pooled(encoder_error_maps(model, lpips, target, ["W+"]))[0]
        how = "the W+ encoder"
    else:
        errors = optimized(["W+"])[0]
        how = f"W+ optimization, {steps} steps"
    tau = float(np.quantile(errors, quantile))
    record.update(method=f"quantile of per-segment W+ LPIPS errors on validation photos ({how})", quantile=quantile,
                  segments=int(errors.size),
                  error_quartiles=[round(float(q), 5) for q in np.quantile(errors, [0.25, 0.5, 0.75])])
    return tau, record


def rematch_predicted_taus(model: Model, previous: dict | None) -> tuple[dict[str, float], dict] | None:
    """``tau_predicted`` for ``model``'s (new) optimization predictor, matched to the measured pass rates of
    ``previous``, an earlier predictor's ``tau_predicted_calibration`` record (:func:`calibrate_tau`): seconds,
    no inversion. Returns (taus, record) as :func:`calibrate_tau` does, or None when ``previous`` cannot be
    reused: none, made at another ``tau``, without its ``steps`` or on photos that cannot be named again (a
    built-in validation set, :data:`saminv.photos.VALIDATION_SETS`, that has been fetched); or when the
    photos now give another number of segments."""
    from saminv.imageio import resize_square
    from saminv.photos import VALIDATION_SETS

    if not previous or "steps" not in previous or previous.get("tau") != model.meta.get("tau"):
        return None
    source = next((f for f in VALIDATION_SETS.values() if previous.get("validation") == f"{f.__module__}.{f.__name__}"), None)
    if source is None:
        return None
    try:
        photos = [resize_square(p, model.generator.cfg.resolution) for p in source()]
    except InputError:  # the validation faces before `make faces`
        return None
    taus, record = calibrate_tau(model, None, photos, steps=previous["steps"], pass_rates=previous["measured_pass_rates"],
                                 maps="predicted")
    if record["segments"] != previous["segments"]:
        return None
    return taus, {**record, "validation": previous["validation"], "measured": "pass rates of the previous calibration"}


def store_tau(model_dir: Path, key: str, tau: float | dict[str, float] | None, stats: dict | None = None) -> None:
    """Write tau (one, or one per space) under ``key`` (a :data:`saminv.models.model_dir.TAU_KEYS` value)
    and its calibration record under ``<key>_calibration`` into ``model_dir/config.json`` (atomically);
    ``tau=None`` removes both (a tau that no longer fits its maps)."""
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    if tau is None:
        cfg.pop(key, None)
        cfg.pop(f"{key}_calibration", None)
    else:
        cfg[key] = tau if isinstance(tau, dict) else round(tau, 5)
        cfg[f"{key}_calibration"] = stats
    atomic_write(path, lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))
