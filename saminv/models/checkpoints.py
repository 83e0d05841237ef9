"""Convert StyleGAN2 checkpoints into saminv models: rosinality (stylegan2-pytorch) ``.pt`` files here,
NVIDIA stylegan2-ada-pytorch ``.pkl`` network pickles through :mod:`saminv.models.nvidia_pickle`.

A rosinality checkpoint is a dict saved with ``torch.save``: ``g_ema`` (the generator state dict,
required), optionally ``latent_avg`` [w_dim] (written by ``convert_weight.py``), ``args`` (an
``argparse.Namespace`` written by ``train.py``), ``g``, ``d``, ``g_optim``, ``d_optim``, ... Only
``g_ema``, ``latent_avg`` and ``args`` are read.

Both implementations store equalized-learning-rate weights raw (scaled at run time), so the
conversion is a renaming plus a few reshapes (``g_ema`` key -> saminv key)::

    style.{i}.weight/bias [w, z|w]            -> mapping.fcs.{i-1}.weight/bias     (i = 1..n_mlp)
    input.input [1, C, 4, 4]                  -> synthesis.blocks.0.const
    conv1.*  / to_rgb1.*                      -> synthesis.blocks.0.conv1.* / .torgb.*
    convs.{2b-2}.* / convs.{2b-1}.*           -> synthesis.blocks.{b}.conv0.* / .conv1.*   (b >= 1)
    to_rgbs.{b-1}.*                           -> synthesis.blocks.{b}.torgb.*
    noises.noise_0 / noise_{2b-1} / noise_{2b} [1, 1, r, r]
                                              -> blocks.0.conv1 / blocks.{b}.conv0 / .conv1 .noise_const

and inside a layer: ``conv.weight`` [1, O, I, k, k] -> ``conv.weight`` [O, I, k, k],
``conv.modulation.*`` -> ``conv.affine.*``, ``noise.weight`` [1] -> ``noise_strength``,
``activate.bias`` [O] -> ``bias``, ToRGB ``bias`` [1, 3, 1, 1] -> ``bias`` [3]. The blur buffers
(``convs.{2b-2}.conv.blur.kernel``, ``to_rgbs.{j}.upsample.kernel``) carry no weights; they are
checked to be the standard [1, 3, 3, 1] filter and dropped.

Loading never executes code from the file: ``torch.load(weights_only=True)`` with exactly one
extra allowed class, ``argparse.Namespace`` (NVIDIA pickles: :class:`~saminv.models.nvidia_pickle.SafeUnpickler`).
Every problem is an :class:`InputError` whose message is one line naming the file.
"""

from __future__ import annotations

import argparse
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from saminv.errors import InputError
from saminv.models import nvidia_pickle
from saminv.models.model_dir import Model, WPrior, file_sha256
from saminv.models.stylegan2 import Generator, GeneratorConfig, blur_kernel

ROSINALITY_LR_MLP = 0.01  # rosinality's default ``lr_mlp`` (the mapping's lr multiplier)
ROSINALITY_CHANNEL_MULTIPLIER = 2  # rosinality's default; only used when the shapes do not fix it
ROSINALITY_CHANNEL_MAX = 512  # channels at 4..32 px; above, 16384 * channel_multiplier / res

_STANDARD_BLUR = blur_kernel() * 4  # rosinality stores the upsampling gain in its blur kernels (sum 4)
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80

_STYLED = {  # rosinality StyledConv suffix -> saminv StyledConv suffix
    "conv.weight": "conv.weight",
    "conv.modulation.weight": "conv.affine.weight",
    "conv.modulation.bias": "conv.affine.bias",
    "noise.weight": "noise_strength",
    "activate.bias": "bias",
}
_TORGB = {  # rosinality ToRGB suffix -> saminv ToRGB suffix
    "conv.weight": "conv.weight",
    "conv.modulation.weight": "conv.affine.weight",
    "conv.modulation.bias": "conv.affine.bias",
    "bias": "bias",
}


# --------------------------------------------------------------------------------------- key map


@dataclass(frozen=True)
class KeyLayout:
    """How a checkpoint's generator state dict maps onto saminv's :class:`Generator`.

    ``keys``: checkpoint key -> saminv key (every saminv key but ``mapping.w_avg`` is the image of one);
    ``filters``: weightless resampling buffers with their expected (standard) value, checked and dropped;
    ``source_shape(key, saminv_shape)``: the shape the checkpoint tensor must have (the rest is a reshape)."""

    keys: Mapping[str, str]
    filters: Mapping[str, Tensor]
    source_shape: Callable[[str, torch.Size], tuple[int, ...]]


def rosinality_layout(cfg: GeneratorConfig) -> KeyLayout:
    """The :class:`KeyLayout` of a rosinality ``g_ema`` for ``cfg``."""
    return KeyLayout(key_map(cfg.num_blocks, cfg.n_mapping), blur_keys(cfg.num_blocks), _source_shape)


def nvidia_layout(cfg: GeneratorConfig, resample_filters: bool = True) -> KeyLayout:
    """The :class:`KeyLayout` of an NVIDIA ``G_ema`` for ``cfg`` (:mod:`saminv.models.nvidia_pickle`); without
    ``resample_filters`` for TensorFlow networks, which store no filter buffers (their ``resample_kernel`` setting
    is checked by :func:`~saminv.models.nvidia_pickle.tf_generator`)."""
    filters = nvidia_pickle.filter_keys(cfg.num_blocks) if resample_filters else {}
    return KeyLayout(nvidia_pickle.key_map(cfg.num_blocks, cfg.n_mapping), filters, nvidia_pickle.source_shape)


def key_map(num_blocks: int, n_mlp: int) -> dict[str, str]:
    """The ``g_ema`` key -> saminv state-dict key mapping for a generator of ``num_blocks`` blocks
    (resolution ``4 * 2**(num_blocks - 1)``) and ``n_mlp`` mapping layers. Every saminv key except
    ``mapping.w_avg`` (from ``latent_avg``) is the image of exactly one rosinality key."""
    m: dict[str, str] = {}
    for i in range(1, n_mlp + 1):
        for p in ("weight", "bias"):
            m[f"style.{i}.{p}"] = f"mapping.fcs.{i - 1}.{p}"

    def layer(src: str, dst: str, table: Mapping[str, str]) -> None:
        for s, d in table.items():
            m[f"{src}.{s}"] = f"{dst}.{d}"

    blk = "synthesis.blocks"
    m["input.input"] = f"{blk}.0.const"
    layer("conv1", f"{blk}.0.conv1", _STYLED)
    layer("to_rgb1", f"{blk}.0.torgb", _TORGB)
    m["noises.noise_0"] = f"{blk}.0.conv1.noise_const"
    for b in range(1, num_blocks):
        layer(f"convs.{2 * b - 2}", f"{blk}.{b}.conv0", _STYLED)
        layer(f"convs.{2 * b - 1}", f"{blk}.{b}.conv1", _STYLED)
        layer(f"to_rgbs.{b - 1}", f"{blk}.{b}.torgb", _TORGB)
        m[f"noises.noise_{2 * b - 1}"] = f"{blk}.{b}.conv0.noise_const"
        m[f"noises.noise_{2 * b}"] = f"{blk}.{b}.conv1.noise_const"
    return m


def blur_keys(num_blocks: int) -> dict[str, Tensor]:
    """The weightless blur buffers of ``g_ema`` with their expected values (4x4, sum 4)."""
    out = {}
    for b in range(1, num_blocks):
        out[f"convs.{2 * b - 2}.conv.blur.kernel"] = _STANDARD_BLUR
        out[f"to_rgbs.{b - 1}.upsample.kernel"] = _STANDARD_BLUR
    return out


def _source_shape(src_key: str, dst_shape: torch.Size) -> tuple[int, ...]:
    """Shape the rosinality tensor must have to become a saminv tensor of ``dst_shape``."""
    if src_key.endswith("conv.weight"):  # [1, O, I, k, k] -> [O, I, k, k]
        return (1, *dst_shape)
    if re.fullmatch(r"(to_rgb1|to_rgbs\.\d+)\.bias", src_key):  # [1, 3, 1, 1] -> [3]
        return (1, 3, 1, 1)
    return tuple(dst_shape)


# ----------------------------------------------------------------------------- config inference


def _count(sd: Mapping[str, Any], fmt: str, start: int) -> int:
    n = 0
    while fmt.format(start + n) in sd:
        n += 1
    return n


def infer_config(sd: Mapping[str, Tensor], args: argparse.Namespace | None = None
                 ) -> tuple[GeneratorConfig, int | float]:
    """Infer the saminv :class:`GeneratorConfig` and rosinality's ``channel_multiplier`` from a
    ``g_ema`` state dict (and ``args`` when the checkpoint has them).

    * ``n_mlp`` = number of ``style.{i}.weight`` (i = 1, 2, ...); ``w_dim, z_dim`` = the shape of
      ``style.1.weight`` (rosinality has z_dim == w_dim);
    * ``resolution`` = ``2 ** (n_to_rgbs + 2)`` (``to_rgbs.{j}`` for 8 px .. resolution);
    * channels: rosinality uses 512 up to 32 px and ``16384 * cm / res`` above, i.e. saminv's
      ``min(channel_base // res, channel_max)`` with ``channel_base = 16384 * cm`` and
      ``channel_max = 512`` (exact for cm <= 2). ``cm`` is read off the last ToRGB's input
      channels when the resolution is >= 64 px; below, the shapes do not depend on it, and
      ``args.channel_multiplier`` (default 2) is used;
    * ``mapping_lr_mul`` = ``args.lr_mlp`` if present, else 0.01.

    The channels per resolution (``input.input`` and the ToRGB inputs) must match the inferred
    config; :func:`convert_state_dict` then verifies every shape against a generator built from it.
    Raises ValueError (one line, naming the key) on missing structure or a foreign channel layout.
    """
    n_mlp = _count(sd, "style.{}.weight", 1)
    if n_mlp == 0:
        raise ValueError("missing key 'style.1.weight' (no mapping network)")
    w_dim, z_dim = _shape_of(sd, "style.1.weight", ndim=2)
    n_rgbs = _count(sd, "to_rgbs.{}.conv.weight", 0)
    resolution = 2 ** (n_rgbs + 2)
    if resolution < 16:
        raise ValueError(f"resolution {resolution} px (found {n_rgbs} 'to_rgbs' layers) is not "
                         "supported; saminv needs >= 16 px")
    n_noise = _count(sd, "noises.noise_{}", 0)
    if n_noise < 2 * n_rgbs + 1:
        raise ValueError(f"missing key 'noises.noise_{n_noise}' ({resolution} px needs "
                         f"noise_0..noise_{2 * n_rgbs})")

    cm_arg = getattr(args, "channel_multiplier", None)
    if resolution >= 64:
        top = _shape_of(sd, f"to_rgbs.{n_rgbs - 1}.conv.weight", ndim=5)[2]
        channel_base = top * resolution
        cm = channel_base // 16384 if channel_base % 16384 == 0 else channel_base / 16384
    else:
        cm = cm_arg if isinstance(cm_arg, int) and cm_arg > 0 else ROSINALITY_CHANNEL_MULTIPLIER
        channel_base = 16384 * cm
    lr_mlp = getattr(args, "lr_mlp", None)
    lr_mlp = float(lr_mlp) if isinstance(lr_mlp, (int, float)) and lr_mlp > 0 else ROSINALITY_LR_MLP
    cfg = GeneratorConfig(resolution=resolution, z_dim=int(z_dim), w_dim=int(w_dim), n_mapping=n_mlp,
                          mapping_lr_mul=lr_mlp, channel_base=int(channel_base),
                          channel_max=ROSINALITY_CHANNEL_MAX)
    found = [_shape_of(sd, "input.input", ndim=4)[1]]
    found += [_shape_of(sd, f"to_rgbs.{j}.conv.weight", ndim=5)[2] for j in range(n_rgbs)]
    wanted = [cfg.channels(cfg.block_resolution(b)) for b in range(cfg.num_blocks)]
    if found != wanted:
        raise ValueError(f"channels per resolution (4 px up) {found} do not follow rosinality's layout "
                         f"(512 up to 32 px, 16384 * cm / res above, cm <= 2): expected {wanted}")
    return cfg, cm


def _shape_of(sd: Mapping[str, Any], key: str, ndim: int) -> tuple[int, ...]:
    t = sd.get(key)
    if not isinstance(t, Tensor):
        raise ValueError(f"missing key {key!r}")
    if t.ndim != ndim:
        raise ValueError(f"key {key!r} has shape {list(t.shape)}, expected {ndim} dimensions")
    return tuple(t.shape)


# ------------------------------------------------------------------------------------ conversion


def convert_state_dict(sd: Mapping[str, Any], G: Generator, layout: KeyLayout) -> dict[str, Tensor]:
    """Rename and reshape a checkpoint's generator state dict into the layout of ``G`` (float32; with
    ``mapping.w_avg`` only when ``layout`` maps a key onto it). Raises ValueError naming the key for a missing
    or unexpected key, a wrong shape (against ``G``), a non-float tensor or a non-standard filter."""
    cfg = G.cfg
    expected = {k: v.shape for k, v in G.state_dict().items()}
    unexpected = sorted(set(sd) - set(layout.keys) - set(layout.filters))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ValueError(f"unexpected key {unexpected[0]!r}{more}")
    for key, kernel in layout.filters.items():
        t = sd.get(key)
        if not isinstance(t, Tensor):
            raise ValueError(f"missing key {key!r}")
        if t.shape != kernel.shape or not torch.allclose(t.float(), kernel, atol=1e-6):
            raise ValueError(f"key {key!r} is not the standard [1, 3, 3, 1] filter")
    out = {}
    for src, dst in layout.keys.items():
        t = sd.get(src)
        if not isinstance(t, Tensor):
            raise ValueError(f"missing key {src!r}")
        want = layout.source_shape(src, expected[dst])
        if tuple(t.shape) != want:
            raise ValueError(f"key {src!r} has shape {list(t.shape)}, expected {list(want)} "
                             f"(inferred {_describe(cfg)})")
        if not t.is_floating_point():
            raise ValueError(f"key {src!r} has dtype {t.dtype}, expected a float tensor")
        out[dst] = t.detach().reshape(expected[dst]).float()
    missing = set(expected) - set(out) - {"mapping.w_avg"}
    assert not missing, missing  # each layout covers Generator exactly
    return out


def _describe(cfg: GeneratorConfig) -> str:
    return (f"{cfg.resolution} px, w_dim {cfg.w_dim}, n_mlp {cfg.n_mapping}, "
            f"channels {[cfg.channels(cfg.block_resolution(b)) for b in range(cfg.num_blocks)]}")


# --------------------------------------------------------------------------------------- loading


def _read_head(path: Path) -> bytes:
    """The first MiB of the checkpoint; InputError when it is missing or empty."""
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found (not a file)")
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    if not head:
        raise InputError(f"{path}: checkpoint file is empty")
    return head


def _load_pickle(path: Path, head: bytes) -> Any:
    """``torch.load`` the file without running code (``weights_only=True``, plus
    ``argparse.Namespace``); InputError for anything it refuses or cannot read."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Detected pickle protocol 4"
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds (UnpicklingError, RuntimeError, EOFError, ...)
        is_pickle = head[0] == _PICKLE_PROTO
        glob = re.search(r"GLOBAL ([\w.]+)", str(e))
        if glob and not glob.group(1).startswith("torch."):  # a torch.* one: a cut-off torch file
            raise InputError(f"{path}: unknown checkpoint format (a pickle that needs the Python "
                             f"object {glob.group(1)}; refusing to run code from it)") from None
        if head.startswith(_ZIP_MAGIC) or is_pickle:
            raise InputError(f"{path}: truncated or corrupt checkpoint ({_reason(e)})") from None
        raise InputError(f"{path}: unknown checkpoint format (neither a PyTorch .pt file nor a pickle)"
                         ) from None


def _reason(e: Exception) -> str:
    """A short one-line summary of a loading error."""
    msg = str(e).split("WeightsUnpickler error:")[-1].strip()
    line = msg.splitlines()[0] if msg else type(e).__name__
    line = line.split(". ")[0].rstrip(".")
    return line if len(line) <= 120 else line[:117] + "..."


def _rosinality_generator(path: Path, head: bytes) -> tuple[Generator, dict]:
    """saminv's generator from a rosinality ``.pt`` (``mapping.w_avg`` from ``latent_avg``, else zeros and
    ``"w_avg": "estimated"``) and its ``source`` metadata; InputError on anything wrong."""
    ckpt = _load_pickle(path, head)
    if not isinstance(ckpt, Mapping) or "g_ema" not in ckpt:
        what = f"keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise InputError(f"{path}: not a rosinality StyleGAN2 checkpoint (no 'g_ema' generator; found {what})")
    sd, args = ckpt["g_ema"], ckpt.get("args")
    if not isinstance(sd, Mapping):
        raise InputError(f"{path}: 'g_ema' is a {type(sd).__name__}, expected a state dict")
    if not isinstance(args, argparse.Namespace):
        args = None
    latent_avg = ckpt.get("latent_avg")
    try:
        cfg, cm = infer_config(sd, args)
        G = Generator(cfg)
        tensors = convert_state_dict(sd, G, rosinality_layout(cfg))
        if latent_avg is not None:
            if not isinstance(latent_avg, Tensor) or latent_avg.numel() != cfg.w_dim:
                shape = list(latent_avg.shape) if isinstance(latent_avg, Tensor) else type(latent_avg).__name__
                raise ValueError(f"'latent_avg' has shape {shape}, expected [{cfg.w_dim}]")
            tensors["mapping.w_avg"] = latent_avg.detach().reshape(cfg.w_dim).float()
        else:
            tensors["mapping.w_avg"] = torch.zeros(cfg.w_dim)
        G.load_state_dict(tensors, strict=True)
    except ValueError as e:
        raise InputError(f"{path}: bad rosinality checkpoint: {e}") from None
    return G, {"format": "rosinality", "channel_multiplier": cm,
               "w_avg": "latent_avg" if latent_avg is not None else "estimated"}


def _nvidia_generator(path: Path) -> tuple[Generator, dict]:
    """saminv's generator from an NVIDIA network pickle (stylegan2-ada-pytorch ``G_ema``, or a TensorFlow
    StyleGAN2 ``Gs``; its tracked ``w_avg`` included) and its ``source`` metadata; InputError on anything wrong."""
    try:
        ckpt = nvidia_pickle.read_network_pickle(path)
    except nvidia_pickle.RefusedPickle as e:
        raise InputError(f"{path}: unsupported NVIDIA pickle ({e})") from None
    except Exception as e:  # EOFError, ValueError, RuntimeError from a cut-off or corrupt file
        raise InputError(f"{path}: truncated or corrupt checkpoint ({_reason(e)})") from None
    try:
        sd, facts, fmt = nvidia_pickle.generator_state(ckpt)
        cfg = nvidia_pickle.infer_config(sd, facts)
        G = Generator(cfg)
        G.load_state_dict(convert_state_dict(sd, G, nvidia_layout(cfg, resample_filters=fmt == "nvidia")), strict=True)
    except LookupError as e:
        raise InputError(f"{path}: not an NVIDIA network pickle ({e})") from None
    except ValueError as e:
        raise InputError(f"{path}: bad NVIDIA checkpoint: {e}") from None
    return G, {"format": fmt, "w_avg": "w_avg"}


def convert_checkpoint(path: Path) -> Model:
    """Read a StyleGAN2 checkpoint (rosinality ``.pt``, or an NVIDIA ``.pkl`` of stylegan2-ada-pytorch or of the
    TensorFlow originals; told apart by content) and return the equivalent saminv :class:`Model`.

    The generator renders the same images as the checkpoint's own (rosinality ``g_ema`` with
    ``randomize_noise=False``, NVIDIA ``G_ema`` / TensorFlow ``Gs`` with ``noise_mode="const"``). ``w_avg``
    [w_dim] is rosinality's ``latent_avg`` when present (else :meth:`Generator.mean_w`) or NVIDIA's tracked
    ``w_avg`` (TensorFlow: ``dlatent_avg``); the W prior is :meth:`WPrior.estimate`. ``meta`` =
    ``{"name": stem, "source": {"format": "rosinality" | "nvidia" | "nvidia-tf",
    "file", "sha256", "w_avg", ...}}``.

    Raises InputError (one line naming the file) when the file is missing or empty, truncated or
    corrupt, a pickle needing other classes (no code from it is ever run), has no ``g_ema`` / ``G_ema`` / ``Gs``,
    or has missing / unexpected keys, wrong shapes (the key is named) or non-finite weights.
    """
    path = Path(path)
    head = _read_head(path)
    if head[0] == _PICKLE_PROTO and any(m in head for m in nvidia_pickle.PICKLE_MARKERS):
        G, source = _nvidia_generator(path)
    else:
        G, source = _rosinality_generator(path, head)
    G.eval().requires_grad_(False)
    if source["w_avg"] == "estimated":
        G.mapping.w_avg.copy_(G.mean_w())
    if not all(torch.isfinite(t).all() for t in G.state_dict().values()):
        raise InputError(f"{path}: bad {source['format']} checkpoint: weights contain NaN or Inf")
    meta = {"name": path.stem, "source": {"format": source.pop("format"), "file": path.name,
                                          "sha256": file_sha256(path), **source}}
    return Model(G, WPrior.estimate(G), meta=meta)
