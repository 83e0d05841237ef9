"""Training the invertibility predictor S_l on shards of ``saminv train invertibility-data`` (paper Eq. 2:
l2 regression of the LPIPS spatial error maps of each latent space).

The data set is small enough to hold in memory (uint8 images, float16 maps). Each step samples a
batch, flips it horizontally at random (images and maps together), and minimises the mean squared
error between predicted and measured maps. The ImageNet backbone trains with a 10x smaller learning
rate and its BatchNorm statistics frozen (small CPU batches). Resumable: ``checkpoint.pt`` (weights,
optimizer, step) and ``log.jsonl`` in the run directory.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from saminv.models.efficientnet import load_backbone
from saminv.models.predictor import InvertibilityPredictor


@dataclass
class PredictorConfig:
    steps: int = 3000
    batch: int = 16
    lr: float = 1e-3
    backbone_lr_scale: float = 0.1
    checkpoint_every: int = 200
    seed: int = 0


def load_shards(data: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All shards of a data set: images uint8 [N, R, R, 3], errors float32 [N, S, R, R], space names.
    Raises FileNotFoundError when ``data`` has no shards."""
    paths = sorted(Path(data).glob("shard_*.npz"))
    if not paths:
        raise FileNotFoundError(f"{data}: no shard_*.npz (make them with saminv train invertibility-data)")
    images, errors, spaces = [], [], None
    for path in paths:
        with np.load(path) as shard:
            images.append(shard["images"])
            errors.append(shard["errors"].astype(np.float32))
            spaces = [str(s) for s in shard["spaces"]]
    return np.concatenate(images), np.concatenate(errors), spaces


class PredictorTrainer:
    """One training run in ``out_dir`` on the data set ``data`` (resumes from its checkpoint)."""

    def __init__(self, data: Path, out_dir: Path, cfg: PredictorConfig, device: str = "cpu") -> None:
        self.images, self.errors, self.spaces = load_shards(data)
        self.out_dir, self.cfg, self.device = Path(out_dir), cfg, device
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.net = InvertibilityPredictor(self.spaces).to(device)
        self.net.backbone.load_state_dict(load_backbone().state_dict())
        head_params = [p for n, p in self.net.named_parameters() if not n.startswith("backbone.")]
        self.opt = torch.optim.Adam([{"params": head_params, "lr": cfg.lr},
                                     {"params": self.net.backbone.parameters(), "lr": cfg.lr * cfg.backbone_lr_scale}])
        self.step = 0
        self.rng = np.random.default_rng(cfg.seed)
        if (self.out_dir / "checkpoint.pt").is_file():
            state = torch.load(self.out_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
            self.net.load_state_dict(state["net"])
            self.opt.load_state_dict(state["opt"])
            self.step = int(state["step"])
            self.rng = np.random.default_rng([cfg.seed, self.step])

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.rng.integers(0, len(self.images), self.cfg.batch)
        x = torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        y = torch.from_numpy(self.errors[idx])
        flip = torch.from_numpy(self.rng.random(len(idx)) < 0.5)
        x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
        return x.to(self.device), y.to(self.device)

    def train_step(self) -> float:
        self.net.train()
        self.net.backbone.eval()  # frozen BatchNorm statistics
        x, y = self.batch()
        loss = (self.net(x) - y).square().mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        return loss.item()

    def save(self) -> None:
        tmp = self.out_dir / "checkpoint.pt.tmp"
        torch.save({"net": self.net.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                    "spaces": self.spaces, "config": asdict(self.cfg)}, tmp)
        tmp.replace(self.out_dir / "checkpoint.pt")

    def train(self, progress: bool = True) -> None:
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="predictor", unit="step", disable=not progress)
        with open(self.out_dir / "log.jsonl", "a") as log:
            while self.step < self.cfg.steps:
                t0 = time.time()
                loss = self.train_step()
                log.write(json.dumps({"step": self.step, "loss": loss, "seconds": round(time.time() - t0, 3)}) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.2e}")
                if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                    log.flush()
                    self.save()
        bar.close()
