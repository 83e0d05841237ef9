"""Feed-forward SAM encoders: a W+ encoder and one Δf encoder per feature space F_k.

The paper's encoder regime (SAM Table 1, "SAM - encoder") has no public implementation; saminv's:

* :class:`WPlusEncoder` (pSp, Richardson et al. 2021, with e4e's offsets, Tov et al. 2021): a
  feature pyramid over the ImageNet EfficientNet-Lite0 trunk (:mod:`saminv.models.fpn`); style layers
  0-2 read the coarsest level, 3-6 the middle one, the rest the finest (pSp's coarse/medium/fine
  split). Each level is reduced by stride-2 convs to 4 x 4 and a linear layer to a level code; one
  linear layer per style layer maps its level's code to an offset from w_avg:
  w+[i] = w_avg + Δ_i. Offsets start near zero, so training starts from the mean face.
* :class:`DeltaEncoder` for F_k: predicts Δf_k [N, C_k, r_k, r_k] from the photo, its W+
  reconstruction (both [N, 3, R, R] in [-1, 1], brought to r_k by stride-2 convs) and the generator's
  own F_k features of that reconstruction. Its last conv starts at zero, so Δf_k starts at 0 (the W+
  reconstruction), like the optimization.

The composed image is then paper Eq. 3-4 with the masks of the predicted layer map
(:mod:`saminv.inversion.feedforward`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from saminv.models.fpn import FeaturePyramid

COARSE_LAYERS, MEDIUM_LAYERS = 3, 7  # pSp: styles [0, 3) coarse, [3, 7) medium, [7, n_latent) fine
LEVEL_CODE = 256


def _down_to(width: int, size: int, target: int) -> nn.Sequential:
    """Stride-2 3x3 convs (LeakyReLU 0.2) from ``size`` to ``target`` pixels (both powers of two)."""
    steps = int(math.log2(size // target))
    layers: list[nn.Module] = []
    for _ in range(steps):
        layers += [nn.Conv2d(width, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers)


def style_level(layer: int) -> int:
    """The pyramid level a style layer reads: 0 = finest (fine styles), 2 = coarsest (coarse styles)."""
    return 2 if layer < COARSE_LAYERS else 1 if layer < MEDIUM_LAYERS else 0


class WPlusEncoder(nn.Module):
    """Image [N, 3, R, R] in [-1, 1] -> w+ [N, n_latent, w_dim] float32, as offsets from ``w_avg``."""

    def __init__(self, n_latent: int, w_dim: int, width: int = 64, input_size: int = 128) -> None:
        super().__init__()
        self.n_latent, self.w_dim = n_latent, w_dim
        self.pyramid = FeaturePyramid(width, levels=3, input_size=input_size)
        sizes = [input_size // s for s in (4, 8, 16)]
        self.level_codes = nn.ModuleList(
            nn.Sequential(_down_to(width, size, 4), nn.Flatten(), nn.Linear(width * 16, LEVEL_CODE), nn.LeakyReLU(0.2))
            for size in sizes)
        self.styles = nn.ModuleList(nn.Linear(LEVEL_CODE, w_dim) for _ in range(n_latent))
        for layer in self.styles:
            nn.init.normal_(layer.weight, std=0.01 / math.sqrt(LEVEL_CODE))
            nn.init.zeros_(layer.bias)
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def init_kwargs(self) -> dict:
        """The constructor arguments that rebuild this network (stored in config.json beside its weights)."""
        return {"n_latent": self.n_latent, "w_dim": self.w_dim, "width": self.pyramid.lateral[0].out_channels,
                "input_size": self.pyramid.input_size}

    def forward(self, images: Tensor) -> Tensor:
        codes = [head(level) for head, level in zip(self.level_codes, self.pyramid(images))]
        offsets = torch.stack([style(codes[style_level(i)]) for i, style in enumerate(self.styles)], dim=1)
        return self.w_avg + offsets


class DeltaEncoder(nn.Module):
    """(photo, W+ reconstruction [N, 3, R, R] in [-1, 1], F_k features [N, C, r, r]) -> Δf_k [N, C, r, r]."""

    def __init__(self, channels: int, size: int, resolution: int, width: int = 64) -> None:
        super().__init__()
        self.channels, self.size, self.resolution = channels, size, resolution
        self.images = nn.Sequential(nn.Conv2d(6, width, 3, padding=1), nn.LeakyReLU(0.2),
                                    _down_to(width, resolution, size))
        self.body = nn.Sequential(nn.Conv2d(width + channels, width, 3, padding=1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.2))
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def init_kwargs(self) -> dict:
        """The constructor arguments that rebuild this network (stored in config.json beside its weights)."""
        return {"channels": self.channels, "size": self.size, "resolution": self.resolution,
                "width": self.out.in_channels}

    def forward(self, photo: Tensor, reconstruction: Tensor, features: Tensor) -> Tensor:
        assert features.shape[1:] == (self.channels, self.size, self.size), features.shape
        x = self.images(torch.cat([photo, reconstruction], dim=1))
        return self.out(self.body(torch.cat([x, features], dim=1)))


class SamEncoders(nn.Module):
    """The W+ encoder and the Δf encoders of a model's feature spaces.

    ``spaces``: {"F2": [C, r, r], ...} (a model's F_k shapes); ``resolution``: the image size R.
    """

    def __init__(self, n_latent: int, w_dim: int, resolution: int, spaces: dict[str, list[int]],
                 width: int = 64) -> None:
        super().__init__()
        self.resolution, self.space_shapes = resolution, {k: list(v) for k, v in spaces.items()}
        self.wplus = WPlusEncoder(n_latent, w_dim, width)
        self.deltas = nn.ModuleDict({name: DeltaEncoder(shape[0], shape[1], resolution, width)
                                     for name, shape in spaces.items()})

    def init_kwargs(self) -> dict:
        """The constructor arguments that rebuild this network (stored in config.json beside its weights)."""
        return {"n_latent": self.wplus.n_latent, "w_dim": self.wplus.w_dim, "resolution": self.resolution,
                "spaces": self.space_shapes, "width": self.wplus.pyramid.lateral[0].out_channels}

    @classmethod
    def for_generator(cls, G, width: int = 64) -> "SamEncoders":
        """Encoders sized for a Generator's W+ and F_k spaces, with w_avg copied from it."""
        spaces = {s.name: list(s.shape) for s in G.spaces if s.block is not None}
        net = cls(G.cfg.n_latent, G.cfg.w_dim, G.cfg.resolution, spaces, width)
        net.wplus.w_avg.copy_(G.mapping.w_avg)
        return net

