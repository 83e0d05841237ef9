"""The masked residual of SAM (paper Eq. 3) as one fused GPU kernel, with the plain-ops reference.

    out = x + area_resize(mask, r) * delta        x, delta [N, C, r, r]; mask [N, 1, R, R], R = s * r

Unfused this is three kernels and two temporaries (avg-pool, multiply, add); the Triton kernel reads
x, delta and the s x s mask window once per output element and writes ``out`` once. It needs CUDA
and Triton; :func:`masked_residual` falls back to the plain ops elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_residual_reference(x: Tensor, mask: Tensor, delta: Tensor) -> Tensor:
    """Plain ops: ``x + avg_pool(mask, R / r) * delta`` (float32 or float16, any device)."""
    s = mask.shape[-1] // x.shape[-1]
    m = F.avg_pool2d(mask, s) if s > 1 else mask
    return x + m.to(x.dtype) * delta


def triton_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_kernel = None


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, mask_ptr, delta_ptr, out_ptr, total, C, r, R, S: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = offsets < total
        w = offsets % r
        h = (offsets // r) % r
        n = offsets // (r * r * C)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        base = n * R * R + (h * S) * R + w * S
        for i in tl.static_range(S):
            for j in tl.static_range(S):
                acc += tl.load(mask_ptr + base + i * R + j, mask=valid, other=0.0).to(tl.float32)
        m = acc / (S * S)
        x = tl.load(x_ptr + offsets, mask=valid, other=0.0)
        d = tl.load(delta_ptr + offsets, mask=valid, other=0.0)
        out = x.to(tl.float32) + m * d.to(tl.float32)
        tl.store(out_ptr + offsets, out.to(x.dtype), mask=valid)

    return kernel


def masked_residual(x: Tensor, mask: Tensor, delta: Tensor, block: int = 1024) -> Tensor:
    """Fused ``x + area_resize(mask) * delta`` on CUDA with Triton; the reference ops elsewhere.

    x, delta: [N, C, r, r] contiguous, float32 or float16; mask: [N, 1, R, R] with R a multiple of r.
    """
    global _kernel
    assert x.shape == delta.shape and mask.shape[:2] == (x.shape[0], 1), (x.shape, mask.shape, delta.shape)
    assert mask.shape[-1] % x.shape[-1] == 0, (mask.shape, x.shape)
    if not (x.is_cuda and triton_available()):
        return masked_residual_reference(x, mask, delta)
    if _kernel is None:
        _kernel = _build_kernel()
    x, mask, delta = x.contiguous(), mask.contiguous(), delta.contiguous()
    out = torch.empty_like(x)
    n, c, r, _ = x.shape
    total = x.numel()
    _kernel[((total + block - 1) // block,)](x, mask, delta, out, total, c, r, mask.shape[-1],
                                             S=mask.shape[-1] // r, BLOCK=block)
    return out
