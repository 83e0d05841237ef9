"""Export to ONNX bundles and the torch-free runtime, on codes of a real photo (faces64)."""

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import saminv
from saminv.cli import app
from saminv.export.onnx_bundle import export_bundle
from saminv.imageio import images_to_uint8, resize_square
from saminv.inversion.optimize import Codes, InversionConfig
from saminv.inversion.sam import invert_spaces, sam_invert, space_masks, to_target
from saminv.metrics import psnr
from saminv.models.lpips import LPIPS
from saminv.models.model_dir import load_model
from saminv.outputs import save_codes
from saminv.photos import face_photo
from saminv.runtime import BundleError, Runtime, load_codes, open_bundle

runner = CliRunner()
NAMES = ["W+", "F2", "F4", "F6", "F8"]


@pytest.fixture(scope="module")
def model():
    return load_model("faces64")


@pytest.fixture(scope="module")
def bundle(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "fp32"
    export_bundle(model, out, log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def bundle16(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("b16") / "fp16"
    export_bundle(model, out, fp16=True, log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def codes_file(model, tmp_path_factory):
    """Codes of the astronaut face: a short W+ inversion, delta_f in bands of F2..F8 (a real photo's w+)."""
    target = to_target(resize_square(face_photo("astronaut"), 64))
    codes = invert_spaces(model, LPIPS(), target, ["W+"], InversionConfig(steps=20)).codes
    labels = np.repeat(np.arange(5).repeat(13)[:64][None], 64, axis=0)  # vertical bands W+, F2, ..., F8
    masks = space_masks(model, labels, NAMES)
    g = torch.Generator().manual_seed(0)
    codes = Codes(codes.wplus, {k: 0.2 * torch.randn(1, *model.generator.space(f"F{k}").shape, generator=g)
                                for k in masks}, masks)
    path = tmp_path_factory.mktemp("codes") / "codes.safetensors"
    save_codes(path, codes, labels, NAMES, model.name, model.tau)
    return path, codes


def test_every_stage_matches_torch(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"]] == ["mapping", "F2", "F4", "F6", "F8"]
    assert all(s["max_abs_diff_vs_torch"] <= 1e-4 for s in manifest["stages"])
    assert manifest["opset"] == 18 and manifest["precision"] == "fp32"
    networks = ["encoder_predictor", "encoder_wplus", "encoder_F2", "encoder_F4", "encoder_F6", "encoder_F8",
                "lpips_spatial"]
    assert [n["name"] for n in manifest["networks"]] == networks
    assert all(n["max_abs_diff_vs_torch"] <= 1e-4 for n in manifest["networks"])
    assert manifest["networks"][0]["outputs"]["maps"] == ["N", 5, 64, 64]
    assert manifest["networks"][-1]["outputs"]["error"] == ["N", 1, 64, 64]
    assert manifest["networks"][3]["inputs"]["features"] == ["N", 128, 16, 16]
    assert set(manifest["files"]) == {"mapping.onnx", "F2.onnx", "F4.onnx", "F6.onnx", "F8.onnx", "directions.npz",
                                      *(f"{n}.onnx" for n in networks)}
    assert manifest["stages"][2]["inputs"]["delta"] == ["N", 128, 16, 16]
    for name in ["F2", "F4", "F6", "F8"]:  # the masked residual is one node with its plain-ops function
        stage = onnx.load(str(bundle / f"{name}.onnx"))
        assert [n.op_type for n in stage.graph.node if n.domain == "saminv"] == ["MaskedResidual"]
        assert [(f.domain, f.name) for f in stage.functions] == [("saminv", "MaskedResidual")]


def test_runtime_renders_the_sam_image_of_real_codes(bundle, codes_file, model):
    path, codes = codes_file
    rt = Runtime(bundle)
    rc = load_codes(path)
    masks = {n: (rc.labels == i).astype(np.float32)[:, None] for i, n in enumerate(rc.names) if n in rc.deltas}
    image = rt.synthesize(rc.wplus, rc.deltas, masks)
    with torch.no_grad():
        ref = codes.render(model).numpy()
    assert np.abs(image - ref).max() <= 1e-4
    # dynamic batch: three copies at once give the same image
    three = rt.synthesize(np.repeat(rc.wplus, 3, 0), {k: np.repeat(v, 3, 0) for k, v in rc.deltas.items()},
                          {k: np.repeat(v, 3, 0) for k, v in masks.items()})
    assert np.abs(three - image).max() <= 1e-5


def test_runtime_edit_matches_the_torch_rule(bundle, codes_file):
    path, _ = codes_file
    rt = Runtime(bundle)
    for strength, layers in ((0.0, None), (2.0, None), (2.0, (0, 3))):
        got = rt.edit(path, "ganspace:2", strength, layers)
        want = saminv.edit(path, "ganspace:2", strength, layers=layers)
        assert np.abs(got.astype(int) - want).max() <= 1
    assert np.array_equal(rt.edit(path, "ganspace:2", 0.0), rt.render(path)[0])
    with pytest.raises(BundleError, match="unknown direction"):
        rt.edit(path, "smile", 1.0)
    with pytest.raises(BundleError, match="out of range"):
        rt.edit(path, "ganspace:2", 1.0, (4, 12))


def test_fp16_bundle_image_psnr(bundle16, codes_file, model):
    manifest = json.loads((bundle16 / "manifest.json").read_text())
    assert manifest["precision"] == "fp16" and manifest["fp16_image_psnr_db"] >= 40
    path, codes = codes_file
    rt = Runtime(bundle16)
    rc = load_codes(path)
    masks = {n: (rc.labels == i).astype(np.float32)[:, None] for i, n in enumerate(rc.names) if n in rc.deltas}
    image = torch.from_numpy(rt.synthesize(rc.wplus, rc.deltas, masks))
    with torch.no_grad():
        assert psnr(image, codes.render(model)).item() >= 40


def test_runtime_never_imports_torch(bundle, codes_file):
    script = f"""
import sys
from saminv.runtime import Runtime
rt = Runtime({str(bundle)!r})
assert rt.generate(2).shape == (2, 64, 64, 3)
assert rt.render({str(codes_file[0])!r}).shape == (1, 64, 64, 3)
assert rt.edit({str(codes_file[0])!r}, "ganspace:0", [0.0, 1.0]).shape == (2, 64, 64, 3)
bad = [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
assert not bad, bad
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.parametrize("damage, message", [
    ("no_manifest", "no manifest.json"),
    ("bad_json", "unreadable manifest"),
    ("other_format", "not a saminv bundle"),
    ("future_version", "format version"),
    ("missing_file", "missing"),
    ("flipped_byte", "sha256 does not match"),
    ("wrong_shape", "do not match manifest.json"),
])
def test_broken_bundles_get_one_clear_line(bundle, tmp_path, damage, message):
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    manifest_path = broken / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if damage == "no_manifest":
        manifest_path.unlink()
    elif damage == "bad_json":
        manifest_path.write_text("{not json")
    elif damage == "other_format":
        manifest_path.write_text(json.dumps({**manifest, "format": "something"}))
    elif damage == "future_version":
        manifest_path.write_text(json.dumps({**manifest, "version": 99}))
    elif damage == "missing_file":
        (broken / "F4.onnx").unlink()
    elif damage == "flipped_byte":
        data = bytearray((broken / "F6.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (broken / "F6.onnx").write_bytes(bytes(data))
    elif damage == "wrong_shape":
        manifest["stages"][2]["inputs"]["delta"] = ["N", 64, 16, 16]
        manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message) as info:
        Runtime(broken)
    assert "\n" not in str(info.value)
    res = runner.invoke(app, ["invert", "--bundle", str(broken), str(tmp_path / "x.png")])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


@pytest.fixture()
def bundle_without_networks(bundle, tmp_path):
    """The faces64 bundle as a model without encoder predictor and encoders exports it."""
    out = tmp_path / "synthesis-only"
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest.pop("networks"):
        (out / entry["file"]).unlink()
        del manifest["files"][entry["file"]]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_cli_export_refuses_existing_output_and_bundle_without_networks_says_so(bundle, bundle_without_networks,
                                                                                  tmp_path):
    res = runner.invoke(app, ["export", "--out", str(bundle)])
    assert res.exit_code == 2 and "exists" in res.output
    photo = tmp_path / "a.png"
    Image.fromarray(face_photo("astronaut")).save(photo)
    res = runner.invoke(app, ["invert", "--bundle", str(bundle_without_networks), str(photo)])
    assert res.exit_code == 2 and "no encoder_predictor or encoder_wplus" in res.output
    with pytest.raises(BundleError, match="no encoder_predictor or encoder_wplus"):
        Runtime(bundle_without_networks).invert(np.zeros((64, 64, 3), np.uint8))
    assert open_bundle(bundle).manifest["model"] == "faces64"


def test_bench_reports_every_backend(tmp_path):
    from saminv.bench import BenchConfig, format_table, run_bench

    backends = ["eager", "onnxruntime"] + ([] if torch.cuda.is_available() else ["cuda"])
    # batches=(1,): the bundle is exported with max_batch 1 (the example inputs have batch 2)
    report = run_bench(["faces64"], backends, BenchConfig(runs=3, warmup=1, batches=(1,), throughput_runs=1),
                       log=lambda s: None)
    entry = report["archs"]["faces64"]
    assert entry["gflop_per_image"] > 0.5 and report["machine"]["fp32_gemm_gflops"] > 1
    for backend in ("eager", "onnxruntime"):
        r = entry["backends"][backend]
        assert "error" not in r, r
        assert r["end_to_end"]["median_ms"] > 0 and set(r["stages"]) == {"mapping", "F2", "F4", "F6", "F8"}
        assert set(r["throughput_img_s"]) == {"1"} and r["peak_rss_mb"] > 10
        assert r["invert"]["median_ms"] > 0  # faces64 ships the encoder predictor and encoders
    assert "faces64 | onnxruntime" in format_table(report)
    if not torch.cuda.is_available():  # a GPU backend here is a one-line failure row, not a crash
        assert entry["backends"]["cuda"] == {"error": "RuntimeError: cuda needs a CUDA GPU"}
        assert "faces64 | cuda | failed: RuntimeError: cuda needs a CUDA GPU" in format_table(report)


def test_runtime_inverts_a_photo_like_torch(bundle, model, tmp_path):
    photo = tmp_path / "astronaut.png"
    Image.fromarray(face_photo("astronaut")).save(photo)
    got = Runtime(bundle).invert(photo)
    image = resize_square(face_photo("astronaut"), 64)
    want = sam_invert(model, LPIPS(), image, mode="encoder")
    assert got.codes.names == want.names and got.maps.shape == (5, 64, 64)
    assert (got.codes.labels[0] == want.labels).mean() >= 0.99
    if (got.codes.labels[0] == want.labels).all():
        assert np.abs(got.image.astype(int) - images_to_uint8(want.image[None].numpy())[0]).max() <= 1
    res = runner.invoke(app, ["invert", str(photo), "--bundle", str(bundle), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out" / "astronaut"
    assert {"reconstruction.png", "layer_map.png", "side_by_side.png", "codes.safetensors", "metrics.json"} <= \
        {p.name for p in out.iterdir()}
    assert json.loads((out / "metrics.json").read_text())["backend"] == "onnxruntime"
    script = f"""
import sys
from saminv.runtime import Runtime
inv = Runtime({str(bundle)!r}).invert({str(photo)!r})
assert inv.image.shape == (64, 64, 3)
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
"""
    subprocess.run([sys.executable, "-c", script], check=True)


@torch.no_grad()
def test_conv_clamp_survives_export(tmp_path):
    """A generator with NVIDIA's conv_clamp (here small, so that it bites) renders the same through the bundle."""
    from saminv.models.model_dir import Model, WPrior
    from saminv.models.stylegan2 import Generator, GeneratorConfig

    torch.manual_seed(0)
    G = Generator(GeneratorConfig(resolution=16, w_dim=64, z_dim=64, n_mapping=2, channel_base=512, channel_max=32,
                                  conv_clamp=0.05)).eval()
    for name, p in G.named_parameters():
        if name.endswith("noise_strength") or name.endswith(".bias"):
            p.normal_(0, 0.3)
    export_bundle(Model(G, WPrior.estimate(G)), tmp_path / "clamped", log=lambda s: None)
    ws = G.mapping(torch.randn(2, 64))[:, None].expand(-1, G.cfg.n_latent, -1)
    ref = G.synthesis(ws, noise_mode="const").numpy()
    image = Runtime(tmp_path / "clamped").synthesize(ws.numpy().copy())
    assert np.abs(ref).max() <= 0.05 * G.cfg.num_blocks + 1e-6  # every ToRGB output clamped
    free = Generator(dataclasses.replace(G.cfg, conv_clamp=None)).eval()
    free.load_state_dict(G.state_dict())
    assert free.synthesis(ws, noise_mode="const").abs().max() > 2 * 0.05 * G.cfg.num_blocks  # the clamp bites
    assert np.abs(image - ref).max() <= 1e-4
