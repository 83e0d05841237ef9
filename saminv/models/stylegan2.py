"""StyleGAN2 (Karras et al., CVPR 2020) in plain PyTorch, segmented for SAM inversion.

The generator follows config-f: a mapping network z -> w, a synthesis network with the skip (ToRGB)
architecture, modulated convolutions with weight demodulation, blur-upsampling with the [1, 3, 3, 1]
filter and per-layer noise. It is written for the CPU and for ONNX export:

* the modulated convolution is the *non-fused* form (scale the activations by the style, convolve
  with the shared weight, scale by the demodulation coefficients), so the batch stays dynamic;
* upfirdn2d is expressed as ordinary (depthwise / transposed) convolutions;
* noise is explicit: ``noise_mode`` is ``"const"`` (stored buffers), ``"random"`` or ``"none"``.

Parameters keep the equalized-learning-rate storage of the reference implementations (raw weights,
multiplied by ``1/sqrt(fan_in) * lr_mul`` at run time), so rosinality checkpoints convert by renaming.

**Segmentation.** The synthesis network is a list of blocks; block ``b`` (resolution ``4 * 2**b``)
ends with the convolution driven by ``w+[2b]``, so its output feature map is the latent space
``F_{2b}`` (SAM, Parmar et al. 2022, Sec. 3). :meth:`Synthesis.run` runs any range of blocks
(``g_{i->j}``) and adds masked residuals after chosen blocks, the SAM image-formation model
(paper Eq. 3-4)::

    f_k = g_{i->k}(f_i, w+) + m_k * delta_f_k,    x = g_{k->out}(f_k, w+)

The residual is added to the block's feature map before its ToRGB, so f_k feeds the rest of the
generator, its own ToRGB included (this keeps F_last, the last block of a small generator, a real
space: its delta reaches the image through its ToRGB). The RGB skip image coming into the block is
not touched.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saminv.ops.masked_residual import masked_residual

NoiseMode = Literal["const", "random", "none"]
NOISE_MODES = ("const", "random", "none")

#: Called after a block with (space index k, features [N, C, r, r]); returns the new features.
FeatureHook = Callable[[int, Tensor, Tensor | None], tuple[Tensor, Tensor | None]]
"""``hook(k, f_k, skip) -> (f_k, skip)``: sees the features F_k [N, C, r, r] of a latent-space block
and the RGB skip image [N, 3, r, r] arriving at it (already upsampled; None in the 4x4 block), before
that block's ToRGB, and returns the pair that continues."""

_SQRT2 = math.sqrt(2.0)


def blur_kernel() -> Tensor:
    """The 4x4 binomial low-pass filter [1, 3, 3, 1] (outer product), normalised to sum 1: StyleGAN2's
    upfirdn2d resampling filter (NVIDIA stores it as ``resample_filter``; x4 for 2x upsampling)."""
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k = k[:, None] * k[None, :]
    return k / k.sum()


def fused_leaky_relu(x: Tensor, bias: Tensor, clamp: float | None = None) -> Tensor:
    """StyleGAN's bias + LeakyReLU(0.2) + gain sqrt(2); ``bias`` is [C], added over dim 1; the result
    clamped to [-clamp, clamp] when ``clamp`` is given (NVIDIA's ``conv_clamp``)."""
    shape = [1, -1] + [1] * (x.ndim - 2)
    x = F.leaky_relu(x + bias.view(shape), 0.2) * _SQRT2
    return x if clamp is None else x.clamp(-clamp, clamp)


@dataclass(frozen=True)
class GeneratorConfig:
    """Architecture of a StyleGAN2 generator.

    Channels at resolution ``r`` are ``min(channel_base // r, channel_max)``; config-f is
    ``channel_base=32768, channel_max=512`` (rosinality's ``channel_multiplier=2``).
    ``feature_blocks`` lists the synthesis blocks whose outputs are SAM latent spaces F_k
    (block ``b`` is F_{2b}); ``None`` selects the default of :func:`default_feature_blocks`.
    ``conv_clamp`` clamps every synthesis layer's activations and each ToRGB output to
    [-conv_clamp, conv_clamp], as NVIDIA's stylegan2-ada generators trained with mixed precision do
    (256 there); ``None`` (rosinality, the official StyleGAN2) clamps nothing.
    """

    resolution: int = 64
    z_dim: int = 512
    w_dim: int = 512
    n_mapping: int = 8
    mapping_lr_mul: float = 0.01
    channel_base: int = 32768
    channel_max: int = 512
    feature_blocks: tuple[int, ...] | None = None
    conv_clamp: float | None = None

    def __post_init__(self) -> None:
        r = self.resolution
        if r < 16 or r & (r - 1):
            raise ValueError(f"resolution must be a power of two >= 16, got {r}")
        if self.feature_blocks is None:
            object.__setattr__(self, "feature_blocks", default_feature_blocks(r))
        else:
            object.__setattr__(self, "feature_blocks", tuple(int(b) for b in self.feature_blocks))
        bad = [b for b in self.feature_blocks if not 0 <= b < self.num_blocks]
        if bad or list(self.feature_blocks) != sorted(set(self.feature_blocks)):
            raise ValueError(f"feature_blocks must be increasing block indices < {self.num_blocks}")

    @property
    def num_blocks(self) -> int:
        """Synthesis blocks: 4x4, 8x8, ..., resolution."""
        return int(math.log2(self.resolution)) - 1

    @property
    def n_latent(self) -> int:
        """Number of w vectors in W+ (one per modulated conv / ToRGB pair)."""
        return 2 * int(math.log2(self.resolution)) - 2

    def channels(self, res: int) -> int:
        """Feature channels at resolution ``res`` px: min(channel_base / res, channel_max)."""
        return min(self.channel_base // res, self.channel_max)

    def block_resolution(self, block: int) -> int:
        """Output resolution of synthesis block ``block`` (block 0 is the 4x4 constant-input block)."""
        return 4 * 2**block

    def to_dict(self) -> dict:
        """JSON-ready fields (the ``generator`` entry of a model's config.json)."""
        d = asdict(self)
        d["feature_blocks"] = list(self.feature_blocks)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "GeneratorConfig":
        """Inverse of :meth:`to_dict`; raises ValueError on unknown keys or an invalid architecture."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown generator config keys: {sorted(unknown)}")
        return cls(**d)


def default_feature_blocks(resolution: int) -> tuple[int, ...]:
    """The SAM feature spaces: up to four consecutive blocks from 8x8, ending at min(128, res).

    For 512 px and larger this is {F4, F6, F8, F10} (16..128 px), as in the paper; for a 64 px
    generator it is {F2, F4, F6, F8} (8..64 px).
    """
    last = int(math.log2(min(128, resolution))) - 2
    first = max(1, last - 3)
    return tuple(range(first, last + 1))


@dataclass(frozen=True)
class LatentSpace:
    """One SAM latent space: ``"W+"`` (block None) or ``F_k`` with k = 2 * block."""

    name: str
    block: int | None
    shape: tuple[int, ...] = field(default=())  # (C, r, r) for F_k, (n_latent, w_dim) for W+


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate: y = x (W * c)^T + b * lr_mul, c = lr_mul/sqrt(in)."""

    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activate: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)) / lr_mul)
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activate = activate

    def forward(self, x: Tensor) -> Tensor:
        if self.activate:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class MappingNetwork(nn.Module):
    """z [N, z_dim] -> w [N, w_dim]: PixelNorm, then ``n_mapping`` FC + LeakyReLU layers.

    Holds ``w_avg`` [w_dim], the mean of w used for truncation and as an inversion start.
    """

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        dims = [cfg.z_dim] + [cfg.w_dim] * cfg.n_mapping
        self.fcs = nn.ModuleList(
            EqualLinear(i, o, lr_mul=cfg.mapping_lr_mul, activate=True) for i, o in zip(dims, dims[1:])
        )
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim))

    def forward(self, z: Tensor, truncation: float = 1.0) -> Tensor:
        x = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)
        for fc in self.fcs:
            x = fc(x)
        if truncation != 1.0:
            x = self.w_avg.lerp(x, truncation)
        return x


class ModulatedConv(nn.Module):
    """Modulated convolution, non-fused form (StyleGAN2 Eq. 1-3).

    ``x`` [N, I, H, W] float32 or float16, ``w`` [N, w_dim] float32 -> [N, O, H', W'] in x's dtype, with
    H' = 2H if ``up`` else H. Styles and demodulation coefficients are computed in float32 (the sum
    of squares overflows in float16) and cast to x's dtype.
    Upsampling is a stride-2 transposed conv followed by the [1, 3, 3, 1] blur (upfirdn2d).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, w_dim: int, demodulate: bool = True,
                 up: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.affine = EqualLinear(w_dim, in_ch, bias_init=1.0)
        self.scale = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.demodulate = demodulate
        self.up = up
        self.padding = kernel // 2
        if up:
            self.register_buffer("blur", (blur_kernel() * 4).expand(out_ch, 1, 4, 4).clone(), persistent=False)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        n, c = x.shape[:2]
        style = self.affine(w)  # [N, I], float32
        weight = self.weight * self.scale
        dtype = x.dtype  # float16 activations: styles, weights and demodulation are computed in float32
        x = x * style.to(dtype).view(n, c, 1, 1)
        if self.up:
            x = F.conv_transpose2d(x, weight.transpose(0, 1).to(dtype), stride=2)
            x = F.conv2d(x, self.blur.to(dtype), padding=1, groups=self.blur.shape[0])
        else:
            x = F.conv2d(x, weight.to(dtype), padding=self.padding)
        if self.demodulate:
            wsq = weight.square().sum(dim=(2, 3))  # [O, I]
            dcoefs = torch.rsqrt(style.square() @ wsq.t() + 1e-8)  # [N, O]
            x = x * dcoefs.to(dtype).view(n, -1, 1, 1)
        return x


class StyledConv(nn.Module):
    """Modulated conv + noise injection + bias + LeakyReLU (clamped to ``clamp``, if any); holds its
    const noise [1, 1, r, r]."""

    def __init__(self, in_ch: int, out_ch: int, w_dim: int, res: int, up: bool = False,
                 clamp: float | None = None) -> None:
        super().__init__()
        self.conv = ModulatedConv(in_ch, out_ch, 3, w_dim, up=up)
        self.clamp = clamp
        self.noise_strength = nn.Parameter(torch.zeros(1))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.register_buffer("noise_const", torch.randn(1, 1, res, res))

    def forward(self, x: Tensor, w: Tensor, noise_mode: NoiseMode) -> Tensor:
        x = self.conv(x, w)
        strength = self.noise_strength.to(x.dtype)
        if noise_mode == "const":
            x = x + strength * self.noise_const.to(x.dtype)
        elif noise_mode == "random":
            x = x + strength * torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)
        return fused_leaky_relu(x, self.bias.to(x.dtype), self.clamp)


class ToRGB(nn.Module):
    """1x1 modulated conv (no demodulation) to RGB, added to the incoming skip image.

    ``upsample_skip`` brings the previous block's RGB [N, 3, r/2, r/2] to this block's size (the
    [1, 3, 3, 1] blur, upfirdn2d up=2); ``forward`` adds this block's RGB (clamped to ``clamp``, if
    any) to it.
    """

    def __init__(self, in_ch: int, w_dim: int, up: bool, clamp: float | None = None) -> None:
        super().__init__()
        self.conv = ModulatedConv(in_ch, 3, 1, w_dim, demodulate=False)
        self.clamp = clamp
        self.bias = nn.Parameter(torch.zeros(3))
        if up:
            self.register_buffer("upsample", (blur_kernel() * 4).expand(3, 1, 4, 4).clone(), persistent=False)
        else:
            self.upsample = None

    def upsample_skip(self, skip: Tensor | None) -> Tensor | None:
        """The incoming RGB skip image [N, 3, r/2, r/2] upsampled 2x with the [1, 3, 3, 1] blur
        (upfirdn2d up=2 as a depthwise transposed conv) to [N, 3, r, r]; None stays None."""
        if skip is None:
            return None
        return F.conv_transpose2d(skip, self.upsample, stride=2, padding=1, groups=3)

    def forward(self, x: Tensor, w: Tensor, skip: Tensor | None) -> Tensor:
        rgb = self.conv(x.float(), w) + self.bias.view(1, 3, 1, 1)  # ToRGB and the image stay float32
        if self.clamp is not None:
            rgb = rgb.clamp(-self.clamp, self.clamp)
        return rgb if skip is None else rgb + skip


class SynthesisBlock(nn.Module):
    """One resolution of the synthesis network.

    Block 0 (4x4) starts from the learned constant; block b >= 1 upsamples. Uses
    ``w+[2b-1]`` (conv0), ``w+[2b]`` (conv1) and ``w+[2b+1]`` (ToRGB); its output is F_{2b}.
    """

    def __init__(self, cfg: GeneratorConfig, block: int) -> None:
        super().__init__()
        self.index = block
        self.res = cfg.block_resolution(block)
        out_ch = cfg.channels(self.res)
        if block == 0:
            self.const = nn.Parameter(torch.randn(1, out_ch, 4, 4))
            self.conv0 = None
        else:
            self.const = None
            self.conv0 = StyledConv(cfg.channels(self.res // 2), out_ch, cfg.w_dim, self.res, up=True,
                                    clamp=cfg.conv_clamp)
        self.conv1 = StyledConv(out_ch, out_ch, cfg.w_dim, self.res, clamp=cfg.conv_clamp)
        self.torgb = ToRGB(out_ch, cfg.w_dim, up=block > 0, clamp=cfg.conv_clamp)
        self.out_channels = out_ch

    def forward(self, x: Tensor | None, skip: Tensor | None, ws: Tensor, noise_mode: NoiseMode,
                hook: FeatureHook | None = None) -> tuple[Tensor, Tensor]:
        """(features, skip RGB) of the previous block -> this block's; ``hook`` may change F_k and the
        incoming skip image before this block's ToRGB (see FeatureHook)."""
        k = 2 * self.index
        if self.conv0 is None:
            x = self.const.expand(ws.shape[0], -1, -1, -1)
        else:
            x = self.conv0(x, ws[:, k - 1], noise_mode)
        x = self.conv1(x, ws[:, k], noise_mode)
        skip = self.torgb.upsample_skip(skip)
        if hook is not None:
            x, skip = hook(k, x, skip)
        return x, self.torgb(x, ws[:, k + 1], skip)


class Synthesis(nn.Module):
    """w+ [N, n_latent, w_dim] -> image [N, 3, R, R] in about [-1, 1], segmented into blocks."""

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(SynthesisBlock(cfg, b) for b in range(cfg.num_blocks))

    def run(self, ws: Tensor, first: int = 0, last: int | None = None,
            state: tuple[Tensor, Tensor] | None = None, noise_mode: NoiseMode = "const",
            hook: FeatureHook | None = None) -> tuple[Tensor, Tensor]:
        """Run blocks ``first..last`` (inclusive): the segment g_{i->j} of the paper.

        ``state`` is the (features, skip RGB) pair output by block ``first - 1`` (None when
        ``first == 0``). ``hook`` (see FeatureHook) is applied at each block that is a SAM latent
        space F_k (k = 2 * block), before that block's ToRGB. Returns the (features, skip RGB) of
        block ``last``.
        """
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        last = len(self.blocks) - 1 if last is None else last
        assert ws.ndim == 3 and ws.shape[1:] == (self.cfg.n_latent, self.cfg.w_dim), ws.shape
        assert (state is None) == (first == 0), "state is required exactly when first > 0"
        x, skip = state if state is not None else (None, None)
        for block in self.blocks[first:last + 1]:
            block_hook = hook if block.index in self.cfg.feature_blocks else None
            x, skip = block(x, skip, ws, noise_mode, block_hook)
        return x, skip

    def forward(self, ws: Tensor, residuals: Mapping[int, tuple[Tensor, Tensor]] | None = None,
                noise_mode: NoiseMode = "const") -> Tensor:
        """Compose the SAM image (Eq. 3-4): after F_k add ``mask_k * delta_k``.

        ``residuals`` maps k -> (mask [N or 1, 1, r, r] in [0, 1], delta [N, C, r, r]). With no
        residuals (or all-zero masks) this is exactly the plain StyleGAN2 forward pass.
        """
        hook = None
        if residuals:
            def hook(k: int, x: Tensor, skip: Tensor | None) -> tuple[Tensor, Tensor | None]:
                if k not in residuals:
                    return x, skip
                mask, delta = residuals[k]
                return masked_residual(x, mask, delta), skip
        return self.run(ws, noise_mode=noise_mode, hook=hook)[1]


class Generator(nn.Module):
    """StyleGAN2 generator: mapping + segmented synthesis.

    ``forward(z)`` takes z [N, z_dim] float32 and returns images [N, 3, R, R] in about [-1, 1].
    """

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.mapping = MappingNetwork(cfg)
        self.synthesis = Synthesis(cfg)

    @property
    def spaces(self) -> list[LatentSpace]:
        """The SAM latent spaces, most editable first: W+, then F_k by increasing k."""
        cfg = self.cfg
        out = [LatentSpace("W+", None, (cfg.n_latent, cfg.w_dim))]
        for b in cfg.feature_blocks:
            r = cfg.block_resolution(b)
            out.append(LatentSpace(f"F{2 * b}", b, (cfg.channels(r), r, r)))
        return out

    def space(self, name: str) -> LatentSpace:
        """The latent space called ``name`` ("W+" or "F<k>"); raises KeyError naming the model's spaces."""
        for s in self.spaces:
            if s.name == name:
                return s
        raise KeyError(f"unknown latent space {name!r}; this model has {[s.name for s in self.spaces]}")

    def broadcast(self, w: Tensor) -> Tensor:
        """w [N, w_dim] -> w+ [N, n_latent, w_dim]."""
        return w.unsqueeze(1).expand(-1, self.cfg.n_latent, -1)

    def forward(self, z: Tensor, truncation: float = 1.0, noise_mode: NoiseMode = "const") -> Tensor:
        """z [N, z_dim] -> images [N, 3, R, R] in about [-1, 1], every style layer fed the same w."""
        return self.synthesis(self.broadcast(self.mapping(z, truncation)), noise_mode=noise_mode)

    @torch.no_grad()
    def mean_w(self, n: int = 10_000, seed: int = 0, batch: int = 2000) -> Tensor:
        """Monte-Carlo estimate of w_avg [w_dim] from ``n`` mapped samples."""
        g = torch.Generator().manual_seed(seed)
        total = torch.zeros(self.cfg.w_dim, dtype=torch.float64)
        for start in range(0, n, batch):
            z = torch.randn(min(batch, n - start), self.cfg.z_dim, generator=g)
            total += self.mapping(z).double().sum(0)
        return (total / n).float()
