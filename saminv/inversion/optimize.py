"""Optimization inversion of phi = {w+, delta_f_k} (SAM, Parmar et al. 2022, Sec. 3.3, Eq. 5-8).

One optimizer serves every case: single-space inversion in W, W+ or F_k (an F_k code is delta_f_k on
top of w+, with an all-ones mask) and the joint SAM optimization (segment masks per F_k). Items of a
batch may use different spaces, so all single-space inversions of an image run as one batch.

Loss (official defaults, shared/README.md)::

    MSE + LPIPS                                  (LPIPS on the output area-downsampled to <= 256 px)
    + 1e-8 * Mahalanobis(LeakyReLU(w_i, 5))       (W prior, Eq. 7)
    + 1e-3 * sum_i ||w_i - w_0||                  (W+ spread)
    + 5 * sum_k mean(delta_f_k^2)                 (F regularizer, Eq. 8)

Adam(0.9, 0.999), lr 0.05 with the StyleGAN2-projector ramp (linear warm-up over the first 5 %,
cosine ramp-down over the last 25 %). Start: w_avg for every layer, delta_f = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from saminv.models.lpips import LPIPS
from saminv.models.model_dir import Model
from saminv.models.stylegan2 import NoiseMode


@dataclass
class InversionConfig:
    """Optimization settings; defaults follow sam_inv_optimization.py except ``steps``."""

    steps: int = 200
    lr: float = 0.05
    mse_weight: float = 1.0
    lpips_weight: float = 1.0
    prior_weight: float = 1e-8
    spread_weight: float = 1e-3
    f_weight: float = 5.0
    lpips_max_size: int = 256
    noise_mode: NoiseMode = "const"


def projector_lr(step: int, steps: int, base: float, rampup: float = 0.05, rampdown: float = 0.25) -> float:
    """StyleGAN2-projector schedule: linear warm-up over ``rampup``, cosine ramp-down over ``rampdown``
    (both fractions of ``steps``; ``rampup=0`` starts at ``base``)."""
    t = step / max(steps, 1)
    ramp = min(1.0, (1.0 - t) / rampdown)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    return base * ramp * (min(1.0, t / rampup) if rampup > 0 else 1.0)


@dataclass
class Codes:
    """SAM codes for N images: phi = {w+, delta_f_k} with masks m_k.

    ``wplus`` [N, n_latent, w_dim] float32; ``deltas[k]`` [N, C_k, r_k, r_k]; ``masks[k]``
    [N, 1, r_k, r_k] in [0, 1] (k is the F_k index, 2 x block). Masks of one image are exclusive.
    """

    wplus: Tensor
    deltas: dict[int, Tensor] = field(default_factory=dict)
    masks: dict[int, Tensor] = field(default_factory=dict)

    def residuals(self) -> dict[int, tuple[Tensor, Tensor]]:
        """``{k: (m_k, Δf_k)}``, the residuals the synthesis adds at F_k (paper Eq. 3)."""
        return {k: (self.masks[k], d) for k, d in self.deltas.items()}

    def render(self, model: Model, noise_mode: NoiseMode = "const") -> Tensor:
        """The composed image [N, 3, R, R] (paper Eq. 3-4)."""
        return model.generator.synthesis(self.wplus, self.residuals(), noise_mode=noise_mode)

    def detach(self) -> "Codes":
        """A copy of these codes, detached from the autograd graph."""
        return Codes(self.wplus.detach().clone(), {k: v.detach().clone() for k, v in self.deltas.items()},
                     {k: v.detach().clone() for k, v in self.masks.items()})



def _area_down(x: Tensor, size: int) -> Tensor:
    return F.interpolate(x, size=(size, size), mode="area") if x.shape[-1] > size else x


class ReconstructionLoss:
    """Per-item MSE + LPIPS [N] to a fixed target [N, 3, H, W] in [-1, 1] (target features cached)."""

    def __init__(self, lpips: LPIPS, target: Tensor, cfg: InversionConfig) -> None:
        self.lpips, self.cfg, self.target = lpips, cfg, target
        self.target_features = lpips.target_features(_area_down(target, cfg.lpips_max_size))

    def __call__(self, x: Tensor) -> Tensor:
        mse = (x - self.target).square().mean(dim=(1, 2, 3))
        perceptual = self.lpips.distance_to(_area_down(x, self.cfg.lpips_max_size), self.target_features)
        return self.cfg.mse_weight * mse + self.cfg.lpips_weight * perceptual


def optimize_codes(model: Model, lpips: LPIPS, target: Tensor, codes: Codes, tie_w: Tensor | None = None,
                   cfg: InversionConfig | None = None, progress: bool = False, desc: str = "invert") -> Codes:
    """Optimize ``codes`` (its w+ and every delta_f_k; masks fixed) to reproduce ``target``.

    target: [N, 3, R, R] float32 in [-1, 1]. ``tie_w`` [N] bool marks items inverted in W (one w
    shared by all layers). Items are independent (the loss is summed over the batch), so a batch of
    N items gives the same result as N separate runs. Returns new, detached codes.
    """
    cfg = cfg or InversionConfig()
    G = model.generator
    assert target.ndim == 4 and target.shape[1:] == (3, G.cfg.resolution, G.cfg.resolution), target.shape
    wplus = codes.wplus.detach().clone().requires_grad_(True)
    deltas = {k: d.detach().clone().requires_grad_(True) for k, d in codes.deltas.items()}
    opt = torch.optim.Adam([wplus, *deltas.values()], lr=cfg.lr, betas=(0.9, 0.999))
    tie = tie_w.view(-1, 1, 1) if tie_w is not None else None

    def effective_wplus() -> Tensor:  # items inverted in W use their first w in every layer
        return wplus if tie is None else torch.where(tie, wplus[:, :1].expand_as(wplus), wplus)

    reconstruction = ReconstructionLoss(lpips, target, cfg)
    for step in tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False, unit="step"):
        for group in opt.param_groups:
            group["lr"] = projector_lr(step, cfg.steps, cfg.lr)
        ws = effective_wplus()
        current = Codes(ws, deltas, codes.masks)
        x = current.render(model, cfg.noise_mode)
        loss = reconstruction(x).sum()
        loss = loss + cfg.prior_weight * model.prior.mahalanobis(ws) * ws.shape[0]
        loss = loss + cfg.spread_weight * (ws[:, 1:] - ws[:, :1]).norm(dim=-1).sum()
        for d in deltas.values():
            loss = loss + cfg.f_weight * d.square().mean(dim=(1, 2, 3)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        ws = effective_wplus()
    return Codes(ws, deltas, codes.masks).detach()


def start_codes(model: Model, n: int, masks: dict[int, Tensor] | None = None) -> Codes:
    """The optimization start: w+ = w_avg in every layer, delta_f_k = 0 for every masked F_k."""
    G = model.generator
    w_avg = G.mapping.w_avg
    wplus = w_avg.view(1, 1, -1).repeat(n, G.cfg.n_latent, 1)
    masks = masks or {}
    deltas = {}
    for k, m in masks.items():
        space = G.space(f"F{k}")
        deltas[k] = torch.zeros(n, *space.shape, device=w_avg.device)
        assert m.shape[0] in (1, n) and m.shape[1:] == (1, *space.shape[1:]), (k, m.shape)
    return Codes(wplus, deltas, {k: m.expand(n, -1, -1, -1) for k, m in masks.items()})
