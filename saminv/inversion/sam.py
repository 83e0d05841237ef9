"""Spatially-Adaptive Multilayer Selection (SAM, Parmar et al. 2022, Sec. 3).

1. Invertibility maps, one per latent space (W+, F_k): ``measured`` = invert the image in every space
   and take the LPIPS spatial error map e_l of each reconstruction (paper Eq. 1); ``predicted`` = one
   pass of the model's invertibility predictor S_l (Eq. 2). Invertibility depends on who inverts, so
   maps and tau belong to a regime: encoder mode uses the encoders' errors (measured: one encoder pass
   per space; predicted: the ``encoder_predictor``, anchored to the measured error of the W+ encoder's
   reconstruction, which encoder mode renders anyway; ``tau_encoder``), optimize and hybrid modes the
   optimization's (measured: single-space optimizations, all spaces in one batch, cut at ``tau``;
   predicted: the ``predictor``; optimize mode anchors its maps to the measured error of the W+ inversion
   that starts its joint optimization and cuts them at :func:`saminv.inversion.selection.anchored_taus`,
   hybrid mode cuts them at ``tau_predicted``, one tau per space on its own error scale).
2. Segment the image class-agnostically (SLIC superpixels) and average each map over each segment.
3. Per segment, walk the spaces from least to most editable (F_last ... W+) and assign the segment to
   every space whose mean error is <= tau: the last match (the most editable that passes) wins; if
   none passes, the least editable space (the official refinement rule).
4. Exclusive masks per space, area-resized to each F_k, then the codes phi = {w+, delta_f_k}, by mode:
   ``optimize``  joint optimization started from a W+ inversion's w+ and delta_f = 0 (embed, then refine);
   ``encoder``   one pass of the W+ and Δf encoders (:mod:`saminv.inversion.feedforward`);
   ``hybrid``    the encoder's codes refined by the joint optimization.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from saminv.errors import InputError
from saminv.imageio import to_tensor_range
from saminv.inversion.feedforward import encode, encode_wplus, encoder_error_maps, predicted_maps
from saminv.inversion.optimize import (
    Codes,
    InversionConfig,
    optimize_codes,
    start_codes,
)
from saminv.inversion.selection import anchored_taus, layer_map, thresholds
from saminv.metrics import psnr
from saminv.models.lpips import LPIPS
from saminv.models.model_dir import PREDICTORS, Model


def space_index(name: str) -> int | None:
    """"F6" -> 6; "W" and "W+" -> None. Raises ValueError for anything else."""
    if name in ("W", "W+"):
        return None
    if name.startswith("F") and name[1:].isdigit():
        return int(name[1:])
    raise ValueError(f"unknown latent space {name!r} (expected W, W+ or F<k>)")


@dataclass
class SpaceInversions:
    """Single-space inversions of N images in S spaces.

    ``images`` [S, N, 3, R, R] in [-1, 1]; ``error_maps`` [S, N, R, R] LPIPS spatial errors (>= 0);
    ``codes`` batch of S*N items, space-major (item s*N + n is image n in space s).
    """

    names: list[str]
    images: Tensor
    error_maps: Tensor
    codes: Codes


def invert_spaces(model: Model, lpips: LPIPS, target: Tensor, names: list[str],
                  cfg: InversionConfig | None = None, progress: bool = False) -> SpaceInversions:
    """Invert target [N, 3, R, R] in each named space ("W", "W+", "F<k>") as one batch."""
    G = model.generator
    n, s = target.shape[0], len(names)
    masks: dict[int, Tensor] = {}
    for i, name in enumerate(names):
        k = space_index(name)
        if k is None:
            continue
        shape = G.space(name).shape
        m = masks.setdefault(k, torch.zeros(n * s, 1, *shape[1:], device=target.device))
        m[i * n:(i + 1) * n] = 1.0
    tie = torch.tensor([name == "W" for name in names for _ in range(n)], device=target.device)
    codes = start_codes(model, n * s, masks)
    codes = optimize_codes(model, lpips, target.repeat(s, 1, 1, 1), codes, tie_w=tie, cfg=cfg,
                           progress=progress, desc=f"invert in {', '.join(names)}")
    with torch.no_grad():
        images = codes.render(model)
        errors = lpips(images, target.repeat(s, 1, 1, 1), spatial=True)[:, 0]
    r = G.cfg.resolution
    return SpaceInversions(list(names), images.view(s, n, 3, r, r), errors.view(s, n, r, r), codes)


def to_target(image: np.ndarray, device: torch.device | str = "cpu") -> Tensor:
    """R x R x 3 uint8 image -> [1, 3, R, R] float32 in [-1, 1]."""
    return torch.from_numpy(to_tensor_range(image)).to(device)


def space_masks(model: Model | None, labels: np.ndarray, names: list[str], device: torch.device | str = "cpu",
                sizes: dict[str, int] | None = None) -> dict[int, Tensor]:
    """Exclusive masks from a layer map: labels [H, W] (index into ``names``) -> {k: [1, 1, r, r]}.

    Each F_k's binary mask is area-resized to the F_k resolution r (from ``model``, or ``sizes`` by
    space name when given, e.g. from a bundle), so masks stay exclusive (they sum to at most 1 at
    every position). ``model`` may be None when ``sizes`` covers every F_k in ``names``.
    """
    out = {}
    lab = torch.as_tensor(labels, device=device)
    for i, name in enumerate(names):
        k = space_index(name)
        if k is None:
            continue
        r = sizes[name] if sizes is not None else model.generator.space(name).shape[-1]
        m = (lab == i).float()[None, None]
        out[k] = F.interpolate(m, size=(r, r), mode="area") if m.shape[-1] != r else m
    return out


MODES = ("encoder", "optimize", "hybrid")
MAPS = ("predicted", "measured")


def default_mode(model: Model) -> str:
    """The best quality per second the model supports: hybrid with trained encoders, else optimize."""
    return "hybrid" if model.has_network("encoders") else "optimize"


def regime_of(mode: str) -> str:
    """The inversion regime whose invertibility maps and tau a mode uses: the encoders' for encoder
    mode; the optimization's for optimize and hybrid (hybrid's codes end optimized)."""
    return "encoder" if mode == "encoder" else "optimization"


@dataclass
class SamResult:
    """SAM inversion of one image. ``image`` [3, R, R] in [-1, 1]; ``labels`` [R, R] into ``names``;
    ``single``: the single-space inversions when the maps were measured, else None."""

    image: Tensor
    codes: Codes
    labels: np.ndarray
    names: list[str]
    single: SpaceInversions | None
    metrics: dict = field(default_factory=dict)


def sam_invert(model: Model, lpips: LPIPS, image: np.ndarray, tau: float | dict[str, float] | None = None,
               names: list[str] | None = None, cfg: InversionConfig | None = None,
               n_segments: int = 48, progress: bool = False, mode: str | None = None,
               maps: str | None = None, evaluate: bool = True) -> SamResult:
    """Invert an R x R x 3 uint8 image with SAM (see the module doc for ``mode`` and ``maps``).

    ``names``: the latent spaces to choose from, most editable first (default: the model's spaces).
    ``mode`` defaults to :func:`default_mode`; ``maps`` to predicted when the model has the predictor of the
    mode's regime (:func:`regime_of`), else measured; ``tau`` to the model's calibrated tau for those maps
    (:meth:`saminv.models.model_dir.Model.tau_for`; a dict gives one per space name).
    ``evaluate=False`` leaves PSNR and LPIPS of the reconstruction out of the metrics (latency benchmarks).
    Predicted maps are anchored to a measured W+ error (:func:`saminv.inversion.selection.anchor_to_measured_wplus`)
    when ``names`` starts with W+: in encoder mode that of the W+ encoder's reconstruction (one LPIPS pass), in
    optimize mode that of the W+ optimization its joint stage starts from (made anyway), with thresholds from
    ``tau`` (default the model's measured-map ``tau``) by :func:`saminv.inversion.selection.anchored_taus`.
    Raises KeyError on unknown spaces, InputError when the mode or maps need a network or a tau the
    model lacks, or when encoder mode is asked for the W space (the encoders give w+).
    """
    t0 = time.time()
    G = model.generator
    device = G.mapping.w_avg.device
    mode = mode or default_mode(model)
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    regime = regime_of(mode)
    maps = maps or ("predicted" if model.has_network(PREDICTORS[regime]) else "measured")
    if maps not in MAPS:
        raise InputError(f"maps must be one of {MAPS}, got {maps!r}")
    names = names or [s.name for s in G.spaces]
    for name in names:
        if name != "W":
            G.space(name)  # raises KeyError for a space this model does not have
    if mode == "encoder" and "W" in names:
        raise InputError("encoder mode inverts in W+ and the F_k spaces, not W")
    if mode != "optimize":
        model.network("encoders")  # fail before any work when the model has none
    # Predicted maps are anchored to a measured W+ error where the mode makes a W+ inversion anyway: encoder
    # mode's W+ encoder pass; optimize mode's W+ optimization, which starts its joint optimization.
    anchor = maps == "predicted" and mode != "hybrid" and names[0] == "W+"
    if anchor and mode == "optimize":  # W+ measured, F_k predicted: one tau per space from tau and tau_predicted
        tau = tau if isinstance(tau, dict) else anchored_taus(model.tau if tau is None else tau,
                                                              model.tau_for(regime, maps))
    elif tau is None:
        tau = model.tau_for(regime, maps)
    target = to_target(image, device)

    single, measured_wplus = None, None
    with torch.no_grad():  # the target's LPIPS features, computed once for the anchoring and the evaluation
        target_features = lpips.target_features(target) if (anchor and mode == "encoder") or evaluate else None
    first = encode_wplus(model, target) if mode != "optimize" else None  # the W+ encoder's pass, made once
    if mode == "optimize" and (maps == "measured" or anchor):  # every space, or the W+ inversion alone
        single = invert_spaces(model, lpips, target, names if maps == "measured" else ["W+"], cfg, progress)
    if maps == "predicted":
        error_maps = predicted_maps(model, target, names, regime)[0]
        if anchor:
            if mode == "encoder":
                with torch.no_grad():
                    wplus_error = lpips.distance_to(first.reconstruction, target_features, spatial=True)[0, 0]
            else:
                wplus_error = single.error_maps[0, 0]
            measured_wplus = wplus_error.cpu().numpy()
    elif regime == "encoder":
        error_maps = encoder_error_maps(model, lpips, target, names, first=first)[0]
    else:
        error_maps = single.error_maps[:, 0]
    labels = layer_map(error_maps.cpu().numpy(), image, thresholds(tau, names), n_segments, measured_wplus)
    masks = space_masks(model, labels, names, device)

    if mode == "optimize":
        start = start_codes(model, 1, masks)
        if "W+" in names:  # embed, then refine: start the joint optimization from a W+ inversion
            wplus = single.codes.wplus[single.names.index("W+")] if single else \
                invert_spaces(model, lpips, target, ["W+"], cfg, progress).codes.wplus[0]
            start.wplus = wplus[None].clone()
    else:
        with torch.no_grad():
            start = encode(model, target, masks, first=first)
    codes = start if mode == "encoder" else optimize_codes(model, lpips, target, start, cfg=cfg, progress=progress,
                                                            desc="SAM joint optimization")
    with torch.no_grad():
        recon = codes.render(model)
        metrics = {
            **({"psnr": psnr(recon, target).item(), "lpips": lpips.distance_to(recon, target_features).item()}
               if evaluate else {}),
            "tau": tau,
            "mode": mode,
            "maps": maps,
            "space_share": {n: float((labels == i).mean()) for i, n in enumerate(names)},
            "seconds": round(time.time() - t0, 2),
        }
        if single is not None:
            metrics["single_space"] = {n: {"psnr": psnr(single.images[i], target).item(),
                                           "lpips": float(single.error_maps[i].mean())} for i, n in enumerate(single.names)}
    return SamResult(recon[0], codes, labels, names, single, metrics)
