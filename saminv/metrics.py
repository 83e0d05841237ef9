"""Image-quality numbers shared by inversion, tests and benchmarks."""

from __future__ import annotations

import torch
from torch import Tensor


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """PSNR in dB of images in [-1, 1] ([..., 3, H, W]; peak-to-peak 2), per leading item."""
    mse = (x.clamp(-1, 1) - y.clamp(-1, 1)).square().flatten(-3).mean(-1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))
