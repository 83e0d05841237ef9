"""SAM's per-segment selection rule, segment averaging and exclusive masks (pure functions)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.data import astronaut

from saminv.inversion.optimize import projector_lr
from saminv.inversion.sam import space_index, space_masks
from saminv.inversion.calibration import quantile_matched_taus
from saminv.inversion.selection import anchor_to_measured_wplus, anchored_taus, segment, segment_means, select_spaces, thresholds


def test_rule_takes_the_most_editable_space_under_tau():
    # rows: W+, F2, F4, F6, F8 (most editable first); columns: segments
    errors = np.array([[0.10, 0.50, 0.30, 0.9],
                       [0.08, 0.40, 0.20, 0.9],
                       [0.05, 0.30, 0.25, 0.9],
                       [0.04, 0.20, 0.10, 0.9],
                       [0.03, 0.19, 0.05, 0.8]])
    assert select_spaces(errors, tau=0.225).tolist() == [0, 3, 1, 4]


def test_rule_when_errors_are_not_monotone():
    # A less editable space may be worse than a more editable one: the last match walking F8 -> W+ wins.
    errors = np.array([[0.3], [0.1], [0.4]])
    assert select_spaces(errors, 0.2).tolist() == [1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.floats(0, 1), min_size=5, max_size=5), min_size=1, max_size=20),
       st.floats(0, 1) | st.lists(st.floats(0, 1), min_size=5, max_size=5))
def test_rule_matches_its_definition(columns, tau):
    """One tau for all spaces, or one per space."""
    errors = np.array(columns).T
    choice = select_spaces(errors, np.array(tau))
    taus = np.broadcast_to(tau, (5,))
    for j, c in enumerate(choice):
        passing = np.flatnonzero(errors[:, j] <= taus)
        assert c == (passing[0] if passing.size else errors.shape[0] - 1)


def test_per_space_taus_come_in_the_order_of_the_spaces():
    tau = {"W+": 0.1, "F4": 0.2, "F8": 0.3}
    assert thresholds(tau, ["F8", "W+"]).tolist() == [0.3, 0.1] and thresholds(0.2, ["W+"]) == 0.2
    with pytest.raises(KeyError):
        thresholds(tau, ["F2"])


def test_quantile_matched_taus_pass_as_many_segments_as_the_measured_errors():
    rng = np.random.default_rng(0)
    measured = rng.uniform(0, 0.1, (3, 400))
    predicted = np.stack([2 * measured[0], measured[1] + 0.05, rng.uniform(0, 1, 400)])  # other scales, one unrelated
    rates = (measured <= 0.04).mean(1)
    taus = quantile_matched_taus(predicted, rates)
    np.testing.assert_allclose((predicted <= taus[:, None]).mean(1), rates, atol=1 / 400)
    np.testing.assert_allclose(taus[:2], [0.08, 0.09], atol=0.002)  # a monotone rescaling maps tau exactly
    np.testing.assert_array_equal(select_spaces(predicted[:2], taus[:2]), select_spaces(measured[:2], 0.04))


def test_segment_means_average_over_each_segment():
    labels = np.array([[0, 0, 1], [2, 2, 1]])
    maps = np.stack([np.array([[1.0, 3.0, 5.0], [2.0, 4.0, 7.0]]), np.zeros((2, 3))])
    np.testing.assert_allclose(segment_means(maps, labels), [[2.0, 6.0, 3.0], [0, 0, 0]])


def test_anchoring_uses_the_measured_w_plus_and_scales_each_segment_by_its_error_ratio():
    segments = np.array([[0, 0, 1], [0, 0, 1]])
    predicted = np.stack([np.full((2, 3), 0.1), np.array([[0.02, 0.04, 0.06], [0.02, 0.04, 0.06]])])
    measured = np.array([[0.3, 0.1, 0.1], [0.1, 0.1, 0.1]])  # segment 0: mean 0.15, segment 1: 0.1
    anchored = anchor_to_measured_wplus(predicted, measured, segments)
    np.testing.assert_array_equal(anchored[0], measured)
    ratio0 = (0.15 + 1e-4) / (0.1 + 1e-4)  # the W+ encoder did 1.5x worse than predicted on segment 0
    np.testing.assert_allclose(anchored[1], [[0.02 * ratio0, 0.04 * ratio0, 0.06], [0.02 * ratio0, 0.04 * ratio0, 0.06]])


def test_anchored_taus_agree_with_the_predicted_taus_where_the_w_plus_ratio_is_typical():
    """With anchored_taus, a segment whose measured W+ error is its predicted one times the typical ratio
    tau / tau_predicted["W+"] keeps the choice of its predicted maps at tau_predicted; a segment whose W+
    inversion did worse needs a later space, one that did better stays in W+."""
    tau_predicted = {"W+": 0.06, "F2": 0.045, "F4": 0.03}
    taus = anchored_taus(0.03, tau_predicted)
    assert taus == pytest.approx({"W+": 0.03, "F2": 0.0225, "F4": 0.015})
    names = list(tau_predicted)
    segments = np.array([[0, 0, 1, 1, 2, 2]])
    predicted = np.stack([np.full((1, 6), v) for v in (0.08, 0.04, 0.02)])  # per space: W+ fails, F2 passes
    measured = np.array([[0.04, 0.04, 0.08, 0.08, 0.02, 0.02]])  # 0.5x predicted (typical), 1x, 0.25x
    unanchored = select_spaces(segment_means(predicted, segments), thresholds(tau_predicted, names))
    np.testing.assert_array_equal(unanchored, [1, 1, 1])
    anchored = segment_means(anchor_to_measured_wplus(predicted, measured, segments), segments)
    np.testing.assert_array_equal(select_spaces(anchored, thresholds(taus, names)), [1, 2, 0])


def test_slic_on_a_real_photo():
    img = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(astronaut()).resize((64, 64)))
    labels = segment(img, 48)
    assert labels.shape == (64, 64) and labels.min() == 0
    assert 20 <= labels.max() + 1 <= 80
    assert np.array_equal(np.unique(labels), np.arange(labels.max() + 1))


class _Space:
    def __init__(self, shape):
        self.shape = shape


class _FakeModel:
    """Only what space_masks needs: generator.space(name).shape."""

    class generator:
        @staticmethod
        def space(name):
            r = {"F2": 8, "F4": 16, "F6": 32, "F8": 64}[name]
            return _Space((16, r, r))


def test_masks_are_exclusive_and_resized():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(64, 64))
    names = ["W+", "F2", "F4", "F6", "F8"]
    masks = space_masks(_FakeModel(), labels, names)
    assert sorted(masks) == [2, 4, 6, 8]
    assert masks[2].shape == (1, 1, 8, 8) and masks[8].shape == (1, 1, 64, 64)
    assert torch.equal(masks[8][0, 0], torch.from_numpy(labels == 4).float())
    # area resizing keeps the share of each space, and the masks of one resolution never overlap
    for k, i in zip([2, 4, 6], [1, 2, 3]):
        assert masks[k].mean().item() == pytest.approx((labels == i).mean(), abs=1e-6)
    total = sum(torch.nn.functional.interpolate(masks[k], size=(8, 8), mode="area") for k in masks)
    assert total.max() <= 1 + 1e-6


def test_space_index():
    assert space_index("F6") == 6 and space_index("W+") is None and space_index("W") is None
    with pytest.raises(ValueError):
        space_index("G3")


def test_projector_schedule():
    steps = 1000
    lrs = [projector_lr(i, steps, 0.05) for i in range(steps)]
    assert lrs[0] == 0 and lrs[25] == pytest.approx(0.025)
    assert max(lrs) == pytest.approx(0.05) and lrs[500] == pytest.approx(0.05)
    assert lrs[-1] < 0.001 and all(a >= b for a, b in zip(lrs[750:], lrs[751:]))
