"""Check saminv's NVIDIA ``.pkl`` conversion against NVIDIA's own stylegan2-ada-pytorch code.

Builds a StyleGAN2 generator with random weights using the ``training/networks.py`` of a local
stylegan2-ada-pytorch checkout (``--repo``; not a saminv dependency: this is a developer check),
pickles it the way NVIDIA's training loop does (``{"G", "D", "G_ema", ...}``), converts the pickle with
``saminv.models.checkpoints.convert_checkpoint`` and compares w (mapping + truncation) and images
(``noise_mode="const"``), float32 NCHW, per configuration: max abs difference and the images' scale. Without
``conv_clamp`` it also writes the same weights in the TensorFlow StyleGAN2 layout (``(G, D, Gs)``), checks that the
checkout's ``legacy.py`` converts that file back to the original generator, and compares saminv's conversion.

    python benchmarks/nvidia_reference.py --repo ../stylegan2-ada-pytorch [--out nvidia_reference.json]

Measured 2026-12-06 (random weights, non-zero noise strengths and biases, 4 images each; a few seconds on 1 thread):
32 px, 64 channels: w 0, image 4.0e-6 (|image| up to 12.9); its TensorFlow file: legacy.py gives back the original
generator exactly (0), saminv 4.0e-6; 64 px, 128 channels, conv_clamp 1.0: w 0, image 2.7e-6 (|image| up to 3.0).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import types
from pathlib import Path

import torch

from saminv.errors import reports_errors
from saminv.models.checkpoints import convert_checkpoint

CONFIGS = [  # (resolution, channel_base, channel_max, conv_clamp)
    (32, 1024, 64, None),
    (64, 4096, 128, 1.0),  # a small clamp, so that clamping really happens
]


def nvidia_generator(resolution: int, channel_base: int, channel_max: int, conv_clamp: float | None):
    """NVIDIA's Generator (from the checkout on sys.path) with random, non-trivial parameters."""
    from training.networks import Generator

    G = Generator(z_dim=512, c_dim=0, w_dim=512, img_resolution=resolution, img_channels=3,
                  mapping_kwargs=dict(num_layers=8),
                  synthesis_kwargs=dict(channel_base=channel_base, channel_max=channel_max, num_fp16_res=0,
                                        conv_clamp=conv_clamp)).eval()
    with torch.no_grad():
        for name, p in G.named_parameters():
            if "noise_strength" in name:
                p.fill_(0.3)
            elif name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        G.mapping.w_avg.normal_()
    return G


class Network:
    """Pickles as the TensorFlow-era ``dnnlib.tflib.network.Network`` (its state dict)."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def __getstate__(self) -> dict:
        return self.state


def tensorflow_pickle(G) -> bytes:
    """``(G, D, Gs)`` in NVIDIA's TensorFlow StyleGAN2 layout holding ``G``'s weights (the inverse of
    stylegan2-ada-pytorch's ``legacy.py``: dense [I, O], conv [k, k, I, O] with the upsampling kernels
    flipped, mod_bias minus 1, ``synthesis/noise{i}`` [1, 1, r, r])."""
    sd = {k: v.detach().numpy() for k, v in G.state_dict().items()}
    mapping = [(f"Dense{i}/{p}", sd[f"mapping.fc{i}.{p}"].T.copy() if p == "weight" else sd[f"mapping.fc{i}.{p}"])
               for i in range(G.mapping.num_layers) for p in ("weight", "bias")]
    synthesis, noise = [("4x4/Const/const", sd["synthesis.b4.const"][None])], 0

    def modulated(src: str, dst: str, flip: bool = False) -> None:
        w = sd[f"{src}.weight"].transpose(2, 3, 1, 0)
        synthesis.extend([(f"{dst}/weight", (w[::-1, ::-1] if flip else w).copy()),
                          (f"{dst}/mod_weight", sd[f"{src}.affine.weight"].T.copy()),
                          (f"{dst}/mod_bias", sd[f"{src}.affine.bias"] - 1), (f"{dst}/bias", sd[f"{src}.bias"])])

    for r in G.synthesis.block_resolutions:
        for tf_name, conv in ([("Conv", "conv1")] if r == 4 else [("Conv0_up", "conv0"), ("Conv1", "conv1")]):
            modulated(f"synthesis.b{r}.{conv}", f"{r}x{r}/{tf_name}", flip=tf_name == "Conv0_up")
            synthesis.append((f"{r}x{r}/{tf_name}/noise_strength", sd[f"synthesis.b{r}.{conv}.noise_strength"]))
            synthesis.append((f"noise{noise}", sd[f"synthesis.b{r}.{conv}.noise_const"][None, None]))
            noise += 1
        modulated(f"synthesis.b{r}.torgb", f"{r}x{r}/ToRGB")

    def network(name, variables, components=None, kwargs=None):
        return Network(dict(version=4, name=name, static_kwargs=kwargs or {}, components=components or {},
                            build_module_src="", build_func_name="G_main", variables=variables))

    synthesis_kwargs = G.init_kwargs.synthesis_kwargs
    kwargs = dict(latent_size=G.z_dim, dlatent_size=G.w_dim, label_size=0, resolution=G.img_resolution, num_channels=3,
                  fmap_base=synthesis_kwargs["channel_base"] // 2, fmap_max=synthesis_kwargs["channel_max"])
    gs = network("G", [("dlatent_avg", sd["mapping.w_avg"])],
                 {"mapping": network("G_mapping", mapping), "synthesis": network("G_synthesis", synthesis)}, kwargs)
    return pickle.dumps((gs, gs, gs))


@reports_errors
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, required=True, help="A stylegan2-ada-pytorch checkout.")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(args.repo.resolve()))
    if "requests" not in sys.modules:  # dnnlib.util imports it for downloads, which this check never makes
        try:
            import requests  # noqa: F401
        except ImportError:
            sys.modules["requests"] = types.ModuleType("requests")
    for name in ("click",):  # legacy.py's command line needs it; this check does not
        if name not in sys.modules:
            try:
                __import__(name)
            except ImportError:
                stub = types.ModuleType(name)
                stub.__getattr__ = lambda attr: (lambda *a, **k: (lambda f: f))
                sys.modules[name] = stub
    import legacy  # noqa: E402  (from the checkout)

    network_module = types.ModuleType("dnnlib.tflib.network")  # so that pickle can name Network
    network_module.Network = Network
    Network.__module__ = "dnnlib.tflib.network"
    sys.modules.setdefault("dnnlib.tflib", types.ModuleType("dnnlib.tflib"))
    sys.modules["dnnlib.tflib.network"] = network_module
    torch.manual_seed(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for res, base, cmax, clamp in CONFIGS:
            G = nvidia_generator(res, base, cmax, clamp)
            z = torch.randn(4, 512)
            with torch.no_grad():
                ws = G.mapping(z, None, truncation_psi=0.7)
                img = G.synthesis(ws, noise_mode="const")
            path = Path(tmp) / f"nvidia{res}.pkl"
            path.write_bytes(pickle.dumps({"G": G, "D": None, "G_ema": G, "augment_pipe": None,
                                           "training_set_kwargs": {}}))
            ours = convert_checkpoint(path).generator
            with torch.no_grad():
                ws_ours = ours.mapping(z, truncation=0.7)
                img_ours = ours.synthesis(ws, noise_mode="const")
            row = {"resolution": res, "channel_base": base, "channel_max": cmax, "conv_clamp": clamp,
                   "w_max_abs_diff": float((ws_ours - ws[:, 0]).abs().max()),
                   "image_max_abs_diff": float((img_ours - img).abs().max()),
                   "image_max_abs": float(img.abs().max())}
            if clamp is None:  # TensorFlow StyleGAN2 has no conv_clamp
                path = Path(tmp) / f"tensorflow{res}.pkl"
                path.write_bytes(tensorflow_pickle(G))
                with open(path, "rb") as f:
                    reference = legacy.convert_tf_generator(legacy._LegacyUnpickler(f).load()[2])
                ours = convert_checkpoint(path).generator
                with torch.no_grad():
                    row["tensorflow_legacy_vs_original"] = float(
                        (reference.synthesis(ws, noise_mode="const") - img).abs().max())
                    row["tensorflow_image_max_abs_diff"] = float((ours.synthesis(ws, noise_mode="const") - img).abs().max())
                    row["tensorflow_w_max_abs_diff"] = float((ours.mapping(z, truncation=0.7) - ws[:, 0]).abs().max())
            results.append(row)
            print(json.dumps(row))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
