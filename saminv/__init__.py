"""saminv: GAN inversion and editing by Spatially-Adaptive Multilayer Selection (SAM) on StyleGAN2.

Python API (imported on first use, so ``import saminv.runtime`` stays free of torch)::

    result = saminv.invert(photo, model="faces64")          # SAM optimization inversion
    image = saminv.edit(result.codes, "ganspace:1", 2.0)     # R x R x 3 uint8
"""

from __future__ import annotations

__all__ = ["invert", "edit"]


def __getattr__(name: str):
    if name in __all__:
        from saminv import api

        return getattr(api, name)
    raise AttributeError(f"module 'saminv' has no attribute {name!r}")
