"""Feed-forward SAM: invertibility maps from the predictor S_l and codes from the encoders.

* :func:`predicted_maps`: one forward pass of the model's invertibility predictor (paper Eq. 2) of a
  regime gives the per-space error maps that would otherwise be measured by inverting in every space:
  with the optimization (``optimization`` regime) or with the encoders (``encoder`` regime). The
  optimization regime averages it with a pass over the mirrored image (:data:`MIRROR_AVERAGED`).
* :func:`encode_wplus`: the W+ encoder's pass (w+, its reconstruction and F_k features), made once per
  image: encoder mode measures the W+ error of that reconstruction (to anchor the predicted maps) and
  the Δf encoders read it.
* :func:`encode_each_space`, :func:`encoder_error_maps`: the encoder regime's measured maps: the LPIPS
  spatial error (Eq. 1) of the encoders' inversion in each space alone (W+: the W+ encoder; F_k: plus
  Δf_k everywhere). One pass per space, so measuring them is cheap (the encoder predictor's data).
* :func:`wplus_features`: render w+ and keep the generator's F_k features (what the Δf encoders read).
* :func:`encode`: phi = {w+, Δf_k} in one pass: the W+ encoder, the W+ reconstruction, then each
  masked F_k's Δf encoder; the composed image is paper Eq. 3-4 (``Codes.render``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saminv.errors import InputError
from saminv.inversion.optimize import Codes
from saminv.models.lpips import LPIPS
from saminv.models.model_dir import PREDICTORS, Model
from saminv.models.stylegan2 import NoiseMode


# Regimes whose predicted maps average the image's pass with the mirrored image's (mirrored back). The
# predictors train on left-right flips, so both passes estimate the same maps and their mean is less noisy:
# over eight optimization predictors of faces64, the average raised the mean Spearman on the 16 held-out faces
# in every space (W+ +0.020, F6 +0.017) and moved that of the photos and patches by under 0.01
# (docs/feedforward.md, "What falls short"). The encoder predictor gained nothing measurable; the encoder regime
# stays one pass: it is the latency path, which the runtime serves with the exported single-pass predictor.
MIRROR_AVERAGED = ("optimization",)


@dataclass
class WPlusPass:
    """The W+ encoder's pass over N images: ``wplus`` [N, n_latent, w_dim], its ``reconstruction``
    [N, 3, R, R] in [-1, 1] and the reconstruction's ``features`` {k: F_k [N, C_k, r_k, r_k]}."""

    wplus: Tensor
    reconstruction: Tensor
    features: dict[int, Tensor]


@torch.no_grad()
def encode_wplus(model: Model, images: Tensor, noise_mode: NoiseMode = "const") -> WPlusPass:
    """The W+ encoder on images [N, 3, R, R] in [-1, 1], then the render of its w+. Raises InputError
    when the model has no encoders."""
    wplus = model.network("encoders").wplus(images)
    return WPlusPass(wplus, *wplus_features(model, wplus, noise_mode))


@torch.no_grad()
def predicted_maps(model: Model, images: Tensor, names: list[str], regime: str = "optimization") -> Tensor:
    """Predicted LPIPS error maps [N, S, R, R] (>= 0) of images [N, 3, R, R] in [-1, 1] for the spaces
    ``names``, by the predictor of ``regime`` ("optimization" or "encoder"); in the regimes of
    :data:`MIRROR_AVERAGED`, the mean of the images' pass and the mirrored images' pass (mirrored back), so
    the maps of a mirrored image are the mirrored maps. Raises InputError when the model has no such
    predictor or the predictor lacks a space."""
    net = model.network(PREDICTORS[regime])
    missing = [n for n in names if n not in net.spaces]
    if missing:
        raise InputError(f"the predictor of {model.name} has no map for {', '.join(missing)} (it has {net.spaces})")
    maps = net(images)
    if regime in MIRROR_AVERAGED:
        maps = (maps + net(images.flip(-1)).flip(-1)) / 2
    return maps[:, [net.spaces.index(n) for n in names]]


def wplus_features(model: Model, wplus: Tensor, noise_mode: NoiseMode = "const") -> tuple[Tensor, dict[int, Tensor]]:
    """Render w+ [N, n_latent, w_dim]: (image [N, 3, R, R], {k: F_k features [N, C_k, r_k, r_k]})."""
    features: dict[int, Tensor] = {}

    def keep(k: int, x: Tensor, skip: Tensor | None) -> tuple[Tensor, Tensor | None]:
        features[k] = x
        return x, skip

    _, image = model.generator.synthesis.run(wplus, noise_mode=noise_mode, hook=keep)
    return image, features


def encode(model: Model, images: Tensor, masks: dict[int, Tensor], noise_mode: NoiseMode = "const",
           first: WPlusPass | None = None) -> Codes:
    """Feed-forward codes of images [N, 3, R, R] in [-1, 1]: w+ from the W+ encoder (``first``, its pass
    when already made) and Δf_k from the F_k encoders for every k whose mask in ``masks``
    ({k: [N or 1, 1, r_k, r_k]}) is not all zero. Raises InputError when the model has no encoders."""
    nets = model.network("encoders")
    first = first or encode_wplus(model, images, noise_mode)
    used = [k for k, m in masks.items() if bool(m.any())]  # an all-zero mask needs no delta_f
    deltas = {k: nets.deltas[f"F{k}"](images, first.reconstruction, first.features[k]) for k in used}
    n = images.shape[0]
    return Codes(first.wplus, deltas, {k: masks[k].expand(n, -1, -1, -1) for k in used})


@torch.no_grad()
def encode_each_space(model: Model, lpips: LPIPS, images: Tensor, names: list[str],
                      noise_mode: NoiseMode = "const",
                      first: WPlusPass | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The encoders' inversion of images [N, 3, R, R] in [-1, 1] in each space of ``names`` alone ("W+" or
    "F<k>"; F_k = the encoder's w+ plus Δf_k with a mask of ones): (w+ [N, n_latent, w_dim], renders
    [S, N, 3, R, R] in [-1, 1], LPIPS spatial error maps [N, S, R, R] >= 0). Raises InputError when the
    model has no encoders. ``first``: the W+ encoder's pass when already made."""
    nets = model.network("encoders")
    first = first or encode_wplus(model, images, noise_mode)
    renders = []
    for name in names:
        if name == "W+":
            renders.append(first.reconstruction)
            continue
        k = int(name[1:])
        delta = nets.deltas[name](images, first.reconstruction, first.features[k])
        renders.append(model.generator.synthesis(first.wplus, {k: (delta.new_ones(1, 1, 1, 1), delta)},
                                                 noise_mode=noise_mode))
    renders = torch.stack(renders)
    s, n = renders.shape[:2]
    errors = lpips(renders.flatten(0, 1), images.repeat(s, 1, 1, 1), spatial=True)[:, 0]
    return first.wplus, renders, errors.view(s, n, *errors.shape[-2:]).transpose(0, 1)


@torch.no_grad()
def encoder_error_maps(model: Model, lpips: LPIPS, images: Tensor, names: list[str],
                       noise_mode: NoiseMode = "const", first: WPlusPass | None = None) -> Tensor:
    """Measured encoder-regime invertibility: LPIPS spatial error maps [N, S, R, R] (>= 0) of images
    [N, 3, R, R] in [-1, 1] inverted by the encoders in each space of ``names`` alone
    (:func:`encode_each_space`). Raises InputError when the model has no encoders."""
    return encode_each_space(model, lpips, images, names, noise_mode, first)[2]
