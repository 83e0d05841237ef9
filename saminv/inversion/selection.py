"""Layer selection of SAM (Parmar et al. 2022, Sec. 3.2), numpy only (the torch-free runtime uses it too).

Segment the image class-agnostically (SLIC superpixels), average each space's invertibility map over
each segment, and pick per segment the most editable space whose mean error is <= tau.
"""

from __future__ import annotations

import numpy as np
from skimage.segmentation import slic


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


def select_spaces(errors: np.ndarray, tau: float | np.ndarray) -> np.ndarray:
    """The official refinement rule. errors [S, K] per space (most editable first) and segment;
    ``tau``: one threshold, or one per space [S].

    Walks the spaces from least to most editable and assigns every space whose error is <= its tau, so
    the most editable passing space wins; a segment where none passes gets the least editable one.
    Returns [K] indices into the spaces.
    """
    s = errors.shape[0]
    taus = np.broadcast_to(np.asarray(tau, dtype=np.float64), (s,))
    choice = np.full(errors.shape[1], s - 1, dtype=np.int64)
    for i in range(s - 1, -1, -1):
        choice[errors[i] <= taus[i]] = i
    return choice


def thresholds(tau: float | dict[str, float], names: list[str]) -> float | np.ndarray:
    """A calibrated tau as :func:`select_spaces` takes it: one float as it is, a dict of per-space taus as
    [S] in the order of ``names``. Raises KeyError for a space the dict lacks."""
    return np.array([tau[n] for n in names]) if isinstance(tau, dict) else tau


def anchor_to_measured_wplus(maps: np.ndarray, measured_wplus: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Predicted maps [S, H, W] (W+ first) anchored to a measured W+ error map [H, W]: the W+ map is
    replaced by the measured one and every F_k map is scaled, per segment of ``segments`` [H, W], by
    (measured + 1e-4) / (predicted + 1e-4) of the segment's mean W+ error. Where the W+ inversion did worse
    than predicted, the later spaces must correct more, and their errors rise in proportion. No fitted
    parameter. Returns float maps [S, H, W] >= 0."""
    means = segment_means(np.stack([measured_wplus, maps[0]]), segments)
    ratio = ((means[0] + 1e-4) / (means[1] + 1e-4))[segments]
    return np.concatenate([measured_wplus[None], maps[1:] * ratio[None]])


def anchored_taus(tau: float, tau_predicted: dict[str, float]) -> dict[str, float]:
    """Per-space thresholds for the optimization predictor's maps anchored to a measured W+ map
    (:func:`anchor_to_measured_wplus`): W+ keeps ``tau`` (its map is now measured, in ``tau``'s units) and
    each F_k gets tau_predicted[F_k] * tau / tau_predicted["W+"]. ``tau_predicted`` (quantile-matched per
    space on validation photos) carries each space's predicted-to-measured error scale; anchoring divides a
    segment's F_k errors by its predicted-to-measured W+ ratio, so the F_k taus take the same division by the
    validation photos' typical ratio (tau_predicted["W+"] / tau). Raises KeyError without a W+ entry."""
    return {name: tau * (t / tau_predicted["W+"]) for name, t in tau_predicted.items()}  # W+: exactly tau


def layer_map(error_maps: np.ndarray, image: np.ndarray, tau: float | np.ndarray, n_segments: int = 48,
              measured_wplus: np.ndarray | None = None) -> np.ndarray:
    """The layer map: maps [S, R, R] (per space, most editable first) of an R x R x 3 uint8 image ->
    labels [R, R] (index of the chosen space per pixel), by segments and the refinement rule. With
    ``measured_wplus`` [R, R], predicted maps are first anchored to it (:func:`anchor_to_measured_wplus`)."""
    segments = segment(image, n_segments)
    if measured_wplus is not None:
        error_maps = anchor_to_measured_wplus(error_maps, measured_wplus, segments)
    return select_spaces(segment_means(error_maps, segments), tau)[segments]
