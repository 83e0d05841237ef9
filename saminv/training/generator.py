"""Distil the built-in ``faces64`` StyleGAN2 from the DCGAN face teacher (``saminv train generator``).

For z ~ N(0, I) the teacher renders T(z) and the student is trained on three terms, each optional:

* paired L1, ``pair_weight * |G(z) - T(z)|``: pins down the layout of every sample;
* feature hints, ``hint_weight * sum_r |P_r(f_r) - T_r(z)|^2``: the student's 4..32 px block outputs,
  through learned 1x1 projections P_r, regress the teacher's feature maps at the same resolutions,
  which gives the early blocks a direct signal (FitNets-style hints, Romero et al. 2015);
* the non-saturating adversarial loss of StyleGAN2 against a small discriminator that sees teacher
  samples as real (lazy R1), ``adv_weight``, which restores detail that regression averages away.

The shipped run uses regression and hints only (the fastest-learning mix measured on 2 CPU cores,
see docs/faces64.md), with the mapping network at full learning rate (``mapping_lr_mul=1``):
StyleGAN2's 0.01 stabilises adversarial training but stalls a regression that must route all of z
through w. The generator's EMA (half-life ``ema_kimg`` thousand images) is what is shipped.

Training is resumable: ``checkpoint.pt`` (plain state_dicts, read with ``weights_only=True``) is
written atomically every ``checkpoint_every`` steps, and every step appends one JSON line to
``log.jsonl``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saminv.models.stylegan2 import Generator, GeneratorConfig
from saminv.training.run import TrainingRun
from saminv.training.teacher import Z_DIM, load_teacher

TEACHER_CHANNELS = (512, 256, 128, 64)  # DCGAN feature maps at 4, 8, 16, 32 px

FACES64 = GeneratorConfig(resolution=64, z_dim=Z_DIM, w_dim=512, n_mapping=8, mapping_lr_mul=0.01,
                          channel_base=4096, channel_max=128)


@dataclass
class DistillConfig:
    """Hyper-parameters of generator distillation (defaults: the shipped faces64 run)."""

    steps: int = 20_000
    batch: int = 16
    lr: float = 0.005  # generator (equalized learning rate)
    d_lr: float = 0.0005  # discriminator (plain init)
    pair_weight: float = 10.0
    adv_weight: float = 0.0
    r1_gamma: float = 0.05
    r1_every: int = 16
    ema_kimg: float = 10.0
    checkpoint_every: int = 250
    seed: int = 0
    mapping_lr_mul: float = 1.0
    hint_weight: float = 1.0


class Discriminator(nn.Module):
    """A light conv discriminator for 64x64 images: [N, 3, 64, 64] in [-1, 1] -> logits [N]."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128, 128, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 1), nn.LeakyReLU(0.2)]
        for cin, cout in zip(channels, channels[1:]):  # 64 -> 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(0.2), nn.AvgPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Conv2d(channels[-1] + 1, channels[-1], 3, padding=1), nn.LeakyReLU(0.2),
                                  nn.Flatten(), nn.Linear(channels[-1] * 16, channels[-1]), nn.LeakyReLU(0.2),
                                  nn.Linear(channels[-1], 1))

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        std = h.std(dim=0, unbiased=False).mean().expand(h.shape[0], 1, *h.shape[2:])  # minibatch stddev
        return self.head(torch.cat([h, std], dim=1)).squeeze(1)


class Distiller(TrainingRun):
    """State of one distillation run in ``out_dir`` (resumes from ``checkpoint.pt`` when present)."""

    desc = "distil faces64"

    def __init__(self, out_dir: Path, cfg: DistillConfig, device: str = "cpu") -> None:
        super().__init__(out_dir, cfg.checkpoint_every, device)
        self.cfg, self.device, self.total_steps = cfg, torch.device(device), cfg.steps
        torch.manual_seed(cfg.seed)
        self.teacher = load_teacher(self.device)
        self.G = Generator(replace(FACES64, mapping_lr_mul=cfg.mapping_lr_mul)).to(self.device).train()
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.D = Discriminator().to(self.device)
        # 1x1 projections of the student's 4..32 px block outputs onto the teacher's feature maps
        self.hints = nn.ModuleList(nn.Conv2d(b.out_channels, c, 1) for b, c in
                                   zip(self.G.synthesis.blocks, TEACHER_CHANNELS)).to(self.device)
        betas = (0.0, 0.99)
        self.opt_G = torch.optim.Adam([*self.G.parameters(), *self.hints.parameters()], lr=cfg.lr, betas=betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=cfg.d_lr, betas=betas)
        self.resume(self.device)

    def state_dict(self) -> dict:
        return {name: getattr(self, name).state_dict() for name in ("G", "G_ema", "D", "hints", "opt_G", "opt_D")
                } | {"config": asdict(self.cfg)}

    def load_state(self, state: dict) -> None:
        for name in ("G", "G_ema", "D", "hints", "opt_G", "opt_D"):
            getattr(self, name).load_state_dict(state[name])

    def train_step(self) -> dict[str, float]:
        cfg, G, D = self.cfg, self.G, self.D
        z = torch.randn(cfg.batch, Z_DIM, device=self.device)
        with torch.no_grad():
            teacher_feats, real = self.teacher.features(z)
        logs: dict[str, float] = {}

        # Generator: paired L1 (+ feature hints) + non-saturating adversarial.
        D.requires_grad_(False)
        ws, x, fake, feats = G.broadcast(G.mapping(z)), None, None, []
        for block in G.synthesis.blocks:
            x, fake = block(x, fake, ws, "random")
            feats.append(x)
        pair = (fake - real).abs().mean()
        loss_G = cfg.pair_weight * pair
        if cfg.hint_weight > 0:
            hint = sum((proj(f) - t).square().mean() for proj, f, t in zip(self.hints, feats, teacher_feats))
            loss_G = loss_G + cfg.hint_weight * hint
            logs["hint"] = hint.item()
        if cfg.adv_weight > 0:
            adv = F.softplus(-D(fake)).mean()
            loss_G = loss_G + cfg.adv_weight * adv
            logs["g_adv"] = adv.item()
        self.optimizer_step(self.opt_G, loss_G)
        logs["pair_l1"] = pair.item()
        logs["pair_psnr"] = float(10 * math.log10(4.0 / max((fake.detach() - real).square().mean().item(), 1e-12)))

        # Discriminator: logistic loss, lazy R1 on teacher samples.
        if cfg.adv_weight > 0:
            D.requires_grad_(True)
            loss_D = F.softplus(D(fake.detach())).mean() + F.softplus(-D(real)).mean()
            if self.step % cfg.r1_every == 0:
                real_r1 = real.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(D(real_r1).sum(), real_r1, create_graph=True)
                r1 = grad.square().sum(dim=(1, 2, 3)).mean()
                loss_D = loss_D + cfg.r1_gamma / 2 * r1 * cfg.r1_every
                logs["r1"] = r1.item()
            self.optimizer_step(self.opt_D, loss_D)
            logs["d_loss"] = loss_D.item()

        beta = 0.5 ** (cfg.batch / (cfg.ema_kimg * 1000))
        with torch.no_grad():
            for p_ema, p in zip(self.G_ema.parameters(), G.parameters()):
                p_ema.lerp_(p, 1 - beta)
            for b_ema, b in zip(self.G_ema.buffers(), G.buffers()):
                b_ema.copy_(b)
        return logs


def export_model(run: Distiller, out: Path) -> Path:
    """Write the run's EMA generator as a model directory: w_avg and the W prior are estimated here;
    tau keeps the default until ``saminv calibrate`` sets it."""
    from saminv.models.model_dir import Model, WPrior, save_model

    G = copy.deepcopy(run.G_ema).cpu().eval()
    G.mapping.w_avg.copy_(G.mean_w())
    model = Model(G, WPrior.estimate(G), meta={
        "name": Path(out).name,
        "source": {"format": "saminv-distilled", "teacher": "gan-face-generate 1.1.1 DCGAN",
                   "steps": run.step, "config": asdict(run.cfg)}})
    return save_model(model, Path(out), overwrite=True)
