"""Training the feed-forward SAM encoders (``saminv train encoder``; models in :mod:`saminv.models.encoders`).

Two stages in one resumable run (:class:`saminv.training.run.TrainingRun`):

1. ``wplus_steps`` steps train the W+ encoder on a mix of images: samples of the model itself, whose w
   is known (a latent loss pulls w+ towards it, normalised by the variance of mapped w), and teacher
   faces, real-photo crops and composites from :class:`~saminv.training.invertibility_data.ImageSource`
   (the held-out photos never appear). Loss: MSE + LPIPS of the reconstruction, the latent loss, and
   the W regularizers of the optimization (Mahalanobis prior, paper Eq. 7, and the W+ spread).
2. ``delta_steps`` steps train the Δf encoders with the W+ encoder frozen: each image of a batch is
   composed with Δf_k everywhere for one feature space F_k (the spaces take turns across the batch, so
   one synthesis pass serves all encoders), with MSE + LPIPS and the F regularizer (paper Eq. 8).

At inference the masks of the predicted layer map confine each Δf_k to its segments (paper Eq. 3-4).
The ImageNet trunk trains at a 10x smaller learning rate with its BatchNorm statistics frozen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from saminv.inversion.feedforward import wplus_features
from saminv.inversion.optimize import InversionConfig, ReconstructionLoss
from saminv.models.encoders import SamEncoders
from saminv.models.fpn import pretrained_trunk_groups
from saminv.models.lpips import LPIPS
from saminv.models.model_dir import Model
from saminv.training.invertibility_data import SOURCES, ImageSource
from saminv.training.run import TrainingRun

REAL_SOURCES = tuple(i for i, s in enumerate(SOURCES) if s != "generated")
IMAGE_OFFSET = 1_000_000  # item indices apart from the invertibility data set's


@dataclass
class EncoderConfig:
    """Hyper-parameters of ``saminv train encoder`` (defaults: the shipped faces64 run).

    The W+ encoder trains first (``wplus_steps``; MSE + LPIPS, the paper's W-regularizers and the
    latent loss on generated images, ``latent_weight``), then the Δf encoders with the W+ encoder
    frozen (``delta_steps``; MSE + LPIPS of the image composed with one Δf_k, plus the F-regularizer).
    A batch holds ``generated`` model samples (their w known) and teacher faces, photo crops and composites.
    ``lr`` is Adam's rate for the new layers, ``backbone_lr_scale`` times it for the pretrained trunk.
    """

    wplus_steps: int = 1500
    delta_steps: int = 3000
    batch: int = 8
    generated: int = 3  # model samples per batch (w known); the rest: teacher, photos, composites
    lr: float = 5e-4
    backbone_lr_scale: float = 0.1
    latent_weight: float = 1.0
    checkpoint_every: int = 100
    seed: int = 0


class EncoderTrainer(TrainingRun):
    """One encoder training run for ``model`` in ``out_dir`` (resumes from its checkpoint)."""

    desc = "encoders"

    def __init__(self, model: Model, out_dir, cfg: EncoderConfig, device: str = "cpu") -> None:
        super().__init__(out_dir, cfg.checkpoint_every, device)
        self.model, self.cfg, self.device = model, cfg, device
        self.total_steps = cfg.wplus_steps + cfg.delta_steps
        self.loss_cfg = InversionConfig()
        torch.manual_seed(cfg.seed)
        G = model.generator
        self.net = SamEncoders.for_generator(G).to(device)
        self.net.wplus.pyramid.load_pretrained()
        self.source = ImageSource(model, cfg.seed)
        self.lpips = LPIPS().to(device)
        with torch.no_grad():
            self.w_var = G.mapping(torch.randn(2000, G.cfg.z_dim, device=device)).var(0).mean()
        self.opt = self._optimizer("wplus")
        self.resume(device)

    @property
    def stage(self) -> str:
        """``"wplus"`` during the first ``wplus_steps`` steps, then ``"delta"``."""
        return "wplus" if self.step < self.cfg.wplus_steps else "delta"

    def _optimizer(self, stage: str) -> torch.optim.Optimizer:
        if stage == "delta":
            return torch.optim.Adam(self.net.deltas.parameters(), lr=self.cfg.lr)
        wplus = self.net.wplus
        return torch.optim.Adam(pretrained_trunk_groups(wplus, wplus.pyramid, self.cfg.lr, self.cfg.backbone_lr_scale))

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "stage": self.stage,
                "config": asdict(self.cfg)}

    def load_state(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt = self._optimizer(state["stage"])
        self.opt.load_state_dict(state["opt"])

    @torch.no_grad()
    def batch(self) -> tuple[Tensor, Tensor]:
        """Images [B, 3, R, R] in [-1, 1] (the first ``generated`` are model samples) and their w [generated, w_dim]."""
        G, cfg = self.model.generator, self.cfg
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step + (self.rank << 40))
        z = torch.randn(cfg.generated, G.cfg.z_dim, generator=g).to(self.device)
        truncation = torch.empty(cfg.generated, 1).uniform_(0.5, 1.0, generator=g).to(self.device)
        w = G.mapping.w_avg + truncation * (G.mapping(z) - G.mapping.w_avg)
        samples = G.synthesis(G.broadcast(w)).clamp(-1, 1)
        others = []
        for j in range(cfg.batch - cfg.generated):
            q = (self.step * self.world + self.rank) * cfg.batch + j
            image, _ = self.source.image(IMAGE_OFFSET + 4 * q + REAL_SOURCES[q % len(REAL_SOURCES)])
            others.append(torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1))
        images = torch.cat([samples, torch.stack(others).to(self.device)])
        flip = torch.rand(len(images), generator=g) < 0.5
        images[flip] = images[flip].flip(-1)
        w = torch.where(flip[:cfg.generated, None].to(self.device), torch.nan, w)  # a flipped sample's w is unknown
        return images, w

    def train_step(self) -> dict[str, float]:
        self.net.train()
        self.net.wplus.pyramid.backbone.eval()  # frozen BatchNorm statistics
        if self.stage == "delta" and self.step == self.cfg.wplus_steps:
            self.opt = self._optimizer("delta")
        images, w = self.batch()
        logs = self._wplus_loss(images, w) if self.stage == "wplus" else self._delta_loss(images)
        loss = logs.pop("loss")
        self.optimizer_step(self.opt, loss)
        return {k: float(v) for k, v in logs.items()}

    def _wplus_loss(self, images: Tensor, w: Tensor) -> dict[str, Tensor]:
        G, lc = self.model.generator, self.loss_cfg
        wplus = self.net.wplus(images)
        recon = G.synthesis(wplus)
        rec = ReconstructionLoss(self.lpips, images, lc)(recon).mean()
        known = ~w.isnan().any(-1)
        latent = ((wplus[:len(w)][known] - w[known, None]).square().mean() / self.w_var
                  if known.any() else wplus.new_zeros(()))
        reg = lc.prior_weight * self.model.prior.mahalanobis(wplus) + \
            lc.spread_weight * (wplus[:, 1:] - wplus[:, :1]).norm(dim=-1).sum(-1).mean()
        loss = rec + self.cfg.latent_weight * latent + reg
        return {"loss": loss, "reconstruction": rec.detach(), "latent": latent.detach(),
                "psnr": _psnr(recon.detach(), images)}

    def _delta_loss(self, images: Tensor) -> dict[str, Tensor]:
        G, lc = self.model.generator, self.loss_cfg
        n = len(images)
        with torch.no_grad():
            wplus = self.net.wplus(images)
            recon, features = wplus_features(self.model, wplus)
        spaces = [s for s in G.spaces if s.block is not None]
        assigned = (self.step + torch.arange(n)) % len(spaces)  # item j is composed with delta_f in one space
        residuals, penalty = {}, images.new_zeros(())
        for i, space in enumerate(spaces):
            items = (assigned == i).nonzero()[:, 0].to(images.device)
            if len(items) == 0:
                continue
            k = 2 * space.block
            delta = self.net.deltas[space.name](images[items], recon[items], features[k][items])
            full = features[k].new_zeros(features[k].shape).index_copy(0, items, delta)
            mask = torch.zeros(n, 1, 1, 1, device=images.device).index_fill(0, items, 1.0)
            residuals[k] = (mask, full)
            penalty = penalty + lc.f_weight * delta.square().mean(dim=(1, 2, 3)).sum() / n
        composed = G.synthesis(wplus, residuals)
        rec = ReconstructionLoss(self.lpips, images, lc)(composed).mean()
        return {"loss": rec + penalty, "reconstruction": rec.detach(), "psnr_wplus": _psnr(recon, images),
                "psnr": _psnr(composed.detach(), images)}

def _psnr(x: Tensor, y: Tensor) -> Tensor:
    return 10 * torch.log10(4.0 / (x - y).square().mean().clamp_min(1e-12))

