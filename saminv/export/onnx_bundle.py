"""``saminv export``: the feed-forward path as a bundle of ONNX files, one per stage, + manifest.json.

Bundle layout (read by :mod:`saminv.runtime`, which never imports torch)::

    manifest.json        resolution, latent spaces and tensor shapes, tau and tau_encoder, w_avg, preprocessing,
                         opset, precision, versions, the torch-vs-ONNX check of every file and the
                         sha256 of every file
    mapping.onnx         z [N, z_dim] -> w [N, w_dim]
    F<k>.onnx            synthesis stage ending at latent space F_k (masked residual + editing blend)
    tail.onnx            the blocks after the last space -> image (when there are any)
    encoder_predictor.onnx  image [N, 3, R, R] -> the encoders' invertibility maps [N, S, R, R] (when the model has one)
    lpips_spatial.onnx      image, reconstruction [N, 3, R, R] -> LPIPS spatial error [N, 1, R, R] (with the encoders:
                            the measured W+ error that anchors the predicted maps)
    encoder_wplus.onnx   image -> w+ [N, n_latent, w_dim]                         (when the model has encoders)
    encoder_F<k>.onnx    (image, W+ reconstruction, F_k features) -> delta_f_k    (idem)
    directions.npz       the model's direction library (vectors [n_latent, w_dim]; layers in the manifest)

The synthesis stages are listed under ``stages``, the feed-forward networks under ``networks`` (these
stay float32 in an --fp16 bundle: they are small, and the masks they lead to are thresholded).

Every stage has a dynamic batch dimension (1 .. --max-batch). Each file is checked with
``onnx.checker`` and run with ONNX Runtime against the torch stage on random inputs (max abs
difference in the manifest); with ``--fp16`` the chain's image is compared with the float32 torch
image (PSNR). The bundle directory appears whole (temp dir + rename).
"""

from __future__ import annotations

import inspect
import json
import platform
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from saminv.editing.directions import load_library
from saminv.export.stages import MappingStage, StagePlan, SynthesisStage, output_names, plan_stages, stage_inputs
from saminv.imageio import atomic_write, file_sha256
from saminv.inversion.feedforward import encode_wplus
from saminv.models.lpips import LPIPS
from saminv.models.model_dir import Model
from saminv.ops.masked_residual import ONNX_DOMAIN, onnx_function
from saminv.outputs import write_dir
from saminv.runtime.runtime import run_synthesis

FORMAT = "saminv-bundle"
FORMAT_VERSION = 1
DEFAULT_OPSET = 18
FP32_TOLERANCE = 1e-4
FP16_MIN_PSNR = 40.0


def _export(module: nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str], path: Path, opset: int,
            max_batch: int) -> None:
    # the example inputs have batch 2, and torch.export needs a range, so the graphs allow at least 2
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))
    specs = tuple({0: batch} for _ in inputs)
    first = next(iter(inspect.signature(module.forward).parameters.values()))
    if first.kind == inspect.Parameter.VAR_POSITIONAL:  # forward(*inputs): one spec for the tuple
        specs = (specs,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), tuple(inputs.values()), input_names=list(inputs),
                                    output_names=outputs, dynamic_shapes=specs,
                                    dynamo=True, opset_version=opset, verbose=False)
    program.save(str(path))
    _add_local_functions(path, opset)


def _add_local_functions(path: Path, opset: int) -> None:
    """Give the file's ``saminv::MaskedResidual`` nodes their model-local function (plain ops)."""
    import onnx

    model = onnx.load(str(path))
    if any(node.domain == ONNX_DOMAIN for node in model.graph.node):
        model.functions.append(onnx_function(opset))
        onnx.save(model, str(path))


def _shapes(tensors: dict[str, torch.Tensor] | list[torch.Tensor], names: list[str] | None = None) -> dict[str, list]:
    items = tensors.items() if isinstance(tensors, dict) else zip(names, tensors)
    return {k: ["N", *v.shape[1:]] for k, v in items}


def _ort_session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check(path: Path, torch_module: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """onnx.checker, then ONNX Runtime vs the torch module: max abs difference over all outputs."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    with torch.no_grad():
        ref = torch_module(*inputs.values())
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = _ort_session(path).run(None, {k: v.numpy() for k, v in inputs.items()})
    return max(float(np.abs(g - r.numpy()).max()) for g, r in zip(got, ref))


def _fp16_image_psnr(model: Model, stages: list[dict], paths: dict[str, Path], n: int = 4) -> float:
    """PSNR (dB, images in [-1, 1]) of the float16 chain's composed image against the float32 torch one."""
    from saminv.inversion.optimize import Codes

    G = model.generator
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ws = G.broadcast(G.mapping(torch.randn(n, G.cfg.z_dim, generator=g)))
    labels = torch.randint(0, len(G.cfg.feature_blocks) + 1, (n, 1, G.cfg.resolution, G.cfg.resolution), generator=g)
    space_stages = [s for s in stages if s["space"]]
    full, masks, deltas = {}, {}, {}
    for i, s in enumerate(space_stages):
        c, r = s["inputs"]["delta"][1], s["inputs"]["delta"][2]
        full[s["space"]] = (labels == i + 1).float()
        masks[int(s["space"][1:])] = torch.nn.functional.interpolate(full[s["space"]], size=(r, r), mode="area")
        deltas[s["space"]] = 0.1 * torch.randn(n, c, r, r, generator=g)
    with torch.no_grad():
        ref = Codes(ws, {int(k[1:]): v for k, v in deltas.items()}, masks).render(model).numpy()
    sessions = {s["name"]: _ort_session(paths[s["name"]]) for s in stages}
    img = run_synthesis(lambda name, feeds, outputs: sessions[name].run(outputs, feeds), stages, G.cfg.resolution,
                        ws.numpy(), {k: v.numpy() for k, v in deltas.items()}, {k: v.numpy() for k, v in full.items()})
    mse = float(np.mean((img - ref) ** 2))
    return float(10 * np.log10(4.0 / max(mse, 1e-20)))


class SpatialLPIPS(nn.Module):
    """LPIPS spatial error map [N, 1, R, R] (>= 0) of ``reconstruction`` against ``image`` (both
    [N, 3, R, R] in [-1, 1]): :class:`saminv.models.lpips.LPIPS` with ``spatial=True`` as one graph."""

    def __init__(self, lpips: LPIPS) -> None:
        super().__init__()
        self.lpips = lpips

    def forward(self, image: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        return self.lpips(reconstruction, image, spatial=True)


def network_exports(model: Model) -> list[tuple[str, nn.Module, dict[str, torch.Tensor], list[str]]]:
    """The model's trained feed-forward networks as (name, module, example inputs, output names)."""
    G = model.generator
    r = G.cfg.resolution
    g = torch.Generator().manual_seed(2)
    image = (torch.rand(2, 3, r, r, generator=g) * 2 - 1)
    out = []
    if model.has_network("encoder_predictor"):  # the runtime inverts feed-forward: the encoder regime's S_l
        out.append(("encoder_predictor", model.network("encoder_predictor").cpu(), {"image": image}, ["maps"]))
    if model.has_network("encoders"):
        nets = model.network("encoders").cpu()
        out.append(("encoder_wplus", nets.wplus, {"image": image}, ["wplus"]))
        first = encode_wplus(model, image)
        reconstruction, features = first.reconstruction, first.features
        for space in G.spaces:
            if space.name in nets.deltas:
                inputs = {"image": image, "reconstruction": reconstruction, "features": features[2 * space.block]}
                out.append((f"encoder_{space.name}", nets.deltas[space.name], inputs, ["delta"]))
        # the measured W+ error that anchors the predicted maps (saminv.inversion.selection)
        out.append(("lpips_spatial", SpatialLPIPS(LPIPS()), {"image": image, "reconstruction": reconstruction},
                    ["error"]))
    return out


def export_bundle(model: Model, out: Path, fp16: bool = False, opset: int = DEFAULT_OPSET, max_batch: int = 32,
                  log: Callable[[str], None] = print) -> dict:
    """Export ``model`` as a bundle directory ``out`` (must not exist). Returns the manifest.

    Raises RuntimeError when a stage's check fails (fp32 max abs > 1e-4, fp16 image PSNR < 40 dB).
    """
    import onnx
    import onnxruntime

    import saminv

    G = model.generator.eval().cpu()
    cfg = G.cfg
    plans = plan_stages(G)
    manifest: dict = {
        "format": FORMAT, "version": FORMAT_VERSION, "model": model.name,
        "resolution": cfg.resolution, "z_dim": cfg.z_dim, "w_dim": cfg.w_dim, "n_latent": cfg.n_latent,
        "spaces": [{"name": s.name, "shape": list(s.shape)} for s in G.spaces],
        "tau": model.tau, "tau_encoder": model.meta.get("tau_encoder"), "w_avg": G.mapping.w_avg.tolist(),
        "preprocessing": {"crop": "center square", "resize": "Lanczos to resolution", "layout": "NCHW RGB",
                          "range": [-1.0, 1.0], "dtype": "float32"},
        "precision": "fp16" if fp16 else "fp32", "opset": opset, "max_batch": max_batch, "noise_mode": "const",
        "versions": {"saminv": getattr(saminv, "__version__", "0.1.0"), "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
        "stages": [], "networks": [], "files": {},
    }

    def fill(tmp: Path) -> None:
        paths: dict[str, Path] = {}
        exports: list[tuple[str, str, nn.Module, nn.Module, dict, list[str], StagePlan | None]] = []
        z = torch.randn(2, cfg.z_dim, generator=torch.Generator().manual_seed(0))
        exports.append(("stages", "mapping", MappingStage(G), MappingStage(G), {"z": z}, ["w"], None))
        for p in plans:
            exports.append(("stages", p.name, SynthesisStage(G, p, fp16=fp16), SynthesisStage(G, p), stage_inputs(G, p),
                            output_names(p), p))
        for name, net, inputs, outputs in network_exports(model):
            exports.append(("networks", name, net, net, inputs, outputs, None))
        for section, name, module, reference, inputs, outputs, plan in exports:
            path = tmp / f"{name}.onnx"
            log(f"exporting {name} ...")
            _export(module, inputs, outputs, path, opset, max_batch)
            diff = _check(path, reference, inputs)
            if (not fp16 or plan is None) and diff > FP32_TOLERANCE:
                raise RuntimeError(f"stage {name}: ONNX Runtime differs from torch by {diff:.2e} > {FP32_TOLERANCE}")
            with torch.no_grad():
                outs = reference(*inputs.values())
            outs = outs if isinstance(outs, tuple) else (outs,)
            entry = {"name": name, "file": path.name, "inputs": _shapes(inputs), "outputs": _shapes(list(outs), outputs),
                     "max_abs_diff_vs_torch": diff}
            if plan is not None:
                entry.update(first_block=plan.first, last_block=plan.last, space=plan.space, w_rows=list(plan.w_rows),
                             resolution=cfg.block_resolution(plan.last))
            manifest.setdefault(section, []).append(entry)
            paths[name] = path
            log(f"  {name}: max abs diff vs torch {diff:.2e}")
        if fp16:
            psnr = _fp16_image_psnr(model, [s for s in manifest["stages"] if s["name"] != "mapping"], paths)
            manifest["fp16_image_psnr_db"] = psnr
            log(f"fp16 chain image vs float32 torch: {psnr:.1f} dB PSNR")
            if psnr < FP16_MIN_PSNR:
                raise RuntimeError(f"fp16 image PSNR {psnr:.1f} dB < {FP16_MIN_PSNR} dB")
        library = load_library(model.path) if model.path else {}
        if library:
            keys = sorted(library)
            arrays = {f"d{i}": library[k].vector.numpy() for i, k in enumerate(keys)}
            atomic_write(tmp / "directions.npz", lambda f: np.savez(f, **arrays))
            manifest["directions"] = [{"name": k, "key": f"d{i}", "layers": list(library[k].layers),
                                       "source": library[k].source} for i, k in enumerate(keys)]
        manifest["files"] = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
        text = json.dumps(manifest, indent=2) + "\n"
        atomic_write(tmp / "manifest.json", lambda f: f.write_text(text))

    write_dir(out, fill)
    return manifest
