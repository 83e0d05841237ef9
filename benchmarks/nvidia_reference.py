"""Check saminv's NVIDIA ``.pkl`` conversion against NVIDIA's own stylegan2-ada-pytorch code.

Builds a StyleGAN2 generator with random weights using the ``training/networks.py`` of a local
stylegan2-ada-pytorch checkout (``--repo``; not a saminv dependency: this is a developer check),
pickles it the way NVIDIA's training loop does (``{"G", "D", "G_ema", ...}``), converts the pickle with
``saminv.models.checkpoints.convert_checkpoint`` and compares w (mapping + truncation) and images
(``noise_mode="const"``), float32 NCHW, per configuration: max abs difference and the images' scale.

    python benchmarks/nvidia_reference.py --repo ../stylegan2-ada-pytorch [--out nvidia_reference.json]

Measured 2026-12-06 (random weights, non-zero noise strengths and biases, 4 images each):
32 px, 64 channels: w 0, image 4.0e-6 (|image| up to 12.9); 64 px, 128 channels, conv_clamp 1.0: w 0, image 2.2e-6
(|image| up to 3.7). On 1 thread, a few seconds.
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
            results.append(row)
            print(json.dumps(row))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
