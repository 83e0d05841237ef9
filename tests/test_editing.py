"""Editing: the direction library and the per-layer rule, on codes of real photos (faces64)."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import saminv
from saminv.cli import app
from saminv.editing.directions import (Direction, boundary, conv_affines, from_array, ganspace, load_library,
                                       mapped_w, pair, parse_layers, resolve, save_directions, sefa)
from saminv.editing.edit import Editor
from saminv.errors import InputError
from saminv.imageio import resize_square
from saminv.inversion.optimize import InversionConfig
from saminv.inversion.sam import invert_spaces, space_masks, to_target
from saminv.models.lpips import LPIPS
from saminv.models.model_dir import load_model
from saminv.photos import face_photo

runner = CliRunner()


@pytest.fixture(scope="module")
def model():
    return load_model("faces64")


@pytest.fixture(scope="module")
def photo_codes(model):
    """Codes of the astronaut face: a short W+ inversion, then delta_f on a layer map with the left
    third in W+, the middle in F6 and the right third in F8 (the rule does not care how the map came about)."""
    target = to_target(resize_square(face_photo("astronaut"), 64))
    inv = invert_spaces(model, LPIPS(), target, ["W+"], InversionConfig(steps=30))
    labels = np.zeros((64, 64), dtype=np.int64)
    labels[:, 22:44], labels[:, 44:] = 1, 2
    names = ["W+", "F6", "F8"]
    masks = space_masks(model, labels, names)
    g = torch.Generator().manual_seed(0)
    deltas = {k: 0.2 * torch.randn(1, *model.generator.space(f"F{k}").shape, generator=g) for k in masks}
    codes = inv.codes
    codes.deltas, codes.masks = deltas, masks
    return codes, labels, names


def change(editor, direction, strength):
    return (editor.edit(direction, strength) - editor.reconstruction).abs().mean(dim=1)[0]


def test_zero_strength_reproduces_the_reconstruction_exactly(model, photo_codes):
    codes = photo_codes[0]
    editor = Editor(model, codes)
    assert torch.equal(editor.reconstruction, codes.render(model))
    for spec in ("ganspace:0", "sefa:1"):
        assert torch.equal(editor.edit(resolve(model, spec), 0.0), codes.render(model))


def test_edit_reaches_w_plus_regions_far_more_than_late_feature_regions(model, photo_codes):
    codes, labels = photo_codes[:2]
    # A GANSpace-style coarse edit (layers 0-3): W+ takes all of it, F6 and F8 regions only its spill across seams.
    diff = change(Editor(model, codes), resolve(model, "ganspace:2", (0, 3)), 2.0)
    w_plus, f6, f8 = (diff[torch.from_numpy(labels == i)].mean().item() for i in range(3))
    assert w_plus > 0.1
    assert w_plus > 3 * f6 and w_plus > 3 * f8


def test_edit_of_layers_up_to_k_leaves_f_k_regions_untouched(model, photo_codes):
    codes, labels = photo_codes[:2]
    editor = Editor(model, codes)
    d = resolve(model, "ganspace:0")
    # F8 is the last block: only its ToRGB follows, so the whole F8 region is untouched.
    f8 = torch.from_numpy(labels == 2)
    assert change(editor, d.with_layers((0, 8)), 3.0)[f8].max().item() == 0.0
    # F6: the 3x3 convolutions of the 64 px block see a few pixels across the seam; far from it, nothing moves.
    diff = change(editor, d.with_layers((0, 6)), 3.0)
    assert diff[:, 30:38].max().item() == 0.0
    assert diff[:, :16].mean().item() > 0.05  # the W+ third does take it
    # Layers after k do reach the F_k region.
    assert change(editor, d.with_layers((7, 9)), 3.0)[:, 30:38].mean().item() > 0.005


def test_without_the_skip_blend_the_edit_would_leak(model, photo_codes):
    """The RGB skip image is blended too: compare with an edit that keeps only the features."""
    codes, labels = photo_codes[:2]
    d = resolve(model, "ganspace:0").with_layers((0, 8))
    naive = codes.__class__(codes.wplus + d.offset(3.0), codes.deltas, codes.masks).render(model)
    f8 = torch.from_numpy(labels == 2)
    leak = (naive - codes.render(model)).abs().mean(dim=1)[0][f8].mean().item()
    assert leak > 0.01


def test_ganspace_directions_are_principal_and_one_sigma_long(model):
    G = model.generator
    ds = ganspace(G, 4, samples=4000)
    w = mapped_w(G, 4000, seed=1) - G.mapping.w_avg  # fresh samples
    units = torch.stack([d.vector[0] / d.vector[0].norm() for d in ds])
    assert torch.allclose(units @ units.t(), torch.eye(4), atol=1e-4)
    stds = (w @ units.t()).std(dim=0)
    assert torch.allclose(stds, torch.stack([d.vector[0].norm() for d in ds]), rtol=0.1)
    assert (stds[:-1] >= stds[1:]).all()  # ordered by explained variance
    assert all(torch.equal(d.vector[0], d.vector[-1]) and d.layers == (0, 9) for d in ds)


def test_sefa_maximises_the_change_of_styles(model):
    G = model.generator
    top = sefa(G, 1, (0, 9))[0]
    a = torch.cat(conv_affines(G, (0, 9))).detach()
    a = a / a.norm(dim=1, keepdim=True)
    u = top.vector[0] / top.vector[0].norm()
    random_units = torch.nn.functional.normalize(torch.randn(64, G.cfg.w_dim, generator=torch.Generator().manual_seed(0)), dim=1)
    assert (a @ u).norm() > (a @ random_units.t()).norm(dim=0).max()
    assert sefa(G, 2, (2, 4))[1].layers == (2, 4)


def test_boundary_from_labelled_latents_moves_the_attribute(model):
    """Label generated faces by brightness; the learned boundary must brighten held-out faces."""
    G = model.generator
    w = mapped_w(G, 600, seed=3)
    with torch.no_grad():
        brightness = G.synthesis(G.broadcast(w)).mean(dim=(1, 2, 3)).numpy()
    d = boundary(G, w[:500].numpy(), brightness[:500] > np.median(brightness[:500]), "light")
    with torch.no_grad():
        ws = G.broadcast(w[500:])
        lighter = G.synthesis(ws + d.offset(2.0)).mean(dim=(1, 2, 3))
        darker = G.synthesis(ws + d.offset(-2.0)).mean(dim=(1, 2, 3))
    assert (lighter > darker).float().mean().item() >= 0.95


def test_pair_direction_carries_one_inversion_to_the_other(model):
    G = model.generator
    lpips = LPIPS()
    a, b = (to_target(resize_square(face_photo(n), 64)) for n in ("astronaut", "lfw-3"))
    codes = invert_spaces(model, lpips, torch.cat([a, b]), ["W+"], InversionConfig(steps=20)).codes
    d = pair(codes.wplus[0], codes.wplus[1], "a-to-b")
    first = codes.__class__(codes.wplus[:1])
    moved = Editor(model, first).edit(d, 1.0)
    assert torch.allclose(moved, G.synthesis(codes.wplus[1:2]), atol=1e-4)
    half = pair(codes.wplus[0], codes.wplus[1], "coarse", (0, 4))
    assert torch.equal(half.offset(1.0)[5:], torch.zeros(5, G.cfg.w_dim))


def test_user_arrays_and_bad_directions(model, tmp_path):
    G = model.generator
    assert from_array(np.ones(512), "x", G).vector.shape == (10, 512)
    assert from_array(np.ones((10, 512)), "x", G, (2, 3)).layers == (2, 3)
    for bad in (np.ones(511), np.ones((9, 512)), np.full(512, np.nan)):
        with pytest.raises(InputError):
            from_array(bad, "x", G)
    for text in ("3-12", "5-2", "a-b", "1-2-3"):
        with pytest.raises(InputError):
            parse_layers(text, 10)
    assert parse_layers("4", 10) == (4, 4)
    with pytest.raises(InputError, match="unknown direction"):
        resolve(model, "smile")
    with pytest.raises(InputError):
        resolve(model, str(tmp_path / "missing.npy"))


def test_library_round_trip_and_broken_file(tmp_path, model):
    d = Direction("mine", torch.randn(10, 512), (1, 3), "test")
    save_directions(tmp_path, [d] + ganspace(model.generator, 2, samples=1000))
    lib = load_library(tmp_path)
    assert sorted(lib) == ["ganspace:0", "ganspace:1", "mine"]
    assert torch.equal(lib["mine"].vector, d.vector) and lib["mine"].layers == (1, 3)
    (tmp_path / "directions.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="broken direction library"):
        load_library(tmp_path)


# ------------------------------------------------------------------------------------------ CLI and API

@pytest.fixture(scope="module")
def codes_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit")
    photo = root / "astronaut.png"
    Image.fromarray(face_photo("astronaut")).save(photo)
    res = runner.invoke(app, ["invert", str(photo), "--steps", "10", "--out", str(root / "inv"), "--edits", "2"])
    assert res.exit_code == 0, res.output
    return root / "inv" / "astronaut"


def test_invert_edits_grid_is_added_to_the_side_by_side(codes_file):
    side = Image.open(codes_file / "side_by_side.png")
    assert side.height > 2 * 64 * 4  # the panel row plus two rows of edits


def test_cli_edit_sweep(codes_file, tmp_path):
    out = tmp_path / "edits"
    res = runner.invoke(app, ["edit", str(codes_file / "codes.safetensors"), "--direction", "ganspace:0",
                              "--strengths", "-2:2:5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    (d,) = out.iterdir()
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted(["codes.safetensors", "direction.npy", "edit.gif", "edit.json", "strip.png",
                            *[f"edit_{i:02d}_{s:+.2f}.png" for i, s in enumerate([-2, -1, 0, 1, 2])]])
    recon = np.asarray(Image.open(codes_file / "reconstruction.png"))
    assert np.array_equal(np.asarray(Image.open(d / "edit_02_+0.00.png")), recon)
    assert not np.array_equal(np.asarray(Image.open(d / "edit_04_+2.00.png")), recon)
    info = json.loads((d / "edit.json").read_text())
    assert info["direction"] == "ganspace:0" and info["layers"] == [0, 9] and info["strengths"] == [-2, -1, 0, 1, 2]
    assert Image.open(d / "edit.gif").n_frames == 8


def test_api_edit_matches_the_cli_reconstruction(codes_file):
    recon = np.asarray(Image.open(codes_file / "reconstruction.png"))
    assert np.array_equal(saminv.edit(codes_file / "codes.safetensors", "ganspace:0", 0.0), recon)
    sweep = saminv.edit(codes_file / "codes.safetensors", np.ones(512, dtype=np.float32), [0.0, 1.0], layers=(9, 9))
    assert sweep.shape == (2, 64, 64, 3) and np.array_equal(sweep[0], recon)


@pytest.mark.parametrize("args, message", [
    (["--direction", "smile"], "unknown direction"),
    (["--direction", "ganspace:0", "--layers", "4-12"], "out of range"),
    (["--direction", "ganspace:0", "--strengths", "1:2"], "--strengths"),
    (["--direction", "ganspace:0", "--strength", "1", "--strengths", "0:1:2"], "not both"),
    (["--direction", "WRONG_NPY"], "shape (3, 512)"),
    (["--direction", "MISSING_NPY"], "not a readable .npy"),
])
def test_cli_edit_bad_input_is_one_line(codes_file, tmp_path, args, message):
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((3, 512), dtype=np.float32))
    args = [str(wrong) if a == "WRONG_NPY" else str(tmp_path / "missing.npy") if a == "MISSING_NPY" else a for a in args]
    res = runner.invoke(app, ["edit", str(codes_file / "codes.safetensors"), *args, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_cli_edit_refuses_broken_codes(tmp_path):
    bad = tmp_path / "codes.safetensors"
    bad.write_bytes(b"\x00" * 10)
    res = runner.invoke(app, ["edit", str(bad), "--direction", "ganspace:0"])
    assert res.exit_code == 2 and "not a saminv codes file" in res.output


def test_cli_directions_store_in_a_model_directory(tmp_path, model):
    model_dir = tmp_path / "m"
    shutil.copytree(model.path, model_dir)
    (model_dir / "directions.safetensors").unlink(missing_ok=True)
    np.save(tmp_path / "d.npy", np.ones(512, dtype=np.float32))
    for args in (["add", "mine", str(tmp_path / "d.npy"), "--layers", "2-3"], ["sefa", "--num", "2", "--layers", "0-4"]):
        res = runner.invoke(app, ["directions", *args, "--model", str(model_dir)])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["directions", "list", "--model", str(model_dir)])
    assert "mine" in res.output and "sefa:1" in res.output and "layers 2-3" in res.output
    assert resolve(load_model(model_dir), "mine").layers == (2, 3)
