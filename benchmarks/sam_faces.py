"""SAM vs single-space inversion on real face photos (issue: foundation, "Done when").

For each photo: SAM optimization at the model's calibrated tau and the default step budget, next to
the single-space inversions that SAM measures anyway (same step budget, so the comparison is at
equal steps), and next to W+ inversion with twice the steps (SAM's joint stage starts from the W+
result, so its w+ has seen both stages). Prints a table and writes JSON.

    python benchmarks/sam_faces.py [--model faces64] [--steps 200] [--photos astronaut,messi,lfw-0] [--out FILE]

``--f-weight``, ``--mse-weight`` and ``--lpips-weight`` change the loss of every stage (defaults: the
official 5, 1, 1) to measure what each term does; docs/optimization.md lists such runs.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from saminv.errors import reports_errors
from saminv.imageio import resize_square
from saminv.inversion.optimize import InversionConfig
from saminv.inversion.sam import invert_spaces, sam_invert, to_target
from saminv.metrics import psnr
from saminv.models.lpips import LPIPS
from saminv.models.model_dir import load_model
from saminv.photos import OPENCV_DATA, face_photo

DEFAULT_PHOTOS = ["astronaut", "messi", "lfw-0", "lfw-1", "lfw-2"]


@reports_errors
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="faces64")
    ap.add_argument("--steps", type=int, default=InversionConfig.steps)
    ap.add_argument("--photos", default=",".join(DEFAULT_PHOTOS))
    ap.add_argument("--tau", type=float, default=None)
    ap.add_argument("--f-weight", type=float, default=InversionConfig.f_weight)
    ap.add_argument("--mse-weight", type=float, default=InversionConfig.mse_weight)
    ap.add_argument("--lpips-weight", type=float, default=InversionConfig.lpips_weight)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    loss = {"f_weight": args.f_weight, "mse_weight": args.mse_weight, "lpips_weight": args.lpips_weight}
    cfg = InversionConfig(steps=args.steps, **loss)

    model = load_model(args.model)
    tau = model.tau if args.tau is None else args.tau
    lpips = LPIPS()
    names = [n for n in args.photos.split(",") if n != "messi" or (OPENCV_DATA / "messi5.jpg").is_file()]
    rows = []
    for name in names:
        image = resize_square(face_photo(name), model.generator.cfg.resolution)
        torch.manual_seed(0)
        t0 = time.time()
        r = sam_invert(model, lpips, image, tau=tau, cfg=cfg, mode="optimize", maps="measured")
        m = r.metrics
        target = to_target(image)
        long_w = invert_spaces(model, lpips, target, ["W+"], replace(cfg, steps=2 * args.steps))
        long_w_psnr = psnr(long_w.images[0], target).item()
        rows.append({"photo": name, "seconds": round(time.time() - t0, 1), "sam_psnr": m["psnr"], "sam_lpips": m["lpips"],
                     "w_plus_share": m["space_share"]["W+"], "w_plus_2x_steps_psnr": long_w_psnr,
                     "w_plus_2x_steps_lpips": long_w.error_maps[0].mean().item(), "space_share": m["space_share"],
                     "single_psnr": {k: v["psnr"] for k, v in m["single_space"].items()},
                     "single_lpips": {k: v["lpips"] for k, v in m["single_space"].items()}})
        row = rows[-1]
        singles = " ".join(f"{k} {v:5.2f}" for k, v in row["single_psnr"].items())
        print(f"{name:10s} SAM {row['sam_psnr']:5.2f} dB / {row['sam_lpips']:.3f}  W+ {row['single_psnr']['W+']:5.2f} dB / "
              f"{row['single_lpips']['W+']:.3f}  gain {row['sam_psnr'] - row['single_psnr']['W+']:+5.2f} dB  "
              f"(W+ 2x steps {long_w_psnr:5.2f} dB)  "
              f"W+ share {row['w_plus_share']:4.0%}  [{singles}]  {row['seconds']:.0f} s", flush=True)
    gain = np.mean([r["sam_psnr"] - r["single_psnr"]["W+"] for r in rows])
    mean_single = {k: {"psnr": float(np.mean([r["single_psnr"][k] for r in rows])),
                       "lpips": float(np.mean([r["single_lpips"][k] for r in rows]))} for k in rows[0]["single_psnr"]}
    print("mean single-space PSNR / LPIPS (paper Figure 3): " +
          "  ".join(f"{k} {v['psnr']:5.2f} / {v['lpips']:.4f}" for k, v in mean_single.items()))
    print(f"mean PSNR gain of SAM over W+: {gain:+.2f} dB; tau {tau}; "
          f"steps {args.steps} per stage; loss {loss}; torch threads {torch.get_num_threads()}")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "tau": tau, "steps": args.steps,
                                        "loss": loss, "mean_single_space": mean_single, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
