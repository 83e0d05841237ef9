"""Spatially-Adaptive Multilayer Selection from measured errors (SAM, Parmar et al. 2022, Sec. 3.1-3.2).

1. Invert the image in every latent space (W+, F_k), all spaces in one batch.
2. Invertibility maps: the LPIPS spatial error map e_l of each reconstruction (paper Eq. 1).
3. Segment the image class-agnostically (SLIC superpixels) and average each map over each segment.
4. Per segment, walk the spaces from least to most editable (F_last ... W+) and assign the segment to
   every space whose mean error is <= tau: the last match (the most editable that passes) wins; if
   none passes, the least editable space (the official refinement rule).
5. Exclusive masks per space, area-resized to each F_k, and the joint optimization of {w+, delta_f_k},
   started from the W+ inversion's w+ and delta_f = 0 (embed, then refine).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from skimage.segmentation import slic
from torch import Tensor

from saminv.imageio import to_tensor_range
from saminv.inversion.optimize import Codes, InversionConfig, optimize_codes, start_codes
from saminv.metrics import psnr
from saminv.models.lpips import LPIPS
from saminv.models.model_dir import Model


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


def segment(image: np.ndarray, n_segments: int = 48, compactness: float = 10.0) -> np.ndarray:
    """Class-agnostic SLIC superpixels of an H x W x 3 uint8 image -> H x W int labels 0..K-1."""
    labels = slic(image, n_segments=n_segments, compactness=compactness, start_label=0, channel_axis=-1)
    _, labels = np.unique(labels, return_inverse=True)
    return labels.reshape(image.shape[:2]).astype(np.int64)


def segment_means(maps: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Average each of S maps [S, H, W] over each segment of labels [H, W] -> [S, K]."""
    k = int(labels.max()) + 1
    counts = np.bincount(labels.ravel(), minlength=k).astype(np.float64)
    sums = np.stack([np.bincount(labels.ravel(), weights=m.ravel(), minlength=k) for m in maps])
    return sums / np.maximum(counts, 1)


def select_spaces(errors: np.ndarray, tau: float) -> np.ndarray:
    """The official refinement rule. errors [S, K] per space (most editable first) and segment.

    Walks the spaces from least to most editable and assigns every space whose error is <= tau, so
    the most editable passing space wins; a segment where none passes gets the least editable one.
    Returns [K] indices into the spaces.
    """
    s = errors.shape[0]
    choice = np.full(errors.shape[1], s - 1, dtype=np.int64)
    for i in range(s - 1, -1, -1):
        choice[errors[i] <= tau] = i
    return choice


def space_masks(model: Model, labels: np.ndarray, names: list[str], device: torch.device | str = "cpu"
                ) -> dict[int, Tensor]:
    """Exclusive masks from a layer map: labels [H, W] (index into ``names``) -> {k: [1, 1, r, r]}.

    Each F_k's binary mask is area-resized to the F_k resolution r, so masks stay exclusive
    (they sum to at most 1 at every position).
    """
    out = {}
    lab = torch.as_tensor(labels, device=device)
    for i, name in enumerate(names):
        k = space_index(name)
        if k is None:
            continue
        r = model.generator.space(name).shape[-1]
        m = (lab == i).float()[None, None]
        out[k] = F.interpolate(m, size=(r, r), mode="area") if m.shape[-1] != r else m
    return out


@dataclass
class SamResult:
    """SAM inversion of one image. ``image`` [3, R, R] in [-1, 1]; ``labels`` [R, R] into ``names``."""

    image: Tensor
    codes: Codes
    labels: np.ndarray
    names: list[str]
    single: SpaceInversions
    metrics: dict = field(default_factory=dict)


def sam_invert(model: Model, lpips: LPIPS, image: np.ndarray, tau: float | None = None,
               names: list[str] | None = None, cfg: InversionConfig | None = None,
               n_segments: int = 48, progress: bool = False) -> SamResult:
    """Invert an R x R x 3 uint8 image with SAM (measured invertibility; paper Sec. 3).

    ``names``: the latent spaces to choose from, most editable first (default: the model's spaces).
    ``tau``: the threshold (default: the model's calibrated tau). Raises KeyError on unknown spaces.
    """
    t0 = time.time()
    G = model.generator
    device = G.mapping.w_avg.device
    tau = model.tau if tau is None else tau
    names = names or [s.name for s in G.spaces]
    for name in names:
        if name != "W":
            G.space(name)  # raises KeyError for a space this model does not have
    target = to_target(image, device)

    single = invert_spaces(model, lpips, target, names, cfg, progress)
    labels_seg = segment(image, n_segments)
    seg_err = segment_means(single.error_maps[:, 0].cpu().numpy(), labels_seg)
    labels = select_spaces(seg_err, tau)[labels_seg]

    masks = space_masks(model, labels, names, device)
    start = start_codes(model, 1, masks)
    if "W+" in names:  # embed, then refine: start the joint optimization from the W+ inversion
        start.wplus = single.codes.wplus[names.index("W+"):names.index("W+") + 1].clone()
    codes = optimize_codes(model, lpips, target, start, cfg=cfg, progress=progress, desc="SAM joint optimization")
    with torch.no_grad():
        recon = codes.render(model)
        metrics = {
            "psnr": psnr(recon, target).item(),
            "lpips": lpips(recon, target).item(),
            "tau": tau,
            "space_share": {n: float((labels == i).mean()) for i, n in enumerate(names)},
            "single_space": {n: {"psnr": psnr(single.images[i], target).item(),
                                 "lpips": float(single.error_maps[i].mean())} for i, n in enumerate(names)},
            "seconds": round(time.time() - t0, 2),
        }
    return SamResult(recon[0], codes, labels, names, single, metrics)
