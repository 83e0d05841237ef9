"""The masked residual of SAM (paper Eq. 3) as one fused operation, in every backend.

    out = x + area_resize(mask, r) * delta        x, delta [N, C, r, r]; mask [N, 1, R, R], R = s * r

computed in float32 and rounded once to x's dtype. Unfused this is three kernels and two temporaries
(avg-pool, multiply, add); fused, x, delta and the s x s mask window are read once per output element
and ``out`` is written once. The one operation has four forms:

* torch: :func:`masked_residual`, a Triton kernel on CUDA (inference), the plain ops elsewhere
  (:func:`masked_residual_reference`; also whenever autograd needs the graph);
* ONNX: one node ``saminv::MaskedResidual(x, mask, delta)`` (:func:`exported_masked_residual` emits it
  during ``torch.onnx.export``) whose model-local function :func:`onnx_function` holds the plain ops,
  so ONNX Runtime runs it as is;
* TensorRT: the same node resolved to the plugin of :mod:`saminv.engines.residual_plugin` (the engine
  builder drops the local function so the ONNX parser looks the op up in the plugin registry).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


ONNX_DOMAIN = "saminv"
ONNX_OP = "MaskedResidual"


def masked_residual_reference(x: Tensor, mask: Tensor, delta: Tensor) -> Tensor:
    """Plain ops: ``x + avg_pool(mask, R / r) * delta`` in float32, cast to x's dtype (any device).

    x, delta [N, C, r, r] float32 or float16; mask [N or 1, 1, R, R] float32 in [0, 1], R a multiple of r.
    """
    s = mask.shape[-1] // x.shape[-1]
    m = F.avg_pool2d(mask, s) if s > 1 else mask
    return (x.float() + m.float() * delta.float()).to(x.dtype)


def exported_masked_residual(x: Tensor, mask: Tensor, delta: Tensor) -> Tensor:
    """:func:`masked_residual` that, inside ``torch.onnx.export(dynamo=True)``, becomes the single node
    ``saminv::MaskedResidual`` (add :func:`onnx_function` to the saved model so ONNX Runtime can run it)."""
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic(f"{ONNX_DOMAIN}::{ONNX_OP}", (x, mask, delta), dtype=x.dtype,
                                       shape=x.shape, version=1)
    return masked_residual(x, mask, delta)


def onnx_function(opset: int):
    """The model-local ONNX function ``saminv::MaskedResidual(x, mask, delta) -> out`` in plain ops:
    the area resize as Reshape [N, 1, r, s, r, s] + ReduceMean, valid for any r and s = R / r."""
    from onnx import TensorProto, helper

    node = helper.make_node
    body = [
        node("Shape", ["mask"], ["n"], start=0, end=1),
        node("Shape", ["mask"], ["big"], start=2, end=3),
        node("Shape", ["delta"], ["r"], start=2, end=3),
        node("Div", ["big", "r"], ["s"]),
        node("Constant", [], ["one"], value_ints=[1]),
        node("Concat", ["n", "one", "r", "s", "r", "s"], ["blocks_shape"], axis=0),
        node("Reshape", ["mask", "blocks_shape"], ["blocks"]),
        node("Constant", [], ["axes"], value_ints=[3, 5]),
        node("ReduceMean", ["blocks", "axes"], ["m"], keepdims=0),
        node("Cast", ["m"], ["m32"], to=TensorProto.FLOAT),
        node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
        node("Cast", ["delta"], ["delta32"], to=TensorProto.FLOAT),
        node("Mul", ["m32", "delta32"], ["scaled"]),
        node("Add", ["x32", "scaled"], ["sum"]),
        node("CastLike", ["sum", "x"], ["out"]),
    ]
    return helper.make_function(ONNX_DOMAIN, ONNX_OP, ["x", "mask", "delta"], ["out"], body,
                                [helper.make_opsetid("", opset)])


@functools.cache
def triton_available() -> bool:
    """Whether the Triton kernel can run: a CUDA device and the triton package (checked once per process;
    :func:`masked_residual` asks on every call)."""
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


def masked_residual(x: Tensor, mask: Tensor, delta: Tensor, out: Tensor | None = None, block: int = 1024) -> Tensor:
    """Fused ``x + area_resize(mask) * delta`` on CUDA with Triton; the reference ops elsewhere and
    whenever autograd records (the kernel has no backward).

    x, delta: [N, C, r, r], float32 or float16; mask: [N or 1, 1, R, R] float32 with R a multiple of r,
    or [N or 1, 1, 1, 1] (one weight per image). ``out`` (like x) receives the result when given (the
    TensorRT plugin writes into its output buffer).
    """
    global _kernel
    assert x.shape == delta.shape and mask.shape[1] == 1 and mask.shape[0] in (1, x.shape[0]), \
        (x.shape, mask.shape, delta.shape)
    if mask.shape[-2:] == (1, 1):
        mask = mask.expand(-1, -1, *x.shape[-2:])
    assert mask.shape[-1] % x.shape[-1] == 0, (mask.shape, x.shape)
    records_grad = torch.is_grad_enabled() and (x.requires_grad or mask.requires_grad or delta.requires_grad)
    if records_grad or not (x.is_cuda and triton_available()):
        result = masked_residual_reference(x, mask, delta)
        return result if out is None else out.copy_(result)
    if _kernel is None:
        _kernel = _build_kernel()
    x, delta = x.contiguous(), delta.contiguous()
    mask = mask.expand(x.shape[0], -1, -1, -1).contiguous()
    out = torch.empty_like(x) if out is None else out
    n, c, r, _ = x.shape
    total = x.numel()
    _kernel[((total + block - 1) // block,)](x, mask, delta, out, total, c, r, mask.shape[-1],
                                             S=mask.shape[-1] // r, BLOCK=block)
    return out
