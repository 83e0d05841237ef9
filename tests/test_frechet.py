"""Tests for saminv.training.frechet: the EfficientNet-Lite0 backbone on real photos, and the
Fréchet distance against closed forms and against image degradation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from saminv.models import efficientnet
from saminv.models.efficientnet import EfficientNetLite0, load_backbone, normalise, pooled_features
from saminv.training.frechet import frechet_distance

skdata = pytest.importorskip("skimage.data")

CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP, COFFEE_MUG = 967, 968, 504


@pytest.fixture(scope="module")
def backbone() -> EfficientNetLite0:
    try:
        return load_backbone()
    except FileNotFoundError as err:
        pytest.skip(str(err))


def to_unit(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 photo -> float [1, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def center_224(img: np.ndarray) -> torch.Tensor:
    x = to_unit(img)
    h, w = x.shape[-2:]
    s = min(h, w)
    x = x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)


def whitened(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Samples whose sample mean is exactly 0 and unbiased sample covariance exactly I."""
    x = rng.standard_normal((n, d))
    x -= x.mean(axis=0)
    chol = np.linalg.cholesky(np.atleast_2d(np.cov(x, rowvar=False)))
    return np.linalg.solve(chol, x.T).T


# ---------------------------------------------------------------- backbone on real photos


def test_backbone_classifies_real_photos(backbone):
    x = normalise(torch.cat([center_224(skdata.chelsea()), center_224(skdata.coffee())]))
    with torch.no_grad():
        logits = backbone(x)
        feats = backbone.features(x)
    assert logits.shape == (2, 1000) and feats.shape == (2, 1280)
    torch.testing.assert_close(logits, backbone._fc(feats))
    top5 = logits.topk(5, dim=1).indices.tolist()
    probs = logits.softmax(dim=1)
    # chelsea: Egyptian cat / tiger cat / tabby (~0.89 of the mass on the cat classes)
    assert top5[0][0] in CATS
    assert len(CATS & set(top5[0])) >= 2
    assert probs[0, sorted(CATS)].sum() > 0.6
    # coffee: espresso first (p ~ 0.94), cup and coffee mug also in the top 5
    assert top5[1][0] == ESPRESSO
    assert len({ESPRESSO, CUP, COFFEE_MUG} & set(top5[1])) >= 2
    assert probs[1, ESPRESSO] > 0.5


def test_backbone_is_frozen_eval(backbone):
    assert not backbone.training
    assert not any(p.requires_grad for p in backbone.parameters())
    assert sum(p.numel() for p in backbone.parameters()) == 4_652_008  # EfficientNet-Lite0: 4.65M


def test_load_backbone_missing_package(monkeypatch):
    monkeypatch.setattr(efficientnet.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install"):
        load_backbone()


def test_normalise_matches_tf_lite_convention():
    rgb255 = torch.tensor([0.0, 127.0, 255.0])
    torch.testing.assert_close(normalise(rgb255 / 127.5 - 1.0), (rgb255 - 127.0) / 128.0)


# ---------------------------------------------------------------- Fréchet distance, closed forms


def test_identical_sets_give_zero_and_distance_is_symmetric():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 16)) @ rng.standard_normal((16, 16))
    b = rng.standard_normal((150, 16)) * 2.0 + 1.0
    scale = np.trace(np.cov(a, rowvar=False))
    for method in ("eigh", "sqrtm"):
        assert abs(frechet_distance(a, a, method=method)) < 1e-8 * scale
        ab, ba = frechet_distance(a, b, method=method), frechet_distance(b, a, method=method)
        assert ab > 0
        assert ab == pytest.approx(ba, rel=1e-9)


def test_shifted_mean_identity_covariance():
    rng = np.random.default_rng(1)
    a, b = whitened(rng, 300, 8), whitened(rng, 250, 8)
    delta = rng.standard_normal(8)
    for method in ("eigh", "sqrtm"):
        assert frechet_distance(a, b + delta, method=method) == pytest.approx(delta @ delta, rel=1e-9)


def test_diagonal_covariances():
    rng = np.random.default_rng(2)
    var_a, var_b = rng.uniform(0.2, 3.0, 6), rng.uniform(0.2, 3.0, 6)
    mu_a, mu_b = rng.standard_normal(6), rng.standard_normal(6)
    a = whitened(rng, 400, 6) * np.sqrt(var_a) + mu_a
    b = whitened(rng, 300, 6) * np.sqrt(var_b) + mu_b
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    for method in ("eigh", "sqrtm"):
        assert frechet_distance(a, b, method=method) == pytest.approx(expected, rel=1e-9)


def test_general_covariances_match_symmetric_formula():
    """Tr sqrtm(Sa Sb) = Tr (Sa^1/2 Sb Sa^1/2)^1/2 for non-commuting covariances."""
    from scipy import linalg

    rng = np.random.default_rng(3)
    a = rng.standard_normal((500, 5)) @ rng.standard_normal((5, 5))
    b = rng.standard_normal((400, 5)) @ rng.standard_normal((5, 5)) + 0.7
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(sa).real
    inner = linalg.sqrtm(root @ sb @ root).real
    diff = a.mean(0) - b.mean(0)
    expected = diff @ diff + np.trace(sa) + np.trace(sb) - 2 * np.trace(inner)
    for method in ("eigh", "sqrtm"):
        assert frechet_distance(a, b, method=method) == pytest.approx(expected, rel=1e-8)


def test_one_dimensional():
    rng = np.random.default_rng(4)
    a, b = whitened(rng, 100, 1) * 2.0 + 1.0, whitened(rng, 80, 1) * 0.5 - 1.0
    assert frechet_distance(a, b) == pytest.approx(2.0 ** 2 + 1.5 ** 2, rel=1e-9)


def test_singular_covariances_methods_agree():
    """Fewer samples than dimensions (the usual small-N case at D = 1280)."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((20, 64))
    b = rng.standard_normal((25, 64)) * 1.5 + 0.3
    fast, ref = frechet_distance(a, b), frechet_distance(a, b, method="sqrtm")
    assert fast == pytest.approx(ref, rel=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((1, 3)), np.zeros((10, 3)))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((10, 3)), np.zeros((10, 3)), method="nope")
    with pytest.raises(ValueError):
        pooled_features(torch.zeros(2, 1, 64, 64), backbone=object())


# ---------------------------------------------------------------- Fréchet distance on real images


def test_distance_grows_with_degradation(backbone):
    """Random 64x64 crops of three photos: blurred copies are much farther than slightly noisy ones."""
    gen = torch.Generator().manual_seed(0)
    photos = [to_unit(skdata.astronaut()), to_unit(skdata.coffee()), to_unit(skdata.chelsea())]
    crops = []
    for i in range(12):
        photo = photos[i % 3]
        h, w = photo.shape[-2:]
        top = int(torch.randint(0, h - 64 + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - 64 + 1, (1,), generator=gen))
        crops.append(photo[..., top:top + 64, left:left + 64])
    clean = torch.cat(crops)
    noisy = (clean + 0.01 * torch.randn(clean.shape, generator=gen)).clamp(-1, 1)
    small = F.interpolate(clean, size=(12, 12), mode="bilinear", antialias=True, align_corners=False)
    blurred = F.interpolate(small, size=(64, 64), mode="bilinear", align_corners=False)

    feats = pooled_features(torch.cat([clean, noisy, blurred]), backbone=backbone, batch=12)
    assert feats.shape == (36, 1280) and feats.dtype == np.float64
    assert np.isfinite(feats).all() and (feats >= 0).all()  # pooled ReLU6 activations
    f_clean, f_noisy, f_blur = feats[:12], feats[12:24], feats[24:]

    assert frechet_distance(f_clean, f_clean) == pytest.approx(0.0, abs=1e-6)
    fd_noise = frechet_distance(f_clean, f_noisy)
    fd_blur = frechet_distance(f_clean, f_blur)
    print(f"FD clean-noisy {fd_noise:.4f}  clean-blurred {fd_blur:.4f}")
    assert 0.0 < fd_noise
    assert fd_blur > 5.0 * fd_noise

    # batching does not change features (first three clean crops, batch of 2)
    np.testing.assert_allclose(pooled_features(clean[:3], backbone=backbone, batch=2), f_clean[:3],
                               rtol=1e-4, atol=1e-5)
