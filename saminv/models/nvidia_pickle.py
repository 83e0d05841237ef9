"""Read NVIDIA StyleGAN2 network pickles (``.pkl``: stylegan2-ada-pytorch, and the TensorFlow originals) as
data, without running their code.

NVIDIA's training loop pickles a dict ``{"G", "D", "G_ema", "augment_pipe", "training_set_kwargs"}``.
Each network is a ``torch_utils.persistence`` object: unpickling calls
``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where ``meta`` holds the Python source of
the network's module (``module_src``, which NVIDIA's own loader ``exec``s), the class name and the
object's ``__dict__`` (``state``: ``_parameters``, ``_buffers``, ``_modules`` and plain attributes).
:class:`SafeUnpickler` allows only the handful of globals such a pickle needs, turns every persistent
object into a :class:`PersistentObject` (class name + state; ``module_src`` is never looked at) and
rebuilds tensors through ``torch.load(weights_only=True)``. The TensorFlow originals (NVIDIA's StyleGAN2
release: a tuple ``(G, D, Gs)`` of ``dnnlib.tflib.network.Network``) become :class:`TFNetwork` (the pickled
state: variables as numpy arrays; the ``build_module_src`` that NVIDIA's loaders ``exec`` is never looked at),
and :func:`tf_generator` renames ``Gs``'s variables as stylegan2-ada-pytorch's ``legacy.py`` does. Anything
else (``os.system``, foreign classes) is refused with :class:`RefusedPickle`.

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

import codecs
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
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct, scalar as _numpy_scalar
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct, scalar as _numpy_scalar

from saminv.models.stylegan2 import GeneratorConfig, blur_kernel

# an NVIDIA network pickle names one of these early (PyTorch: the persistence hook; TensorFlow era: dnnlib.tflib)
PICKLE_MARKERS = (b"torch_utils.persistence", b"dnnlib")
_STANDARD_FILTER = blur_kernel()  # NVIDIA resample_filter buffers: [1, 3, 3, 1] outer product, sum 1


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


class TFNetwork(dict):
    """A TensorFlow-era ``dnnlib.tflib.network.Network`` kept as data: its pickled state (``static_kwargs``,
    ``variables`` as ``[(name, ndarray)]``, ``components`` by name); ``build_module_src`` is never looked at."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise RefusedPickle("a dnnlib.tflib Network without a state dict")
        self.update(state)

    def variables(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Every variable of this network and its components, named ``component/.../variable``."""
        out = {prefix + str(name): value for name, value in self.get("variables") or []}
        for name, component in (self.get("components") or {}).items():
            if isinstance(component, TFNetwork):
                out.update(component.variables(f"{prefix}{name}/"))
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
    """Unpickles NVIDIA network pickles as data (persistent objects, TensorFlow networks, tensors, numpy arrays);
    refuses every global not in ``ALLOWED``.

    Raises :class:`RefusedPickle` naming the refused global."""

    ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_object,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("collections", "OrderedDict"): OrderedDict,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles (a pure function)
        ("dnnlib.util", "EasyDict"): _AttrDict,
        ("dnnlib.tflib.network", "Network"): TFNetwork,
        ("numpy", "dtype"): np.dtype,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise RefusedPickle(f"it needs the Python object {module}.{name}; refusing to run code from it"
                                ) from None


def read_network_pickle(path: Path) -> Any:
    """The top-level object of an NVIDIA network pickle (stylegan2-ada-pytorch: a dict of :class:`PersistentObject`
    networks; TensorFlow: a ``(G, D, Gs)`` tuple of :class:`TFNetwork`).

    Raises :class:`RefusedPickle` (a refused global), other pickle.UnpicklingError / EOFError / ValueError
    (truncated or corrupt data), RuntimeError (a tensor that ``torch.load`` cannot rebuild)."""
    with open(path, "rb") as f:
        return SafeUnpickler(f).load()


# ------------------------------------------------------------------ the generator: tensors and facts


@dataclass(frozen=True)
class GeneratorFacts:
    """What a network pickle says about its generator beyond the tensors: the synthesis blocks'
    resolutions (4 px first), their architectures, ``c_dim``, the mapping's learning-rate multiplier and
    ``conv_clamp``."""

    resolutions: tuple[int, ...]
    architectures: frozenset[str]
    c_dim: int = 0
    mapping_lr_mul: float = 0.01
    conv_clamp: float | None = None


def pytorch_generator(g: PersistentObject) -> tuple[dict[str, Tensor], GeneratorFacts]:
    """The state dict and facts of a stylegan2-ada-pytorch ``G_ema``: the blocks ``synthesis.b{res}``,
    ``fc0``'s ``bias_gain`` (= the mapping's lr multiplier) and the first layer's ``conv_clamp``. Raises
    ValueError when there are no StyleGAN2 blocks (StyleGAN3) or a child is not a network layer."""
    synthesis = g.submodules().get("synthesis")
    if not isinstance(synthesis, PersistentObject):
        raise ValueError("G_ema has no synthesis network")
    blocks = sorted((int(name[1:]), b) for name, b in synthesis.submodules().items()
                    if name[:1] == "b" and name[1:].isdigit() and isinstance(b, PersistentObject))
    if not blocks:
        kinds = sorted({m.class_name if isinstance(m, PersistentObject) else type(m).__name__
                        for m in synthesis.submodules().values()})
        raise ValueError(f"G_ema's synthesis network has no StyleGAN2 blocks b4, b8, ... (found {kinds}; "
                         "StyleGAN3 is not supported)")
    mapping = g.submodules().get("mapping")
    first_fc = mapping.submodules().get("fc0") if isinstance(mapping, PersistentObject) else None
    layer = blocks[0][1].submodules().get("conv1")
    clamp = layer.attr("conv_clamp") if isinstance(layer, PersistentObject) else None
    facts = GeneratorFacts(
        resolutions=tuple(r for r, _ in blocks), architectures=frozenset(b.attr("architecture", "skip") for _, b in blocks),
        c_dim=int(g.attr("c_dim", 0) or 0),
        mapping_lr_mul=float(first_fc.attr("bias_gain", 0.01)) if isinstance(first_fc, PersistentObject) else 0.01,
        conv_clamp=None if clamp is None else float(clamp))
    return g.state_dict(), facts


# ---------------------------------------------------------------------------- TensorFlow-era pickles


def _tf_tensor(tf: dict[str, np.ndarray], name: str) -> Tensor:
    value = tf.get(name)
    if not isinstance(value, (np.ndarray, np.generic)) or value.dtype.kind != "f":  # scalars come as np.float32
        raise ValueError(f"missing variable {name!r}")
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))


def tf_generator(gs: TFNetwork) -> tuple[dict[str, Tensor], GeneratorFacts]:
    """The ``G_ema`` state dict (NVIDIA's PyTorch names, :func:`key_map`; TensorFlow stores no ``resample_filter``
    buffers) and facts of a TensorFlow StyleGAN2
    ``Gs`` network, converted as NVIDIA's stylegan2-ada-pytorch ``legacy.py`` does: dense weights [I, O]
    transposed, conv weights [k, k, I, O] -> [O, I, k, k] with the upsampling convs' kernels flipped (TF
    runs them as a transposed conv), ``mod_bias + 1``, ``synthesis/noise{i}`` [1, 1, r, r] -> [r, r] (layer
    ``i`` in order), ``dlatent_avg`` -> ``mapping.w_avg``; ``static_kwargs`` give ``label_size``, ``mapping_lrmul``,
    ``architecture``, ``resample_kernel`` and ``conv_clamp``. Raises ValueError naming a missing variable or an
    unsupported setting (version < 4, conditional, ``orig`` architecture, another resample kernel)."""
    if int(gs.get("version", 0)) < 4:
        raise ValueError(f"TensorFlow network version {gs.get('version')} (< 4: not StyleGAN2)")
    kwargs = gs.get("static_kwargs") or {}
    if list(kwargs.get("resample_kernel", [1, 3, 3, 1])) != [1, 3, 3, 1]:
        raise ValueError(f"resample kernel {kwargs.get('resample_kernel')}; saminv needs [1, 3, 3, 1]")
    tf = gs.variables()
    resolutions = sorted({int(k.split("/")[1].split("x")[0]) for k in tf
                          if k.startswith("synthesis/") and "x" in k.split("/")[1]})
    architecture = "orig" if any("ToRGB_lod" in k for k in tf) else str(kwargs.get("architecture", "skip"))
    sd: dict[str, Tensor] = {"mapping.w_avg": _tf_tensor(tf, "dlatent_avg")}
    n_mapping = sum(1 for k in tf if k.startswith("mapping/Dense") and k.endswith("/weight"))
    for i in range(n_mapping):
        sd[f"mapping.fc{i}.weight"] = _tf_tensor(tf, f"mapping/Dense{i}/weight").T
        sd[f"mapping.fc{i}.bias"] = _tf_tensor(tf, f"mapping/Dense{i}/bias")

    def modulated(src: str, dst: str, flip: bool = False) -> None:
        weight = _tf_tensor(tf, f"{src}/weight")
        sd[f"{dst}.weight"] = (weight.flip(0, 1) if flip else weight).permute(3, 2, 0, 1)
        sd[f"{dst}.affine.weight"] = _tf_tensor(tf, f"{src}/mod_weight").T
        sd[f"{dst}.affine.bias"] = _tf_tensor(tf, f"{src}/mod_bias") + 1
        sd[f"{dst}.bias"] = _tf_tensor(tf, f"{src}/bias")

    noise = 0
    for r in resolutions:
        src, dst = f"synthesis/{r}x{r}", f"synthesis.b{r}"
        if r == 4:
            sd[f"{dst}.const"] = _tf_tensor(tf, f"{src}/Const/const")[0]
        for name, conv in ((("Conv", "conv1"),) if r == 4 else (("Conv0_up", "conv0"), ("Conv1", "conv1"))):
            modulated(f"{src}/{name}", f"{dst}.{conv}", flip=name == "Conv0_up")
            sd[f"{dst}.{conv}.noise_strength"] = _tf_tensor(tf, f"{src}/{name}/noise_strength").reshape(())
            sd[f"{dst}.{conv}.noise_const"] = _tf_tensor(tf, f"synthesis/noise{noise}")[0, 0]
            noise += 1
        if architecture == "skip":
            modulated(f"{src}/ToRGB", f"{dst}.torgb")
    clamp = kwargs.get("conv_clamp")  # stylegan2-ada's TensorFlow networks may set it
    facts = GeneratorFacts(resolutions=tuple(resolutions), architectures=frozenset({architecture}),
                           c_dim=int(kwargs.get("label_size", 0)), mapping_lr_mul=float(kwargs.get("mapping_lrmul", 0.01)),
                           conv_clamp=None if clamp is None else float(clamp))
    return sd, facts


# ------------------------------------------------------------------------------ -> saminv's layout


def generator_state(ckpt: Any) -> tuple[dict[str, Tensor], GeneratorFacts, str]:
    """``(state dict, facts, format)`` of the generator of a network pickle's top-level object: a
    stylegan2-ada-pytorch dict's ``G_ema`` (``"nvidia"``) or the ``Gs`` of a TensorFlow ``(G, D, Gs)`` tuple
    (``"nvidia-tf"``). Raises LookupError (one line) when it holds neither, ValueError from the readers."""
    if isinstance(ckpt, dict) and isinstance(ckpt.get("G_ema"), PersistentObject):
        return (*pytorch_generator(ckpt["G_ema"]), "nvidia")
    if isinstance(ckpt, tuple) and len(ckpt) == 3 and isinstance(ckpt[2], TFNetwork):
        return (*tf_generator(ckpt[2]), "nvidia-tf")
    if isinstance(ckpt, TFNetwork):
        what = "a single TensorFlow network"
    else:
        what = f"keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else type(ckpt).__name__
    raise LookupError(f"no 'G_ema' generator (nor a TensorFlow (G, D, Gs) tuple); found {what}")


def infer_config(sd: dict[str, Tensor], facts: GeneratorFacts) -> GeneratorConfig:
    """The saminv :class:`GeneratorConfig` of a generator with NVIDIA's state dict ``sd`` and ``facts``.

    Resolution and channels come from the blocks' shapes (NVIDIA and saminv share the rule
    ``min(channel_base // res, channel_max)``), the mapping's depth and dimensions from ``mapping.fc{i}``.
    Raises ValueError (one line) for a conditional, non-``skip`` or irregular generator."""
    if facts.c_dim:
        raise ValueError(f"G_ema is class-conditional (c_dim {facts.c_dim}); saminv needs an unconditional generator")
    resolutions = list(facts.resolutions)
    if not resolutions or resolutions[0] != 4 or resolutions != [4 * 2**i for i in range(len(resolutions))] \
            or resolutions[-1] < 16:
        raise ValueError(f"synthesis blocks at {resolutions} px; saminv needs 4, 8, ... up to >= 16 px")
    if facts.architectures != {"skip"}:
        raise ValueError(f"synthesis architecture {sorted(facts.architectures)}; saminv implements 'skip' "
                         "(NVIDIA's default)")
    channels = []
    for r in resolutions:
        weight = sd.get(f"synthesis.b{r}.conv1.weight")
        if weight is None or weight.ndim != 4:
            raise ValueError(f"missing key 'synthesis.b{r}.conv1.weight'")
        channels.append(int(weight.shape[0]))
    top_res, top_ch, channel_max = resolutions[-1], channels[-1], max(channels)
    n_mapping = sum(1 for k in sd if k.startswith("mapping.fc") and k.endswith(".weight"))
    first, last = sd.get("mapping.fc0.weight"), sd.get(f"mapping.fc{n_mapping - 1}.weight")
    if n_mapping == 0 or first is None or last is None or first.ndim != 2 or last.ndim != 2:
        raise ValueError("missing key 'mapping.fc0.weight' (no mapping network)")
    cfg = GeneratorConfig(resolution=top_res, z_dim=int(first.shape[1]), w_dim=int(last.shape[0]),
                          n_mapping=n_mapping, mapping_lr_mul=facts.mapping_lr_mul, channel_base=top_ch * top_res,
                          channel_max=channel_max, conv_clamp=facts.conv_clamp)
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
