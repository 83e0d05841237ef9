"""``saminv bench``: latency, throughput and peak memory of the feed-forward path, per backend.

The feed-forward path is mapping + every synthesis stage with SAM residuals (random masks and
delta_f, keep = 0), i.e. what the runtime serves. Backends:

* ``eager``: the torch stages (:class:`saminv.export.stages.SynthesisStage`), no autograd;
* ``compiled``: the same under ``torch.compile`` (inductor);
* ``onnxruntime``: the exported bundle through the torch-free :class:`saminv.runtime.Runtime` (CPU EP).

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

BACKENDS = ("eager", "compiled", "onnxruntime")


@dataclass
class BenchConfig:
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


def _measure(arch: str, backend: str, bundle: str, cfg: BenchConfig) -> dict:
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    stages = [s for s in manifest["stages"] if s["name"] != "mapping"]
    if backend == "onnxruntime":
        from saminv.runtime import Runtime

        rt = Runtime(bundle, threads=cfg.threads)

        def make(n):
            z, masks, deltas = _inputs(manifest, stages, n)
            ws = np.repeat(rt.mapping(z)[:, None], manifest["n_latent"], axis=1)
            end_to_end = lambda: rt.synthesize(np.repeat(rt.mapping(z)[:, None], manifest["n_latent"], axis=1),
                                               deltas, masks)
            return end_to_end, ws, masks, deltas

        def stage_fns(ws, masks, deltas):
            """Each session on the inputs it sees in the chain (plain session.run, no binding)."""
            n = ws.shape[0]
            fns = {"mapping": lambda z=np.zeros((n, manifest["z_dim"]), np.float32): rt.sessions["mapping"].run(None, {"z": z})}
            previous = None
            for s in stages:
                a, b = s["w_rows"]
                feeds = {} if previous is None else {"f_in": previous[0], "rgb_in": previous[1]}
                feeds["w_slice"] = np.ascontiguousarray(ws[:, a:b])
                if s["space"]:
                    c, r = s["inputs"]["delta"][1], s["inputs"]["delta"][2]
                    feeds.update(mask=masks[s["space"]], delta=deltas[s["space"]], keep=np.zeros((n, 1, 1, 1), np.float32),
                                 f_keep=np.zeros((n, c, r, r), np.float32), rgb_keep=np.zeros((n, 3, r, r), np.float32))
                    out = rt.sessions[s["name"]].run(None, feeds)
                    previous = (out[0], out[2])
                fns[s["name"]] = lambda name=s["name"], feeds=feeds: rt.sessions[name].run(None, feeds)
            return fns
    else:
        import torch

        from saminv.export.stages import MappingStage, SynthesisStage, plan_stages

        torch.set_num_threads(cfg.threads)
        torch.set_grad_enabled(False)
        model = build_model(arch)
        G = model.generator
        mods = {"mapping": MappingStage(G)}
        mods.update({p.name: SynthesisStage(G, p) for p in plan_stages(G)})
        if backend == "compiled":
            # All stages share SynthesisStage.forward: one compiled graph per (stage, batch size).
            torch._dynamo.config.recompile_limit = 64
            mods = {k: torch.compile(v, dynamic=False) for k, v in mods.items()}

        def run_chain(z, masks, deltas):
            n = z.shape[0]
            w = mods["mapping"](z)
            ws = w[:, None].expand(-1, G.cfg.n_latent, -1).contiguous()
            f = rgb = None
            for s in stages:
                a, b = s["w_rows"]
                ins = [] if f is None else [f, rgb]
                ins.append(ws[:, a:b])
                if s["space"] is None:
                    return mods[s["name"]](*ins)[0]
                d = deltas[s["space"]]
                ins += [masks[s["space"]], d, torch.zeros(n, 1, 1, 1), torch.zeros_like(d), torch.zeros(n, 3, *d.shape[2:])]
                f, _, rgb = mods[s["name"]](*ins)
            return rgb

        def make(n):
            z, masks, deltas = _inputs(manifest, stages, n)
            z = torch.from_numpy(z)
            masks = {k: torch.from_numpy(v) for k, v in masks.items()}
            deltas = {k: torch.from_numpy(v) for k, v in deltas.items()}
            ws = G.broadcast(G.mapping(z)).contiguous()
            return lambda: run_chain(z, masks, deltas), ws, masks, deltas

        def stage_fns(ws, masks, deltas):
            n, f, rgb = ws.shape[0], None, None
            fns = {"mapping": lambda z=torch.zeros(n, G.cfg.z_dim): mods["mapping"](z)}
            for s in stages:
                a, b = s["w_rows"]
                ins = [] if f is None else [f, rgb]
                ins.append(ws[:, a:b].contiguous())
                if s["space"]:
                    d = deltas[s["space"]]
                    ins += [masks[s["space"]], d, torch.zeros(n, 1, 1, 1), torch.zeros_like(d), torch.zeros(n, 3, *d.shape[2:])]
                    f, _, rgb = mods[s["name"]](*ins)
                fns[s["name"]] = (lambda name=s["name"], ins=ins: mods[name](*ins))
            return fns

    t_setup = time.perf_counter()
    end_to_end, ws, masks, deltas = make(1)
    end_to_end()  # first call (compilation for "compiled")
    first_call_s = time.perf_counter() - t_setup
    result = {"end_to_end": _stats(_timed(end_to_end, cfg.runs, cfg.warmup)), "first_call_s": first_call_s}
    result["stages"] = {k: _stats(_timed(fn, cfg.runs, cfg.warmup)) for k, fn in stage_fns(ws, masks, deltas).items()}
    result["throughput_img_s"] = {}
    for n in cfg.batches:
        fn = make(n)[0]
        times = _timed(fn, cfg.throughput_runs, 1)
        result["throughput_img_s"][str(n)] = n / float(np.median(times))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
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
            " | ".join(f"b{n} img/s" for n in report["config"]["batches"]) + " | peak RSS MB | per stage median ms |",
            "|---" * (8 + len(report["config"]["batches"])) + "|"]
    for arch, entry in report["archs"].items():
        eager = entry["backends"].get("eager", {}).get("end_to_end", {}).get("median_ms")
        for backend, r in entry["backends"].items():
            if "error" in r:
                rows.append(f"| {arch} | {backend} | failed: {r['error']} |")
                continue
            med = r["end_to_end"]["median_ms"]
            stages = ", ".join(f"{k} {v['median_ms']:.2f}" for k, v in r["stages"].items())
            rows.append(f"| {arch} | {backend} | {med:.2f} | {r['end_to_end']['p95_ms']:.2f} | "
                        f"{med / entry['floor_ms']:.2f} | {eager / med if eager else float('nan'):.2f}x | " +
                        " | ".join(f"{r['throughput_img_s'][str(n)]:.1f}" for n in report["config"]["batches"]) +
                        f" | {r['peak_rss_mb']:.0f} | {stages} |")
        rows.append(f"| {arch} | floor ({entry['gflop_per_image']:.1f} GFLOP / "
                    f"{report['machine']['fp32_gemm_gflops']:.0f} GFLOP/s) | {entry['floor_ms']:.2f} | | 1.00 | | |")
    return "\n".join(rows)
