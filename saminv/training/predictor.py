"""Training an invertibility predictor S_l on shards of ``saminv train invertibility-data`` (paper Eq. 2:
l2 regression of the LPIPS spatial error maps of each latent space).

The data set's regime (its ``info.json``) decides which predictor this trains: ``optimization`` data
(single-space optimizations) -> ``predictor``; ``encoder`` data (the encoders' single-space passes) ->
``encoder_predictor`` (:data:`saminv.models.model_dir.PREDICTORS`).

The data set is small enough to hold in memory (uint8 images, float16 maps). Each step samples a
batch, flips it horizontally at random and, with ``shift`` > 0, moves it by up to ``shift`` pixels in
each direction (images and maps together, reflect-padded at the border), and minimises the squared error
between predicted and measured maps, each space's divided by the variance of its maps in the data
(so the small F_k errors count as much as W+'s). The ImageNet backbone trains with a 10x smaller learning
rate and its BatchNorm statistics frozen (small CPU batches). Learning rates are constant, then ramp
down to zero along a cosine over the last ``rampdown`` of the steps (the StyleGAN2-projector ramp, no
warm-up), so the final weights are not one noisy Adam step among many. The ramp is relative to the total
``steps``: resuming a finished run with more steps continues at the rate that total gives. Resumable:
``checkpoint.pt`` (weights, optimizer, step) and ``log.jsonl`` in the run directory.

A run may start from another predictor with the same spaces (``start``) instead of the ImageNet trunk alone,
keeping only its own data's error scale: an optimization-regime predictor started from the encoder-regime
one (faces64: 4,096 encoder-regime images against 152) ranks held-out F2/F4/F8 segments better (docs/feedforward.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from saminv.inversion.optimize import projector_lr
from saminv.models.fpn import pretrained_trunk_groups
from saminv.models.predictor import InvertibilityPredictor
from saminv.training.invertibility_data import recorded_config, unfinished_shards
from saminv.training.run import TrainingRun


@dataclass
class PredictorConfig:
    """Hyper-parameters of ``saminv train predictor`` (faces64's shipped predictors used ``--steps``
    2,000 and 8,000; docs/feedforward.md, "Reproducing the shipped weights").

    Adam at ``lr`` for the decoder and heads, ``backbone_lr_scale`` times it for the pretrained
    EfficientNet-Lite0 trunk; no warm-up, cosine ramp-down over the last ``rampdown`` of ``steps``.
    ``shift``: the largest random translation of a batch item in pixels (0: flips only; faces64's optimization
    ``predictor`` used 6 at 64 px, which ranked held-out segments better: docs/feedforward.md).
    """

    steps: int = 3000
    batch: int = 16
    lr: float = 1e-3
    backbone_lr_scale: float = 0.1
    rampdown: float = 0.25
    checkpoint_every: int = 200
    seed: int = 0
    shift: int = 0


def load_shards(*data: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All shards of one or more data sets, in order: images uint8 [N, R, R, 3], errors float32
    [N, S, R, R], space names. A shard measured twice (``errors_mirrored``, see
    :mod:`saminv.training.invertibility_data`) gives the mean of its two maps. Raises FileNotFoundError when
    a data set has no shards, ValueError when the data sets' spaces differ or a data set is unfinished
    (:func:`saminv.training.invertibility_data.unfinished_shards`: a predictor trained on part of it, or on a
    mix of once- and twice-measured maps, would not be the one its command describes)."""
    images, errors, spaces = [], [], None
    for directory in data:
        paths = sorted(Path(directory).glob("shard_*.npz"))
        if not paths:
            raise FileNotFoundError(f"{directory}: no shard_*.npz (make them with saminv train invertibility-data)")
        unfinished = unfinished_shards(directory)
        if unfinished:
            listed = ", ".join(unfinished[:3]) + (", ..." if len(unfinished) > 3 else "")
            raise ValueError(f"{directory} is unfinished: {len(unfinished)} shard(s) missing or measured once "
                             f"({listed}); rerun the saminv train invertibility-data command that made it (it resumes)")
        for path in paths:
            with np.load(path) as shard:
                names = [str(s) for s in shard["spaces"]]
                if spaces is not None and names != spaces:
                    raise ValueError(f"{path}: spaces {names}, but the data so far has {spaces}")
                images.append(shard["images"])
                measured = [shard[key].astype(np.float32) for key in ("errors", "errors_mirrored") if key in shard.files]
                errors.append(sum(measured) / len(measured))
                spaces = names
    return np.concatenate(images), np.concatenate(errors), spaces


def data_regime(*data: Path) -> str:
    """The inversion regime one or more data sets were made with (``info.json``; data sets older than
    regimes are optimization data). Raises ValueError when they differ."""
    regimes = {cfg.regime if cfg else "optimization" for cfg in map(recorded_config, data)}
    if len(regimes) > 1:
        raise ValueError(f"the data sets mix regimes ({', '.join(sorted(regimes))}): a predictor learns one")
    return regimes.pop()


def shifted(batch: torch.Tensor, offsets: np.ndarray, shift: int) -> torch.Tensor:
    """Each item of ``batch`` [B, C, H, W] moved by ``offsets`` [B, 2] (row, column; each in 0..2 * shift,
    where ``shift`` is no move) with reflect padding: item i becomes rows ``offsets[i, 0]`` ... and columns
    ``offsets[i, 1]`` ... of the padded item. Same shape and dtype as ``batch``."""
    h, w = batch.shape[-2:]
    padded = torch.nn.functional.pad(batch, (shift,) * 4, mode="reflect")
    return torch.stack([item[:, a:a + h, b:b + w] for item, (a, b) in zip(padded, offsets)])


class PredictorTrainer(TrainingRun):
    """One training run in ``out_dir`` on one data set or several of the same regime and spaces, pooled
    (``data``; resumes from its checkpoint). Raises FileNotFoundError or ValueError (:func:`load_shards`,
    :func:`data_regime`) and ValueError for a ``start`` of another shape."""

    desc = "predictor"

    def __init__(self, data: Path | list[Path], out_dir: Path, cfg: PredictorConfig, device: str = "cpu",
                 start: InvertibilityPredictor | None = None) -> None:
        data = [data] if isinstance(data, Path) else data
        self.images, self.errors, self.spaces = load_shards(*data)
        self.regime = data_regime(*data)
        if not 0 <= cfg.shift < self.images.shape[1]:
            raise ValueError(f"shift {cfg.shift}: must be 0 to {self.images.shape[1] - 1} px for {self.images.shape[1]} px images")
        super().__init__(out_dir, cfg.checkpoint_every, device)  # bad data or settings leave no run directory behind
        self.cfg, self.device, self.total_steps = cfg, device, cfg.steps
        torch.manual_seed(cfg.seed)
        self.net = InvertibilityPredictor(self.spaces).to(device)
        if start is None:
            self.net.pyramid.load_pretrained()
        elif start.init_kwargs() != self.net.init_kwargs():
            raise ValueError(f"the start predictor ({start.init_kwargs()}) does not match this run's network "
                             f"({self.net.init_kwargs()}): the data's spaces and the default width")
        else:
            self.net.load_state_dict(start.state_dict())
        self.net.scale.copy_(torch.from_numpy(self.errors.mean(axis=(0, 2, 3))))
        # each space's squared error in units of its variance: F6/F8 errors are 10x smaller than W+'s
        self.weights = torch.from_numpy(1.0 / self.errors.var(axis=(0, 2, 3))).view(1, -1, 1, 1).to(device)
        self.opt = torch.optim.Adam(pretrained_trunk_groups(self.net, self.net.pyramid, cfg.lr, cfg.backbone_lr_scale))
        self.base_lrs = [group["lr"] for group in self.opt.param_groups]
        self.resume(device)
        self.rng = np.random.default_rng([cfg.seed, self.step, self.rank])  # batches: own stream per rank and resume

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "spaces": self.spaces,
                "config": asdict(self.cfg)}

    def load_state(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch: images [B, 3, R, R] in [-1, 1] and their error maps e_l [B, S, R, R] (LPIPS units),
        each pair flipped left-right with probability 0.5, then shifted together (``cfg.shift``)."""
        idx = self.rng.integers(0, len(self.images), self.cfg.batch)
        x = torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        y = torch.from_numpy(self.errors[idx])
        flip = torch.from_numpy(self.rng.random(len(idx)) < 0.5)
        x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
        if self.cfg.shift:
            offsets = self.rng.integers(0, 2 * self.cfg.shift + 1, (len(idx), 2))
            x, y = (shifted(t, offsets, self.cfg.shift) for t in (x, y))
        return x.to(self.device), y.to(self.device)

    def train_step(self) -> dict[str, float]:
        self.net.train()
        self.net.pyramid.backbone.eval()  # frozen BatchNorm statistics
        for group, base in zip(self.opt.param_groups, self.base_lrs):
            group["lr"] = projector_lr(self.step, self.total_steps, base, rampup=0.0, rampdown=self.cfg.rampdown)
        x, y = self.batch()
        loss = ((self.net(x) - y).square() * self.weights).mean()
        self.optimizer_step(self.opt, loss)
        return {"loss": loss.item(), "lr": self.opt.param_groups[0]["lr"]}
