"""The per-layer editing rule for multilayer SAM codes (paper Sec. 3.4).

An edit moves w+ by an offset delta. Regions inverted in W+ take w+ + delta in every layer. A region
inverted in F_k keeps its unedited block output there and takes the edit only in the layers after k:
at each F_k the edited pass blends the unedited features (with their delta_f_k) and the unedited
incoming RGB skip image back in under the mask m_k::

    f_k    <- lerp(f_k,    f_k^orig,    m_k)
    skip_k <- lerp(skip_k, skip_k^orig, m_k)

Blending the skip image as well as the features matters for the skip architecture: without it the
RGB contributed by the earlier, edited ToRGB layers would leak the edit into F_k regions. ``torch.lerp``
is exact at both ends (m = 1 gives f^orig, equal inputs give themselves), so an offset of zero
reproduces the reconstruction bit for bit and fully masked pixels keep their unedited values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saminv.editing.directions import Direction
from saminv.inversion.optimize import Codes
from saminv.models.model_dir import Model
from saminv.models.stylegan2 import NoiseMode
from saminv.ops.masked_residual import masked_residual


class Editor:
    """Edits of fixed SAM codes (N images). The unedited pass is computed once, at construction.

    ``codes``: w+ [N, n_latent, w_dim], delta_f_k [N, C_k, r_k, r_k] and masks [N, 1, r_k, r_k].
    """

    def __init__(self, model: Model, codes: Codes, noise_mode: NoiseMode = "const") -> None:
        G = model.generator
        assert codes.wplus.ndim == 3 and codes.wplus.shape[1:] == (G.cfg.n_latent, G.cfg.w_dim), codes.wplus.shape
        self.model, self.codes, self.noise_mode = model, codes, noise_mode
        self.unedited: dict[int, tuple[Tensor, Tensor | None]] = {}

        def record(k: int, x: Tensor, skip: Tensor | None) -> tuple[Tensor, Tensor | None]:
            if k in codes.deltas:
                x = masked_residual(x, codes.masks[k], codes.deltas[k])
                self.unedited[k] = (x, skip)
            return x, skip

        with torch.no_grad():
            self.reconstruction = G.synthesis.run(codes.wplus, hook=record, noise_mode=noise_mode)[1]

    @torch.no_grad()
    def render(self, offset: Tensor) -> Tensor:
        """Images [N, 3, R, R] in [-1, 1] of the codes edited by a w+ ``offset`` ([n_latent, w_dim] or
        [N, n_latent, w_dim]) under the per-layer rule. A zero offset returns the reconstruction exactly."""
        codes = self.codes

        def blend(k: int, x: Tensor, skip: Tensor | None) -> tuple[Tensor, Tensor | None]:
            if k not in codes.deltas:
                return x, skip
            mask = codes.masks[k]
            x = masked_residual(x, mask, codes.deltas[k])
            x_orig, skip_orig = self.unedited[k]
            x = torch.lerp(x, x_orig, mask)
            if skip is not None:
                skip = torch.lerp(skip, skip_orig, mask)
            return x, skip

        ws = codes.wplus + offset.to(codes.wplus)
        return self.model.generator.synthesis.run(ws, hook=blend, noise_mode=self.noise_mode)[1]

    def edit(self, direction: Direction, strength: float) -> Tensor:
        """Images [N, 3, R, R] edited by ``direction`` at ``strength`` (its layers only)."""
        return self.render(direction.offset(strength))

    def sweep(self, direction: Direction, strengths: list[float]) -> Tensor:
        """Images [S, N, 3, R, R], one batch per strength (so strength 0 is the exact reconstruction)."""
        return torch.stack([self.edit(direction, s) for s in strengths])
