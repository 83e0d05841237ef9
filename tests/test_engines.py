"""The fused masked residual in each backend (torch, ONNX node + local function, TensorRT plugin) and the
TensorRT engines. GPU tests skip with a reason where CUDA, Triton or TensorRT is missing."""

import importlib.util

import numpy as np
import pytest
import torch

from saminv.engines.residual_plugin import plugin_ready_onnx
from saminv.errors import InputError
from saminv.ops.masked_residual import (
    ONNX_DOMAIN,
    ONNX_OP,
    masked_residual,
    masked_residual_reference,
    onnx_function,
    triton_available,
)

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_reference_is_the_area_resized_mask_residual():
    g = torch.Generator().manual_seed(0)
    x, delta = torch.randn(2, 8, 16, 16, generator=g), torch.randn(2, 8, 16, 16, generator=g)
    mask = (torch.rand(2, 1, 64, 64, generator=g) > 0.5).float()
    m = torch.nn.functional.interpolate(mask, size=(16, 16), mode="area")
    assert torch.allclose(masked_residual_reference(x, mask, delta), x + m * delta, atol=1e-6)
    assert torch.equal(masked_residual(x, mask, delta), masked_residual_reference(x, mask, delta))  # CPU: fallback


def test_mask_broadcasts_over_the_batch_and_out_receives_the_result():
    g = torch.Generator().manual_seed(1)
    x, delta = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    mask = torch.rand(1, 1, 32, 32, generator=g)
    out = torch.empty_like(x)
    got = masked_residual(x, mask, delta, out=out)
    assert got is out and torch.allclose(out, masked_residual_reference(x, mask.expand(3, -1, -1, -1), delta))
    x16 = x.half()
    assert masked_residual(x16, mask, delta).dtype == torch.float16
    weight = torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1, 1)  # one weight per image
    assert torch.allclose(masked_residual(x, weight, delta), x + weight * delta)


def _function_model(x_type: int):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node(ONNX_OP, ["x", "mask", "delta"], ["out"], domain=ONNX_DOMAIN)
    features, image = ["N", "C", "r", "r"], ["N", 1, "R", "R"]
    inputs = [helper.make_tensor_value_info("x", x_type, features),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, image),
              helper.make_tensor_value_info("delta", TensorProto.FLOAT, features)]
    graph = helper.make_graph([node], "masked_residual", inputs, [helper.make_tensor_value_info("out", x_type, features)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(ONNX_DOMAIN, 1)],
                              functions=[onnx_function(18)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("r, R", [(8, 64), (32, 64), (64, 64), (4, 1024)])
@pytest.mark.parametrize("half", [False, True])
def test_onnx_local_function_is_the_reference_op(r, R, half):
    import onnxruntime as ort
    from onnx import TensorProto

    g = torch.Generator().manual_seed(r)
    x, delta = torch.randn(2, 5, r, r, generator=g), torch.randn(2, 5, r, r, generator=g)
    mask = (torch.rand(2, 1, R, R, generator=g) > 0.5).float()
    x = x.half() if half else x
    model = _function_model(TensorProto.FLOAT16 if half else TensorProto.FLOAT)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy(), "mask": mask.numpy(), "delta": delta.numpy()})[0]
    want = masked_residual_reference(x, mask, delta).numpy()
    assert got.dtype == want.dtype and np.abs(got.astype(np.float32) - want.astype(np.float32)).max() <= 1e-6


def test_plugin_ready_onnx_leaves_the_node_to_the_plugin_registry():
    from onnx import TensorProto

    model = _function_model(TensorProto.FLOAT)
    ready, count = plugin_ready_onnx(model)
    assert count == 1 and len(ready.functions) == 0 and len(model.functions) == 1  # the input is not changed
    (node,) = ready.graph.node
    assert (node.domain, node.op_type) == (ONNX_DOMAIN, ONNX_OP)
    assert {a.name: a.s.decode() for a in node.attribute} == {"plugin_namespace": ONNX_DOMAIN}


@pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton (none on this machine)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("r, R", [(8, 64), (32, 64), (64, 64), (128, 1024)])
def test_triton_kernel_matches_plain_ops(dtype, r, R):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, 16, r, r, device="cuda", generator=g).to(dtype)
    delta = torch.randn(3, 16, r, r, device="cuda", generator=g).to(dtype)
    mask = (torch.rand(3, 1, R, R, device="cuda", generator=g) > 0.5).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert torch.allclose(masked_residual(x, mask, delta), masked_residual_reference(x, mask, delta), atol=tol, rtol=tol)


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_engines_without_tensorrt_say_so_in_one_line(tmp_path):
    from saminv.engines.tensorrt_engines import build_engines

    with pytest.raises(InputError, match="TensorRT is not installed"):
        build_engines(tmp_path)


@pytest.mark.skipif(not (HAS_TENSORRT and torch.cuda.is_available()), reason="needs TensorRT and a CUDA GPU")
def test_engines_match_onnx_runtime(tmp_path):
    from saminv.engines.tensorrt_engines import EngineStages, build_engines
    from saminv.export.onnx_bundle import export_bundle
    from saminv.export.stages import plan_stages, stage_inputs
    from saminv.models.model_dir import load_model
    from saminv.runtime import Runtime

    model = load_model("faces64")
    export_bundle(model, tmp_path / "b", log=lambda s: None)
    build_engines(tmp_path / "b", log=lambda s: None)
    engines, rt = EngineStages(tmp_path / "b"), Runtime(tmp_path / "b")
    for plan in plan_stages(model.generator):
        feeds = stage_inputs(model.generator, plan)
        session = rt.sessions[plan.name]
        want = dict(zip([o.name for o in session.get_outputs()], session.run(None, {k: v.numpy() for k, v in feeds.items()})))
        got = engines.run(plan.name, {k: v.cuda() for k, v in feeds.items()})
        for name, w in want.items():
            assert np.abs(got[name].float().cpu().numpy() - w).max() <= 1e-3


@pytest.mark.skipif(not (HAS_TENSORRT and triton_available()), reason="needs TensorRT, Triton and a CUDA GPU")
def test_fused_residual_engines_match_plain_engines(tmp_path):
    from saminv.engines.tensorrt_engines import EngineStages, build_engines
    from saminv.export.onnx_bundle import export_bundle
    from saminv.export.stages import plan_stages, stage_inputs
    from saminv.models.model_dir import load_model

    model = load_model("faces64")
    export_bundle(model, tmp_path / "b", log=lambda s: None)
    build_engines(tmp_path / "b", log=lambda s: None)
    folder = build_engines(tmp_path / "b", fused_residual=True, log=lambda s: None)
    assert folder.name.endswith("-fused")
    plain, fused = EngineStages(tmp_path / "b"), EngineStages(tmp_path / "b", fused_residual=True)
    for plan in plan_stages(model.generator):
        feeds = {k: v.cuda() for k, v in stage_inputs(model.generator, plan).items()}
        want, got = plain.run(plan.name, feeds), fused.run(plan.name, feeds)
        for name in want:
            assert (got[name].float() - want[name].float()).abs().max().item() <= 1e-4
