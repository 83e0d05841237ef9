"""How close a distilled generator is to its teacher (``saminv train report``).

* A picture: an 8 x 8 grid of student samples beside the teacher's samples for the same z.
* A number: the Fréchet distance (pooled EfficientNet-Lite0 features, :mod:`saminv.training.frechet`)
  between ``n`` student samples and ``n`` teacher samples, next to the floor, the distance between two
  disjoint sets of ``n`` teacher samples. Three disjoint z sets are drawn from one seed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from saminv.imageio import from_tensor_range
from saminv.models.model_dir import Model
from saminv.models.efficientnet import load_backbone, pooled_features
from saminv.training.frechet import frechet_distance
from saminv.training.teacher import Z_DIM, load_teacher
from saminv.viz import image_grid, side_by_side


@torch.no_grad()
def _render(net: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, batch: int = 200) -> torch.Tensor:
    return torch.cat([net(z[i:i + batch]).clamp(-1, 1) for i in range(0, len(z), batch)])


def _grid(images: torch.Tensor) -> np.ndarray:
    return image_grid(np.stack([from_tensor_range(x.numpy()) for x in images]), cols=8)


@torch.no_grad()
def sample_grid(model: Model, seed: int = 0) -> np.ndarray:
    """student (left) | teacher (right), 8 x 8 samples each for the same z: H x W x 3 uint8."""
    z = torch.randn(64, Z_DIM, generator=torch.Generator().manual_seed(seed))
    student = _render(lambda v: model.generator(v, noise_mode="const"), z)
    teacher = _render(load_teacher(), z)
    return side_by_side([_grid(student), _grid(teacher)], ["saminv faces64 (student)", "DCGAN teacher, same z"])


def frechet_report(model: Model, n: int = 2000, seed: int = 0) -> dict:
    """FD(student, teacher) and the floor FD(teacher, teacher') over ``n`` samples each."""
    if model.generator.cfg.z_dim != Z_DIM:
        raise ValueError(f"the teacher takes z of {Z_DIM} dims, the model {model.generator.cfg.z_dim}")
    z = torch.randn(3 * n, Z_DIM, generator=torch.Generator().manual_seed(seed))
    teacher = load_teacher()
    backbone = load_backbone()
    student = pooled_features(_render(lambda v: model.generator(v, noise_mode="const"), z[:n]), backbone)
    teacher_a = pooled_features(_render(teacher, z[n:2 * n]), backbone)
    teacher_b = pooled_features(_render(teacher, z[2 * n:]), backbone)
    return {"samples": n, "seed": seed, "backbone": "EfficientNet-Lite0 (pooled 1280-d)",
            "fd_student_teacher": frechet_distance(student, teacher_a),
            "fd_teacher_teacher_floor": frechet_distance(teacher_b, teacher_a)}
