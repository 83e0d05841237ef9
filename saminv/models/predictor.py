"""The invertibility predictor S_l (SAM paper Sec. 3.2, Eq. 2): for an image, one map per latent space
predicting the LPIPS spatial error e_l that inverting it in that space would leave.

Architecture: a feature pyramid over the ImageNet-pretrained EfficientNet-Lite0 trunk
(:mod:`saminv.models.fpn`, strides 4-16 of the image resized to 128 px), a 3x3 smoothing conv on the
finest merged level, one small head per latent space; the maps are resized (bilinear) to the image
size, made non-negative with softplus and multiplied by a per-space ``scale`` (the mean error of the
training data, a buffer saved with the weights). The heads start at softplus = 1, i.e. at that mean:
LPIPS errors are small (about 0.003-0.04), and an unscaled softplus head starting near 0.7 is pushed
into its flat negative tail, where it stays at zero (measured: a dead predictor after 2,000 steps).

Input ``images`` [N, 3, R, R] float32 in [-1, 1]; output [N, S, R, R] float32 >= 0 (S = number of
latent spaces, most editable first, as in the model's ``spaces``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saminv.models.fpn import FeaturePyramid


class InvertibilityPredictor(nn.Module):
    """S_l for ``spaces`` (names, e.g. ["W+", "F2", ..., "F8"])."""

    def __init__(self, spaces: list[str], width: int = 64) -> None:
        super().__init__()
        self.spaces = list(spaces)
        self.pyramid = FeaturePyramid(width)
        self.smooth = nn.Conv2d(width, width, 3, padding=1)
        self.heads = nn.ModuleList(nn.Sequential(nn.Conv2d(width, width // 2, 3, padding=1), nn.ReLU(),
                                                 nn.Conv2d(width // 2, 1, 1)) for _ in self.spaces)
        for head in self.heads:
            nn.init.constant_(head[-1].bias, math.log(math.e - 1))  # softplus(bias) = 1
        self.register_buffer("scale", torch.ones(len(self.spaces)))

    def init_kwargs(self) -> dict:
        """The constructor arguments that rebuild this network (stored in config.json beside its weights)."""
        return {"spaces": self.spaces, "width": self.smooth.in_channels}

    def forward(self, images: Tensor) -> Tensor:
        y = F.relu(self.smooth(self.pyramid(images)[0]))
        maps = torch.cat([head(y) for head in self.heads], dim=1)
        maps = F.softplus(F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False))
        return maps * self.scale.view(1, -1, 1, 1)
