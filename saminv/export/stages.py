"""The feed-forward path cut into exportable stages (torch modules with plain tensor inputs).

The synthesis network is cut at the SAM latent spaces: stage ``F<k>`` runs the blocks after the
previous space up to block k/2 (g_{i->k}) and applies, before that block's ToRGB, the masked residual
of paper Eq. 3 and the editing blend (Sec. 3.4, see :mod:`saminv.editing.edit`)::

    m      = area_resize(mask, r)                     # mask [N, 1, R, R] in [0, 1] at image size
    f_k    = g(f_i, skip_i, w+) + m * delta           # the masked residual (one ONNX node, see saminv.ops)
    f_k    = lerp(f_k,  f_keep,   m * keep)           # editing: keep the unedited F_k (keep = 1)
    skip   = lerp(skip, skip_keep, m * keep)          # ... and the unedited incoming RGB
    rgb    = ToRGB(f_k) + skip

With ``keep = 0`` the blend is the identity (plain inversion / rendering). With ``fp16`` the
features are computed in float16 inside the stage (styles, demodulation, ToRGB and the RGB image in
float32); the stage's inputs and outputs stay float32. The ``tail`` stage runs the
blocks after the last space to the image; ``mapping`` is z -> w. Every stage takes only the w+ rows
it uses (``w_slice``), so the runtime can pass slices of one w+ array.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saminv.models.stylegan2 import Generator, NoiseMode
from saminv.ops.masked_residual import exported_masked_residual


@dataclass(frozen=True)
class StagePlan:
    """Blocks ``first..last`` of the synthesis; ``space`` = "F<k>" when block ``last`` is a latent space
    (the stage then has the residual and blend inputs), None for the tail. ``w_rows`` = (start, stop)
    rows of w+ the stage reads."""

    name: str
    first: int
    last: int
    space: str | None

    @property
    def w_rows(self) -> tuple[int, int]:
        """(start, stop) rows of w+ [n_latent, w_dim] that blocks first..last read: block b's convs
        use rows 2b-1 and 2b (block 0: row 0), its ToRGB row 2b+1."""
        return max(2 * self.first - 1, 0), 2 * self.last + 2


def plan_stages(G: Generator) -> list[StagePlan]:
    """Synthesis stages of ``G``: one per latent space F_k, then the tail (if blocks remain)."""
    plans, first = [], 0
    for b in G.cfg.feature_blocks:
        assert b >= 1, "a latent space at the 4x4 block has no incoming skip image"
        plans.append(StagePlan(f"F{2 * b}", first, b, f"F{2 * b}"))
        first = b + 1
    if first < G.cfg.num_blocks:
        plans.append(StagePlan("tail", first, G.cfg.num_blocks - 1, None))
    return plans


class MappingStage(nn.Module):
    """z [N, z_dim] float32 -> w [N, w_dim] (no truncation; w_avg is in the manifest)."""

    def __init__(self, G: Generator) -> None:
        super().__init__()
        self.mapping = G.mapping

    def forward(self, *inputs: Tensor) -> Tensor:  # varargs, like SynthesisStage, for one export call
        (z,) = inputs
        return self.mapping(z)


class SynthesisStage(nn.Module):
    """One synthesis stage (see the module doc). Inputs, N the batch, r the stage resolution:

    * ``f_in`` [N, C_in, r/2, r/2], ``rgb_in`` [N, 3, r/2, r/2]: the previous stage's features and RGB
      skip image (absent for the first stage, which starts from the learned constant);
    * ``w_slice`` [N, stop - start, w_dim]: w+ rows ``plan.w_rows``;
    * space stages also: ``mask`` [N, 1, R, R], ``delta`` [N, C, r, r], ``keep`` [N, 1, 1, 1],
      ``f_keep`` [N, C, r, r], ``rgb_keep`` [N, 3, r, r].

    Outputs, space stages: ``f_out`` (F_k after residual and blend), ``rgb_blend`` (the blended
    incoming RGB at r) and ``rgb_out`` (the RGB after this block's ToRGB); the tail: ``image`` [N, 3, R, R].
    """

    def __init__(self, G: Generator, plan: StagePlan, noise_mode: NoiseMode = "const", fp16: bool = False) -> None:
        super().__init__()
        self.plan, self.noise_mode = plan, noise_mode
        self.dtype = torch.float16 if fp16 else torch.float32
        self.blocks = nn.ModuleList(G.synthesis.blocks[plan.first:plan.last + 1])
        self.resolution = G.cfg.resolution
        self.n_latent = G.cfg.n_latent

    def _run(self, features: Tensor | None, skip: Tensor | None, w_slice: Tensor, hook) -> tuple[Tensor, Tensor]:
        start = self.plan.w_rows[0]
        ws = F.pad(w_slice, (0, 0, start, self.n_latent - start - w_slice.shape[1]))  # rows at their w+ index
        x = features
        for block in self.blocks:  # features in self.dtype (the 4x4 block stays float32); RGB in float32
            x = None if x is None else x.to(self.dtype)
            x, skip = block(x, skip, ws, self.noise_mode, hook if block is self.blocks[-1] else None)
        return x.float(), skip

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        if self.plan.first == 0:
            features, skip, inputs = None, None, inputs
        else:
            features, skip, inputs = inputs[0], inputs[1], inputs[2:]
        if self.plan.space is None:
            (w_slice,) = inputs
            return (self._run(features, skip, w_slice, None)[1],)
        w_slice, mask, delta, keep, f_keep, skip_keep = inputs
        r = delta.shape[-1]
        m = F.avg_pool2d(mask, self.resolution // r) if self.resolution != r else mask
        seen = {}

        def residual_and_blend(k: int, x: Tensor, skip_in: Tensor | None) -> tuple[Tensor, Tensor | None]:
            weight = m * keep
            x = torch.lerp(exported_masked_residual(x, mask, delta), f_keep.to(x.dtype), weight.to(x.dtype))
            skip_in = torch.lerp(skip_in, skip_keep, weight)
            seen["skip_in"] = skip_in
            return x, skip_in

        x, rgb = self._run(features, skip, w_slice, residual_and_blend)
        return x, seen["skip_in"], rgb


def stage_inputs(G: Generator, plan: StagePlan, n: int = 2, seed: int = 0) -> dict[str, Tensor]:
    """Example inputs of a stage, by name, for export and checks (random, with a non-trivial mask)."""
    g = torch.Generator().manual_seed(seed)
    cfg = G.cfg
    out: dict[str, Tensor] = {}
    if plan.first > 0:
        r_in = cfg.block_resolution(plan.first - 1)
        out["f_in"] = torch.randn(n, cfg.channels(r_in), r_in, r_in, generator=g)
        out["rgb_in"] = torch.randn(n, 3, r_in, r_in, generator=g) * 0.5
    start, stop = plan.w_rows
    w = G.mapping(torch.randn(n, cfg.z_dim, generator=g)).detach()
    out["w_slice"] = w[:, None].repeat(1, stop - start, 1) + 0.1 * torch.randn(n, stop - start, cfg.w_dim, generator=g)
    if plan.space is not None:
        r = cfg.block_resolution(plan.last)
        c = cfg.channels(r)
        out["mask"] = (torch.rand(n, 1, cfg.resolution, cfg.resolution, generator=g) > 0.5).float()
        out["delta"] = 0.2 * torch.randn(n, c, r, r, generator=g)
        out["keep"] = torch.tensor([0.0, 1.0] * (n // 2) + [0.0] * (n % 2)).view(n, 1, 1, 1)
        out["f_keep"] = torch.randn(n, c, r, r, generator=g)
        out["rgb_keep"] = torch.randn(n, 3, r, r, generator=g) * 0.5
    return out


def output_names(plan: StagePlan) -> list[str]:
    """ONNX output names of a stage: the tail gives ``image``; a latent-space stage gives the F_k
    features ``f_out`` [N, C, r, r], the blended incoming skip image ``rgb_blend`` and ``rgb_out`` (after
    this block's ToRGB), both [N, 3, r, r] (see :class:`SynthesisStage`)."""
    return ["image"] if plan.space is None else ["f_out", "rgb_blend", "rgb_out"]
