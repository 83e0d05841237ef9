"""A feature pyramid over the ImageNet EfficientNet-Lite0 trunk (Lin et al. 2017, "Feature Pyramid
Networks for Object Detection"), shared by the invertibility predictor and the W+ encoder (the pSp
encoder, Richardson et al. 2021, reads its styles from such a pyramid).

Input images [N, 3, R, R] float32 in [-1, 1] (any R) are resized (bilinear) to ``input_size``; the
trunk gives ``levels`` feature maps at strides 4, 8, 16 (, 32); 1x1 lateral convs bring them to
``width`` channels and a top-down pass adds each upsampled (nearest) coarser level to the next finer.
Output: the merged levels, finest first: [N, width, input_size / 4, ...], [N, width, input_size / 8, ...], ...
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from saminv.models.efficientnet import PYRAMID_CHANNELS, EfficientNetLite0, load_backbone, normalise


def pretrained_trunk_groups(net: nn.Module, pyramid: "FeaturePyramid", lr: float, trunk_scale: float) -> list[dict]:
    """Optimizer parameter groups for a network built on ``pyramid``: the ImageNet trunk at
    ``lr * trunk_scale``, every other parameter of ``net`` at ``lr``."""
    trunk = list(pyramid.backbone.parameters())
    ids = {id(p) for p in trunk}
    return [{"params": [p for p in net.parameters() if id(p) not in ids], "lr": lr},
            {"params": trunk, "lr": lr * trunk_scale}]


class FeaturePyramid(nn.Module):
    """EfficientNet-Lite0 trunk (``levels`` pyramid levels) + FPN top-down merge to ``width`` channels."""

    def __init__(self, width: int = 64, levels: int = 3, input_size: int = 128) -> None:
        super().__init__()
        self.levels, self.input_size = levels, input_size
        self.backbone = EfficientNetLite0(levels=levels)
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in PYRAMID_CHANNELS[:levels])

    def load_pretrained(self) -> "FeaturePyramid":
        """Copy the ImageNet weights into the trunk (training starts from them)."""
        self.backbone.load_state_dict(load_backbone(levels=self.levels).state_dict())
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        assert images.ndim == 4 and images.shape[1] == 3, images.shape
        size = (self.input_size, self.input_size)
        x = images if images.shape[-2:] == size else F.interpolate(images, size=size, mode="bilinear",
                                                                   align_corners=False)
        features = self.backbone.pyramid(normalise(x))
        merged = [self.lateral[-1](features[-1])]
        for lateral, level in zip(reversed(self.lateral[:-1]), reversed(features[:-1])):
            merged.insert(0, F.interpolate(merged[0], size=level.shape[-2:], mode="nearest") + lateral(level))
        return merged
