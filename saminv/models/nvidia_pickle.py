"""Read NVIDIA stylegan2-ada-pytorch network pickles (``.pkl``) as data, without running their code.

NVIDIA's training loop pickles a dict ``{"G", "D", "G_ema", "augment_pipe", "training_set_kwargs"}``.
Each network is a ``torch_utils.persistence`` object: unpickling calls
``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where ``meta`` holds the Python source of
the network's module (``module_src``, which NVIDIA's own loader ``exec``s), the class name and the
object's ``__dict__`` (``state``: ``_parameters``, ``_buffers``, ``_modules`` and plain attributes).
:class:`SafeUnpickler` allows only the handful of globals such a pickle needs, turns every persistent
object into a :class:`PersistentObject` (class name + state; ``module_src`` is never looked at) and
rebuilds tensors through ``torch.load(weights_only=True)``. Anything else (``os.system``, TensorFlow-era
``dnnlib.tflib`` networks, foreign classes) is refused with :class:`RefusedPickle`.

The generator ``G_ema`` then maps onto saminv's :class:`~saminv.models.stylegan2.Generator`, whose names
follow NVIDIA's (NVIDIA key -> saminv key)::

    mapping.fc{i}.weight/bias               -> mapping.fcs.{i}.weight/bias
    mapping.w_avg                           -> mapping.w_avg
    synthesis.b4.const [C, 4, 4]            -> synthesis.blocks.0.const [1, C, 4, 4]
    synthesis.b{r}.conv0|conv1.weight       -> synthesis.blocks.{b}.conv0|conv1.conv.weight    (r = 4 * 2**b)
    synthesis.b{r}.conv0|conv1.affine.*     -> synthesis.blocks.{b}.conv0|conv1.conv.affine.*
    synthesis.b{r}.conv0|conv1.noise_strength []     -> ....noise_strength [1]
    synthesis.b{r}.conv0|conv1.noise_const [r, r]    -> ....noise_const [1, 1, r, r]
    synthesis.b{r}.conv0|conv1.bias         -> ....bias
    synthesis.b{r}.torgb.weight / affine.* / bias    -> synthesis.blocks.{b}.torgb.conv.weight / conv.affine.* / bias

The ``resample_filter`` buffers carry no weights: they are checked to be the standard [1, 3, 3, 1]
filter (normalised to sum 1) and dropped. Only the ``skip`` generator architecture (NVIDIA's default for
StyleGAN2 generators), unconditional (``c_dim`` 0) and RGB, is accepted; StyleGAN3 pickles are refused.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

try:
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # numpy < 2
    from numpy.core.multiarray import scalar as _numpy_scalar

from saminv.models.stylegan2 import GeneratorConfig

# an NVIDIA network pickle names one of these early (PyTorch: the persistence hook; TensorFlow era: dnnlib.tflib)
PICKLE_MARKERS = (b"torch_utils.persistence", b"dnnlib")
_STANDARD_FILTER = torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64  # sum 1


@dataclass
class PersistentObject:
    """A ``torch_utils.persistence`` object kept as data: its class name and ``__dict__`` (``state``)."""

    class_name: str
    state: dict = field(repr=False)

    def attr(self, name: str, default: Any = None) -> Any:
        """A plain attribute of the pickled module (e.g. ``conv_clamp``, ``architecture``)."""
        return self.state.get(name, default)

    def submodules(self) -> dict[str, Any]:
        """The pickled module's children (``_modules``), by name."""
        return dict(self.state.get("_modules") or {})

    def state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """Parameters and buffers of this object and its persistent children, keyed like ``nn.Module.state_dict``.

        Raises ValueError when a child is not a persistent object (NVIDIA networks have only those)."""
        out: dict[str, Tensor] = {}
        for group in ("_parameters", "_buffers"):
            for name, t in (self.state.get(group) or {}).items():
                if t is not None:
                    out[prefix + name] = t
        for name, child in self.submodules().items():
            if isinstance(child, PersistentObject):
                out.update(child.state_dict(f"{prefix}{name}."))
            elif child is not None:
                raise ValueError(f"module {prefix}{name} is a {type(child).__name__}, not a network layer")
        return out


class RefusedPickle(pickle.UnpicklingError):
    """The pickle needs something saminv does not load: a global outside :attr:`SafeUnpickler.ALLOWED`,
    or a persistent entry that is not a class state."""


class _AttrDict(dict):
    """Stands in for ``dnnlib.util.EasyDict`` (a dict with attribute access; only the items matter here)."""


def _persistent_object(meta: dict) -> PersistentObject:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise RefusedPickle("a torch_utils.persistence entry without a class state")
    return PersistentObject(str(meta.get("class_name")), meta["state"])


def _storage_from_bytes(data: bytes) -> Any:
    """``torch.storage._load_from_bytes`` without code execution: the bytes are a ``torch.save`` of one storage."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _parameter(data: Tensor, requires_grad: bool, backward_hooks: Any, *state: Any) -> Tensor:
    """``torch._utils._rebuild_parameter``: the parameter's data as a plain tensor."""
    return data


class SafeUnpickler(pickle.Unpickler):
    """Unpickles NVIDIA network pickles as data; refuses every global not in ``ALLOWED``.

    Raises :class:`RefusedPickle` naming the refused global."""

    ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_object,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("collections", "OrderedDict"): OrderedDict,
        ("dnnlib.util", "EasyDict"): _AttrDict,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            if module.startswith("dnnlib.tflib"):
                raise RefusedPickle(
                    "a TensorFlow StyleGAN2 pickle; convert it to PyTorch first (NVIDIA stylegan2-ada-pytorch "
                    "legacy.py, or rosinality's convert_weight.py)") from None
            raise RefusedPickle(f"it needs the Python object {module}.{name}; refusing to run code from it"
                                ) from None


def read_network_pickle(path: Path) -> Any:
    """The top-level dict of an NVIDIA network pickle, networks as :class:`PersistentObject`.

    Raises :class:`RefusedPickle` (a refused global), other pickle.UnpicklingError / EOFError / ValueError
    (truncated or corrupt data), RuntimeError (a tensor that ``torch.load`` cannot rebuild)."""
    with open(path, "rb") as f:
        return SafeUnpickler(f).load()


# ------------------------------------------------------------------------- G_ema -> saminv layout


def _blocks(g: PersistentObject) -> list[tuple[int, PersistentObject]]:
    """``(resolution, block)`` of G_ema's synthesis network, 4 px first."""
    synthesis = g.submodules().get("synthesis")
    if not isinstance(synthesis, PersistentObject):
        raise ValueError("G_ema has no synthesis network")
    blocks = [(int(name[1:]), b) for name, b in synthesis.submodules().items()
              if name[:1] == "b" and name[1:].isdigit() and isinstance(b, PersistentObject)]
    if not blocks:
        kinds = sorted({type(m).__name__ if not isinstance(m, PersistentObject) else m.class_name
                        for m in synthesis.submodules().values()})
        raise ValueError(f"G_ema's synthesis network has no StyleGAN2 blocks b4, b8, ... (found {kinds}; "
                         "StyleGAN3 is not supported)")
    return sorted(blocks, key=lambda rb: rb[0])


def infer_config(g: PersistentObject, sd: dict[str, Tensor]) -> GeneratorConfig:
    """The saminv :class:`GeneratorConfig` of NVIDIA's ``G_ema`` (``g``, with its state dict ``sd``).

    Resolution and channels come from the blocks' shapes (NVIDIA and saminv share the rule
    ``min(channel_base // res, channel_max)``), the mapping's depth from ``mapping.fc{i}``, its learning-rate
    multiplier from ``fc0``'s ``bias_gain`` and ``conv_clamp`` from the first synthesis layer. Raises
    ValueError (one line) for a conditional, non-RGB, non-``skip`` or irregular generator."""
    if g.attr("c_dim", 0):
        raise ValueError(f"G_ema is class-conditional (c_dim {g.attr('c_dim')}); saminv needs an unconditional generator")
    blocks = _blocks(g)
    resolutions = [r for r, _ in blocks]
    if resolutions[0] != 4 or resolutions != [4 * 2**i for i in range(len(blocks))] or resolutions[-1] < 16:
        raise ValueError(f"synthesis blocks at {resolutions} px; saminv needs 4, 8, ... up to >= 16 px")
    archs = {b.attr("architecture", "skip") for _, b in blocks}
    if archs != {"skip"}:
        raise ValueError(f"synthesis architecture {sorted(archs)}; saminv implements 'skip' (NVIDIA's default)")
    channels = []
    for r, _ in blocks:
        weight = sd.get(f"synthesis.b{r}.conv1.weight")
        if weight is None or weight.ndim != 4:
            raise ValueError(f"missing key 'synthesis.b{r}.conv1.weight'")
        channels.append(int(weight.shape[0]))
    top_res, top_ch, channel_max = resolutions[-1], channels[-1], max(channels)
    n_mapping = sum(1 for k in sd if k.startswith("mapping.fc") and k.endswith(".weight"))
    fc0 = sd.get("mapping.fc0.weight")
    if n_mapping == 0 or fc0 is None or fc0.ndim != 2:
        raise ValueError("missing key 'mapping.fc0.weight' (no mapping network)")
    mapping = g.submodules().get("mapping")
    first_fc = mapping.submodules().get("fc0") if isinstance(mapping, PersistentObject) else None
    lr_mul = float(first_fc.attr("bias_gain", 0.01)) if isinstance(first_fc, PersistentObject) else 0.01
    layer = blocks[0][1].submodules().get("conv1")
    clamp = layer.attr("conv_clamp") if isinstance(layer, PersistentObject) else None
    cfg = GeneratorConfig(resolution=top_res, z_dim=int(fc0.shape[1]), w_dim=int(g.attr("w_dim", fc0.shape[0])),
                          n_mapping=n_mapping, mapping_lr_mul=lr_mul, channel_base=top_ch * top_res,
                          channel_max=channel_max, conv_clamp=None if clamp is None else float(clamp))
    wanted = [cfg.channels(r) for r in resolutions]
    if channels != wanted:
        raise ValueError(f"channels per resolution (4 px up) {channels} do not follow min(channel_base // res, "
                         f"channel_max): expected {wanted}")
    return cfg


def key_map(num_blocks: int, n_mapping: int) -> dict[str, str]:
    """NVIDIA ``G_ema`` key -> saminv state-dict key for a generator of ``num_blocks`` blocks and
    ``n_mapping`` mapping layers; every saminv key is the image of exactly one NVIDIA key."""
    m = {"mapping.w_avg": "mapping.w_avg"}
    for i in range(n_mapping):
        for p in ("weight", "bias"):
            m[f"mapping.fc{i}.{p}"] = f"mapping.fcs.{i}.{p}"
    for b in range(num_blocks):
        src, dst = f"synthesis.b{4 * 2**b}", f"synthesis.blocks.{b}"
        if b == 0:
            m[f"{src}.const"] = f"{dst}.const"
        for conv in (("conv1",) if b == 0 else ("conv0", "conv1")):
            for s, d in (("weight", "conv.weight"), ("affine.weight", "conv.affine.weight"),
                         ("affine.bias", "conv.affine.bias"), ("noise_strength", "noise_strength"),
                         ("noise_const", "noise_const"), ("bias", "bias")):
                m[f"{src}.{conv}.{s}"] = f"{dst}.{conv}.{d}"
        for s, d in (("weight", "conv.weight"), ("affine.weight", "conv.affine.weight"),
                     ("affine.bias", "conv.affine.bias"), ("bias", "bias")):
            m[f"{src}.torgb.{s}"] = f"{dst}.torgb.{d}"
    return m


def filter_keys(num_blocks: int) -> dict[str, Tensor]:
    """The weightless ``resample_filter`` buffers of ``G_ema`` with their expected value (4x4, sum 1)."""
    out = {}
    for b in range(num_blocks):
        src = f"synthesis.b{4 * 2**b}"
        out[f"{src}.resample_filter"] = _STANDARD_FILTER
        for conv in (("conv1",) if b == 0 else ("conv0", "conv1")):
            out[f"{src}.{conv}.resample_filter"] = _STANDARD_FILTER
    return out


def source_shape(src_key: str, dst_shape: torch.Size) -> tuple[int, ...]:
    """Shape the NVIDIA tensor must have to become a saminv tensor of ``dst_shape``."""
    if src_key.endswith(".const"):  # [C, 4, 4] -> [1, C, 4, 4]
        return tuple(dst_shape[1:])
    if src_key.endswith(".noise_strength"):  # [] -> [1]
        return ()
    if src_key.endswith(".noise_const"):  # [r, r] -> [1, 1, r, r]
        return tuple(dst_shape[2:])
    return tuple(dst_shape)
