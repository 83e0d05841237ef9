"""LPIPS perceptual distance with spatial error maps, on the shift-tolerant VGG16 trunk.

LPIPS (Zhang, Isola, Efros, Shechtman, Wang: "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric", CVPR 2018) compares two images through the activations of a frozen classifier:
at each of five layers the features are unit-normalised along the channel axis, their squared
difference is weighted per channel by a learned non-negative 1x1 convolution, and the resulting
one-channel map is averaged over space; the five averages are summed.

The weights used here are those of ST-LPIPS (Ghildyal & Liu: "Shift-tolerant Perceptual Similarity
Metric", ECCV 2022), shipped in the PyPI package ``stlpips-pytorch`` 0.0.2 as
``stlpips_pytorch/weights/vST0.0/vgg_shift_tolerant.pth`` (its ``vgg`` / ``shift_tolerant``
variant). That trunk is VGG16 (configuration "D", no batch norm) in which every stride-2 max pool
is replaced by anti-aliased down-sampling (BlurPool, Zhang, ICML 2019):

* a 2x2 max pool with stride 1 (the spatial size shrinks by one), then
* reflection padding by 2 pixels on every side ("pad more": twice the usual ``(k - 1) / 2``),
* then a depthwise 3x3 binomial blur ``[1, 2, 1] x [1, 2, 1] / 16`` with stride 2.

A side length ``s`` therefore becomes ``floor(s / 2) + 1`` at each of the four down-sampling steps
(64 -> 33 -> 17 -> 9 -> 5). The features compared are relu1_2, relu2_2, relu3_3, relu4_3 and
relu5_3 (64, 128, 256, 512, 512 channels). Inputs in [-1, 1] are first standardised per channel
with the LPIPS v0.1 scaling layer, ``(x - shift) / scale`` with shift = (-0.030, -0.088, -0.188)
and scale = (0.458, 0.448, 0.450) (both read from the weights file). The spatial reduction is a
plain mean, as in LPIPS.

This module is a self-contained re-implementation: it never imports ``stlpips_pytorch`` (whose
modules pull in torchvision); it only reads the weights file. For inputs so small that a feature
map is no larger than the padding (a side of 16 or 17 pixels), the reference implementation fails
inside ``ReflectionPad2d``; here the reflection is continued periodically instead, which equals
ordinary reflection whenever the latter is defined.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LPIPS", "lpips_weights_path", "MIN_SIZE"]

#: Smallest supported input height / width.
MIN_SIZE = 16

_PACKAGE = "stlpips_pytorch"
_WEIGHTS_RELPATH = Path("weights") / "vST0.0" / "vgg_shift_tolerant.pth"
_INSTALL_HINT = "pip install --no-deps stlpips-pytorch==0.0.2"

#: Output channels of the 3x3 convolutions of each VGG16 stage; a stage's last ReLU is compared.
_STAGES: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)
_BLUR_PAD = 2  # reflection padding of the BlurPool layers (filter size 3, "pad more")
_NORM_EPS = 1e-10  # as in LPIPS: f / (||f|| + eps)


def lpips_weights_path() -> Path:
    """Path of the ST-LPIPS VGG16 weights inside the installed ``stlpips-pytorch`` package.

    The package is located without being imported (its modules need torchvision).

    Raises:
        FileNotFoundError: the package is not installed, or its weights file is missing.
    """
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _WEIGHTS_RELPATH
        if candidate.is_file():
            return candidate
    if not locations:
        raise FileNotFoundError(
            f"the LPIPS weights come from the Python package 'stlpips-pytorch', which is not "
            f"installed; install it with: {_INSTALL_HINT}"
        )
    raise FileNotFoundError(
        f"'stlpips-pytorch' is installed at {locations[0]} but its weights file "
        f"{_WEIGHTS_RELPATH.as_posix()} is missing; reinstall it with: {_INSTALL_HINT}"
    )


def _reflect_index(n: int, pad: int, device: torch.device) -> Tensor:
    """Indices of a length-``n`` axis reflected (repeatedly, if needed) by ``pad`` on both ends."""
    i = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = torch.remainder(i, period)
    return torch.where(i < n, i, period - i)


def _reflect_pad(x: Tensor, pad: int) -> Tensor:
    """Reflection padding of the last two axes; also defined when an axis is not longer than ``pad``."""
    h, w = x.shape[-2:]
    if pad < h and pad < w:
        return F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = x.index_select(-2, _reflect_index(h, pad, x.device))
    return x.index_select(-1, _reflect_index(w, pad, x.device))


class _BlurPool(nn.Module):
    """Anti-aliased down-sampling: 2x2 max pool (stride 1), reflect pad 2, 3x3 binomial blur, stride 2.

    [N, C, s, s] -> [N, C, s // 2 + 1, s // 2 + 1]. The blur kernel is a buffer of shape [C, 1, 3, 3]
    (overwritten by the weights file, which stores it).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = taps[:, None] * taps[None, :]
        kernel = (kernel / kernel.sum()).expand(channels, 1, 3, 3).clone()
        self.register_buffer("kernel", kernel)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(x, kernel_size=2, stride=1)
        x = _reflect_pad(x, _BLUR_PAD)
        return F.conv2d(x, self.kernel, stride=2, groups=x.shape[1])


class _Stage(nn.Module):
    """Optional BlurPool, then 3x3 convolutions (zero padding 1), each followed by a ReLU."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], downsample: bool) -> None:
        super().__init__()
        self.blur = _BlurPool(in_channels) if downsample else None
        convs = []
        for width in widths:
            convs.append(nn.Conv2d(in_channels, width, kernel_size=3, padding=1))
            in_channels = width
        self.convs = nn.ModuleList(convs)

    def forward(self, x: Tensor) -> Tensor:
        if self.blur is not None:
            x = self.blur(x)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x


def _unit(feat: Tensor) -> Tensor:
    """Channel-wise unit normalisation f / (||f||_2 + eps) of [N, C, H, W] features.

    ``vector_norm`` has a zero (not NaN) gradient where a pixel's features are all zero."""
    return feat / (torch.linalg.vector_norm(feat, dim=1, keepdim=True) + _NORM_EPS)


def _reference_key_map() -> dict[str, str]:
    """Maps this module's state_dict keys to the keys of the stlpips ``.pth`` file.

    In the reference, stage ``s`` is ``net.slice{s+1}``, an nn.Sequential whose indices continue the
    flat VGG16 ``features`` list: [max pool, blur,] then (conv, ReLU) pairs.
    """
    mapping = {"shift": "scaling_layer.shift", "scale": "scaling_layer.scale"}
    index = 0
    for s, widths in enumerate(_STAGES):
        prefix = f"net.slice{s + 1}"
        if s > 0:
            index += 1  # max pool (no state)
            mapping[f"stages.{s}.blur.kernel"] = f"{prefix}.{index}.filt"
            index += 1
        for j in range(len(widths)):
            mapping[f"stages.{s}.convs.{j}.weight"] = f"{prefix}.{index}.weight"
            mapping[f"stages.{s}.convs.{j}.bias"] = f"{prefix}.{index}.bias"
            index += 2  # conv, ReLU
        mapping[f"heads.{s}.weight"] = f"lin{s}.model.1.weight"  # index 0 is a Dropout
    return mapping


class LPIPS(nn.Module):
    """Frozen ST-LPIPS (VGG16) distance; differentiable with respect to both images.

    Args:
        weights: a ``.pth`` state_dict in the stlpips layout (``net.slice*``, ``lin*``,
            ``scaling_layer.*``) or in this module's own layout; ``None`` uses
            :func:`lpips_weights_path`.

    Raises:
        FileNotFoundError: ``weights`` does not exist (or, with ``None``, the package is missing).
        ValueError: the file is not a state_dict with exactly the expected tensors and shapes.

    The module is put in eval mode and its parameters have ``requires_grad=False``; move it with
    ``.to(device)`` like any module. Inputs are cast to the dtype of its parameters (float32).
    """

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(1, 3, 1, 1))
        self.register_buffer("scale", torch.ones(1, 3, 1, 1))
        stages = []
        in_channels = 3
        for s, widths in enumerate(_STAGES):
            stages.append(_Stage(in_channels, widths, downsample=s > 0))
            in_channels = widths[-1]
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(nn.Conv2d(w[-1], 1, kernel_size=1, bias=False) for w in _STAGES)

        path = Path(weights) if weights is not None else lpips_weights_path()
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS weights file not found: {path}")
        self.load_state_dict(self._read_state_dict(path), strict=True)
        self.requires_grad_(False)
        self.eval()

    def _read_state_dict(self, path: Path) -> dict[str, Tensor]:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors come in many types
            raise ValueError(f"cannot read LPIPS weights {path}: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"LPIPS weights {path} do not hold a state_dict")
        if "net.slice1.0.weight" in raw:
            mapping = _reference_key_map()
            missing = sorted(v for v in mapping.values() if v not in raw)
            unexpected = sorted(set(raw) - set(mapping.values()))
            if missing or unexpected:
                raise ValueError(
                    f"LPIPS weights {path} do not match the ST-LPIPS VGG16 layout "
                    f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
                )
            raw = {ours: raw[theirs] for ours, theirs in mapping.items()}
        own = self.state_dict()
        if set(raw) != set(own):
            raise ValueError(
                f"LPIPS weights {path} do not match the expected keys "
                f"(missing: {sorted(set(own) - set(raw))[:5]}, "
                f"unexpected: {sorted(set(raw) - set(own))[:5]})"
            )
        for key, value in raw.items():
            if not isinstance(value, Tensor) or value.shape != own[key].shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"LPIPS weights {path}: {key} has shape {shape}, expected {tuple(own[key].shape)}"
                )
        return raw

    def features(self, x: Tensor) -> list[Tensor]:
        """Compared activations of images ``x`` [N, 3, H, W] in [-1, 1].

        Returns relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (not normalised), float32 tensors of
        shapes [N, C_l, H_l, W_l] with C = 64, 128, 256, 512, 512 and H_l = H_{l-1} // 2 + 1.
        """
        h = (x - self.shift) / self.scale
        out = []
        for stage in self.stages:
            h = stage(h)
            out.append(h)
        return out

    def forward(self, x: Tensor, y: Tensor, spatial: bool = False) -> Tensor:
        """LPIPS distance between ``x`` and ``y``.

        Args:
            x, y: float images [N, 3, H, W] with values in [-1, 1], same shape, H and W >= 16
                (64 x 64 is the main use). Gradients flow to both.
            spatial: return the per-pixel error map instead of the per-image distance.

        Returns:
            ``spatial=False``: [N] distances (float32, >= 0; 0 for identical images).
            ``spatial=True``: [N, 1, H, W] non-negative error map: each layer's map upsampled
            bilinearly to H x W, summed over the layers. Its spatial mean equals the distance
            up to the error of the bilinear resampling (about 1e-4 relative at 64 x 64).

        Raises:
            ValueError: bad rank, channel count, size, dtype, or mismatched shapes.
        """
        self._check(x, y)
        dtype = self.shift.dtype
        fx, fy = self._feature_pairs(x.to(dtype), y.to(dtype))
        return self._compare([_unit(f) for f in fx], [_unit(f) for f in fy], tuple(x.shape[-2:]), spatial)

    def target_features(self, y: Tensor) -> list[Tensor]:
        """Unit-normalised features of fixed images ``y`` [N, 3, H, W] in [-1, 1], computed once
        without autograd, for :meth:`distance_to` inside optimization loops. Raises ValueError."""
        self._check(y, y)
        with torch.no_grad():
            return [_unit(f) for f in self.features(y.to(self.shift.dtype))]

    def distance_to(self, x: Tensor, target: list[Tensor], spatial: bool = False) -> Tensor:
        """``forward(x, y, spatial)`` with ``target = target_features(y)``: the same numbers, without
        recomputing the target's features. Raises ValueError for a bad ``x``."""
        self._check(x, x)
        feats = [_unit(f) for f in self.features(x.to(self.shift.dtype))]
        if [f.shape for f in feats] != [t.shape for t in target]:
            raise ValueError("LPIPS: target features do not match the images' shape")
        return self._compare(feats, target, tuple(x.shape[-2:]), spatial)

    def _compare(self, ux: list[Tensor], uy: list[Tensor], size: tuple[int, int], spatial: bool) -> Tensor:
        """Weighted squared differences of unit-normalised features, as a distance or a map."""
        maps = [F.conv2d((a - b).square(), head.weight) for a, b, head in zip(ux, uy, self.heads)]
        if spatial:
            out = F.interpolate(maps[0], size=size, mode="bilinear", align_corners=False)
            for m in maps[1:]:
                out = out + F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            return out
        return torch.stack([m.mean(dim=(1, 2, 3)) for m in maps], dim=0).sum(dim=0)

    def _feature_pairs(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Features of x and y. One batched pass, unless only one of them needs gradients (the
        usual case of an optimised image against a fixed target): then the other one runs without
        autograd, so that the backward pass does not go through its half of the batch."""
        if torch.is_grad_enabled() and x.requires_grad != y.requires_grad:
            with torch.no_grad():
                fixed = self.features(y if x.requires_grad else x)
            moving = self.features(x if x.requires_grad else y)
            return (moving, fixed) if x.requires_grad else (fixed, moving)
        n = x.shape[0]
        both = self.features(torch.cat([x, y], dim=0))
        return [f[:n] for f in both], [f[n:] for f in both]

    @staticmethod
    def _check(x: Tensor, y: Tensor) -> None:
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, Tensor):
                raise ValueError(f"LPIPS: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.ndim != 4 or t.shape[1] != 3:
                raise ValueError(f"LPIPS: {name} must have shape [N, 3, H, W], got {tuple(t.shape)}")
            if not t.is_floating_point():
                raise ValueError(f"LPIPS: {name} must be a floating-point tensor, got {t.dtype}")
        if x.shape != y.shape:
            raise ValueError(f"LPIPS: x and y shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        if min(x.shape[-2:]) < MIN_SIZE:
            raise ValueError(
                f"LPIPS: images must be at least {MIN_SIZE}x{MIN_SIZE}, got {tuple(x.shape[-2:])}"
            )
