"""Tests of saminv.models.lpips on real photographs (scikit-image sample data, resized to 64x64)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from skimage import data

from saminv.models import lpips as lpips_mod
from saminv.models.lpips import LPIPS, lpips_weights_path

SIZE = 64
PHOTOS = ("astronaut", "chelsea", "coffee")


def _pil(name: str) -> Image.Image:
    return Image.fromarray(getattr(data, name)()).convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)


def _tensor(im: Image.Image) -> torch.Tensor:
    """PIL RGB image -> [3, H, W] float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Run this module single-threaded. On a small shared CPU (e.g. beside a training job),
    oversubscribed intra-op threads make these many small convolutions ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def metric() -> LPIPS:
    return LPIPS()


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {name: _pil(name) for name in PHOTOS}


@pytest.fixture(scope="module")
def clean(photos) -> torch.Tensor:
    return torch.stack([_tensor(photos[n]) for n in PHOTOS])


@pytest.fixture(scope="module")
def distorted(photos, clean) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def noise(sigma: float) -> torch.Tensor:
        return (clean + sigma * torch.randn(clean.shape, generator=g)).clamp(-1, 1)

    def blur(radius: float) -> torch.Tensor:
        return torch.stack([_tensor(photos[n].filter(ImageFilter.GaussianBlur(radius))) for n in PHOTOS])

    local = clean.clone()
    local[..., : SIZE // 2, : SIZE // 2] = noise(0.4)[..., : SIZE // 2, : SIZE // 2]
    return {
        "same": clean.clone(),
        "noise_mild": noise(0.03),
        "noise_strong": noise(0.3),
        "blur_mild": blur(0.6),
        "blur_strong": blur(2.5),
        "shift_1px": torch.roll(clean, 1, dims=-1),
        "other_photo": clean.roll(1, dims=0),  # each photo against a different one
        "local": local,
    }


def _batched(metric, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], spatial: bool):
    """Evaluates several groups of image pairs in one call (the tests must stay fast on a CPU)."""
    keys = list(pairs)
    sizes = [pairs[k][0].shape[0] for k in keys]
    with torch.no_grad():
        out = metric(
            torch.cat([pairs[k][0] for k in keys]), torch.cat([pairs[k][1] for k in keys]), spatial=spatial
        )
    return dict(zip(keys, out.split(sizes)))


@pytest.fixture(scope="module")
def distances(metric, clean, distorted) -> dict[str, torch.Tensor]:
    """Distances [N] of the clean photos to each distortion, plus one reversed pair."""
    pairs = {k: (clean, v) for k, v in distorted.items()}
    pairs["noise_strong_reversed"] = (distorted["noise_strong"], clean)
    return _batched(metric, pairs, spatial=False)


@pytest.fixture(scope="module")
def maps(metric, clean, distorted) -> dict[str, torch.Tensor]:
    """Spatial error maps [N, 1, H, W] for two of the distortions."""
    return _batched(metric, {k: (clean, distorted[k]) for k in ("noise_strong", "local")}, spatial=True)


def test_weights_path_points_at_the_stlpips_file():
    path = lpips_weights_path()
    assert path.is_file()
    assert path.name == "vgg_shift_tolerant.pth"
    assert path.parent.name == "vST0.0"


def test_weights_path_missing_package_raises_with_install_hint(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match="pip install"):
        lpips_weights_path()


def test_missing_weights_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        LPIPS(tmp_path / "nope.pth")


def test_bad_weights_file_raises(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="expected keys"):
        LPIPS(bad)


def test_module_is_frozen_and_in_eval_mode(metric):
    assert not metric.training
    params = list(metric.parameters())
    assert len(params) == 2 * 13 + 5  # 13 VGG16 convolutions (weight, bias) + 5 linear heads
    assert all(not p.requires_grad for p in metric.parameters())
    # the learned channel weights of LPIPS are non-negative, hence so is every error map
    assert all(float(h.weight.min()) >= 0 for h in metric.heads)
    assert len(metric.state_dict()) == 37  # + input shift/scale and 4 blur kernels, as in the file


def test_identical_images_have_zero_distance(distances):
    assert distances["same"].shape == (len(PHOTOS),)
    assert distances["same"].dtype == torch.float32
    assert float(distances["same"].abs().max()) < 1e-6


def test_distance_is_symmetric(distances):
    torch.testing.assert_close(
        distances["noise_strong"], distances["noise_strong_reversed"], rtol=1e-4, atol=1e-6
    )


def test_distortions_are_ranked_sensibly(distances):
    d = distances
    assert torch.all(d["noise_mild"] > 0)
    assert torch.all(d["noise_mild"] < d["noise_strong"])
    assert torch.all(d["blur_mild"] < d["blur_strong"])
    assert torch.all(d["other_photo"] > d["noise_mild"])
    assert torch.all(d["other_photo"] > d["blur_mild"])
    # shift tolerance (the point of ST-LPIPS): a one-pixel translation is cheaper than mild blur
    assert torch.all(d["shift_1px"] < d["blur_mild"])
    assert torch.all(d["other_photo"] < 1.5)


def test_spatial_map_shape_sign_and_mean(maps, distances):
    emap = maps["noise_strong"]
    assert emap.shape == (len(PHOTOS), 1, SIZE, SIZE)
    assert emap.dtype == torch.float32
    assert float(emap.min()) >= 0
    torch.testing.assert_close(emap.mean(dim=(1, 2, 3)), distances["noise_strong"], rtol=2e-3, atol=1e-5)


def test_spatial_map_localises_a_local_distortion(maps, distances):
    emap = maps["local"][:, 0]
    torch.testing.assert_close(emap.mean(dim=(1, 2)), distances["local"], rtol=2e-3, atol=1e-5)
    h = SIZE // 2
    quadrants = torch.stack(
        [emap[:, :h, :h], emap[:, :h, h:], emap[:, h:, :h], emap[:, h:, h:]], dim=1
    ).sum(dim=(2, 3))  # [N, 4], top-left first
    share = quadrants / quadrants.sum(dim=1, keepdim=True)
    assert torch.all(share[:, 0] > 0.4)  # a quarter of the area holds well over a quarter
    assert torch.all(quadrants[:, 0] > 1.5 * quadrants[:, 1:].max(dim=1).values)
    assert torch.all(quadrants[:, 0] > 4 * quadrants[:, 3])  # the opposite corner is quiet


def test_gradients_flow_to_the_input(metric, clean, distorted):
    x = distorted["noise_mild"][:1].clone().requires_grad_(True)
    metric(x, clean[:1]).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().max()) > 0
    assert all(p.grad is None for p in metric.parameters())

    # the spatial map is differentiable too, also when both inputs need gradients (batched path)
    small = torch.nn.functional.avg_pool2d(torch.cat([distorted["noise_mild"][:1], clean[:1]]), 2)
    x2 = small[:1].clone().requires_grad_(True)
    y2 = small[1:].clone().requires_grad_(True)
    metric(x2, y2, spatial=True).mean().backward()
    assert torch.isfinite(x2.grad).all() and float(x2.grad.abs().max()) > 0
    assert torch.isfinite(y2.grad).all() and float(y2.grad.abs().max()) > 0


def test_gradient_descent_on_the_input_reduces_the_distance(metric, clean, distorted):
    pair = torch.nn.functional.avg_pool2d(torch.cat([distorted["noise_strong"][:1], clean[:1]]), 2)
    x, target = pair[:1].clone().requires_grad_(True), pair[1:]  # 32 x 32, to keep the test fast
    opt = torch.optim.Adam([x], lr=0.03)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = metric(x, target).sum()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0]


def test_small_and_non_square_inputs(metric, clean):
    x = torch.nn.functional.interpolate(clean[:2], size=(16, 23), mode="bilinear", align_corners=False)
    y = x.flip(0)
    with torch.no_grad():
        d = metric(x, y)
        emap = metric(x, y, spatial=True)
    assert d.shape == (2,) and torch.isfinite(d).all() and torch.all(d > 0)
    assert emap.shape == (2, 1, 16, 23)
    # stage sizes follow s -> s // 2 + 1 (max pool 2/1, reflect pad 2, blur stride 2)
    sizes = [tuple(f.shape[-2:]) for f in metric.features(x)]
    assert sizes == [(16, 23), (9, 12), (5, 7), (3, 4), (2, 3)]


def test_periodic_reflection_matches_torch_where_defined():
    t = torch.randn(1, 2, 5, 7)
    idx_h = lpips_mod._reflect_index(5, 2, t.device)
    idx_w = lpips_mod._reflect_index(7, 2, t.device)
    manual = t.index_select(-2, idx_h).index_select(-1, idx_w)
    torch.testing.assert_close(manual, torch.nn.functional.pad(t, (2, 2, 2, 2), mode="reflect"))
    assert lpips_mod._reflect_index(2, 2, t.device).tolist() == [0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize(
    "x_shape, y_shape",
    [((1, 3, 64, 64), (1, 3, 64, 32)), ((1, 1, 64, 64), (1, 1, 64, 64)), ((3, 64, 64), (3, 64, 64)),
     ((1, 3, 8, 8), (1, 3, 8, 8))],
)
def test_bad_inputs_raise(metric, x_shape, y_shape):
    with pytest.raises(ValueError):
        metric(torch.zeros(x_shape), torch.zeros(y_shape))


def test_own_layout_state_dict_round_trip(metric, tmp_path, clean):
    path = tmp_path / "own.pth"
    torch.save(metric.state_dict(), path)
    other = LPIPS(path)
    x = torch.nn.functional.avg_pool2d(clean[:2], 2)
    with torch.no_grad():
        torch.testing.assert_close(other(x[:1], x[1:]), metric(x[:1], x[1:]))


def test_cached_target_features_give_the_same_distance(metric, clean):
    x, y = clean[:2], clean[1:3]
    target = metric.target_features(y)
    torch.testing.assert_close(metric.distance_to(x, target), metric(x, y))
    torch.testing.assert_close(metric.distance_to(x, target, spatial=True), metric(x, y, spatial=True))
    with pytest.raises(ValueError):
        metric.distance_to(x[:, :, :32, :32], target)
