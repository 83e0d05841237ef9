"""The resumable training loop shared by every ``saminv train`` command.

A run lives in one directory: ``checkpoint.pt`` (plain state_dicts and numbers, read back with
``weights_only=True``) is written atomically every ``checkpoint_every`` steps and at the end, and
every step appends one JSON line of its losses to ``log.jsonl``. Starting a run in a directory that
holds a checkpoint resumes it; a subclass says what its state is and what one step does.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same command trains data-parallel, one process per GPU or
CPU worker: the process group starts on first use (NCCL on CUDA, else gloo), every rank starts from
the same weights, draws its own batches (subclasses seed them with ``rank``), and
:meth:`TrainingRun.optimizer_step` averages the gradients over the ranks before each update (what
DistributedDataParallel does, without wrapping the networks, whose sub-modules the runs call
directly). Only rank 0 writes the checkpoint and the log.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm


def process_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _process_group(device: str | torch.device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")


class TrainingRun:
    """Base class: subclasses set ``desc``, ``cfg`` (a dataclass) and ``total_steps`` and implement ``train_step``,
    ``state_dict`` and ``load_state``."""

    desc = "train"
    total_steps = 0

    def __init__(self, out_dir: Path, checkpoint_every: int, device: str | torch.device = "cpu") -> None:
        self.out_dir, self.checkpoint_every = Path(out_dir), checkpoint_every
        self.rank, self.world = process_rank()
        if self.world > 1:
            _process_group(device)
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.step = 0

    def optimizer_step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` and update ``optimizer``'s parameters, averaging gradients over the ranks."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:
            import torch.distributed as dist

            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is None:  # unused on this rank this step: contributes zeros
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
        optimizer.step()

    @property
    def checkpoint(self) -> Path:
        """The run's ``checkpoint.pt``."""
        return self.out_dir / "checkpoint.pt"

    def train_step(self) -> dict[str, float]:
        """One optimisation step; returns the losses to log."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Everything needed to resume (state_dicts, tensors, numbers), without ``step``."""
        raise NotImplementedError

    def load_state(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (tensors already on the run's device)."""
        raise NotImplementedError

    def resume(self, device: str | torch.device = "cpu") -> None:
        """Load ``checkpoint.pt`` when the run directory has one; give ranks > 0 their own torch seed."""
        if self.checkpoint.is_file():
            state = torch.load(self.checkpoint, map_location=device, weights_only=True)
            self.load_state(state)
            self.step = int(state["step"])
            torch.set_rng_state(state["rng"])
        if self.rank:
            torch.manual_seed(self.cfg.seed + 1_000_003 * self.rank + self.step)

    def save(self) -> None:
        """Write the checkpoint atomically (temp file, then rename), with ``step`` and the torch RNG; rank 0 only."""
        if self.rank != 0:
            return
        tmp = self.checkpoint.with_suffix(".pt.tmp")
        torch.save({**self.state_dict(), "step": self.step, "rng": torch.get_rng_state()}, tmp)
        os.replace(tmp, self.checkpoint)

    def record(self) -> dict:
        """How the run trained, for ``config.json``: steps, its config, and the summed step time (seconds)."""
        log = self.out_dir / "log.jsonl"
        seconds = sum(json.loads(line).get("seconds", 0) for line in log.read_text().splitlines()) if log.is_file() else 0
        return {"steps": self.step, "config": asdict(self.cfg), "train_seconds": round(seconds)}

    def train(self, steps: int | None = None, progress: bool = True) -> None:
        """Train until ``steps`` total steps (default ``total_steps``), logging every step and
        checkpointing as it goes."""
        steps = steps or self.total_steps
        bar = tqdm(total=steps, initial=self.step, desc=self.desc, disable=not progress or self.rank != 0, unit="step")
        with open(self.out_dir / "log.jsonl" if self.rank == 0 else os.devnull, "a") as log:
            try:
                while self.step < steps:
                    t0 = time.time()
                    logs = self.train_step()
                    self.step += 1
                    log.write(json.dumps({"step": self.step, **logs, "seconds": round(time.time() - t0, 3)}) + "\n")
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
                    if self.step % self.checkpoint_every == 0 or self.step == steps:
                        log.flush()
                        self.save()
            finally:
                bar.close()
