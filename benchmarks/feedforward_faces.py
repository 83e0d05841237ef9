"""Feed-forward SAM on the held-out real photos (issue: feed-forward SAM, "Done when").

Six measurements, each on photos no training step saw (:func:`saminv.photos.held_out_photos`: the
astronaut, the held-out opencv-doc photos, the 16 registry faces once ``make faces`` has run,
and scikit-image's LFW non-face patches, which are near-uniform and easy to invert; the predictor,
layer-map and encoder parts also report each group on its own, ``by_group``: ``photos``, ``faces`` and
``nonface_patches``):

* ``predictor``, ``encoder_predictor``  predicted vs measured invertibility, per regime: per space, the Spearman
  correlation of the per-segment mean errors (segments of all photos pooled; measured = single-space
  optimizations with the data set's step budget, or single-space encoder passes), and the share of
  pixels whose layer map agrees at the measured maps' tau (like with like: both maps on the data set's
  error scale); the same two scores for the maps measured on the mirrored photos, mirrored back, against
  the measured ones (``mirrored_measurement``: the measurement's repeatability rho; it doubles the
  optimization regime's cost), with ``attainable`` = sqrt(rho), the Spearman against one measurement of
  a predictor that knew the part both measurements share exactly (correction for attenuation: rho
  itself understates it), and the predictor's Spearman against the mean of both measurements
  (``vs_mean_of_both``: above its score against one when measurement noise holds it down); for the
  encoder regime also the scores of the predicted maps anchored to the measured W+ error (what encoder
  mode uses); and ``within_photo``, the mean over photos of each photo's own Spearman (the ranking of the
  segments inside one photo, which the pooled score mixes with each photo's level);
* ``layer_maps`` the optimization regime's layer maps as ``saminv invert --maps measured|predicted`` makes them:
  measured maps after the default optimization (``--steps``) cut at ``tau``; optimize mode's predicted maps,
  anchored to the measured W+ map and cut at ``anchored_taus``; hybrid mode's predicted maps alone, cut at
  ``tau_predicted`` (one per space, their own error scale): pixel agreement with the measured layer map,
  W+ share. With ``--maps-cache DIR`` these three parts keep the measured maps (and mirrored ones) per photo
  in DIR and read them back on the next run, so scoring another predictor of the same generator (a model
  directory that ``saminv train predictor --into`` wrote) takes seconds instead of the optimizations' hour;
* ``encoder``    encoder SAM (encoder-regime predicted masks, W+ and Δf encoders) vs the W+ encoder alone:
  PSNR, LPIPS; encoder SAM with measured encoder maps (what a perfect predictor would give); and the PSNR
  of each single-space encoder inversion (W+, or w+ plus Δf_k everywhere; paper Figure 3's ordering);
* ``optimize``   SAM optimization with predicted maps vs measured maps (same steps, each at its own tau):
  PSNR, LPIPS, seconds, share of pixels in W+ and the share where the two layer maps agree; plus hybrid
  mode (encoder start + joint optimization) at a few step budgets;
* ``latency``    encoder mode, one 64 x 64 photo, the ``saminv.invert`` code path: median and p95 of
  ``--runs`` runs after 5 warm-up runs, on the threads torch has (OMP_NUM_THREADS=2 on CI machines);
  the inversion alone, and with the PSNR/LPIPS evaluation of its result.

    OMP_NUM_THREADS=2 python benchmarks/feedforward_faces.py [--parts predictor,encoder_predictor,layer_maps,encoder,optimize,latency]
        [--groups photos,faces,nonface_patches] [--nonface-patches 9] [--optimize-photos 6] [--maps-cache runs/bench-maps]
        [--out docs/feedforward_bench.json]

``--out`` updates the parts run in an existing JSON file and keeps the others (``photos``: every photo some part measured).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from saminv.errors import reports_errors
from saminv.imageio import atomic_write, file_sha256, resize_square
from saminv.inversion.feedforward import encode_each_space, encoder_error_maps, predicted_maps
from saminv.inversion.optimize import InversionConfig
from saminv.inversion.sam import invert_spaces, sam_invert, to_target
from saminv.inversion.selection import (
    anchor_to_measured_wplus,
    anchored_taus,
    layer_map,
    segment,
    segment_means,
    thresholds,
)
from saminv.metrics import psnr
from saminv.models.lpips import LPIPS
from saminv.models.model_dir import load_model
from saminv.photos import held_out_photos, photo_group


def by_group(rows: list[dict], means) -> dict:
    """``means`` (a function of a list of per-photo rows, each with its ``photo`` name) of each non-empty
    group of held-out photos (:func:`saminv.photos.photo_group`): ``photos`` (astronaut, opencv-doc),
    ``faces`` (registry faces) and ``nonface_patches``."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(photo_group(r["photo"]), []).append(r)
    return {g: means(members) for g, members in groups.items()}


def predictor_scores(rows: list[dict], names: list[str], predicted: str = "predicted") -> dict:
    """Per-space Spearman of the pooled per-segment errors (each row's ``measured`` and ``predicted``:
    [S, segments]) and the share of pixels whose layer maps agree (rows' ``<predicted>_agree`` / ``pixels``)."""
    m = np.concatenate([r["measured"] for r in rows], axis=1)
    p = np.concatenate([r[predicted] for r in rows], axis=1)
    return {"segments": int(m.shape[1]),
            "layer_map_agreement": sum(r[f"{predicted}_agree"] for r in rows) / sum(r["pixels"] for r in rows),
            "spearman": {n: float(spearmanr(m[s], p[s]).statistic) for s, n in enumerate(names)}}


def maps_folder(cache: Path | None, model, regime: str, steps: int) -> Path | None:
    """The folder below ``--maps-cache`` (created; None without a cache) of the maps ``regime`` measures with
    ``model``: they depend on the generator's weights and the optimization's settings (optimization regime,
    ``InversionConfig`` with ``steps``) or the encoders' weights (encoder regime), not on the predictor. A
    change to the measuring code itself (LPIPS, the loss) needs a fresh folder."""
    if cache is None:
        return None
    digest = hashlib.sha256(file_sha256(Path(model.path) / "weights.safetensors").encode())
    if regime == "encoder":
        digest.update(model.meta["encoders"]["sha256"].encode())
        name = f"encoder-{digest.hexdigest()[:16]}"
    else:
        digest.update(json.dumps(asdict(InversionConfig(steps=steps)), sort_keys=True).encode())
        name = f"optimization-{steps}steps-{digest.hexdigest()[:16]}"
    (cache / name).mkdir(parents=True, exist_ok=True)
    return cache / name


def measurer(model, lpips, names: list[str], regime: str, steps: int):
    """The measurement of ``regime``'s error maps in the spaces ``names``, as a function of images [N, 3, R, R]
    -> maps [N, S, R, R]: single-space optimizations of ``steps`` steps, or single-space encoder passes."""
    def measure(images: torch.Tensor) -> torch.Tensor:
        if regime == "encoder":
            return encoder_error_maps(model, lpips, images, names)
        cfg = InversionConfig(steps=steps)
        return invert_spaces(model, lpips, images, names, cfg, progress=True).error_maps.transpose(0, 1)
    return measure


def cached_maps(names: list[str], targets: torch.Tensor, measure, keys: tuple[str, ...],
                cache: Path | None) -> dict[str, np.ndarray]:
    """Measured maps of the photos ``names`` (``targets`` [N, 3, R, R]), [N, S, R, R] float32 for each of
    ``keys``: ``measured`` (``measure(images)`` -> tensor [N, S, R, R]) and ``mirrored`` (measured on the
    mirror images, mirrored back). With a ``cache`` folder each photo's maps live in ``<photo>.npz``, one
    array per key: what it holds is read back, the rest measured and added (the file rewritten atomically)."""
    files = [cache / f"{name}.npz" if cache is not None else None for name in names]
    maps: list[dict[str, np.ndarray]] = []
    for f in files:
        with np.load(f) if f is not None and f.is_file() else nullcontext({}) as held:
            maps.append({k: held[k] for k in held})
    added = set()
    for key in keys:
        todo = [i for i, m in enumerate(maps) if key not in m]
        if todo:
            images = targets[todo].flip(-1) if key == "mirrored" else targets[todo]
            for i, m in zip(todo, measure(images).numpy()):
                maps[i][key] = m[..., ::-1].copy() if key == "mirrored" else m
            added.update(todo)
    for i in added:
        if files[i] is not None:
            atomic_write(files[i], lambda path: np.savez(path, **maps[i]))  # the temp name keeps .npz
    return {k: np.stack([m[k] for m in maps]) for k in keys}


def within_photo_spearman(rows: list[dict], names: list[str]) -> dict[str, float]:
    """Per space, the mean over photos of the Spearman of one photo's per-segment ``measured`` and ``predicted``
    errors (photos whose segments all share one value in a space are left out of that space)."""
    per_photo = np.array([[spearmanr(r["measured"][s], r["predicted"][s]).statistic for s in range(len(names))]
                          for r in rows])
    return {n: float(np.nanmean(per_photo[:, s])) for s, n in enumerate(names)}


def predictor_part(model, lpips, photos, steps: int, regime: str, batch: int = 8, cache: Path | None = None) -> dict:
    names = [s.name for s in model.generator.spaces]
    tau = model.tau_for(regime)
    cache = maps_folder(cache, model, regime, steps)
    measure = measurer(model, lpips, names, regime, steps)
    rows = []
    for start in range(0, len(photos), batch):
        chunk = photos[start:start + batch]
        targets = torch.cat([to_target(img) for _, img in chunk])
        maps = cached_maps([name for name, _ in chunk], targets, measure, ("measured", "mirrored"), cache)
        measured, mirrored = maps["measured"], maps["mirrored"]
        predicted = predicted_maps(model, targets, names, regime)
        for i, (name, img) in enumerate(chunk):
            m, p, mm = measured[i], predicted[i].numpy(), mirrored[i]
            seg = segment(img)
            measured_labels = layer_map(m, img, tau)
            same = measured_labels == layer_map(p, img, tau)
            row = {"photo": name, "measured": segment_means(m, seg), "predicted": segment_means(p, seg),
                   "predicted_agree": int(same.sum()), "pixels": same.size,
                   "mirrored": segment_means(mm, seg),
                   "mirrored_agree": int((measured_labels == layer_map(mm, img, tau)).sum())}
            if regime == "encoder":
                anchored = anchor_to_measured_wplus(p, m[0], seg)
                row["anchored"] = segment_means(anchored, seg)
                row["anchored_agree"] = int((measured_labels == layer_map(anchored, img, tau)).sum())
            rows.append(row)
            print(f"  {name}: layer maps agree on {same.mean():.1%} (mirrored measurement: "
                  f"{row['mirrored_agree'] / same.size:.1%})")

    def scores(rows: list[dict]) -> dict:
        out = predictor_scores(rows, names)
        # measured maps vs those measured on the mirrored photos: the measurement's repeatability rho
        mirrored = predictor_scores(rows, names, "mirrored")
        rho = mirrored["spearman"]
        out["mirrored_measurement"] = {k: mirrored[k] for k in ("spearman", "layer_map_agreement")}
        out["mirrored_measurement"]["attainable"] = {n: float(np.sqrt(max(r, 0.0))) for n, r in rho.items()}
        both = [{**r, "measured": (r["measured"] + r["mirrored"]) / 2} for r in rows]
        out["vs_mean_of_both"] = predictor_scores(both, names)["spearman"]
        out["within_photo"] = within_photo_spearman(rows, names)
        if regime == "encoder":
            # the predicted maps anchored to the measured W+ error (what encoder mode uses)
            anchored = predictor_scores(rows, names, "anchored")
            out["w_plus_anchored"] = {k: anchored[k] for k in ("spearman", "layer_map_agreement")}
        return out

    return {"regime": regime, "photos": len(photos), "measure_steps": steps if regime == "optimization" else None,
            "tau": tau, **scores(rows), "by_group": by_group(rows, scores)}


def layer_maps_part(model, lpips, photos, steps: int, batch: int = 8, cache: Path | None = None) -> dict:
    names = [s.name for s in model.generator.spaces]
    cache = maps_folder(cache, model, "optimization", steps)
    measure = measurer(model, lpips, names, "optimization", steps)
    tau, tau_predicted = model.tau_for("optimization"), model.tau_for("optimization", "predicted")
    predicted_taus = thresholds(tau_predicted, names)
    anchored = thresholds(anchored_taus(tau, tau_predicted), names)
    rows = []
    for start in range(0, len(photos), batch):
        chunk = photos[start:start + batch]
        targets = torch.cat([to_target(img) for _, img in chunk])
        measured = cached_maps([name for name, _ in chunk], targets, measure, ("measured",), cache)["measured"]
        predicted = predicted_maps(model, targets, names)
        for i, (name, img) in enumerate(chunk):
            m = measured[i]
            labels = {"measured": layer_map(m, img, tau),
                      "anchored": layer_map(predicted[i].numpy(), img, anchored, measured_wplus=m[0]),
                      "predicted": layer_map(predicted[i].numpy(), img, predicted_taus)}
            rows.append({"photo": name, "w_plus_share": {k: float((v == 0).mean()) for k, v in labels.items()},
                         "agreement": {k: float((labels[k] == labels["measured"]).mean())
                                       for k in ("anchored", "predicted")}})
            share, agree = rows[-1]["w_plus_share"], rows[-1]["agreement"]
            print(f"  {name}: W+ share measured {share['measured']:.0%}, predicted {share['predicted']:.0%}; agreement "
                  f"anchored (optimize mode) {agree['anchored']:.1%}, predicted alone (hybrid mode) {agree['predicted']:.1%}")
    def means(rows: list[dict]) -> dict:
        return {key: {k: float(np.mean([r[key][k] for r in rows])) for k in rows[0][key]} for key in ("w_plus_share", "agreement")}

    return {"steps": steps, "tau": tau, "tau_predicted": tau_predicted, "anchored_taus": anchored_taus(tau, tau_predicted),
            "mean": means(rows),
            "by_group": by_group(rows, means), "rows": rows}


def encoder_part(model, lpips, photos) -> dict:
    rows, names = [], [s.name for s in model.generator.spaces]
    for name, img in photos:
        target = to_target(img)
        with torch.no_grad():
            _, singles, _ = encode_each_space(model, lpips, target, names)  # singles[0]: the W+ encoder alone
        sam = sam_invert(model, lpips, img, mode="encoder")
        oracle = sam_invert(model, lpips, img, mode="encoder", maps="measured")
        rows.append({"photo": name, "wplus_psnr": psnr(singles[0], target).item(),
                     "wplus_lpips": lpips(singles[0], target).item(), "sam_psnr": sam.metrics["psnr"],
                     "sam_lpips": sam.metrics["lpips"], "space_share": sam.metrics["space_share"],
                     "measured_maps_psnr": oracle.metrics["psnr"], "measured_maps_lpips": oracle.metrics["lpips"],
                     "single_space_psnr": {n: psnr(x, target).item() for n, x in zip(names, singles)}})
        print(f"  {name}: W+ encoder {rows[-1]['wplus_psnr']:.2f} dB -> encoder SAM {rows[-1]['sam_psnr']:.2f} dB "
              f"(W+ {sam.metrics['space_share']['W+']:.0%}; measured maps {oracle.metrics['psnr']:.2f} dB)")
    def means(rows: list[dict]) -> dict:
        keys = ("wplus_psnr", "wplus_lpips", "sam_psnr", "sam_lpips", "measured_maps_psnr", "measured_maps_lpips")
        mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
        mean["w_plus_share"] = float(np.mean([r["space_share"]["W+"] for r in rows]))
        mean["single_space_psnr"] = {n: float(np.mean([r["single_space_psnr"][n] for r in rows])) for n in rows[0]["single_space_psnr"]}
        mean["gain_db"] = mean["sam_psnr"] - mean["wplus_psnr"]
        return mean

    mean = means(rows)
    return {"tau": model.tau_for("encoder"), "mean": mean, "gain_db": mean["gain_db"], "by_group": by_group(rows, means),
            "rows": rows}


def optimize_part(model, lpips, photos, steps: int, hybrid_steps: list[int]) -> dict:
    rows = []
    for name, img in photos:
        row, labels = {"photo": name}, {}
        for label, kwargs in [("measured", {"mode": "optimize", "maps": "measured", "cfg": InversionConfig(steps=steps)}),
                              ("predicted", {"mode": "optimize", "maps": "predicted", "cfg": InversionConfig(steps=steps)}),
                              *[(f"hybrid_{n}", {"mode": "hybrid", "cfg": InversionConfig(steps=n)}) for n in hybrid_steps]]:
            torch.manual_seed(0)
            r = sam_invert(model, lpips, img, **kwargs)
            labels[label] = r.labels
            row[label] = {"psnr": r.metrics["psnr"], "lpips": r.metrics["lpips"], "seconds": r.metrics["seconds"],
                          "tau": r.metrics["tau"], "w_plus_share": r.metrics["space_share"]["W+"]}
        row["layer_map_agreement"] = float((labels["predicted"] == labels["measured"]).mean())
        print(f"  {name}: " + ", ".join(f"{k} {v['psnr']:.2f} dB {v['seconds']:.0f} s W+ {v['w_plus_share']:.0%}"
                                        for k, v in row.items() if isinstance(v, dict))
              + f"; predicted and measured layer maps agree on {row['layer_map_agreement']:.1%}")
        rows.append(row)
    keys = [k for k, v in rows[0].items() if isinstance(v, dict)]
    mean = {k: {m: float(np.mean([r[k][m] for r in rows])) for m in ("psnr", "lpips", "seconds", "w_plus_share")}
            for k in keys}
    return {"steps": steps, "mean": mean, "predicted_minus_measured_db": mean["predicted"]["psnr"] - mean["measured"]["psnr"],
            "layer_map_agreement": float(np.mean([r["layer_map_agreement"] for r in rows])), "rows": rows}


def latency_part(model, lpips, image: np.ndarray, runs: int) -> dict:
    """The inversion alone (``evaluate=False``: no PSNR/LPIPS of the result), and with that evaluation."""
    out = {"runs": runs, "threads": torch.get_num_threads()}
    for key, evaluate in (("", False), ("with_evaluation_", True)):
        times = []
        for i in range(5 + runs):
            t0 = time.perf_counter()
            sam_invert(model, lpips, image, mode="encoder", evaluate=evaluate)
            if i >= 5:
                times.append(1000 * (time.perf_counter() - t0))
        out.update({f"{key}median_ms": float(np.median(times)), f"{key}p95_ms": float(np.percentile(times, 95))})
    return out


@reports_errors
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="faces64")
    ap.add_argument("--parts", default="predictor,encoder_predictor,layer_maps,encoder,optimize,latency")
    ap.add_argument("--groups", default="photos,faces,nonface_patches",
                    help="Held-out groups to measure (saminv.photos.photo_group); faces need `make faces`.")
    ap.add_argument("--nonface-patches", type=int, default=9,
                    help="Held-out LFW non-face patches (scikit-image lfw_subset items 100-199) to include.")
    ap.add_argument("--measure-steps", type=int, default=100, help="Steps of the single-space inversions that measure maps (predictor part: the data set's budget).")
    ap.add_argument("--steps", type=int, default=InversionConfig.steps, help="Optimization steps of optimize mode and of the layer_maps part's measured maps.")
    ap.add_argument("--hybrid-steps", default="25,50,100,200")
    ap.add_argument("--optimize-photos", type=int, default=6)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--maps-cache", type=Path, default=None,
                    help="Keep the measured maps of the predictor and layer_maps parts per photo in this folder "
                         "and reuse them (e.g. runs/bench-maps).")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    model = load_model(args.model)
    lpips = LPIPS()
    r = model.generator.cfg.resolution
    groups = args.groups.split(",")
    photos = [(name, resize_square(img, r)) for name, img in held_out_photos(args.nonface_patches)
              if photo_group(name) in groups]
    parts = args.parts.split(",")
    result = {"model": model.name, "photos": [n for n, _ in photos]}
    for regime, key in (("optimization", "predictor"), ("encoder", "encoder_predictor")):
        if key in parts:
            print(f"{key}: predicted vs measured invertibility maps ({regime} regime)")
            result[key] = predictor_part(model, lpips, photos, args.measure_steps, regime, cache=args.maps_cache)
            print(json.dumps(result[key], indent=1))
    if "layer_maps" in parts:
        print("layer maps of the optimization regime: measured (tau) vs predicted (anchored; alone at tau_predicted)")
        result["layer_maps"] = layer_maps_part(model, lpips, photos, args.steps, cache=args.maps_cache)
        print(json.dumps(result["layer_maps"]["mean"], indent=1))
    if "encoder" in parts:
        print("encoder SAM vs W+ encoder")
        result["encoder"] = encoder_part(model, lpips, photos)
        print(json.dumps(result["encoder"]["mean"]), f"gain {result['encoder']['gain_db']:+.2f} dB")
    if "optimize" in parts:
        print("optimize mode: predicted vs measured maps; hybrid")
        hybrid = [int(n) for n in args.hybrid_steps.split(",") if n]
        result["optimize"] = optimize_part(model, lpips, photos[:args.optimize_photos], args.steps, hybrid)
        print(json.dumps(result["optimize"]["mean"], indent=1))
    if "latency" in parts:
        result["latency"] = latency_part(model, lpips, photos[0][1], args.runs)
        lat = result["latency"]
        print(f"encoder mode: median {lat['median_ms']:.1f} ms, p95 {lat['p95_ms']:.1f} ms; with PSNR/LPIPS of the "
              f"result median {lat['with_evaluation_median_ms']:.1f} ms ({lat['threads']} threads)")
    if args.out:
        kept = json.loads(args.out.read_text()) if args.out.exists() else {}
        # the parts kept may have measured other photos: "photos" lists every photo some part measured
        result["photos"] = kept.get("photos", []) + [n for n in result["photos"] if n not in kept.get("photos", [])]
        args.out.write_text(json.dumps({**kept, **result}, indent=2) + "\n")
        print(f"updated {', '.join(k for k in result if k in parts)} in {args.out}")


if __name__ == "__main__":
    main()
