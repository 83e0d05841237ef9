"""The fused masked residual as a TensorRT plugin, and the ONNX preparation that routes to it.

Exported space stages carry the masked residual as one node ``saminv::MaskedResidual(x, mask, delta)``
with a model-local function holding the plain ops (:mod:`saminv.ops.masked_residual`). For an engine
with the fused residual, :func:`plugin_ready_onnx` removes that function and marks each node with
``plugin_namespace = "saminv"``: TensorRT's ONNX parser then finds no importer and no local function for
the op and takes the plugin ``saminv::MaskedResidual`` (version "1") from the plugin registry, which
:func:`register_plugin` fills through TensorRT's Python plugin API (``tensorrt.plugin``, TensorRT >= 10.7):

* shape and type: the output is like ``x`` ([N, C, r, r], float32 or float16);
* implementation: the Triton kernel of :func:`saminv.ops.masked_residual.masked_residual`, launched on
  the stream TensorRT gives, reading and writing TensorRT's buffers through torch views (no copies).

Engines that use the plugin run a Python callback, so they need this module imported (and torch,
Triton) where they run; :class:`saminv.engines.tensorrt_engines.EngineStages` does that.
"""

# No ``from __future__ import annotations`` here: tensorrt.plugin reads the plugin functions' type hints
# as objects (TensorDesc, Tensor, Tuple[Tensor]).
from typing import Tuple

from saminv.ops.masked_residual import ONNX_DOMAIN, ONNX_OP

PLUGIN_ID = f"{ONNX_DOMAIN}::{ONNX_OP}"
_registered = False


def plugin_ready_onnx(model):
    """A copy of ``model`` (onnx.ModelProto) whose MaskedResidual nodes resolve to the TensorRT plugin:
    no local function for them, ``plugin_namespace`` set on each. Returns (model, number of nodes)."""
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [f for f in out.functions if not (f.domain == ONNX_DOMAIN and f.name == ONNX_OP)]
    del out.functions[:]
    out.functions.extend(kept)
    count = 0
    for node in out.graph.node:
        if node.domain == ONNX_DOMAIN and node.op_type == ONNX_OP:
            if not any(a.name == "plugin_namespace" for a in node.attribute):
                node.attribute.append(helper.make_attribute("plugin_namespace", ONNX_DOMAIN))
            count += 1
    return out, count


def register_plugin() -> None:
    """Register ``saminv::MaskedResidual`` with TensorRT's plugin registry (once per process).
    Raises ImportError when TensorRT's Python plugin API (TensorRT >= 10.7) is missing."""
    global _registered
    if _registered:
        return
    import tensorrt.plugin as trtp

    @trtp.register(PLUGIN_ID)
    def _describe(x: trtp.TensorDesc, mask: trtp.TensorDesc, delta: trtp.TensorDesc) -> trtp.TensorDesc:
        return x.like()

    @trtp.impl(PLUGIN_ID)
    def _run(x: trtp.Tensor, mask: trtp.Tensor, delta: trtp.Tensor, outputs: Tuple[trtp.Tensor], stream: int) -> None:
        import torch

        from saminv.ops.masked_residual import masked_residual

        views = [torch.as_tensor(t, device="cuda") for t in (x, mask, delta, outputs[0])]
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            masked_residual(*views[:3], out=views[3])

    _registered = True
