"""Rosinality checkpoint conversion: saminv must render what rosinality's ``g_ema`` renders.

The checkpoints are built here from rosinality's documented key names and shapes (random weights),
and the images are compared with an independent reference written in this file from rosinality's
semantics: the *fused* grouped modulated conv, upsampling by a grouped stride-2 transposed conv
followed by an explicit upfirdn2d blur, PixelNorm + EqualLinear mapping (lr_mul 0.01), and noise
added before the bias of the fused LeakyReLU.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from saminv.errors import InputError
from saminv.models import checkpoints
from saminv.models.checkpoints import convert_checkpoint
from saminv.models.model_dir import load_model, load_model_dir, save_model

SQRT2 = math.sqrt(2.0)


# ----------------------------------------------------------------------- rosinality-format writer


def rosinality_channels(res: int, cm: int) -> int:
    return 512 if res <= 32 else 16384 * cm // res


def blur_kernel(factor_sq: float) -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    return torch.outer(k, k) / 64 * factor_sq


def make_g_ema(size: int, style_dim: int, n_mlp: int, cm: int, lr_mlp: float = 0.01, seed: int = 0
               ) -> dict[str, torch.Tensor]:
    """A rosinality ``g_ema`` state dict with random weights (noise weights non-zero)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    sd: dict[str, torch.Tensor] = {}
    for i in range(1, n_mlp + 1):
        sd[f"style.{i}.weight"] = rnd(style_dim, style_dim) / lr_mlp
        sd[f"style.{i}.bias"] = rnd(style_dim, std=0.2 / lr_mlp)

    def modconv(prefix: str, cin: int, cout: int, k: int, std: float = 1.0) -> None:
        sd[f"{prefix}.conv.weight"] = rnd(1, cout, cin, k, k, std=std)
        sd[f"{prefix}.conv.modulation.weight"] = rnd(cin, style_dim)
        sd[f"{prefix}.conv.modulation.bias"] = rnd(cin, std=0.1, mean=1.0)

    def styled(prefix: str, cin: int, cout: int, up: bool) -> None:
        modconv(prefix, cin, cout, 3)
        if up:
            sd[f"{prefix}.conv.blur.kernel"] = blur_kernel(4)
        sd[f"{prefix}.noise.weight"] = rnd(1, std=0.3)
        sd[f"{prefix}.activate.bias"] = rnd(cout, std=0.1)

    def to_rgb(prefix: str, cin: int, up: bool) -> None:
        modconv(prefix, cin, 3, 1, std=0.25)
        sd[f"{prefix}.bias"] = rnd(1, 3, 1, 1, std=0.1)
        if up:
            sd[f"{prefix}.upsample.kernel"] = blur_kernel(4)

    log_size = int(math.log2(size))
    c4 = rosinality_channels(4, cm)
    sd["input.input"] = rnd(1, c4, 4, 4)
    styled("conv1", c4, c4, up=False)
    to_rgb("to_rgb1", c4, up=False)
    cin = c4
    for i in range(3, log_size + 1):
        cout = rosinality_channels(2**i, cm)
        styled(f"convs.{2 * i - 6}", cin, cout, up=True)
        styled(f"convs.{2 * i - 5}", cout, cout, up=False)
        to_rgb(f"to_rgbs.{i - 3}", cout, up=True)
        cin = cout
    for layer in range((log_size - 2) * 2 + 1):
        r = 2 ** ((layer + 5) // 2)
        sd[f"noises.noise_{layer}"] = rnd(1, 1, r, r)
    return sd


def write_ckpt(path, g_ema, latent_avg=True, args=None, extra=True):
    ckpt = {"g_ema": g_ema}
    if latent_avg:
        ckpt["latent_avg"] = torch.randn(g_ema["style.1.weight"].shape[0]) * 0.1
    if args is not None:
        ckpt["args"] = args
    if extra:  # what train.py also saves; must be ignored
        ckpt["g_optim"] = {"state": {}, "param_groups": [{"lr": 0.002, "params": [0, 1]}]}
        ckpt["ada_aug_p"] = 0.0
    torch.save(ckpt, path)
    return ckpt


# ------------------------------------------------------------------- independent reference model


def ref_upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int, pad: tuple[int, int]) -> torch.Tensor:
    """Upsample by zero insertion, pad (pad0, pad1) on both axes, convolve with the flipped kernel."""
    n, c, h, w = x.shape
    if up > 1:
        z = x.new_zeros(n, c, h * up, w * up)
        z[:, :, ::up, ::up] = x
        x = z
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    k = torch.flip(kernel, [0, 1])[None, None].expand(c, 1, *kernel.shape)
    return F.conv2d(x, k, groups=c)


def ref_equal_linear(x, weight, bias, lr_mul=1.0):
    return F.linear(x, weight * (lr_mul / math.sqrt(weight.shape[1])), bias * lr_mul)


def ref_modconv(sd, prefix, x, w, demodulate=True, up=False):
    """Rosinality's fused modulated conv: one grouped conv with per-sample weights [N*O, I, k, k]."""
    n, cin, h, wd = x.shape
    weight = sd[f"{prefix}.conv.weight"]  # [1, O, I, k, k]
    _, cout, _, k, _ = weight.shape
    style = ref_equal_linear(w, sd[f"{prefix}.conv.modulation.weight"], sd[f"{prefix}.conv.modulation.bias"])
    wgt = weight / math.sqrt(cin * k * k) * style.view(n, 1, cin, 1, 1)  # [N, O, I, k, k]
    if demodulate:
        wgt = wgt * torch.rsqrt(wgt.pow(2).sum([2, 3, 4]) + 1e-8).view(n, cout, 1, 1, 1)
    x = x.reshape(1, n * cin, h, wd)
    if up:
        wt = wgt.transpose(1, 2).reshape(n * cin, cout, k, k)
        out = F.conv_transpose2d(x, wt, stride=2, padding=0, groups=n)
        out = out.view(n, cout, *out.shape[2:])
        return ref_upfirdn2d(out, blur_kernel(4), up=1, pad=(1, 1))
    out = F.conv2d(x, wgt.reshape(n * cout, cin, k, k), padding=k // 2, groups=n)
    return out.view(n, cout, *out.shape[2:])


def ref_styled(sd, prefix, x, w, noise, up=False):
    out = ref_modconv(sd, prefix, x, w, up=up)
    out = out + sd[f"{prefix}.noise.weight"] * noise
    return F.leaky_relu(out + sd[f"{prefix}.activate.bias"].view(1, -1, 1, 1), 0.2) * SQRT2


def ref_to_rgb(sd, prefix, x, w, skip):
    out = ref_modconv(sd, prefix, x, w, demodulate=False) + sd[f"{prefix}.bias"]
    if skip is not None:
        out = out + ref_upfirdn2d(skip, blur_kernel(4), up=2, pad=(2, 1))
    return out


def ref_mapping(sd, z, n_mlp, lr_mlp=0.01):
    x = z * torch.rsqrt(z.pow(2).mean(1, keepdim=True) + 1e-8)
    for i in range(1, n_mlp + 1):
        x = F.linear(x, sd[f"style.{i}.weight"] * (lr_mlp / math.sqrt(x.shape[1])))
        x = F.leaky_relu(x + sd[f"style.{i}.bias"] * lr_mlp, 0.2) * SQRT2
    return x


def ref_synthesis(sd, latent):
    """Rosinality ``Generator.forward(input_is_latent=True, randomize_noise=False)`` on w+ [N, L, D]."""
    n_rgbs = sum(1 for k in sd if k.startswith("to_rgbs.") and k.endswith(".conv.weight"))
    noise = [sd[f"noises.noise_{i}"] for i in range(2 * n_rgbs + 1)]
    out = sd["input.input"].repeat(latent.shape[0], 1, 1, 1)
    out = ref_styled(sd, "conv1", out, latent[:, 0], noise[0])
    skip = ref_to_rgb(sd, "to_rgb1", out, latent[:, 1], None)
    i = 1
    for j in range(n_rgbs):
        out = ref_styled(sd, f"convs.{2 * j}", out, latent[:, i], noise[2 * j + 1], up=True)
        out = ref_styled(sd, f"convs.{2 * j + 1}", out, latent[:, i + 1], noise[2 * j + 2])
        skip = ref_to_rgb(sd, f"to_rgbs.{j}", out, latent[:, i + 2], skip)
        i += 2
    return skip


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ckpt32(tmp_path_factory):
    """32 px, style_dim 512, n_mlp 8 (rosinality's train.py defaults), with latent_avg and args."""
    path = tmp_path_factory.mktemp("ckpt") / "faces32.pt"
    args = argparse.Namespace(size=32, latent=512, n_mlp=8, channel_multiplier=2, iter=800000)
    ckpt = write_ckpt(path, make_g_ema(32, 512, 8, cm=2, seed=1), args=args)
    return path, ckpt


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """The smallest rosinality generator saminv accepts: 16 px, style_dim 64, n_mlp 2."""
    path = tmp_path_factory.mktemp("small") / "small16.pt"
    g_ema = make_g_ema(16, 64, 2, cm=2, seed=2)
    write_ckpt(path, g_ema)
    return path, g_ema


def max_diff(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------- equivalence


@torch.no_grad()
def test_renders_like_rosinality_32px(ckpt32):
    path, ckpt = ckpt32
    sd = ckpt["g_ema"]
    model = convert_checkpoint(path)
    G = model.generator
    cfg = G.cfg
    assert (cfg.resolution, cfg.w_dim, cfg.z_dim, cfg.n_mapping) == (32, 512, 512, 8)
    assert cfg.mapping_lr_mul == 0.01
    assert [cfg.channels(r) for r in (4, 8, 16, 32)] == [512] * 4
    assert torch.equal(G.mapping.w_avg, ckpt["latent_avg"])
    assert model.meta["name"] == "faces32"
    assert model.meta["source"]["format"] == "rosinality" and model.meta["source"]["file"] == "faces32.pt"
    assert len(model.meta["source"]["sha256"]) == 64

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 512, generator=gen)
    assert max_diff(G.mapping(z), ref_mapping(sd, z, 8)) <= 1e-4

    # a distinct w per layer, so a wrong latent index cannot go unnoticed
    ws = ref_mapping(sd, torch.randn(2 * cfg.n_latent, 512, generator=gen), 8).view(2, cfg.n_latent, 512)
    ref = ref_synthesis(sd, ws)
    out = G.synthesis(ws, noise_mode="const")
    diff = max_diff(out, ref)
    print(f"32px max abs diff {diff:.3g} (|ref| max {ref.abs().max():.3g}, std {ref.std():.3g})")
    assert out.shape == ref.shape == (2, 3, 32, 32)
    assert 0.1 < ref.std() and ref.abs().max() < 4  # a meaningful, roughly [-1, 1] image
    assert diff <= 1e-3

    # the noise buffers and (non-zero) strengths sit where rosinality uses them
    blocks = G.synthesis.blocks
    layers = [blocks[0].conv1] + [c for b in blocks[1:] for c in (b.conv0, b.conv1)]
    for i, layer in enumerate(layers):
        assert torch.equal(layer.noise_const, sd[f"noises.noise_{i}"])
        src = "conv1" if i == 0 else f"convs.{i - 1}"
        assert torch.equal(layer.noise_strength, sd[f"{src}.noise.weight"]) and layer.noise_strength.abs() > 0


@torch.no_grad()
def test_renders_like_rosinality_64px_channel_multiplier_1(tmp_path):
    """Channels drop to 256 at 64 px (cm=1); no latent_avg (w_avg estimated); lr_mlp from args."""
    path = tmp_path / "cm1.pt"
    sd = make_g_ema(64, 64, 2, cm=1, lr_mlp=0.02, seed=3)
    write_ckpt(path, sd, latent_avg=False, args=argparse.Namespace(channel_multiplier=1, lr_mlp=0.02))
    model = convert_checkpoint(path)
    G = model.generator
    cfg = G.cfg
    assert (cfg.resolution, cfg.w_dim, cfg.n_mapping, cfg.mapping_lr_mul) == (64, 64, 2, 0.02)
    assert (cfg.channel_base, cfg.channel_max) == (16384, 512)
    assert [cfg.channels(4 * 2**b) for b in range(cfg.num_blocks)] == [512, 512, 512, 512, 256]
    assert model.meta["source"]["channel_multiplier"] == 1 and model.meta["source"]["w_avg"] == "estimated"
    assert max_diff(G.mapping.w_avg, G.mean_w()) == 0.0

    gen = torch.Generator().manual_seed(1)
    ws = ref_mapping(sd, torch.randn(cfg.n_latent, 64, generator=gen), 2, lr_mlp=0.02)[None]
    ref = ref_synthesis(sd, ws)
    diff = max_diff(G.synthesis(ws, noise_mode="const"), ref)
    print(f"64px max abs diff {diff:.3g} (|ref| max {ref.abs().max():.3g})")
    assert 0.1 < ref.std() and ref.abs().max() < 4
    assert diff <= 1e-3


def test_inferred_multiplier_below_64px_comes_from_args(tmp_path, small_ckpt):
    _, sd = small_ckpt
    cfg, cm = checkpoints.infer_config(sd, argparse.Namespace(channel_multiplier=1))
    assert cm == 1 and cfg.channel_base == 16384 and cfg.resolution == 16
    cfg, cm = checkpoints.infer_config(sd, None)
    assert cm == 2 and cfg.channel_base == 32768


# ------------------------------------------------------------------------------------ the cache


def test_load_model_converts_once_into_cache(tmp_path, monkeypatch, small_ckpt):
    path, g_ema = small_ckpt
    monkeypatch.setenv("SAMINV_CACHE", str(tmp_path / "cache"))
    calls = []
    real = checkpoints.convert_checkpoint
    monkeypatch.setattr(checkpoints, "convert_checkpoint", lambda p: calls.append(p) or real(p))

    first = load_model(path)
    entries = list((tmp_path / "cache" / "models").iterdir())
    assert len(entries) == 1 and first.path == entries[0] and calls == [path]
    config = json.loads((entries[0] / "config.json").read_text())
    assert config["source"]["format"] == "rosinality" and config["name"] == "small16"
    assert entries[0].name == config["source"]["sha256"][:16]

    second = load_model(str(path))
    assert calls == [path]  # reused, not converted again
    assert second.path == first.path
    for k, v in first.generator.state_dict().items():
        assert torch.equal(v, second.generator.state_dict()[k]), k
    ws = torch.randn(1, second.generator.cfg.n_latent, 64)
    with torch.no_grad():
        assert max_diff(second.generator.synthesis(ws), ref_synthesis(g_ema, ws)) <= 1e-3


# --------------------------------------------------------------------------------- bad input


def _expect_error(path, *fragments):
    with pytest.raises(InputError) as info:
        convert_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_missing_and_empty_file(tmp_path):
    _expect_error(tmp_path / "nope.pt", "not found")
    (tmp_path / "empty.pt").write_bytes(b"")
    _expect_error(tmp_path / "empty.pt", "empty")


def test_truncated_and_random_bytes(tmp_path, small_ckpt):
    data = small_ckpt[0].read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    _expect_error(tmp_path / "cut.pt", "truncated or corrupt")
    noise = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    (tmp_path / "noise.pt").write_bytes(bytes(noise.tolist()))
    _expect_error(tmp_path / "noise.pt", "unknown checkpoint format")


def test_dict_without_g_ema(tmp_path):
    torch.save({"g": {"w": torch.zeros(2)}, "d": {}}, tmp_path / "nog.pt")
    _expect_error(tmp_path / "nog.pt", "no 'g_ema'")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    _expect_error(tmp_path / "tensor.pt", "no 'g_ema'")


_DELETE = object()


@pytest.mark.parametrize("key, value, fragment", [
    ("convs.1.conv.weight", torch.zeros(1, 512, 256, 3, 3),
     "key 'convs.1.conv.weight' has shape [1, 512, 256, 3, 3], expected [1, 512, 512, 3, 3]"),
    ("to_rgb1.bias", torch.zeros(3), "key 'to_rgb1.bias' has shape [3], expected [1, 3, 1, 1]"),
    ("convs.2.activate.bias", _DELETE, "missing key 'convs.2.activate.bias'"),
    ("noises.noise_4", _DELETE, "missing key 'noises.noise_4'"),
    ("convs.0.bias", torch.zeros(512), "unexpected key 'convs.0.bias'"),
    ("convs.0.conv.blur.kernel", torch.ones(4, 4), "'convs.0.conv.blur.kernel' is not the standard"),
    ("input.input", torch.zeros(1, 256, 4, 4), "do not follow rosinality's layout"),
], ids=["shape", "rgb-bias-shape", "missing", "missing-noise", "unexpected", "blur", "channels"])
def test_bad_state_dict_names_the_key(tmp_path, small_ckpt, key, value, fragment):
    sd = dict(small_ckpt[1])
    if value is _DELETE:
        del sd[key]
    else:
        sd[key] = value
    write_ckpt(tmp_path / "bad.pt", sd, extra=False)
    _expect_error(tmp_path / "bad.pt", "bad rosinality checkpoint", fragment)


def _pickle_global(module: str, name: str, body: bytes = b")\x81") -> bytes:
    """Protocol-2 pickle bytes whose first object is ``module.name`` (built by hand, never loaded)."""
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + body


def test_foreign_pickle_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    # builtins.open(marker, 'w') via REDUCE: would create the marker if the pickle were executed
    arg = str(marker).encode()
    data = (b"\x80\x02cbuiltins\nopen\nX" + len(arg).to_bytes(4, "little") + arg
            + b"X\x01\x00\x00\x00w\x86R.")
    (tmp_path / "evil.pt").write_bytes(data)
    _expect_error(tmp_path / "evil.pt", "unknown checkpoint format", "open")
    assert not marker.exists()

    (tmp_path / "other.pt").write_bytes(_pickle_global("mypackage.models", "Thing") + b".")
    _expect_error(tmp_path / "other.pt", "unknown checkpoint format", "mypackage.models.Thing")


# ------------------------------------------------------------------------- NVIDIA network pickles
# Written here from NVIDIA's documented layout (stylegan2-ada-pytorch): a pickled dict whose networks are
# torch_utils.persistence objects, each reduced to _reconstruct_persistent_obj(meta) with meta = {type,
# version, module_src, class_name, state = the module's __dict__}; G_ema's names mapping.fc{i},
# mapping.w_avg, synthesis.b{res}.const / conv0 / conv1 / torgb (affine, weight, bias, noise_strength [],
# noise_const [r, r], resample_filter = [1, 3, 3, 1] outer product / 64).


def _reconstruct_persistent_obj(meta):  # stands in for NVIDIA's hook, which exec()s meta["module_src"]
    raise AssertionError("saminv must never call the pickle's own reconstruct hook")


class EasyDict(dict):
    """Stands in for dnnlib.util.EasyDict while writing."""


class TFNetwork:
    """Stands in for the TensorFlow-era dnnlib.tflib.network.Network: pickles its state dict (whose
    build_module_src NVIDIA's TensorFlow loader exec()s)."""

    __qualname__ = "Network"  # pickled by name as dnnlib.tflib.network.Network (the fixture registers it)

    def __init__(self, state):
        self.state = state

    def __getstate__(self):
        return self.state


@pytest.fixture
def nvidia_modules(monkeypatch):
    """Registers stand-ins for NVIDIA's modules so that pickle can name them while writing."""
    persistence = types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = EasyDict
    network = types.ModuleType("dnnlib.tflib.network")
    network.Network = TFNetwork
    monkeypatch.setattr(_reconstruct_persistent_obj, "__module__", "torch_utils.persistence")
    monkeypatch.setattr(EasyDict, "__module__", "dnnlib.util")
    monkeypatch.setattr(TFNetwork, "__module__", "dnnlib.tflib.network")
    for name, module in {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
                         "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util,
                         "dnnlib.tflib": types.ModuleType("dnnlib.tflib"), "dnnlib.tflib.network": network}.items():
        monkeypatch.setitem(sys.modules, name, module)


class Persistent:
    """Pickles as NVIDIA's persistent objects do."""

    def __init__(self, class_name, state, module_src="class Generator: pass"):
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def __reduce__(self):
        return (_reconstruct_persistent_obj, (dict(type="class", version=6, module_src=self.module_src,
                                                   class_name=self.class_name, state=self.state),))


NVIDIA_FILTER = torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64
NVIDIA_BUFFERS = ("w_avg", "noise_const", "resample_filter")


def nvidia_g_ema(sd, w_avg):
    """The NVIDIA ``G_ema`` state dict with the weights of rosinality's ``g_ema`` ``sd``."""
    n_mlp = sum(1 for k in sd if k.startswith("style.") and k.endswith(".weight"))
    n_rgbs = sum(1 for k in sd if k.startswith("to_rgbs.") and k.endswith(".conv.weight"))
    out = {"mapping.w_avg": w_avg}
    for i in range(n_mlp):
        out[f"mapping.fc{i}.weight"], out[f"mapping.fc{i}.bias"] = sd[f"style.{i + 1}.weight"], sd[f"style.{i + 1}.bias"]

    def affine(src, dst):
        out[f"{dst}.weight"] = sd[f"{src}.conv.weight"][0]
        out[f"{dst}.affine.weight"] = sd[f"{src}.conv.modulation.weight"]
        out[f"{dst}.affine.bias"] = sd[f"{src}.conv.modulation.bias"]

    def layer(src, dst, noise):
        affine(src, dst)
        out[f"{dst}.noise_strength"] = sd[f"{src}.noise.weight"].reshape(())
        out[f"{dst}.noise_const"] = sd[noise][0, 0]
        out[f"{dst}.bias"] = sd[f"{src}.activate.bias"]
        out[f"{dst}.resample_filter"] = NVIDIA_FILTER

    def torgb(src, dst):
        affine(src, dst)
        out[f"{dst}.bias"] = sd[f"{src}.bias"].reshape(3)

    out["synthesis.b4.const"], out["synthesis.b4.resample_filter"] = sd["input.input"][0], NVIDIA_FILTER
    layer("conv1", "synthesis.b4.conv1", "noises.noise_0")
    torgb("to_rgb1", "synthesis.b4.torgb")
    for j in range(n_rgbs):
        block = f"synthesis.b{8 * 2**j}"
        out[f"{block}.resample_filter"] = NVIDIA_FILTER
        layer(f"convs.{2 * j}", f"{block}.conv0", f"noises.noise_{2 * j + 1}")
        layer(f"convs.{2 * j + 1}", f"{block}.conv1", f"noises.noise_{2 * j + 2}")
        torgb(f"to_rgbs.{j}", f"{block}.torgb")
    return out


def _class_name(path):
    last = path.rsplit(".", 1)[-1]
    if last.startswith("fc") or last == "affine":
        return "FullyConnectedLayer"
    if last[:1] == "b" and last[1:].isdigit():
        return "SynthesisBlock"
    return {"": "Generator", "mapping": "MappingNetwork", "synthesis": "SynthesisNetwork",
            "conv0": "SynthesisLayer", "conv1": "SynthesisLayer", "torgb": "ToRGBLayer"}.get(last, last)


def nvidia_network(flat, attrs, module_src="class Generator: pass"):
    """Nested persistent objects holding the state dict ``flat``; ``attrs[path]`` adds plain attributes."""
    def node(path):
        return {"_parameters": OrderedDict(), "_buffers": OrderedDict(), "_modules": OrderedDict(), **attrs.get(path, {})}

    nodes = {"": node("")}
    for key, t in flat.items():
        *parts, name = key.split(".")
        for i in range(len(parts)):
            path = ".".join(parts[:i + 1])
            if path not in nodes:
                nodes[path] = node(path)
                nodes[".".join(parts[:i])]["_modules"][parts[i]] = path
        group = "_buffers" if name in NVIDIA_BUFFERS else "_parameters"
        nodes[".".join(parts)][group][name] = t if group == "_buffers" else torch.nn.Parameter(t.clone())

    def build(path):
        state = dict(nodes[path])
        state["_modules"] = OrderedDict((k, build(p)) for k, p in state["_modules"].items())
        return Persistent(_class_name(path), state, module_src)
    return build("")


def write_nvidia_pkl(path, g_ema_sd, w_avg, clamp=None, c_dim=0, module_src="class Generator: pass", extra=None):
    """An NVIDIA training snapshot (G, D, G_ema, augment_pipe, training_set_kwargs) with rosinality's weights."""
    flat = nvidia_g_ema(g_ema_sd, w_avg)
    res = max(int(k.split(".")[1][1:]) for k in flat if k.startswith("synthesis.b"))
    attrs = {"": {"z_dim": g_ema_sd["style.1.weight"].shape[1], "c_dim": c_dim, "w_dim": w_avg.numel(),
                  "img_resolution": res, "img_channels": 3, "_init_kwargs": EasyDict(c_dim=c_dim)},
             "mapping.fc0": {"bias_gain": 0.01, "weight_gain": np.float64(0.01 / math.sqrt(w_avg.numel()))}}
    for key in flat:
        parts = key.split(".")
        if parts[0] == "synthesis":
            attrs.setdefault(".".join(parts[:2]), {"architecture": "skip"})
            if parts[2] in ("conv0", "conv1", "torgb"):
                attrs.setdefault(".".join(parts[:3]), {"conv_clamp": clamp})
    G = nvidia_network(flat, attrs, module_src)
    snapshot = {"training_set_kwargs": EasyDict(path="ffhq.zip", resolution=res), "G": G, "D": None,
                "G_ema": G, "augment_pipe": None, **(extra or {})}
    path.write_bytes(pickle.dumps(snapshot, protocol=4))


@torch.no_grad()
def test_nvidia_pickle_renders_like_rosinality(tmp_path, monkeypatch, nvidia_modules, small_ckpt):
    _, sd = small_ckpt
    w_avg = torch.randn(64) * 0.1
    marker = tmp_path / "ran"
    write_nvidia_pkl(tmp_path / "snapshot.pkl", sd, w_avg, module_src=f"open({str(marker)!r}, 'w')")
    model = convert_checkpoint(tmp_path / "snapshot.pkl")
    assert not marker.exists()  # the pickle's module source was never executed
    G = model.generator
    cfg = G.cfg
    assert (cfg.resolution, cfg.w_dim, cfg.z_dim, cfg.n_mapping, cfg.mapping_lr_mul) == (16, 64, 64, 2, 0.01)
    assert [cfg.channels(r) for r in (4, 8, 16)] == [512] * 3 and cfg.conv_clamp is None
    assert torch.equal(G.mapping.w_avg, w_avg)
    assert model.meta["source"]["format"] == "nvidia" and model.meta["source"]["w_avg"] == "w_avg"

    gen = torch.Generator().manual_seed(7)
    z = torch.randn(2, 64, generator=gen)
    assert max_diff(G.mapping(z), ref_mapping(sd, z, 2)) <= 1e-4
    ws = ref_mapping(sd, torch.randn(2 * cfg.n_latent, 64, generator=gen), 2).view(2, cfg.n_latent, 64)
    ref = ref_synthesis(sd, ws)
    assert 0.1 < ref.std() and ref.abs().max() < 4
    assert max_diff(G.synthesis(ws, noise_mode="const"), ref) <= 1e-3

    monkeypatch.setenv("SAMINV_CACHE", str(tmp_path / "cache"))  # --model takes the .pkl too
    cached = load_model(tmp_path / "snapshot.pkl")
    assert max_diff(cached.generator.synthesis(ws, noise_mode="const"), ref) <= 1e-3


def write_tensorflow_pkl(path, g_ema_sd, w_avg, module_src="class Generator: pass", **static_kwargs):
    """A TensorFlow StyleGAN2 snapshot (G, D, Gs) with rosinality's weights, in the TensorFlow layout that NVIDIA's
    stylegan2-ada-pytorch legacy.py reads: dense [I, O], conv [k, k, I, O] (upsampling convs' kernels flipped),
    mod_bias stored minus 1, noise{i} [1, 1, r, r], scalars as numpy float32."""
    nv = {k: v.numpy() for k, v in nvidia_g_ema(g_ema_sd, w_avg).items()}
    n_mlp = sum(1 for k in nv if k.startswith("mapping.fc") and k.endswith(".weight"))
    mapping = [(f"Dense{i}/{p}", nv[f"mapping.fc{i}.{p}"].T.copy() if p == "weight" else nv[f"mapping.fc{i}.{p}"])
               for i in range(n_mlp) for p in ("weight", "bias")]
    resolutions = sorted({int(k.split(".")[1][1:]) for k in nv if k.startswith("synthesis.b")})
    synthesis, noise = [("4x4/Const/const", nv["synthesis.b4.const"][None])], 0

    def modulated(src, dst, flip=False):
        w = nv[f"{src}.weight"].transpose(2, 3, 1, 0)
        synthesis.extend([(f"{dst}/weight", (w[::-1, ::-1] if flip else w).copy()),
                          (f"{dst}/mod_weight", nv[f"{src}.affine.weight"].T.copy()),
                          (f"{dst}/mod_bias", nv[f"{src}.affine.bias"] - 1), (f"{dst}/bias", nv[f"{src}.bias"])])

    for r in resolutions:
        for tf_name, conv in ([("Conv", "conv1")] if r == 4 else [("Conv0_up", "conv0"), ("Conv1", "conv1")]):
            src = f"synthesis.b{r}.{conv}"
            modulated(src, f"{r}x{r}/{tf_name}", flip=tf_name == "Conv0_up")
            synthesis.append((f"{r}x{r}/{tf_name}/noise_strength", np.float32(nv[f"{src}.noise_strength"])))
            synthesis.append((f"noise{noise}", nv[f"{src}.noise_const"][None, None]))
            noise += 1
        modulated(f"synthesis.b{r}.torgb", f"{r}x{r}/ToRGB")

    def network(name, variables, components=None, kwargs=None):
        return TFNetwork(dict(version=4, name=name, static_kwargs=kwargs or {}, components=components or {},
                              build_module_src=module_src, build_func_name="G_main", variables=variables))

    kwargs = EasyDict(latent_size=int(nv["mapping.fc0.weight"].shape[1]), label_size=0, resolution=resolutions[-1],
                      **static_kwargs)
    gs = network("G", [("dlatent_avg", nv["mapping.w_avg"])], {"mapping": network("G_mapping", mapping),
                                                                "synthesis": network("G_synthesis", synthesis)}, kwargs)
    path.write_bytes(pickle.dumps((gs, network("D", []), gs), protocol=2))


@torch.no_grad()
def test_tensorflow_pickle_renders_like_rosinality(tmp_path, nvidia_modules, small_ckpt):
    _, sd = small_ckpt
    w_avg = torch.randn(64) * 0.1
    marker = tmp_path / "ran"
    write_tensorflow_pkl(tmp_path / "stylegan2-tf.pkl", sd, w_avg, module_src=f"open({str(marker)!r}, 'w')")
    model = convert_checkpoint(tmp_path / "stylegan2-tf.pkl")
    assert not marker.exists()
    G = model.generator
    assert (G.cfg.resolution, G.cfg.w_dim, G.cfg.n_mapping) == (16, 64, 2) and model.meta["source"]["format"] == "nvidia-tf"
    assert torch.equal(G.mapping.w_avg, w_avg)
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(2, 64, generator=gen)
    assert max_diff(G.mapping(z), ref_mapping(sd, z, 2)) <= 1e-4
    ws = ref_mapping(sd, torch.randn(2 * G.cfg.n_latent, 64, generator=gen), 2).view(2, G.cfg.n_latent, 64)
    ref = ref_synthesis(sd, ws)
    assert 0.1 < ref.std() and max_diff(G.synthesis(ws, noise_mode="const"), ref) <= 1e-3
    assert G.cfg.conv_clamp is None

    write_tensorflow_pkl(tmp_path / "ada-tf.pkl", sd, w_avg, conv_clamp=256)  # stylegan2-ada's TensorFlow networks
    assert convert_checkpoint(tmp_path / "ada-tf.pkl").generator.cfg.conv_clamp == 256.0


@torch.no_grad()
def test_nvidia_conv_clamp_is_kept_and_applied(tmp_path, nvidia_modules, small_ckpt):
    """NVIDIA's mixed-precision generators clamp each layer's activations and ToRGB output to conv_clamp."""
    _, sd = small_ckpt
    write_nvidia_pkl(tmp_path / "clamped.pkl", sd, torch.zeros(64), clamp=0.01)
    model = convert_checkpoint(tmp_path / "clamped.pkl")
    assert model.generator.cfg.conv_clamp == 0.01
    save_model(model, tmp_path / "model")
    G = load_model_dir(tmp_path / "model").generator
    assert G.cfg.conv_clamp == 0.01
    ws = ref_mapping(sd, torch.randn(G.cfg.n_latent, 64, generator=torch.Generator().manual_seed(8)), 2)[None]
    # the image is the sum of one clamped ToRGB output per block, each upsampled by a filter that sums to 1
    out = G.synthesis(ws, noise_mode="const")
    assert out.abs().max() <= 0.01 * G.cfg.num_blocks + 1e-6
    assert ref_synthesis(sd, ws).abs().max() > 10 * 0.01 * G.cfg.num_blocks  # unclamped, it would not be


def _evil_reduce(marker):
    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    return Evil()


def test_bad_nvidia_pickles(tmp_path, nvidia_modules, small_ckpt):
    _, sd = small_ckpt
    w_avg = torch.zeros(64)
    marker = tmp_path / "pwned"
    write_nvidia_pkl(tmp_path / "evil.pkl", sd, w_avg, extra={"payload": _evil_reduce(marker)})
    _expect_error(tmp_path / "evil.pkl", "unsupported NVIDIA pickle", "io.open", "refusing to run code")
    assert not marker.exists()

    write_nvidia_pkl(tmp_path / "good.pkl", sd, w_avg)
    data = (tmp_path / "good.pkl").read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    _expect_error(tmp_path / "cut.pkl", "truncated or corrupt")

    write_nvidia_pkl(tmp_path / "cond.pkl", sd, w_avg, c_dim=10)
    _expect_error(tmp_path / "cond.pkl", "bad NVIDIA checkpoint", "class-conditional")

    broken = nvidia_g_ema(sd, w_avg)
    del broken["synthesis.b8.conv0.affine.bias"]
    G = nvidia_network(broken, {})
    (tmp_path / "missing.pkl").write_bytes(pickle.dumps({"G_ema": G}))
    _expect_error(tmp_path / "missing.pkl", "bad NVIDIA checkpoint", "missing key 'synthesis.b8.conv0.affine.bias'")

    sg3 = nvidia_network({"synthesis.input.weight": torch.zeros(4, 2), "synthesis.L0_36_512.weight": torch.zeros(2),
                          "mapping.fc0.weight": torch.zeros(64, 64)}, {})
    (tmp_path / "sg3.pkl").write_bytes(pickle.dumps({"G_ema": sg3}))
    _expect_error(tmp_path / "sg3.pkl", "StyleGAN3 is not supported")

    (tmp_path / "nog.pkl").write_bytes(pickle.dumps({"training_set_kwargs": EasyDict(path="x"), "D": None}))
    _expect_error(tmp_path / "nog.pkl", "no 'G_ema' generator")

    write_tensorflow_pkl(tmp_path / "tf.pkl", sd, w_avg)
    data = (tmp_path / "tf.pkl").read_bytes().replace(b"noise_strength", b"noise_strengtX")
    (tmp_path / "tf-missing.pkl").write_bytes(data)
    _expect_error(tmp_path / "tf-missing.pkl", "bad NVIDIA checkpoint", "missing variable 'synthesis/4x4/Conv/noise_strength'")


# ----------------------------------------------------------------------------------------- CLI


@torch.no_grad()
def test_convert_and_generate_cli_match_the_reference(ckpt32, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from saminv.cli import app

    monkeypatch.setenv("SAMINV_CACHE", str(tmp_path / "cache"))
    path, ckpt = ckpt32
    runner = CliRunner()
    res = runner.invoke(app, ["convert", str(path), "--out", str(tmp_path / "model")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "model" / "config.json").is_file()
    assert runner.invoke(app, ["convert", str(path), "--out", str(tmp_path / "model")]).exit_code == 2  # exists

    gen = torch.Generator().manual_seed(5)
    ws = ref_mapping(ckpt["g_ema"], torch.randn(2 * 8, 512, generator=gen), 8).view(2, 8, 512)
    np.save(tmp_path / "latents.npy", ws.numpy())
    for model in (tmp_path / "model", path):  # a model directory, or the .pt converted on first use
        out = tmp_path / f"out-{model.name}"
        res = runner.invoke(app, ["generate", "--model", str(model), "--latents", str(tmp_path / "latents.npy"),
                                  "--out", str(out), "--save-array"])
        assert res.exit_code == 0, res.output
        images = torch.from_numpy(np.load(out / "images.npy"))
        assert images.dtype == torch.float32 and images.shape == (2, 3, 32, 32)
        assert max_diff(images, ref_synthesis(ckpt["g_ema"], ws)) <= 1e-3
        assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png"]

    np.save(tmp_path / "bad.npy", np.zeros((2, 7, 512), np.float32))
    res = runner.invoke(app, ["generate", "--model", str(path), "--latents", str(tmp_path / "bad.npy")])
    assert res.exit_code == 2 and "expected (N, 8, 512)" in res.output
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 truncated")
    res = runner.invoke(app, ["generate", "--model", str(tmp_path / "broken.pt")])
    assert res.exit_code == 2 and "broken.pt" in res.output and "Traceback" not in res.output
