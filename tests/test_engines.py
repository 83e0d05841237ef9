"""GPU paths: the fused masked residual (Triton). Skipped with a reason where CUDA/Triton is missing."""

import importlib.util

import numpy as np
import pytest
import torch

from saminv.engines.masked_residual import masked_residual, masked_residual_reference, triton_available
from saminv.errors import InputError

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_reference_is_the_area_resized_mask_residual():
    g = torch.Generator().manual_seed(0)
    x, delta = torch.randn(2, 8, 16, 16, generator=g), torch.randn(2, 8, 16, 16, generator=g)
    mask = (torch.rand(2, 1, 64, 64, generator=g) > 0.5).float()
    m = torch.nn.functional.interpolate(mask, size=(16, 16), mode="area")
    assert torch.allclose(masked_residual_reference(x, mask, delta), x + m * delta, atol=1e-6)
    assert torch.equal(masked_residual(x, mask, delta), masked_residual_reference(x, mask, delta))  # CPU: fallback


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
