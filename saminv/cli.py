"""The ``saminv`` command line: convert, generate, invert, edit, directions, export, bench, calibrate, train.

Every command reports bad input as one line on stderr and exits with code 2 (1 when some images of
a batch failed); outputs are written atomically and never overwrite silently.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from saminv.errors import InputError, reports_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="GAN inversion and editing by Spatially-Adaptive Multilayer Selection (SAM) on StyleGAN2.")
train_app = typer.Typer(no_args_is_help=True, help="Train saminv's models.")
app.add_typer(train_app, name="train")
engines_app = typer.Typer(no_args_is_help=True, help="TensorRT engines for an exported bundle (NVIDIA GPUs).")
app.add_typer(engines_app, name="engines")
directions_app = typer.Typer(no_args_is_help=True, help="Build and list a model's direction library (edits).")
app.add_typer(directions_app, name="directions")

MODEL_HELP = "A built-in model name, a model directory, or a StyleGAN2 checkpoint (rosinality .pt, NVIDIA .pkl)."


def pick_device(device: str) -> str:
    """The torch device for ``--device``: ``auto`` picks CUDA when present, else CPU.

    Raises :class:`InputError` for CUDA on a machine without it, or a name other than
    auto, cpu, cuda or cuda:N.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise InputError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    return device


@app.command()
@reports_errors
def convert(checkpoint: Path = typer.Argument(..., help="StyleGAN2 checkpoint: rosinality .pt (g_ema, latent_avg) or NVIDIA .pkl (stylegan2-ada-pytorch G_ema, or the TensorFlow originals' Gs; read as data, their code never runs)."),
            out: Path = typer.Option(..., "--out", help="Model directory to write (must not exist)."),
            ) -> None:
    """Convert a StyleGAN2 checkpoint into a saminv model directory (config.json + weights.safetensors)."""
    from saminv.models.checkpoints import convert_checkpoint
    from saminv.models.model_dir import save_model

    if out.exists():
        raise InputError(f"{out} exists; choose another --out")
    model = convert_checkpoint(checkpoint)
    save_model(model, out)
    cfg = model.generator.cfg
    typer.echo(f"wrote {out}: {cfg.resolution} px, {cfg.n_latent} w vectors, spaces "
               f"{', '.join(s.name for s in model.generator.spaces)}; tau {model.tau} (the paper's default until "
               f"`saminv calibrate --model {out}`)")


@app.command()
@reports_errors
def generate(model: str = typer.Option("faces64", help=MODEL_HELP),
             latents: Optional[Path] = typer.Option(None, help="W+ codes .npy shaped (N, n_latent, w_dim) or W codes (N, w_dim)."),
             num: int = typer.Option(8, help="Without --latents: number of random samples."),
             seed: int = typer.Option(0, help="Without --latents: seed of the random z."),
             truncation: float = typer.Option(1.0, help="Without --latents: truncation psi toward w_avg."),
             out: Path = typer.Option(Path("samples"), help="Output directory (a new one if it exists)."),
             save_array: bool = typer.Option(False, "--save-array", help="Also write images.npy: float32 NCHW in [-1, 1]."),
             ) -> None:
    """Render W+ codes (const noise) to PNGs."""
    import numpy as np
    import torch

    from saminv.imageio import atomic_write, from_tensor_range, load_array, save_png, unique_dir
    from saminv.models.model_dir import load_model

    m = load_model(model)
    G = m.generator
    if latents is not None:
        ws = load_array(latents)
        if ws.ndim == 2 and ws.shape[1] == G.cfg.w_dim:
            ws = np.repeat(ws[:, None], G.cfg.n_latent, axis=1)
        if ws.ndim != 3 or ws.shape[1:] != (G.cfg.n_latent, G.cfg.w_dim):
            raise InputError(f"{latents}: shape {ws.shape}, expected (N, {G.cfg.n_latent}, {G.cfg.w_dim})")
        ws = torch.from_numpy(ws.astype(np.float32))
    else:
        z = torch.randn(num, G.cfg.z_dim, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ws = G.broadcast(G.mapping(z, truncation))
    out = unique_dir(out)
    out.mkdir(parents=True)
    with torch.no_grad():
        images = torch.cat([G.synthesis(ws[i:i + 16], noise_mode="const") for i in range(0, len(ws), 16)])
    for i, img in enumerate(images):
        save_png(out / f"{i:05d}.png", from_tensor_range(img.numpy()))
    if save_array:
        atomic_write(out / "images.npy", lambda p: np.save(p, images.numpy().astype(np.float32)))
    typer.echo(f"wrote {len(images)} images to {out}")


def model_directory(spec: str, purpose: str):
    """Load a model that lives in a directory saminv may update (a built-in name or a model directory)."""
    from saminv.models.model_dir import cache_dir, load_model

    m = load_model(spec)
    if m.path is None or cache_dir() in m.path.parents:
        raise InputError(f"{purpose} needs a model directory or built-in name, not a checkpoint")
    return m


def parse_spaces(spaces: Optional[str], available: list[str]) -> list[str] | None:
    """``--spaces "W+,F4"`` as a list in the model's order (W+, then F_k by increasing k),
    or None (every space) when the option is empty.

    Raises :class:`InputError` naming the choices for an unknown or empty list.
    """
    if not spaces:
        return None
    names = [s.strip() for s in spaces.split(",") if s.strip()]
    bad = [n for n in names if n not in available]
    if bad or not names:
        raise InputError(f"--spaces {spaces!r}: choose from {', '.join(available)}")
    return sorted(set(names), key=available.index)


@app.command()
@reports_errors
def invert(paths: list[Path] = typer.Argument(..., help="Images or directories of images."),
           model: str = typer.Option("faces64", help=MODEL_HELP),
           out: Path = typer.Option(Path("saminv-out"), help="Output root; one folder per image, never overwritten."),
           tau: Optional[float] = typer.Option(None, help="Invertibility threshold (default: the model's calibrated tau for "
                                                         "the maps: tau in optimize mode, whose predicted maps are anchored to "
                                                         "its W+ inversion; tau_predicted in hybrid mode with predicted maps; "
                                                         "tau_encoder in encoder mode and with --bundle)."),
           steps: int = typer.Option(200, min=1, help="Optimization steps, per stage (single-space and SAM)."),
           spaces: Optional[str] = typer.Option(None, help="Comma-separated latent spaces to choose from (default: all of the model's)."),
           segments: int = typer.Option(48, min=1, help="Number of SLIC superpixels."),
           device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda[:N]."),
           seed: int = typer.Option(0, help="Seed of torch's random state."),
           edits: int = typer.Option(0, min=0, max=20, help="Add a grid of the top-N GANSpace edits to the side-by-side."),
           bundle: Optional[Path] = typer.Option(None, help="Invert feed-forward with an exported bundle (torch-free runtime)."),
           mode: str = typer.Option("auto", help="encoder (one pass), optimize, hybrid (encoder start + optimization), "
                                                 "or auto: hybrid when the model has trained encoders, else optimize."),
           maps: str = typer.Option("auto", help="Invertibility maps: predicted (the model's predictor), measured "
                                                 "(invert in every space), or auto: predicted when the model has a predictor."),
           ) -> None:
    """Invert photos with SAM: reconstruction, layer map, side-by-side, codes, metrics."""
    import torch
    from tqdm import tqdm

    from saminv.imageio import collect_images, load_image, unique_dir
    from saminv.inversion.optimize import InversionConfig
    from saminv.inversion.sam import MAPS, MODES, sam_invert
    from saminv.models.lpips import LPIPS
    from saminv.models.model_dir import load_model
    from saminv.outputs import write_inversion

    torch.manual_seed(seed)
    dev = pick_device(device)
    if tau is not None and not 0 <= tau:
        raise InputError("--tau must be >= 0")
    if mode not in ("auto", *MODES) or maps not in ("auto", *MAPS):
        raise InputError(f"--mode must be auto or one of {', '.join(MODES)}; --maps auto or one of {', '.join(MAPS)}")
    if bundle is not None and (edits or mode not in ("auto", "encoder") or maps not in ("auto", "predicted") or spaces):
        raise InputError("--bundle inverts feed-forward (encoder mode, predicted maps, all spaces) without --edits")
    if bundle is not None:  # a bad bundle fails before any image is read
        from saminv.runtime import Runtime

        runtime = Runtime(bundle)
        runtime.require_inversion_networks()
        if tau is not None:
            runtime.tau = tau
    files, failures = [], []
    for p in paths:  # a missing path or an empty directory fails alone; the others still run
        try:
            files += collect_images([p])
        except InputError as e:
            failures.append(str(e))
            if len(paths) > 1:
                typer.echo(f"error: {e}", err=True)
    if not files:
        raise InputError(failures[0] if len(failures) == 1 else "no images to invert")
    lpips = LPIPS().to(dev)
    if bundle is not None:
        model_name, resolution = runtime.bundle.manifest["model"], runtime.resolution

        def invert_one(image):
            return _runtime_result(runtime, image, lpips)
    else:
        m = load_model(model, dev)
        model_name, resolution = m.name, m.generator.cfg.resolution
        names = parse_spaces(spaces, [s.name for s in m.generator.spaces])
        cfg = InversionConfig(steps=steps)

        def invert_one(image):
            return sam_invert(m, lpips, image, tau=tau, names=names, cfg=cfg, n_segments=segments, progress=True,
                              mode=None if mode == "auto" else mode, maps=None if maps == "auto" else maps)
    inverted = 0
    for path in tqdm(files, desc="images", unit="img", disable=len(files) < 2):
        try:
            image = load_image(path, resolution)
            result = invert_one(image)
            target_dir = unique_dir(out / path.stem)
            grid = None
            if edits:
                from saminv.editing.session import GRID_STRENGTHS, ganspace_grid_rows
                from saminv.outputs import edit_grid_image

                grid = edit_grid_image(ganspace_grid_rows(m, result.codes, edits), GRID_STRENGTHS)
            write_inversion(target_dir, image, result, model_name, grid)
            inverted += 1
            mt = result.metrics
            share = ", ".join(f"{k} {v:.0%}" for k, v in mt["space_share"].items() if v > 0)
            tqdm.write(f"{path}: {mt['mode']} ({mt['maps']} maps) PSNR {mt['psnr']:.2f} dB, LPIPS {mt['lpips']:.3f}, "
                       f"{share}, {mt['seconds']:.1f} s -> {target_dir}")
        except InputError as e:
            failures.append(str(e))
            if len(files) > 1:
                tqdm.write(f"error: {e}", file=sys.stderr)
    if failures and inverted + len(failures) == 1:  # one input: its error is the whole report, as for a missing one
        raise InputError(failures[0])
    if failures:
        typer.echo(f"{inverted} of {inverted + len(failures)} inputs inverted; failed:", err=True)
        for f in failures:
            typer.echo(f"  {f}", err=True)
        raise typer.Exit(1)


def _runtime_result(runtime, image, lpips):
    """Invert one R x R x 3 uint8 image with the torch-free runtime and wrap the result as a SamResult
    (masks area-resized to each F_k) so that the CLI writes the same outputs as for the torch path."""
    import time

    import torch

    from saminv.imageio import to_tensor_range
    from saminv.inversion.optimize import Codes
    from saminv.inversion.sam import SamResult, space_masks
    from saminv.metrics import psnr

    t0 = time.time()
    inv = runtime.invert(image)
    seconds = time.time() - t0
    names = inv.codes.names
    deltas = {int(name[1:]): torch.from_numpy(d) for name, d in inv.codes.deltas.items()}
    sizes = {s["name"]: s["shape"][-1] for s in runtime.bundle.manifest["spaces"] if s["name"] != "W+"}
    masks = {k: m for k, m in space_masks(None, inv.codes.labels[0], names, sizes=sizes).items() if k in deltas}
    recon, target = torch.from_numpy(to_tensor_range(inv.image)), torch.from_numpy(to_tensor_range(image))
    metrics = {"psnr": psnr(recon, target).item(), "lpips": lpips(recon, target).item(), "tau": runtime.tau,
               "mode": "encoder", "maps": "predicted", "backend": "onnxruntime",
               "space_share": {n: float((inv.codes.labels == i).mean()) for i, n in enumerate(names)},
               "seconds": round(seconds, 3)}
    return SamResult(recon[0], Codes(torch.from_numpy(inv.codes.wplus), deltas, masks), inv.codes.labels[0], names,
                     None, metrics)


@app.command()
@reports_errors
def edit(input: Path = typer.Argument(..., help="A codes.safetensors from saminv invert, or a photo (inverted with SAM first)."),
         direction: str = typer.Option(..., help="ganspace:K, sefa:K, a name in the model's library, or a .npy "
                                                 "of shape (n_latent, w_dim) or (w_dim,)."),
         strength: Optional[float] = typer.Option(None, help="One strength (default 2; GANSpace/SeFa/boundary "
                                                            "directions count in standard deviations of W)."),
         strengths: Optional[str] = typer.Option(None, help="A sweep START:STOP:COUNT, e.g. -3:3:7 (writes a strip and a GIF)."),
         layers: Optional[str] = typer.Option(None, help="w+ layers i-j the edit moves (default: the direction's own)."),
         model: Optional[str] = typer.Option(None, help=MODEL_HELP + " Default: the codes' model, else faces64."),
         out: Path = typer.Option(Path("saminv-edits"), help="Output root; one new folder per edit."),
         steps: int = typer.Option(200, min=1, help="For a photo: optimization steps per SAM stage."),
         device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda[:N]."),
         ) -> None:
    """Edit SAM codes along a direction by the per-layer rule (regions in F_k take the edit only after layer k)."""
    import time

    from saminv.editing.directions import parse_layers, resolve
    from saminv.editing.session import load_edit_input, parse_strengths, sweep_images
    from saminv.imageio import unique_dir
    from saminv.outputs import write_edit

    values = parse_strengths(strength, strengths)
    m, saved, origin = load_edit_input(input, model, steps, pick_device(device))
    d = resolve(m, direction, parse_layers(layers, m.generator.cfg.n_latent))
    t0 = time.perf_counter()
    images = sweep_images(m, saved, d, values)
    ms = (time.perf_counter() - t0) * 1000 / len(values)
    stem = input.stem if input.suffix != ".safetensors" else input.parent.name or input.stem
    target = unique_dir(out / f"{stem}_{d.name.replace(':', '')}")
    info = {"model": m.name, "input": origin, "direction": d.name, "source": d.source, "layers": list(d.layers),
            "ms_per_image": round(ms, 2)}
    write_edit(target, images, values, saved, m, d.vector.cpu().numpy(), info)
    typer.echo(f"{d.name} (layers {d.layers[0]}-{d.layers[1]}) at {', '.join(f'{v:+g}' for v in values)}: "
               f"{ms:.1f} ms per image -> {target}")


@directions_app.command("list")
@reports_errors
def directions_list(model: str = typer.Option("faces64", help=MODEL_HELP)) -> None:
    """List the stored directions of a model (ganspace:K and sefa:K also work when not stored)."""
    from saminv.editing.directions import load_library
    from saminv.models.model_dir import load_model

    m = load_model(model)
    library = load_library(m.path) if m.path else {}
    if not library:
        typer.echo(f"{m.name}: no stored directions (ganspace:K and sefa:K are computed on use)")
    for name, d in library.items():
        typer.echo(f"{name:24s} layers {d.layers[0]}-{d.layers[1]}  {d.source}")


def _store(model, directions) -> None:
    from saminv.editing.directions import save_directions

    if model.path is None:
        raise InputError("this model has no directory to store directions in")
    path = save_directions(model.path, directions)
    typer.echo(f"stored {', '.join(d.name for d in directions)} -> {path}")


@directions_app.command("ganspace")
@reports_errors
def directions_ganspace(model: str = typer.Option("faces64", help=MODEL_HELP),
                        num: int = typer.Option(10, min=1, help="Principal components to store (ganspace:0 ..)."),
                        samples: int = typer.Option(10_000, min=100, help="Mapped w samples for the PCA."),
                        layers: Optional[str] = typer.Option(None, help="w+ layers i-j the directions move (default all)."),
                        ) -> None:
    """GANSpace: principal components of mapped w (strength 1 = one standard deviation)."""
    from saminv.editing.directions import ganspace, parse_layers
    from saminv.models.model_dir import load_model

    m = load_model(model)
    span = parse_layers(layers, m.generator.cfg.n_latent)
    _store(m, [d.with_layers(span) for d in ganspace(m.generator, num, samples)])


@directions_app.command("sefa")
@reports_errors
def directions_sefa(model: str = typer.Option("faces64", help=MODEL_HELP),
                    num: int = typer.Option(10, min=1, help="Eigenvectors to store (sefa:0 ..)."),
                    layers: Optional[str] = typer.Option(None, help="w+ layers i-j whose modulation weights are factorized (default all)."),
                    ) -> None:
    """SeFa: closed-form factorization of the modulation weights (strength 1 = one standard deviation)."""
    from saminv.editing.directions import parse_layers, sefa
    from saminv.models.model_dir import load_model

    m = load_model(model)
    _store(m, sefa(m.generator, num, parse_layers(layers, m.generator.cfg.n_latent)))


@directions_app.command("boundary")
@reports_errors
def directions_boundary(name: str = typer.Argument(..., help="Name of the new direction."),
                        latents: Path = typer.Option(..., help=".npy of W codes (N, w_dim)."),
                        labels: Path = typer.Option(..., help=".npy of N binary labels (the direction points to the larger value)."),
                        model: str = typer.Option("faces64", help=MODEL_HELP),
                        layers: Optional[str] = typer.Option(None, help="w+ layers i-j the direction moves (default all)."),
                        ) -> None:
    """InterFaceGAN-style boundary: the normal of a linear SVM on labelled latents."""
    from saminv.editing.directions import boundary, parse_layers
    from saminv.imageio import load_array
    from saminv.models.model_dir import load_model

    m = load_model(model)
    span = parse_layers(layers, m.generator.cfg.n_latent)
    _store(m, [boundary(m.generator, load_array(latents), load_array(labels), name, span)])


@directions_app.command("pair")
@reports_errors
def directions_pair(name: str = typer.Argument(..., help="Name of the new direction."),
                    source: Path = typer.Argument(..., help="'Before': a codes.safetensors or a photo."),
                    target: Path = typer.Argument(..., help="'After': a codes.safetensors or a photo."),
                    model: Optional[str] = typer.Option(None, help=MODEL_HELP + " Default: the codes' model, else faces64."),
                    layers: Optional[str] = typer.Option(None, help="w+ layers i-j the direction moves (default all)."),
                    steps: int = typer.Option(200, min=1, help="For photos: optimization steps per SAM stage."),
                    ) -> None:
    """Custom edit from one image pair: the difference of their inverted w+ over the chosen layers."""
    from saminv.editing.directions import pair, parse_layers
    from saminv.editing.session import load_edit_input

    m, before, _ = load_edit_input(source, model, steps)
    m2, after, _ = load_edit_input(target, model or m.name, steps)
    if m2.name != m.name:
        raise InputError(f"{source} and {target} belong to different models ({m.name}, {m2.name})")
    _store(m, [pair(before.codes.wplus, after.codes.wplus, name, parse_layers(layers, m.generator.cfg.n_latent))])


@directions_app.command("add")
@reports_errors
def directions_add(name: str = typer.Argument(..., help="Name of the new direction."),
                   array: Path = typer.Argument(..., help=".npy of shape (n_latent, w_dim) or (w_dim,)."),
                   model: str = typer.Option("faces64", help=MODEL_HELP),
                   layers: Optional[str] = typer.Option(None, help="w+ layers i-j the direction moves (default all)."),
                   ) -> None:
    """Store a user's direction in the model's library."""
    from saminv.editing.directions import from_array, parse_layers
    from saminv.imageio import load_array
    from saminv.models.model_dir import load_model

    m = load_model(model)
    _store(m, [from_array(load_array(array), name, m.generator, parse_layers(layers, m.generator.cfg.n_latent), f"user array {array.name}")])


@app.command()
@reports_errors
def export(model: str = typer.Option("faces64", help=MODEL_HELP),
           out: Path = typer.Option(..., help="Bundle directory to write (must not exist)."),
           fp16: bool = typer.Option(False, "--fp16", help="float16 features (styles, demodulation, ToRGB and image stay float32)."),
           opset: int = typer.Option(18, min=18, help="ONNX opset (the dynamo exporter needs >= 18)."),
           max_batch: int = typer.Option(32, min=1, help="Largest batch the dynamic batch axis accepts."),
           ) -> None:
    """Export the feed-forward path as ONNX, one file per stage, with manifest.json (checked against torch)."""
    from saminv.export.onnx_bundle import export_bundle
    from saminv.models.model_dir import load_model

    if out.exists():
        raise InputError(f"{out} exists; choose another --out")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise InputError(f"export needs onnx, onnxscript and onnxruntime (pip install 'saminv[export]'): {e}") from None
    manifest = export_bundle(load_model(model), out, fp16=fp16, opset=opset, max_batch=max_batch, log=typer.echo)
    worst = max(s["max_abs_diff_vs_torch"] for s in manifest["stages"])
    extra = f", fp16 image PSNR {manifest['fp16_image_psnr_db']:.1f} dB" if fp16 else ""
    typer.echo(f"wrote {out}: {len(manifest['stages'])} stages, max abs diff vs torch {worst:.1e}{extra}")


@engines_app.command("build")
@reports_errors
def engines_build(bundle: Path = typer.Argument(..., help="A bundle written by saminv export."),
                  max_batch: Optional[int] = typer.Option(None, help="Largest batch (default: the bundle's)."),
                  opt_batch: int = typer.Option(1, min=1, help="Batch the engines are tuned for."),
                  workspace_gb: float = typer.Option(4.0, help="Builder workspace limit in GiB."),
                  fused_residual: bool = typer.Option(False, help="Run each masked residual as saminv's fused "
                                                      "plugin (Triton; needs torch where the engines run; "
                                                      "plans not version-compatible)."),
                  ) -> None:
    """Build TensorRT plans for this GPU, keyed by TensorRT version and compute capability (version-compatible
    unless --fused-residual)."""
    from saminv.engines.tensorrt_engines import build_engines

    folder = build_engines(bundle, max_batch, opt_batch, workspace_gb, fused_residual, log=typer.echo)
    typer.echo(f"wrote {folder}")


@app.command()
@reports_errors
def bench(archs: str = typer.Option("faces64,256", help="Comma-separated: model specs and/or 256, 1024 (random config-f)."),
          backends: str = typer.Option("eager,compiled,onnxruntime", help="Comma-separated: eager, compiled, onnxruntime; with an NVIDIA GPU also cuda, cuda-compiled, tensorrt, tensorrt-fused."),
          runs: int = typer.Option(50, min=1, help="Timed runs per latency (after --warmup)."),
          warmup: int = typer.Option(5, min=0, help="Untimed runs before each latency and throughput measurement."),
          batches: str = typer.Option("1,8,32", help="Batch sizes for throughput."),
          throughput_runs: int = typer.Option(3, min=1, help="Timed runs per throughput batch."),
          threads: int = typer.Option(2, min=1, help="Intra-op threads for every backend."),
          out: Path = typer.Option(Path("bench.json"), help="JSON report (a new name if it exists)."),
          ) -> None:
    """Latency (median, p95), throughput and peak memory of the feed-forward path per backend; table + JSON."""
    from saminv.bench import BACKENDS, BenchConfig, format_table, run_bench
    from saminv.imageio import save_json

    chosen = [b.strip() for b in backends.split(",") if b.strip()]
    bad = [b for b in chosen if b not in BACKENDS]
    if bad or not chosen:
        raise InputError(f"--backends: choose from {', '.join(BACKENDS)}")
    try:
        sizes = tuple(int(b) for b in batches.split(","))
    except ValueError:
        raise InputError(f"--batches {batches!r}: expected integers like 1,8,32") from None
    cfg = BenchConfig(runs=runs, warmup=warmup, batches=sizes, throughput_runs=throughput_runs, threads=threads)
    report = run_bench([a.strip() for a in archs.split(",") if a.strip()], chosen, cfg, log=typer.echo)
    typer.echo(format_table(report))
    target = out if not out.exists() else out.with_name(f"{out.stem}-{int(__import__('time').time())}{out.suffix}")
    save_json(target, report)
    typer.echo(f"wrote {target}")


@app.command()
@reports_errors
def calibrate(model: str = typer.Option("faces64", help="A built-in name or model directory (config.json is updated)."),
              validation: str = typer.Option("photos", help="Built-in validation set: photos (16 crops of scikit-image "
                                                             "photos, no faces) or faces (36 real face crops; needs `make "
                                                             "faces`; faces64 ships taus calibrated on these)."),
              images: Optional[list[Path]] = typer.Option(None, help="Validation photos or directories (replace --validation)."),
              steps: int = typer.Option(200, help="Optimization steps of the inversions."),
              quantile: float = typer.Option(0.5, min=0.0, max=1.0, help="Quantile of per-segment W+ errors that becomes tau (measured maps)."),
              regime: str = typer.Option("optimization", help="Whose errors: optimization (stores tau) or encoder "
                                                               "(the W+ encoder's, stores tau_encoder; needs trained encoders)."),
              maps: str = typer.Option("measured", help="measured, or predicted: one tau per space for the optimization "
                                                         "predictor's maps, matched to the measured maps at tau (stores "
                                                         "tau_predicted; calibrate tau first; inverts in every space)."),
              ) -> None:
    """Calibrate tau on validation photos and store it in the model's config.json."""
    from saminv.imageio import collect_images, load_image, resize_square
    from saminv.inversion.calibration import calibrate_tau, store_tau
    from saminv.inversion.sam import MAPS
    from saminv.models.lpips import LPIPS
    from saminv.models.model_dir import REGIMES, TAU_KEYS
    from saminv.photos import VALIDATION_SETS

    if validation not in VALIDATION_SETS:
        raise InputError(f"--validation must be one of {', '.join(VALIDATION_SETS)}, got {validation!r}")
    if regime not in REGIMES:
        raise InputError(f"--regime must be one of {', '.join(REGIMES)}, got {regime!r}")
    if maps not in MAPS:
        raise InputError(f"--maps must be one of {', '.join(MAPS)}, got {maps!r}")
    m = model_directory(model, "calibrate")
    r = m.generator.cfg.resolution
    if images:
        photos = [load_image(p, r) for p in collect_images(images)]
    else:
        photos = [resize_square(p, r) for p in VALIDATION_SETS[validation]()]
    tau, stats = calibrate_tau(m, LPIPS(), photos, steps=steps, quantile=quantile, progress=True, regime=regime, maps=maps)
    source = VALIDATION_SETS[validation]
    stats["validation"] = "the given images" if images else f"{source.__module__}.{source.__name__}"
    key = TAU_KEYS[regime, maps]
    store_tau(m.path, key, tau, stats)
    shown = ", ".join(f"{n} {t:.4f}" for n, t in tau.items()) if isinstance(tau, dict) else f"{tau:.4f}"
    typer.echo(f"{key} = {shown} ({stats['segments']} segments of {stats['images']} photos) -> {m.path / 'config.json'}")
    matched = TAU_KEYS["optimization", "predicted"]
    if key == "tau" and matched in m.meta:  # the predicted maps' taus were matched to the previous tau
        store_tau(m.path, matched, None)
        typer.echo(f"removed {matched} (matched to the previous tau): saminv calibrate --model {model} --maps predicted")


@app.command("sample-photo")
@reports_errors
def sample_photo(name: str = typer.Argument("astronaut", help="astronaut, messi (needs Debian opencv-doc), lfw-0 .. lfw-99 (scikit-image's LFW faces) or a registry face such as obama (needs `make faces`)."),
                 out: Path = typer.Option(..., help="PNG file to write (must not exist)."),
                 ) -> None:
    """Write a real face photo that ships with installed packages (for demos and tests)."""
    from saminv.imageio import save_png
    from saminv.photos import face_photo

    if out.exists():
        raise InputError(f"{out} exists; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(out, face_photo(name))
    typer.echo(f"wrote {out}")


@train_app.command("generator")
@reports_errors
def train_generator(out: Path = typer.Option(Path("runs/faces64"), help="Run directory (resumes from its checkpoint.pt)."),
                    steps: int = typer.Option(20_000, help="Total steps to reach (a resumed run continues)."),
                    batch: int = typer.Option(16, min=1, help="Images per step."),
                    pair_weight: float = typer.Option(10.0, help="Weight of the paired L1 to the teacher (0: pure GAN)."),
                    adv_weight: float = typer.Option(0.0, help="Weight of the adversarial loss (0: regression only)."),
                    hint_weight: float = typer.Option(1.0, help="Weight of the feature hints to the teacher's 4..32 px maps."),
                    export: Optional[Path] = typer.Option(None, help="Afterwards, write the EMA generator as a model directory here (replaced if it exists)."),
                    device: str = typer.Option("cpu", help="cpu or cuda[:N]."),
                    ) -> None:
    """Distil the built-in faces64 StyleGAN2 from the DCGAN face teacher (resumable)."""
    from saminv.training.generator import DistillConfig, Distiller, export_model

    try:
        run = Distiller(out, DistillConfig(steps=steps, batch=batch, pair_weight=pair_weight, adv_weight=adv_weight,
                                                 hint_weight=hint_weight),
                        pick_device(device))
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    run.train()
    if export is not None:
        export_model(run, export)
        typer.echo(f"wrote {export}")


@train_app.command("invertibility-data")
@reports_errors
def train_invertibility_data(out: Path = typer.Option(..., help="Data set directory (resumes: existing shards are kept)."),
                             model: str = typer.Option("faces64", help=MODEL_HELP),
                             images: Optional[list[Path]] = typer.Option(None, help="Your photos or directories: added to "
                                                                                     "the pool's real photos, or the images set."),
                             source: str = typer.Option("pool", help="Which images: pool (DCGAN teacher faces, model "
                                                                     "samples, real-photo crops, composites), "
                                                                     "validation-faces (the 36 faces of `make faces`), "
                                                                     "nonface-patches (lfw_subset's 90 training "
                                                                     "background patches) or images (your --images "
                                                                     "alone); a set's photos come whole, then as crops."),
                             count: int = typer.Option(1024, min=1, help="Images in the data set."),
                             shard_size: int = typer.Option(8, min=1, help="Images per shard (one inversion batch)."),
                             steps: int = typer.Option(100, min=1, help="Optimization steps per single-space inversion "
                                                                         "(optimization regime)."),
                             regime: str = typer.Option("optimization", help="Who inverts: optimization (single-space "
                                                                              "optimizations, minutes per shard) or encoder "
                                                                              "(the model's encoders, seconds per shard)."),
                             mirror: bool = typer.Option(False, help="Also measure each image mirrored left-right; "
                                                                     "the predictor trains on the mean of both maps. "
                                                                     "On an existing data set: adds that measurement."),
                             seed: int = typer.Option(0, help="Seed of the images drawn (samples, crops, flips, colour jitter, composites)."),
                             rank: Optional[int] = typer.Option(None, help="This process's shard set (default: torchrun's RANK, else 0)."),
                             world: Optional[int] = typer.Option(None, help="Number of processes (default: torchrun's WORLD_SIZE, else 1)."),
                             ) -> None:
    """Invert training images in every latent space and store LPIPS error maps (predictor data), in shards."""
    from saminv.imageio import collect_images, load_image
    from saminv.models.model_dir import REGIMES, load_model
    from saminv.training.invertibility_data import PHOTO_LOAD_SCALE, DataConfig, generate_dataset
    from saminv.training.run import process_rank

    if regime not in REGIMES:
        raise InputError(f"--regime must be one of {', '.join(REGIMES)}, got {regime!r}")
    m = load_model(model)
    env_rank, env_world = process_rank()
    rank, world = env_rank if rank is None else rank, env_world if world is None else world
    if not 0 <= rank < world:
        raise InputError(f"--rank {rank} must lie in [0, --world {world})")
    side = PHOTO_LOAD_SCALE * m.generator.cfg.resolution
    extra = [load_image(p, side) for p in collect_images(images)] if images else None
    try:
        written = generate_dataset(m, out, DataConfig(count, shard_size, steps, seed, regime, source, mirror), rank, world, extra)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None
    typer.echo(f"wrote {len(written)} shards to {out}")


INTO_HELP = "A built-in name or model directory that receives the weights when the run reaches its last step."


@train_app.command("predictor")
@reports_errors
def train_predictor(data: list[Path] = typer.Option(..., help="A data set from saminv train invertibility-data (repeat "
                                                               "to pool several); its regime decides the network: "
                                                               "predictor or encoder_predictor."),
                    out: Path = typer.Option(Path("runs/predictor"), help="Run directory (resumes from its checkpoint.pt)."),
                    steps: int = typer.Option(3000, min=1, help="Total steps to reach (a resumed run continues)."),
                    batch: int = typer.Option(16, min=1, help="Images per step."),
                    lr: float = typer.Option(1e-3, help="Learning rate of decoder and heads (backbone: 0.1x)."),
                    seed: int = typer.Option(0, help="Seed of the batches and their flips, and of the new layers' "
                                                     "initial weights without --start-from (runs that differ only "
                                                     "in it show the training's spread)."),
                    shift: int = typer.Option(0, min=0, help="Largest random shift of a training image and its "
                                                             "maps, in pixels (0: flips only; both of faces64's "
                                                             "predictors used 6)."),
                    device: str = typer.Option("cpu", help="cpu or cuda[:N]."),
                    into: Optional[str] = typer.Option(None, help=INTO_HELP),
                    start_from: Optional[str] = typer.Option(
                        None, help="A built-in name or model directory whose predictor of the other regime gives "
                                   "the starting weights (default: the ImageNet trunk alone); ignored when the "
                                   "run resumes."),
                    ) -> None:
    """Train an invertibility predictor S_l: l2 regression of the per-space LPIPS error maps (paper Eq. 2)."""
    from saminv.models.model_dir import PREDICTORS, TAU_KEYS, load_model, save_network
    from saminv.training.predictor import PredictorConfig, PredictorTrainer, data_regime

    target = model_directory(into, "--into") if into else None
    start = None
    try:
        if start_from:
            other = next(kind for regime, kind in PREDICTORS.items() if regime != data_regime(*data))
            start = load_model(start_from).network(other)
        cfg = PredictorConfig(steps=steps, batch=batch, lr=lr, seed=seed, shift=shift)
        run = PredictorTrainer(data, out, cfg, pick_device(device), start)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None
    if target is not None and run.spaces != [s.name for s in target.generator.spaces]:
        raise InputError(f"the data set's spaces {run.spaces} are not those of {target.name}")
    run.train()
    kind = PREDICTORS[run.regime]
    typer.echo(f"{kind} at step {run.step} -> {out / 'checkpoint.pt'}")
    if target is not None:
        save_network(target.path, kind, run.net, {"data": ", ".join(map(str, data)), **run.record()})
        typer.echo(f"{kind} weights -> {target.path / (kind + '.safetensors')}")
        if run.regime == "optimization":  # the previous predictor's tau_predicted does not fit the new maps
            from saminv.inversion.calibration import rematch_predicted_taus, store_tau

            key = TAU_KEYS["optimization", "predicted"]
            rematched = rematch_predicted_taus(load_model(target.path), target.meta.get(f"{key}_calibration"))
            store_tau(target.path, key, *(rematched or (None,)))
            if rematched:
                shown = ", ".join(f"{n} {t:.4f}" for n, t in rematched[0].items())
                typer.echo(f"{key} = {shown} (matched to the previous calibration's measured pass rates)")
            else:
                typer.echo(f"then: saminv calibrate --model {target.path} --maps predicted (its maps' tau, one per space)")


@train_app.command("encoder")
@reports_errors
def train_encoder(model: str = typer.Option("faces64", help=MODEL_HELP),
                  out: Path = typer.Option(Path("runs/encoders"), help="Run directory (resumes from its checkpoint.pt)."),
                  wplus_steps: int = typer.Option(1500, min=0, help="Steps of the W+ encoder (stage 1)."),
                  delta_steps: int = typer.Option(3000, min=0, help="Steps of the Δf encoders, W+ frozen (stage 2)."),
                  batch: int = typer.Option(8, min=2, help="Images per step (model samples and photos)."),
                  generated: int = typer.Option(3, min=0, help="Model samples (known w) per batch; the rest are photos, crops, composites."),
                  lr: float = typer.Option(5e-4, help="Learning rate (ImageNet trunk: 0.1x)."),
                  device: str = typer.Option("cpu", help="cpu or cuda[:N]."),
                  into: Optional[str] = typer.Option(None, help=INTO_HELP),
                  ) -> None:
    """Train the W+ encoder (pSp/e4e style) and one Δf encoder per F_k for feed-forward SAM."""
    from saminv.models.model_dir import load_model, save_network
    from saminv.training.encoders import EncoderConfig, EncoderTrainer

    if generated >= batch:
        raise InputError(f"--generated {generated} must be smaller than --batch {batch}")
    target = model_directory(into, "--into") if into else None
    dev = pick_device(device)
    m = load_model(model, dev)
    cfg = EncoderConfig(wplus_steps=wplus_steps, delta_steps=delta_steps, batch=batch, generated=generated, lr=lr)
    run = EncoderTrainer(m, out, cfg, dev)
    run.train()
    typer.echo(f"encoders at step {run.step} -> {out / 'checkpoint.pt'}")
    if target is not None:
        save_network(target.path, "encoders", run.net, {"model": m.name, **run.record()})
        typer.echo(f"encoder weights -> {target.path / 'encoders.safetensors'}")


@train_app.command("report")
@reports_errors
def train_report(model: str = typer.Option("faces64", help=MODEL_HELP),
                 n: int = typer.Option(2000, help="Samples per set for the Fréchet distance."),
                 out: Path = typer.Option(Path("docs"), help="Directory for <name>_samples.png and <name>_fd.json."),
                 ) -> None:
    """Sample grid (student beside teacher) and Fréchet distance to the DCGAN teacher, with its floor."""
    from saminv.imageio import save_json, save_png
    from saminv.models.model_dir import load_model
    from saminv.training.report import frechet_report, sample_grid

    m = load_model(model)
    out.mkdir(parents=True, exist_ok=True)
    try:
        save_png(out / f"{m.name}_samples.png", sample_grid(m))
        report = frechet_report(m, n)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None
    save_json(out / f"{m.name}_fd.json", report)
    typer.echo(f"FD student-teacher {report['fd_student_teacher']:.2f}, floor teacher-teacher "
               f"{report['fd_teacher_teacher_floor']:.2f} ({n} samples each) -> {out}")


def main() -> None:
    """The ``saminv`` console script."""
    app()


if __name__ == "__main__":
    main()
