"""`saminv invert` and the SAM pipeline on real photos with the built-in faces64 model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from saminv.cli import app
from saminv.imageio import resize_square
from saminv.inversion.optimize import InversionConfig
from saminv.inversion.sam import invert_spaces, sam_invert, to_target
from saminv.metrics import psnr
from saminv.models.lpips import LPIPS
from saminv.models.model_dir import load_model
from saminv.outputs import load_codes
from saminv.photos import face_photo

runner = CliRunner()


@pytest.fixture(scope="module")
def model():
    return load_model("faces64")


@pytest.fixture(scope="module")
def lpips():
    return LPIPS()


@pytest.fixture(scope="module")
def face():
    return resize_square(face_photo("astronaut"), 64)


@pytest.fixture()
def face_png(tmp_path):
    path = tmp_path / "astronaut.png"
    Image.fromarray(face_photo("astronaut")).save(path)
    return path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_invert_writes_every_output(tmp_path, face_png, model):
    out = tmp_path / "out"
    res = invoke("invert", face_png, "--steps", 8, "--out", out, "--mode", "optimize", "--maps", "measured")
    assert res.exit_code == 0, res.output
    d = out / "astronaut"
    assert sorted(p.name for p in d.iterdir()) == [
        "codes.safetensors", "layer_map.png", "metrics.json", "reconstruction.png", "side_by_side.png"]
    metrics = json.loads((d / "metrics.json").read_text())
    assert set(metrics) >= {"psnr", "lpips", "space_share", "seconds", "tau", "single_space"}
    assert metrics["mode"] == "optimize" and metrics["maps"] == "measured"
    assert sum(metrics["space_share"].values()) == pytest.approx(1.0)
    assert metrics["tau"] == pytest.approx(model.tau)
    # The codes re-render the reconstruction (up to 8-bit quantization).
    saved = load_codes(d / "codes.safetensors")
    codes = saved.codes
    assert saved.model == "faces64" and saved.names == ["W+", "F2", "F4", "F6", "F8"]
    assert saved.labels.shape == (64, 64)
    with torch.no_grad():
        again = ((codes.render(model)[0].clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
    recon = np.asarray(Image.open(d / "reconstruction.png")).astype(np.float32)
    assert np.abs(again - recon).max() <= 1.0
    # Masks are exclusive and their shares match the reported ones for F8 (full resolution).
    total = sum(torch.nn.functional.interpolate(m, size=(8, 8), mode="area") for m in codes.masks.values())
    assert total.max() <= 1 + 1e-5
    assert codes.masks[8].mean().item() == pytest.approx(metrics["space_share"]["F8"], abs=1e-6)
    side = Image.open(d / "side_by_side.png")
    assert side.height > 64 * 4 and side.width > 3 * 64 * 4


def test_outputs_never_overwrite(tmp_path, face_png):
    out = tmp_path / "out"
    for _ in range(2):
        assert invoke("invert", face_png, "--steps", 2, "--out", out).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["astronaut", "astronaut-1"]


def _unusual_images(tmp_path):
    rgb = face_photo("astronaut")
    im = Image.fromarray(rgb)
    paths = {}
    paths["gray"] = tmp_path / "gray.png"
    im.convert("L").save(paths["gray"])
    rgba = im.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(im.size))
    paths["rgba"] = tmp_path / "rgba.png"
    rgba.save(paths["rgba"])
    paths["palette"] = tmp_path / "palette.gif"
    im.convert("P", palette=Image.Palette.ADAPTIVE).save(paths["palette"])
    paths["deep"] = tmp_path / "deep.png"
    Image.fromarray((np.asarray(im.convert("L")).astype(np.uint16) * 257)).save(paths["deep"])
    paths["rotated"] = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    im.rotate(90, expand=True).save(paths["rotated"], exif=exif)
    return paths


def test_unusual_images_are_converted_and_inverted(tmp_path):
    paths = _unusual_images(tmp_path)
    out = tmp_path / "out"
    res = invoke("invert", *paths.values(), "--steps", 2, "--out", out)
    assert res.exit_code == 0, res.output
    for name in paths:
        rec = np.asarray(Image.open(out / name / "reconstruction.png"))
        assert rec.shape == (64, 64, 3)
    # The EXIF-rotated JPEG was turned upright: its input panel matches the upright photo.
    side = np.asarray(Image.open(out / "rotated" / "side_by_side.png")).astype(float)
    upright = np.asarray(Image.open(out / "gray" / "side_by_side.png").convert("RGB")).astype(float)
    title = side.shape[0] - 256
    assert np.abs(side[title:, :256].mean(2) - upright[title:, :256].mean(2)).mean() < 12


def _bad_inputs(tmp_path):
    good = face_photo("astronaut")
    bad = {}
    bad["missing"] = tmp_path / "missing.png"
    bad["text"] = tmp_path / "text.png"
    bad["text"].write_text("not an image")
    png = tmp_path / "full.png"
    Image.fromarray(good).save(png)
    data = png.read_bytes()
    bad["truncated_png"] = tmp_path / "truncated.png"
    bad["truncated_png"].write_bytes(data[: len(data) // 2])
    jpg = tmp_path / "full.jpg"
    Image.fromarray(good).save(jpg, quality=90)
    data = jpg.read_bytes()
    bad["truncated_jpg"] = tmp_path / "truncated.jpg"
    bad["truncated_jpg"].write_bytes(data[: len(data) // 2])
    corrupt = bytearray(png.read_bytes())
    corrupt[200:400] = bytes(200)
    bad["corrupt_png"] = tmp_path / "corrupt.png"
    bad["corrupt_png"].write_bytes(bytes(corrupt))
    bad["tiny"] = tmp_path / "tiny.png"
    Image.fromarray(good[:8, :8]).save(bad["tiny"])
    bad["bomb"] = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bad["bomb"])
    bad["empty_dir"] = tmp_path / "empty"
    bad["empty_dir"].mkdir()
    return bad


def test_bad_inputs_fail_alone_with_one_line_each(tmp_path, face_png):
    bad = _bad_inputs(tmp_path)
    out = tmp_path / "out"
    res = invoke("invert", face_png, *bad.values(), "--steps", 2, "--out", out)
    assert res.exit_code == 1
    assert "Traceback" not in res.output
    assert f"1 of {1 + len(bad)} inputs inverted" in res.output
    tail = res.output.split("inputs inverted; failed:")[1].splitlines()
    summary = [line for line in tail if line.startswith("  ")]
    assert len(summary) == len(bad)
    for path in bad.values():
        assert sum(str(path) in line for line in summary) == 1
    assert sorted(p.name for p in out.iterdir()) == ["astronaut"]  # nothing half-written
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]


@pytest.mark.parametrize("kind", ["missing", "truncated_jpg", "empty_dir"])
def test_one_bad_input_is_one_line_and_exit_2(tmp_path, kind):
    bad = _bad_inputs(tmp_path)[kind]
    res = invoke("invert", bad, "--out", tmp_path / "out")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert len(res.output.splitlines()) == 1 and res.output.startswith(f"error: {bad}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,fragment", [
    (["--model", "no-such-model"], "no-such-model"),
    (["--spaces", "W+,F3"], "--spaces"),
    (["--device", "tpu"], "--device"),
])
def test_bad_options_exit_2(tmp_path, face_png, args, fragment):
    res = invoke("invert", face_png, *args, "--out", tmp_path / "out")
    assert res.exit_code == 2 and fragment in res.output and "Traceback" not in res.output


def test_unwritable_output_is_one_line(tmp_path, face_png):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = invoke("invert", face_png, "--steps", 1, "--out", blocker / "sub")
    assert res.exit_code != 0 and "cannot write" in res.output and "Traceback" not in res.output


def test_tau_extremes_pick_the_ends_of_the_space_list(model, lpips, face):
    cfg = InversionConfig(steps=3)
    everything_editable = sam_invert(model, lpips, face, tau=1e9, cfg=cfg)
    assert everything_editable.metrics["space_share"]["W+"] == 1.0
    assert all(m.sum() == 0 for m in everything_editable.codes.masks.values())
    nothing_passes = sam_invert(model, lpips, face, tau=-1.0, cfg=cfg)
    assert nothing_passes.metrics["space_share"]["F8"] == 1.0


def test_single_space_psnr_rises_from_w_plus_to_late_spaces(model, lpips, face):
    """Paper Figure 3 on a real photo: W+ < F4 < F8 at the same step budget."""
    target = to_target(face)
    inv = invert_spaces(model, lpips, target, ["W", "W+", "F4", "F8"], InversionConfig(steps=60))
    p = psnr(inv.images[:, 0], target.expand(4, -1, -1, -1)).tolist()
    assert p[0] <= p[1] + 0.5 < p[2] + 0.5 < p[3] + 0.5
    assert p[3] > p[1] + 3


def test_w_inversion_shares_one_w_across_layers(model, lpips, face):
    inv = invert_spaces(model, lpips, to_target(face), ["W", "W+"], InversionConfig(steps=5))
    w, wplus = inv.codes.wplus[0], inv.codes.wplus[1]
    assert torch.equal(w, w[:1].expand_as(w))
    assert not torch.equal(wplus, wplus[:1].expand_as(wplus))


def test_generated_image_is_recovered_in_w_plus(model, lpips):
    G = model.generator
    with torch.no_grad():
        target = G(torch.randn(1, G.cfg.z_dim, generator=torch.Generator().manual_seed(3)), truncation=0.7)
    inv = invert_spaces(model, lpips, target.clamp(-1, 1), ["W+"], InversionConfig(steps=80))
    assert psnr(inv.images[0], target).item() > 24


def test_calibrate_stores_tau_in_the_model_directory(tmp_path, model):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(model.path, model_dir)
    photos = []
    for name in ("lfw-7", "astronaut"):
        photos.append(tmp_path / f"{name}.png")
        Image.fromarray(face_photo(name)).save(photos[-1])
    args = ["calibrate", "--model", model_dir, "--steps", 3, "--quantile", 0.25]
    res = invoke(*args, *[a for p in photos for a in ("--images", p)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((model_dir / "config.json").read_text())
    record = cfg["tau_calibration"]
    assert record["images"] == 2 and record["quantile"] == 0.25 and record["validation"] == "the given images"
    assert 0 < cfg["tau"] <= record["error_quartiles"][1]
    assert load_model(model_dir).tau == cfg["tau"]
    assert "tau_predicted" not in cfg and "removed tau_predicted" in res.output  # it was matched to the old tau

    res = invoke("calibrate", "--model", model_dir, "--validation", "cats")
    assert res.exit_code == 2 and "--validation must be one of photos, faces" in res.output


def test_calibrate_on_the_validation_faces_needs_their_archives(tmp_path, model, monkeypatch):
    import shutil

    monkeypatch.setenv("SAMINV_CACHE", str(tmp_path / "cache"))  # nothing fetched there
    model_dir = tmp_path / "model"
    shutil.copytree(model.path, model_dir)
    before = (model_dir / "config.json").read_bytes()
    res = invoke("calibrate", "--model", model_dir, "--validation", "faces")
    assert res.exit_code == 2 and "make faces" in res.output and len(res.output.strip().splitlines()) == 1
    assert (model_dir / "config.json").read_bytes() == before


def test_sample_photo(tmp_path):
    out = tmp_path / "face.png"
    assert invoke("sample-photo", "astronaut", "--out", out).exit_code == 0
    assert np.array_equal(np.asarray(Image.open(out)), face_photo("astronaut"))
    assert invoke("sample-photo", "astronaut", "--out", out).exit_code == 2  # never overwrites
    res = invoke("sample-photo", "nobody", "--out", tmp_path / "x.png")
    assert res.exit_code == 2 and "nobody" in res.output
    assert invoke("sample-photo", "lfw-99", "--out", tmp_path / "lfw-99.png").exit_code == 0
    res = invoke("sample-photo", "lfw-100", "--out", tmp_path / "lfw-100.png")  # lfw_subset 100-199: not faces
    assert res.exit_code == 2 and "lfw-99" in res.output and not (tmp_path / "lfw-100.png").exists()
