"""The invertibility predictor S_l (SAM paper Sec. 3.2, Eq. 2): for an image, one map per latent space
predicting the LPIPS spatial error e_l that inverting it in that space would leave.

Architecture: the ImageNet-pretrained EfficientNet-Lite0 (:mod:`saminv.models.efficientnet`) on the
image resized to ``backbone_size``; a feature-pyramid decoder (Lin et al. 2017: 1x1 laterals, top-down
upsample-and-add, 3x3 smoothing) to stride 4; one small head per latent space; the maps are resized
to the image size and made non-negative with softplus.

Input ``images`` [N, 3, R, R] float32 in [-1, 1]; output [N, S, R, R] float32 >= 0 (S = number of
latent spaces, most editable first, as in the model's ``spaces``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saminv.models.efficientnet import PYRAMID_CHANNELS, EfficientNetLite0, normalise


class InvertibilityPredictor(nn.Module):
    """S_l for ``spaces`` (names, e.g. ["W+", "F2", ..., "F8"])."""

    def __init__(self, spaces: list[str], width: int = 64, backbone_size: int = 128) -> None:
        super().__init__()
        self.spaces, self.backbone_size = list(spaces), backbone_size
        self.backbone = EfficientNetLite0()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in PYRAMID_CHANNELS)
        self.smooth = nn.Conv2d(width, width, 3, padding=1)
        self.heads = nn.ModuleList(nn.Sequential(nn.Conv2d(width, width // 2, 3, padding=1), nn.ReLU(),
                                                 nn.Conv2d(width // 2, 1, 1)) for _ in self.spaces)

    def forward(self, images: Tensor) -> Tensor:
        assert images.ndim == 4 and images.shape[1] == 3, images.shape
        size = images.shape[-2:]
        x = F.interpolate(images, size=(self.backbone_size, self.backbone_size), mode="bilinear", align_corners=False)
        levels = self.backbone.pyramid(normalise(x))
        y = self.lateral[-1](levels[-1])
        for lateral, level in zip(reversed(self.lateral[:-1]), reversed(levels[:-1])):
            y = F.interpolate(y, size=level.shape[-2:], mode="nearest") + lateral(level)
        y = F.relu(self.smooth(y))
        maps = torch.cat([head(y) for head in self.heads], dim=1)
        return F.softplus(F.interpolate(maps, size=size, mode="bilinear", align_corners=False))

