"""Editing SAM codes of real face photos (issue: editing, "Done when").

For each photo: SAM optimization inversion at the model's defaults (cached in --cache), then

* per latent space, the mean absolute change (on [-1, 1] images) inside the pixels inverted in that
  space, for GANSpace edits on GANSpace-style layer ranges (W+ regions should change far more than
  late F_k ones);
* reach: for each F_k region, the change inside it for an edit of layers 0..k only (which the
  per-layer rule keeps out of F_k regions), over the whole region and over its interior (pixels at
  least --margin px from any other region: the later 3x3 convolutions carry changes across seams),
  and for layers k+1.. (which it lets in);
* strength 0 against the reconstruction (must be exactly 0);
* latency of one edit of existing codes, median and p95 over 50 runs after 5 warm-up runs;
* docs/editing.png: input, reconstruction, layer map, a GANSpace sweep under the per-layer rule and
  the same sweep without it (delta_f simply kept, "naive"), to look at the seams.

    python benchmarks/edit_faces.py [--photos astronaut,messi] [--directions ganspace:2@0-3,...] [--figure docs/editing.png]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from saminv.editing.directions import parse_layers, resolve
from saminv.editing.edit import Editor
from saminv.editing.session import to_uint8
from saminv.errors import reports_errors
from saminv.imageio import resize_square, save_png
from saminv.inversion.optimize import Codes
from saminv.inversion.sam import sam_invert
from saminv.models.lpips import LPIPS
from saminv.models.model_dir import load_model
from saminv.outputs import PANEL_SCALE, SavedCodes, load_codes, save_codes, stack_rows
from saminv.photos import face_photo
from saminv.viz import layer_map_image, legend_image, side_by_side

FIGURE_STRENGTHS = [-2.0, -1.0, 0.0, 1.0, 2.0]
DIRECTIONS = "ganspace:2@0-3,ganspace:4@0-3,ganspace:0@0-5,ganspace:1@0-9"


def inverted(model, name: str, cache: Path) -> tuple[np.ndarray, SavedCodes]:
    image = resize_square(face_photo(name), model.generator.cfg.resolution)
    path = cache / f"{model.name}_{name}.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        r = sam_invert(model, LPIPS(), image, progress=True, mode="optimize", maps="measured")
        cache.mkdir(parents=True, exist_ok=True)
        save_codes(path, r.codes, r.labels, r.names, model.name, r.metrics["tau"])
    return image, load_codes(path)


def interior(labels: np.ndarray, index: int, margin: int) -> np.ndarray:
    """Pixels of region ``index`` at least ``margin`` px (chessboard distance) from any other region."""
    from scipy.ndimage import binary_erosion

    inside = labels == index
    return binary_erosion(inside, structure=np.ones((3, 3), bool), iterations=margin, border_value=1)


def region_changes(diff: np.ndarray, labels: np.ndarray, names: list[str]) -> dict[str, float]:
    """Mean |change| [R, R] over the pixels of each space present."""
    return {n: float(diff[labels == i].mean()) for i, n in enumerate(names) if (labels == i).any()}


@reports_errors
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="faces64")
    ap.add_argument("--photos", default="astronaut,messi")
    ap.add_argument("--directions", default=DIRECTIONS, help="name@first-last, comma-separated")
    ap.add_argument("--strength", type=float, default=2.0)
    ap.add_argument("--margin", type=int, default=8, help="px from other regions that count as interior")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/saminv-edit-bench"))
    ap.add_argument("--figure", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    model = load_model(args.model)
    n_latent = model.generator.cfg.n_latent
    directions = []
    for spec in args.directions.split(","):
        name, _, span = spec.partition("@")
        directions.append(resolve(model, name, parse_layers(span or None, n_latent)))
    report, figure_rows = {"model": model.name, "strength": args.strength, "photos": {}}, []
    for name in args.photos.split(","):
        image, saved = inverted(model, name, args.cache)
        codes, labels, names = saved.codes, saved.labels, saved.names
        editor = Editor(model, codes)
        recon = codes.render(model).detach()
        row = {"space_share": {n: float((labels == i).mean()) for i, n in enumerate(names)},
               "strength0_max_abs": float((editor.edit(directions[0], 0.0) - recon).abs().max())}
        per_dir = {}
        for d in directions:
            diff = (editor.edit(d, args.strength) - recon).abs().mean(dim=1)[0].numpy()
            key = f"{d.name}@{d.layers[0]}-{d.layers[1]}"
            per_dir[key] = region_changes(diff, labels, names)
            reach = {}
            for i, n in enumerate(names):
                if n == "W+" or not (labels == i).any():
                    continue
                k = int(n[1:])
                inside, core = labels == i, interior(labels, i, args.margin)
                before = (editor.edit(d.with_layers((0, k)), args.strength) - recon).abs().mean(dim=1)[0].numpy()
                after = (editor.edit(d.with_layers((k + 1, n_latent - 1)), args.strength) - recon).abs().mean(dim=1)[0].numpy()
                reach[n] = {"layers_0_to_k_mean": float(before[inside].mean()), "interior_pixels": int(core.sum()),
                            "layers_0_to_k_interior_max": float(before[core].max()) if core.any() else None,
                            "layers_after_k_mean": float(after[inside].mean())}
            per_dir[key + " reach"] = reach
        row["mean_abs_change"] = per_dir
        for _ in range(5):
            editor.edit(directions[0], 1.0)
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            editor.edit(directions[0], 1.0)
            times.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        Editor(model, codes).edit(directions[0], 1.0)
        row["edit_ms_median"], row["edit_ms_p95"] = float(np.median(times)), float(np.percentile(times, 95))
        row["first_edit_ms_with_setup"] = (time.perf_counter() - t0) * 1000
        report["photos"][name] = row
        print(f"{name}: strength 0 max |diff| {row['strength0_max_abs']}; mean |change| per space at {args.strength:+g}:")
        for key, changes in per_dir.items():
            if key.endswith(" reach"):
                print(f"   {key}: " + "  ".join(
                    f"{n} [0-k mean {v['layers_0_to_k_mean']:.3f}, interior max "
                    f"{'-' if v['layers_0_to_k_interior_max'] is None else format(v['layers_0_to_k_interior_max'], '.1e')} "
                    f"({v['interior_pixels']} px); after-k mean {v['layers_after_k_mean']:.3f}]" for n, v in changes.items()))
            else:
                print(f"   {key:22s} " + "  ".join(f"{n} {v:.3f}" for n, v in changes.items()))
        print(f"   edit latency median {row['edit_ms_median']:.1f} ms, p95 {row['edit_ms_p95']:.1f} ms "
              f"(first edit incl. setup {row['first_edit_ms_with_setup']:.1f} ms), {torch.get_num_threads()} threads")

        if args.figure:
            d = directions[0]
            rule = to_uint8(editor.sweep(d, FIGURE_STRENGTHS)[:, 0])
            naive = to_uint8(torch.stack([Codes(codes.wplus + d.offset(s), codes.deltas, codes.masks).render(model).detach()
                                          for s in FIGURE_STRENGTHS])[:, 0])
            lmap = layer_map_image(labels, names)
            head = side_by_side([image, to_uint8(recon)[0], lmap], [name, "SAM", "layer map"], scale=PANEL_SCALE)
            head = np.concatenate([head, legend_image(names, head.shape[0], list(row["space_share"].values()))], axis=1)
            titles = [f"{d.name} {s:+g}" for s in FIGURE_STRENGTHS]
            figure_rows += [head, side_by_side(list(rule), [f"per-layer rule {t}" if j == 2 else t for j, t in enumerate(titles)],
                                               scale=PANEL_SCALE),
                            side_by_side(list(naive), [f"naive {t}" if j == 2 else t for j, t in enumerate(titles)],
                                         scale=PANEL_SCALE)]
    if args.figure:
        save_png(args.figure, stack_rows(figure_rows, gap=12))
        print(f"wrote {args.figure}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
