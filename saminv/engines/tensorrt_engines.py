"""TensorRT engines from a bundle's ONNX stages (optional extra ``saminv[tensorrt]``; needs a GPU).

``build_engines`` parses each stage with TensorRT's ONNX parser into a *strongly typed* network (the
precision is the ONNX graph's own: an fp16 bundle already carries its casts), adds one optimization
profile over the dynamic batch (1 .. max_batch, optimum ``opt_batch``), builds a version-compatible
plan (``BuilderFlag.VERSION_COMPATIBLE``) reusing and updating a timing cache, and writes::

    BUNDLE/engines/trt<version>-sm<major><minor>/<stage>.plan
    BUNDLE/engines/trt<version>-sm<major><minor>/engines.json   (versions, capability, sha256, flags)
    BUNDLE/engines/timing.cache

With ``fused_residual`` the masked residual of each space stage runs as the plugin of
:mod:`saminv.engines.residual_plugin` instead of TensorRT's own resize, multiply and add; those plans
call back into Python (Triton), so they are built without version compatibility and live in
``trt<version>-sm<major><minor>-fused/``.

``EngineStages`` runs the plans with torch CUDA tensors as buffers (``execute_async_v3`` on torch's
current stream), so no pycuda is involved. Plans are keyed by TensorRT version and GPU compute
capability; a mismatch is reported, never silently used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from saminv.errors import InputError
from saminv.imageio import atomic_write


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise InputError("TensorRT is not installed (pip install 'saminv[tensorrt]' on a machine with an NVIDIA GPU)") from None
    return trt


def _register_plugin() -> None:
    from saminv.engines.residual_plugin import register_plugin

    try:
        register_plugin()
    except ImportError:
        raise InputError("the fused masked residual needs TensorRT's Python plugin API (tensorrt.plugin, "
                         "TensorRT >= 10.7) and Triton") from None


def engine_key(trt_version: str, capability: tuple[int, int], fused_residual: bool = False) -> str:
    """The folder name of engines built by one TensorRT version for one GPU compute capability,
    e.g. ``trt10.13.0.35-sm90`` or ``trt10.13.0.35-sm90-fused``: engines run only where both match."""
    return f"trt{trt_version}-sm{capability[0]}{capability[1]}" + ("-fused" if fused_residual else "")


def _capability() -> tuple[int, int]:
    import torch

    if not torch.cuda.is_available():
        raise InputError("building TensorRT engines needs a CUDA GPU")
    return torch.cuda.get_device_capability()


def _stage_onnx(path: Path, fused_residual: bool) -> bytes:
    """The stage file's bytes as TensorRT should parse them (masked residuals routed to the plugin)."""
    if not fused_residual:
        return path.read_bytes()
    import onnx

    from saminv.engines.residual_plugin import plugin_ready_onnx

    return plugin_ready_onnx(onnx.load(str(path)))[0].SerializeToString()


def build_engines(bundle: Path, max_batch: int | None = None, opt_batch: int = 1, workspace_gb: float = 4.0,
                  fused_residual: bool = False, log=print) -> Path:
    """Build one plan per stage of ``bundle``; returns the engine directory. Raises InputError when
    TensorRT or a GPU is missing, TensorRT has no Python plugin API for ``fused_residual``, or a stage
    does not parse/build."""
    from saminv.runtime.bundle import open_bundle

    trt = _tensorrt()
    b = open_bundle(bundle)
    capability = _capability()
    if fused_residual:
        _register_plugin()
    out = b.path / "engines" / engine_key(trt.__version__, capability, fused_residual)
    out.mkdir(parents=True, exist_ok=True)
    max_batch = max_batch or b.manifest.get("max_batch", 32)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = b.path / "engines" / "timing.cache"
    cache = builder.create_builder_config().create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    record = {"tensorrt": trt.__version__, "compute_capability": list(capability), "max_batch": max_batch,
              "opt_batch": opt_batch, "flags": ["STRONGLY_TYPED"] if fused_residual else ["VERSION_COMPATIBLE", "STRONGLY_TYPED"],
              "fused_residual": fused_residual, "precision": b.manifest["precision"], "plans": {}}
    for stage in b.manifest["stages"]:
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(_stage_onnx(b.path / stage["file"], fused_residual), str(b.path / stage["file"])):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise InputError(f"{stage['file']}: TensorRT cannot parse it ({errors[:300]})")
        config = builder.create_builder_config()  # one per stage: its own optimization profile
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        if not fused_residual:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        config.set_timing_cache(cache, ignore_mismatch=False)
        profile = builder.create_optimization_profile()
        for name, shape in stage["inputs"].items():
            rest = tuple(shape[1:])
            profile.set_shape(name, (1, *rest), (opt_batch, *rest), (max_batch, *rest))
        config.add_optimization_profile(profile)
        log(f"building {stage['name']} ...")
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise InputError(f"{stage['file']}: TensorRT could not build an engine")
        data = bytes(plan)
        atomic_write(out / f"{stage['name']}.plan", lambda p: p.write_bytes(data))
        record["plans"][stage["name"]] = {"file": f"{stage['name']}.plan", "sha256": hashlib.sha256(data).hexdigest()}
    cache_bytes = bytes(cache.serialize())
    atomic_write(cache_path, lambda p: p.write_bytes(cache_bytes))
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(out / "engines.json", lambda p: p.write_text(text))
    return out


class EngineStages:
    """Deserialized plans of a bundle for this GPU, run with torch CUDA tensors as I/O buffers."""

    def __init__(self, bundle: Path, fused_residual: bool = False) -> None:
        import torch

        trt = _tensorrt()
        key = engine_key(trt.__version__, _capability(), fused_residual)
        folder = Path(bundle) / "engines" / key
        index = folder / "engines.json"
        if not index.is_file():
            flag = " --fused-residual" if fused_residual else ""
            raise InputError(f"{bundle}: no engines for {key} (run saminv engines build{flag} on this machine)")
        if fused_residual:
            _register_plugin()  # the plans call the plugin's Python implementation
        record = json.loads(index.read_text())
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.runtime.engine_host_code_allowed = True  # version-compatible plans carry their lean runtime
        self.engines, self.contexts = {}, {}
        for name, entry in record["plans"].items():
            data = (folder / entry["file"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise InputError(f"{folder / entry['file']}: sha256 does not match engines.json")
            engine = self.runtime.deserialize_cuda_engine(data)
            self.engines[name], self.contexts[name] = engine, engine.create_execution_context()
        self.torch = torch

    def run(self, name: str, feeds: dict) -> dict:
        """Run stage ``name`` on CUDA tensors ``feeds`` (by input name); returns its outputs (CUDA tensors)."""
        torch, trt = self.torch, _tensorrt()
        engine, context = self.engines[name], self.contexts[name]
        outputs = {}
        for i in range(engine.num_io_tensors):
            tname = engine.get_tensor_name(i)
            if engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT:
                t = feeds[tname].contiguous()
                context.set_input_shape(tname, tuple(t.shape))
                context.set_tensor_address(tname, t.data_ptr())
        for i in range(engine.num_io_tensors):
            tname = engine.get_tensor_name(i)
            if engine.get_tensor_mode(tname) == trt.TensorIOMode.OUTPUT:
                dtype = torch.float16 if engine.get_tensor_dtype(tname) == trt.DataType.HALF else torch.float32
                outputs[tname] = torch.empty(tuple(context.get_tensor_shape(tname)), device="cuda", dtype=dtype)
                context.set_tensor_address(tname, outputs[tname].data_ptr())
        context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        return outputs
