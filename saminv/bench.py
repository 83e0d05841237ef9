"""``saminv bench``: latency, throughput and peak memory of the feed-forward path, per backend.

The feed-forward path is mapping + every synthesis stage with SAM residuals (random masks and
delta_f, keep = 0), i.e. what the runtime serves; for models with trained encoders and encoder predictor,
also the feed-forward inversion of a real photo (predictor, segments, encoders, compose). Backends:

* ``eager``: the torch stages (:class:`saminv.export.stages.SynthesisStage`), no autograd;
* ``compiled``: the same under ``torch.compile`` (inductor);
* ``onnxruntime``: the exported bundle through the torch-free :class:`saminv.runtime.Runtime` (CPU EP);
* on an NVIDIA GPU: ``cuda`` and ``cuda-compiled`` (the torch stages on CUDA; the masked residual is
  the fused Triton kernel, and ``cuda`` also times that kernel against the plain ops per latent space),
  ``tensorrt`` and ``tensorrt-fused`` (engines built from the bundle, the latter with the masked-residual
  plugin). GPU times include copying the numpy inputs to the device and end with a synchronize.

Architectures: ``faces64`` (or any model spec) and randomly initialised config-f generators ``256``,
``1024`` (speed does not depend on trained weights). Each (architecture, backend) runs in a fresh
process (spawn), so its peak RSS is its own. Per stage and end to end: median and p95 latency over
``runs`` runs at batch 1 after ``warmup`` runs; throughput (images/s) at each batch size; FLOPs of
the synthesis (torch.utils.flop_counter) and the fp32 GEMM rate of this machine, giving the floor
FLOPs / rate.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from saminv.runtime.runtime import run_synthesis

GPU_BACKENDS = ("cuda", "cuda-compiled", "tensorrt", "tensorrt-fused")
BACKENDS = ("eager", "compiled", "onnxruntime", *GPU_BACKENDS)


@dataclass
class BenchConfig:
    """How ``saminv bench`` times each backend.

    ``runs`` timed calls (after ``warmup`` untimed ones) give the median and p95 latency at batch 1;
    each batch size in ``batches`` is timed ``throughput_runs`` times for images per second;
    ``threads`` is the CPU thread count (torch and onnxruntime intra-op threads).
    """

    runs: int = 50
    warmup: int = 5
    batches: tuple[int, ...] = (1, 8, 32)
    throughput_runs: int = 3
    threads: int = 2


def _stats(times: list[float]) -> dict:
    ms = np.asarray(times) * 1000
    return {"median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)), "runs": len(ms)}


def _timed(fn, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def build_model(arch: str):
    """A model spec (built-in name, directory, checkpoint) or "256"/"1024": random config-f generator."""
    import torch

    from saminv.models.model_dir import Model, WPrior, load_model
    from saminv.models.stylegan2 import Generator, GeneratorConfig

    if arch.isdigit():
        torch.manual_seed(0)
        G = Generator(GeneratorConfig(resolution=int(arch))).eval()
        d = G.cfg.w_dim
        return Model(G, WPrior(torch.zeros(d), torch.eye(d)), meta={"name": f"config-f-{arch}-random"})
    return load_model(arch)


def gemm_gflops(threads: int, n: int = 2048, trials: int = 5, reps: int = 5) -> float:
    """Peak fp32 GEMM rate (GFLOP/s, best of ``trials``) of this machine with ``threads`` torch threads."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(n, n)
    torch.mm(a, a)
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * reps / best / 1e9


def synthesis_gflop(model) -> float:
    """FLOPs (GFLOP, 2 per multiply-add) of one image through mapping + synthesis."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    G = model.generator
    with FlopCounterMode(display=False) as counter:
        G.synthesis(G.broadcast(G.mapping(torch.zeros(1, G.cfg.z_dim))))
    return counter.get_total_flops() / 1e9


def _inputs(cfg, stages: list[dict], n: int, seed: int = 0) -> tuple[np.ndarray, dict, dict]:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, cfg["z_dim"])).astype(np.float32)
    masks, deltas = {}, {}
    for s in stages:
        if s["space"]:
            c, r = s["inputs"]["delta"][1], s["inputs"]["delta"][2]
            masks[s["space"]] = (rng.random((n, 1, cfg["resolution"], cfg["resolution"])) > 0.7).astype(np.float32)
            deltas[s["space"]] = (0.1 * rng.standard_normal((n, c, r, r))).astype(np.float32)
    return z, masks, deltas


def _worker(arch: str, backend: str, bundle: str, cfg: BenchConfig, queue) -> None:
    """Measure one (architecture, backend) in this (fresh) process; put a result dict on ``queue``."""
    try:
        queue.put(_measure(arch, backend, bundle, cfg))
    except Exception as e:  # report, do not hang the parent
        queue.put({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})


def _backend(arch: str, backend: str, bundle: str, cfg: BenchConfig):
    """(mapping(z) -> w numpy, run_stage(name, feeds, outputs), sync()) of a backend, on the bundle's
    stages; ``sync`` waits for queued GPU work. Raises RuntimeError for a GPU backend without CUDA."""
    if backend == "onnxruntime":
        from saminv.runtime import Runtime

        rt = Runtime(bundle, threads=cfg.threads)
        return rt.mapping, rt.run_stage, lambda: None
    import torch

    torch.set_num_threads(cfg.threads)
    torch.set_grad_enabled(False)
    device = "cuda" if backend in GPU_BACKENDS else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{backend} needs a CUDA GPU")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if backend.startswith("tensorrt"):
        from saminv.engines.tensorrt_engines import EngineStages, build_engines

        fused = backend == "tensorrt-fused"
        build_engines(Path(bundle), fused_residual=fused, log=lambda s: None)
        engines = EngineStages(Path(bundle), fused_residual=fused)

        def run_engine(name: str, feeds: dict, outputs: list[str]):
            got = engines.run(name, {k: torch.as_tensor(v, device=device) for k, v in feeds.items()})
            return [got[o] for o in outputs]

        return (lambda z: run_engine("mapping", {"z": z}, ["w"])[0].cpu().numpy()), run_engine, sync

    from saminv.export.stages import MappingStage, SynthesisStage, plan_stages

    G = build_model(arch).generator
    mods = {"mapping": MappingStage(G), **{p.name: SynthesisStage(G, p) for p in plan_stages(G)}}
    mods = {k: v.to(device) for k, v in mods.items()}
    if backend.endswith("compiled"):
        # All stages share SynthesisStage.forward: one compiled graph per (stage, batch size).
        torch._dynamo.config.recompile_limit = 64
        mods = {k: torch.compile(v, dynamic=False) for k, v in mods.items()}

    def run_stage(name: str, feeds: dict, outputs: list[str]):
        return mods[name](*(torch.as_tensor(v, device=device) for v in feeds.values()))

    return (lambda z: mods["mapping"](torch.from_numpy(z).to(device)).cpu().numpy()), run_stage, sync


def _residual_timings(stages: list[dict], resolution: int, cfg: BenchConfig, batch: int = 8) -> dict:
    """Fused (Triton) vs plain-ops masked residual on CUDA, per latent space: median ms at ``batch``."""
    import torch

    from saminv.ops.masked_residual import masked_residual, masked_residual_reference

    out = {}
    for s in stages:
        if s["space"] is None:
            continue
        c, r = s["inputs"]["delta"][1], s["inputs"]["delta"][2]
        x, delta = torch.randn(2, batch, c, r, r, device="cuda")
        mask = (torch.rand(batch, 1, resolution, resolution, device="cuda") > 0.5).float()
        times = {}
        for kind, fn in (("fused", masked_residual), ("plain", masked_residual_reference)):
            times[kind] = _stats(_timed(lambda fn=fn: (fn(x, mask, delta), torch.cuda.synchronize()),
                                        cfg.runs, cfg.warmup))["median_ms"]
        out[s["space"]] = {"fused_ms": times["fused"], "plain_ms": times["plain"],
                           "speedup": times["plain"] / times["fused"]}
    return out


def _inversion(model_spec: str, backend: str, bundle: str, manifest: dict, cfg: BenchConfig):
    """Feed-forward SAM inversion of a real photo (the astronaut face crop) as a callable, when the bundle
    carries the encoder predictor and encoders: Runtime.invert for onnxruntime, sam_invert(mode="encoder")
    without evaluation metrics for eager; None otherwise."""
    networks = {n["name"] for n in manifest.get("networks", [])}
    if not {"encoder_predictor", "encoder_wplus"} <= networks or manifest.get("tau_encoder") is None \
            or backend not in ("eager", "onnxruntime"):
        return None
    from saminv.imageio import resize_square
    from saminv.photos import face_photo

    photo = resize_square(face_photo("astronaut"), manifest["resolution"])
    if backend == "onnxruntime":
        from saminv.runtime import Runtime

        rt = Runtime(bundle, threads=cfg.threads)
        return lambda: rt.invert(photo)
    from saminv.inversion.sam import sam_invert
    from saminv.models.lpips import LPIPS

    model, lpips = build_model(model_spec), LPIPS()  # LPIPS measures the W+ error that anchors the maps
    return lambda: sam_invert(model, lpips, photo, mode="encoder", evaluate=False)


def _measure(arch: str, backend: str, bundle: str, cfg: BenchConfig) -> dict:
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    stages = [s for s in manifest["stages"] if s["name"] != "mapping"]
    mapping, run_stage, sync = _backend(arch, backend, bundle, cfg)
    n_latent, resolution = manifest["n_latent"], manifest["resolution"]

    def make(n):
        z, masks, deltas = _inputs(manifest, stages, n)

        def end_to_end():
            image = run_synthesis(run_stage, stages, resolution, np.repeat(mapping(z)[:, None], n_latent, axis=1),
                                  deltas, masks)
            sync()
            return image

        return end_to_end, z, masks, deltas

    def stage_fns(z, masks, deltas):
        """Each stage on the feeds it sees in the chain."""
        feeds_log: dict = {}
        run_synthesis(run_stage, stages, resolution, np.repeat(mapping(z)[:, None], n_latent, axis=1), deltas, masks,
                      feeds_log=feeds_log)
        fns = {"mapping": lambda: mapping(z)}
        for s in stages:
            outputs = ["image"] if s["space"] is None else ["f_out", "rgb_blend", "rgb_out"]
            fns[s["name"]] = lambda name=s["name"], outputs=outputs: (run_stage(name, feeds_log[name], outputs), sync())
        return fns

    t_setup = time.perf_counter()
    end_to_end, z, masks, deltas = make(1)
    end_to_end()  # first call (compilation for "compiled")
    first_call_s = time.perf_counter() - t_setup
    result = {"end_to_end": _stats(_timed(end_to_end, cfg.runs, cfg.warmup)), "first_call_s": first_call_s}
    result["stages"] = {k: _stats(_timed(fn, cfg.runs, cfg.warmup)) for k, fn in stage_fns(z, masks, deltas).items()}
    result["throughput_img_s"] = {}
    for n in cfg.batches:
        fn = make(n)[0]
        times = _timed(fn, cfg.throughput_runs, 1)
        result["throughput_img_s"][str(n)] = n / float(np.median(times))
    invert = _inversion(arch, backend, bundle, manifest, cfg)
    if invert is not None:
        result["invert"] = _stats(_timed(invert, cfg.runs, cfg.warmup))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if backend in GPU_BACKENDS:
        import torch

        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        if backend == "cuda":
            result["masked_residual"] = _residual_timings(stages, resolution, cfg)
    return result


def run_bench(archs: list[str], backends: list[str], cfg: BenchConfig, log=print) -> dict:
    """Benchmark each architecture with each backend (one fresh process each). Returns the report dict."""
    import torch

    from saminv.export.onnx_bundle import export_bundle

    rate = gemm_gflops(cfg.threads)
    report = {"machine": {"threads": cfg.threads, "fp32_gemm_gflops": rate, "torch": torch.__version__},
              "config": asdict(cfg), "archs": {}}
    log(f"fp32 GEMM rate: {rate:.1f} GFLOP/s on {cfg.threads} threads")
    ctx = mp.get_context("spawn")
    for arch in archs:
        model = build_model(arch)
        gflop = synthesis_gflop(model)
        entry = {"gflop_per_image": gflop, "floor_ms": gflop / rate * 1000, "backends": {}}
        log(f"{arch}: {gflop:.1f} GFLOP per image, floor {entry['floor_ms']:.1f} ms")
        with tempfile.TemporaryDirectory() as tmp:
            bundle = Path(tmp) / "bundle"
            export_bundle(model, bundle, max_batch=max(cfg.batches), log=lambda s: None)
            for backend in backends:
                queue = ctx.Queue()
                proc = ctx.Process(target=_worker, args=(arch, backend, str(bundle), cfg, queue))
                proc.start()
                result = queue.get()
                proc.join()
                entry["backends"][backend] = result
                if "error" in result:
                    log(f"  {backend:12s} failed: {result['error']}")
                else:
                    e = result["end_to_end"]
                    log(f"  {backend:12s} {e['median_ms']:9.2f} ms median, {e['p95_ms']:9.2f} ms p95, "
                        f"{result['peak_rss_mb']:7.0f} MB peak RSS, " +
                        ", ".join(f"b{n}: {v:.1f} img/s" for n, v in result["throughput_img_s"].items()))
        report["archs"][arch] = entry
    return report


def format_table(report: dict) -> str:
    """A Markdown table of the report: one row per (architecture, backend)."""
    rows = ["| arch | backend | median ms | p95 ms | x floor | vs eager | " +
            " | ".join(f"b{n} img/s" for n in report["config"]["batches"]) + " | peak RSS MB | invert ms | per stage median ms |",
            "|---" * (9 + len(report["config"]["batches"])) + "|"]
    for arch, entry in report["archs"].items():
        eager = entry["backends"].get("eager", {}).get("end_to_end", {}).get("median_ms")
        for backend, r in entry["backends"].items():
            if "error" in r:
                rows.append(f"| {arch} | {backend} | failed: {r['error']} |")
                continue
            med = r["end_to_end"]["median_ms"]
            stages = ", ".join(f"{k} {v['median_ms']:.2f}" for k, v in r["stages"].items())
            invert = f"{r['invert']['median_ms']:.2f}" if "invert" in r else "-"
            rows.append(f"| {arch} | {backend} | {med:.2f} | {r['end_to_end']['p95_ms']:.2f} | "
                        f"{med / entry['floor_ms']:.2f} | {eager / med if eager else float('nan'):.2f}x | " +
                        " | ".join(f"{r['throughput_img_s'][str(n)]:.1f}" for n in report["config"]["batches"]) +
                        f" | {r['peak_rss_mb']:.0f} | {invert} | {stages} |")
        rows.append(f"| {arch} | floor ({entry['gflop_per_image']:.1f} GFLOP / "
                    f"{report['machine']['fp32_gemm_gflops']:.0f} GFLOP/s) | {entry['floor_ms']:.2f} | | 1.00 | | |")
    residual = [(arch, space, t) for arch, entry in report["archs"].items()
                for space, t in entry["backends"].get("cuda", {}).get("masked_residual", {}).items()]
    if residual:
        rows += ["", "| arch | space | fused masked residual ms | plain ops ms | speed-up |", "|---|---|---|---|---|"]
        rows += [f"| {a} | {sp} | {t['fused_ms']:.3f} | {t['plain_ms']:.3f} | {t['speedup']:.2f}x |" for a, sp, t in residual]
    return "\n".join(rows)
