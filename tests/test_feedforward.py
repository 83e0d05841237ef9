"""Feed-forward SAM: encoders, trained networks in the model directory, encoder training, and every
inversion mode on a real photo."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from saminv.cli import app
from saminv.errors import InputError
from saminv.imageio import resize_square
from saminv.inversion.feedforward import encode, encode_wplus, encoder_error_maps, predicted_maps, wplus_features
from saminv.inversion.optimize import InversionConfig, ReconstructionLoss
from saminv.inversion.sam import sam_invert, space_masks, to_target
from saminv.inversion.selection import anchored_taus, layer_map
from saminv.metrics import psnr
from saminv.models.encoders import SamEncoders
from saminv.models.lpips import LPIPS
from saminv.models.model_dir import load_model
from saminv.photos import face_photo
from saminv.training.encoders import EncoderTrainer
from saminv.training.predictor import PredictorConfig, PredictorTrainer, load_shards

runner = CliRunner()


@pytest.fixture(scope="module")
def face():
    return resize_square(face_photo("astronaut"), 64)


@pytest.fixture(scope="module")
def lpips():
    return LPIPS()


def test_untrained_encoders_start_at_w_avg_and_zero_delta(face):
    model = load_model("faces64")
    G = model.generator
    nets = SamEncoders.for_generator(G).eval()
    model.networks["encoders"] = nets
    target = to_target(face)
    with torch.no_grad():
        masks = {k: torch.ones(1, 1, s.shape[1], s.shape[2]) for k, s in ((2 * s.block, s) for s in G.spaces if s.block is not None)}
        codes = encode(model, target, masks)
        mean_face = G.synthesis(G.broadcast(G.mapping.w_avg[None]))
        assert psnr(codes.render(model), mean_face).item() > 30  # offsets start near zero
        assert all(torch.equal(d, torch.zeros_like(d)) for d in codes.deltas.values())
        reconstruction, features = wplus_features(model, codes.wplus)
        assert torch.equal(codes.render(model), reconstruction)
    assert {k: f.shape[1:] for k, f in features.items()} == {2 * s.block: s.shape for s in G.spaces if s.block is not None}


def test_networks_live_in_the_model_directory(trained, face):
    model, run = trained
    target = to_target(face)
    with torch.no_grad():
        ours = model.network("encoders").wplus(target)
        reference = run.net.eval().wplus(target)
    assert (ours - reference).abs().max() < 2e-2  # float16 storage
    entry = json.loads((model.path / "config.json").read_text())["encoders"]
    assert entry["trained"]["steps"] == 20 and entry["init"]["resolution"] == 64
    assert not load_model("faces64").has_network("unknown")


def test_broken_or_missing_networks_are_one_line(trained, tmp_path):
    model, _ = trained
    broken = tmp_path / "broken"
    shutil.copytree(model.path, broken)
    (broken / "predictor.safetensors").write_bytes(b"not weights")
    with pytest.raises(InputError, match="broken predictor weights: sha256 mismatch"):
        load_model(broken).network("predictor")
    config = json.loads((broken / "config.json").read_text())
    del config["encoders"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="has no trained encoders"):
        load_model(broken).network("encoders")
    photo = tmp_path / "face.png"
    Image.fromarray(face_photo("astronaut")).save(photo)
    res = runner.invoke(app, ["invert", str(photo), "--model", str(broken), "--mode", "encoder", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert len(res.output.splitlines()) == 1 and "has no trained encoders" in res.output


def test_encoder_training_learns_both_stages(trained, tmp_path):
    _, run = trained
    log = [json.loads(line) for line in (run.out_dir / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == list(range(1, 21))
    wplus_stage, delta_stage = log[:12], log[12:]
    assert "latent" in wplus_stage[0] and "psnr_wplus" in delta_stage[0]
    # the W+ encoder reconstructs its 12 training batches better than where it started (each batch holds
    # other images, so the logged losses of early and late steps do not compare; the batches' photo crops
    # depend on whether Debian's opencv-doc is installed: summed loss 5.34 vs 6.54 without it, 6.86 vs 7.53 with)
    start = EncoderTrainer(run.model, tmp_path, run.cfg)
    G = run.model.generator

    def reconstruction_losses(net: SamEncoders) -> np.ndarray:
        losses = []
        for step in range(len(wplus_stage)):
            start.step = step
            images, _ = start.batch()
            with torch.no_grad():
                recon = G.synthesis(net.eval().wplus(images))
                losses.append(ReconstructionLoss(start.lpips, images, start.loss_cfg)(recon).mean().item())
        return np.array(losses)

    before, after = reconstruction_losses(start.net), reconstruction_losses(run.net)
    assert before[0] == pytest.approx(wplus_stage[0]["reconstruction"], rel=1e-4)  # the same batches and start
    assert after.mean() < 0.95 * before.mean() and (after < before).mean() >= 0.75
    gain = [e["psnr"] - e["psnr_wplus"] for e in delta_stage]  # Δf starts at 0: composed = W+ reconstruction
    assert gain[0] == 0 and sum(gain[-4:]) > max(sum(gain[:4]), 0.1)


def test_resumed_encoder_run_continues(trained):
    _, run = trained
    resumed = EncoderTrainer(run.model, run.out_dir, run.cfg)
    assert resumed.step == 20 and resumed.stage == "delta"
    for a, b in zip(resumed.net.state_dict().values(), run.net.state_dict().values()):
        assert torch.equal(a, b)


def test_every_mode_on_a_real_photo(lpips, face):
    """The shipped networks of faces64 on the held-out astronaut face."""
    model = load_model("faces64")
    assert all(model.has_network(k) for k in ("predictor", "encoder_predictor", "encoders"))
    encoder = sam_invert(model, lpips, face, mode="encoder")
    assert encoder.single is None and encoder.metrics["maps"] == "predicted" and encoder.metrics["mode"] == "encoder"
    assert encoder.metrics["tau"] == model.tau_for("encoder") != model.tau  # the encoder regime's own tau
    target = to_target(face)
    with torch.no_grad():
        maps = predicted_maps(model, target, encoder.names, "encoder")[0].numpy()
        wplus_only = encode_wplus(model, target).reconstruction
        measured_wplus = lpips(wplus_only, target, spatial=True)[0, 0].numpy()  # anchors the predicted maps
        labels = layer_map(maps, face, model.tau_for("encoder"), measured_wplus=measured_wplus)
        again = encode(model, target, space_masks(model, labels, encoder.names)).render(model)
    assert (encoder.labels == labels).all() and torch.allclose(again[0], encoder.image, atol=1e-5)
    assert (layer_map(maps, face, model.tau_for("encoder")) != labels).any()  # the anchoring changes the map
    assert 0 < encoder.metrics["space_share"]["W+"] < 1  # a real mix of spaces
    assert encoder.metrics["psnr"] > psnr(wplus_only, target).item()  # Δf encoders add detail where the map says
    assert encoder.metrics["lpips"] < lpips(wplus_only, target).item()

    cfg = InversionConfig(steps=20)
    hybrid = sam_invert(model, lpips, face, mode="hybrid", cfg=cfg)
    assert hybrid.metrics["psnr"] > encoder.metrics["psnr"] + 0.5  # optimization refines the encoder's codes
    predicted = sam_invert(model, lpips, face, mode="optimize", cfg=cfg)
    measured = sam_invert(model, lpips, face, mode="optimize", maps="measured", cfg=cfg)
    assert predicted.single.names == ["W+"] and measured.single.names == predicted.names  # no per-space inversions
    # each set of maps is cut at the tau of its own error scale: optimize mode anchors the predicted maps to
    # the measured error of its W+ inversion (W+ at tau, each F_k derived from tau_predicted); hybrid mode
    # cuts them alone at tau_predicted
    tau_predicted = model.tau_for("optimization", "predicted")
    anchored = anchored_taus(model.tau, tau_predicted)
    assert predicted.metrics["tau"] == anchored and anchored["W+"] == model.tau != tau_predicted["W+"]
    assert hybrid.metrics["tau"] == tau_predicted and measured.metrics["tau"] == model.tau
    assert all(anchored[n] / tau_predicted[n] == pytest.approx(model.tau / tau_predicted["W+"]) for n in predicted.names)
    with torch.no_grad():
        optimization_maps = predicted_maps(model, target, predicted.names)[0].numpy()
    measured_wplus = predicted.single.error_maps[0, 0].numpy()
    assert (predicted.labels == layer_map(optimization_maps, face, [anchored[n] for n in predicted.names],
                                          measured_wplus=measured_wplus)).all()
    # W+ is decided on the measured W+ error, as with measured maps (the same 20-step W+ inversion)
    assert ((predicted.labels == 0) == (measured.labels == 0)).mean() > 0.99
    assert (hybrid.labels == layer_map(optimization_maps, face, [tau_predicted[n] for n in predicted.names])).all()
    wplus = measured.single.images[0]  # [1, 3, R, R]: a 20-step W+ inversion, where a joint optimization starts
    assert predicted.metrics["psnr"] > psnr(wplus, target).item() + 0.5 and predicted.metrics["lpips"] < lpips(wplus, target).item()
    assert predicted.metrics["seconds"] < measured.metrics["seconds"]  # no per-space inversions


def test_optimization_maps_average_the_mirrored_pass(face):
    """The optimization predictor's maps are the mean of the face's pass and its mirror's (mirrored back), so
    they mirror with the face; the encoder predictor's are one pass, as the exported runtime computes them."""
    model = load_model("faces64")
    names = [s.name for s in model.generator.spaces]
    target = to_target(face)
    with torch.no_grad():
        maps = predicted_maps(model, target, names)
        single = model.network("predictor")(target)
        mirrored = model.network("predictor")(target.flip(-1)).flip(-1)
        assert torch.allclose(predicted_maps(model, target.flip(-1), names).flip(-1), maps, atol=1e-6)
        assert torch.allclose(maps, (single + mirrored) / 2, atol=1e-7)
        assert (single - mirrored).abs().amax() > 0.1 * single.mean()  # the two passes really differ on a face
        encoder_maps = predicted_maps(model, target, names, "encoder")
        assert torch.equal(encoder_maps, model.network("encoder_predictor")(target))


def test_encoder_mode_measures_the_encoders_own_errors(lpips, face):
    """Measured maps of encoder mode: one encoder pass per space, no optimization; F_k beats W+ on a real photo."""
    model = load_model("faces64")
    names = [s.name for s in model.generator.spaces]
    target = to_target(face)
    maps = encoder_error_maps(model, lpips, target, names)
    assert maps.shape == (1, 5, 64, 64) and (maps >= 0).all()
    with torch.no_grad():
        wplus = model.network("encoders").wplus(target)
        wplus_only, features = wplus_features(model, wplus)
        f8 = model.network("encoders").deltas["F8"](target, wplus_only, features[8])
        f8_image = model.generator.synthesis(wplus, {8: (torch.ones(1, 1, 1, 1), f8)})
    assert torch.allclose(maps[0, 0], lpips(wplus_only, target, spatial=True)[0, 0], atol=1e-6)
    assert torch.allclose(maps[0, 4], lpips(f8_image, target, spatial=True)[0, 0], atol=1e-6)
    assert maps[0, 4].mean() < 0.7 * maps[0, 0].mean()  # the last feature space keeps far more detail
    measured = sam_invert(model, lpips, face, mode="encoder", maps="measured")
    assert measured.single is None and measured.metrics["maps"] == "measured"
    assert (measured.labels == layer_map(maps[0].numpy(), face, model.tau_for("encoder"))).all()
    assert measured.metrics["psnr"] > psnr(wplus_only, target).item() + 0.5


def test_modes_need_their_networks_and_tau(face, lpips):
    bare = load_model("faces64")
    for kind in ("encoders", "predictor", "encoder_predictor"):
        bare.meta.pop(kind, None)
    with pytest.raises(InputError, match="no trained encoders"):
        sam_invert(bare, lpips, face, mode="encoder", maps="measured", cfg=InversionConfig(steps=1))
    with pytest.raises(InputError, match="no trained predictor"):
        sam_invert(bare, lpips, face, mode="optimize", maps="predicted", cfg=InversionConfig(steps=1))
    with pytest.raises(InputError, match="saminv train invertibility-data --regime encoder, then saminv train predictor"):
        predicted_maps(bare, to_target(face), ["W+"], "encoder")
    bare.meta.pop("tau_encoder")
    with pytest.raises(InputError, match="no calibrated tau for the encoder regime"):
        bare.tau_for("encoder")
    with pytest.raises(InputError, match="calibrate --regime encoder --maps measured"):  # encoder mode's predicted maps use tau_encoder
        bare.tau_for("encoder", "predicted")
    predictor_only = load_model("faces64")
    predictor_only.meta.pop("tau_predicted")  # a predictor whose maps' tau was never calibrated
    with pytest.raises(InputError, match="saminv calibrate --regime optimization --maps predicted"):
        sam_invert(predictor_only, lpips, face, mode="optimize", cfg=InversionConfig(steps=1))
    with pytest.raises(InputError, match="saminv calibrate --regime optimization --maps predicted"):
        sam_invert(predictor_only, lpips, face, mode="optimize", tau=0.05, cfg=InversionConfig(steps=1))  # F_k taus need it
    per_space = {s.name: 0.05 for s in predictor_only.generator.spaces}  # one tau per space needs no calibration
    assert sam_invert(predictor_only, lpips, face, mode="optimize", tau=per_space,
                      cfg=InversionConfig(steps=1)).metrics["tau"] == per_space
    with pytest.raises(InputError, match="not W"):
        sam_invert(load_model("faces64"), lpips, face, mode="encoder", names=["W", "F8"])


def test_encoder_regime_data_trains_the_encoder_predictor(trained, tmp_path):
    """Encoder-regime shards hold the encoders' own error maps; a predictor trained on them fits them better
    and lands in the model directory as encoder_predictor; tau_encoder is calibrated on the encoders' errors."""
    model, _ = trained
    model_dir = tmp_path / "model"
    shutil.copytree(model.path, model_dir)
    data = tmp_path / "data"
    res = runner.invoke(app, ["train", "invertibility-data", "--regime", "encoder", "--model", str(model_dir),
                              "--out", str(data), "--count", "8", "--shard-size", "4"])
    assert res.exit_code == 0, res.output
    shard = np.load(data / "shard_00001.npz")
    x = torch.from_numpy(shard["images"]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    measured = encoder_error_maps(model, LPIPS(), x, [str(n) for n in shard["spaces"]])
    assert torch.allclose(torch.from_numpy(shard["errors"]).float(), measured, atol=2e-3)  # float16 storage
    assert shard["reconstructions"].shape == (4, 5, 64, 64, 3)

    run = PredictorTrainer(data, tmp_path / "run", PredictorConfig(steps=30, batch=4, checkpoint_every=15))
    assert run.regime == "encoder"
    images, errors, _ = load_shards(data)
    x, y = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1), torch.from_numpy(errors)

    def weighted_error() -> float:
        run.net.eval()
        with torch.no_grad():
            return ((run.net(x) - y).square() * run.weights).mean().item()

    before = weighted_error()
    run.train(progress=False)
    assert weighted_error() < 0.7 * before
    res = runner.invoke(app, ["train", "predictor", "--data", str(data), "--steps", "31", "--batch", "2",
                              "--out", str(tmp_path / "run"), "--into", str(model_dir)])
    assert res.exit_code == 0, res.output
    config = json.loads((model_dir / "config.json").read_text())
    assert config["encoder_predictor"]["trained"]["steps"] == 31 and config["predictor"]["trained"]["steps"] == 0
    started = ["train", "predictor", "--data", str(data), "--steps", "1", "--batch", "2", "--out", str(tmp_path / "started")]
    res = runner.invoke(app, [*started, "--start-from", "faces64"])  # encoder data: starts from faces64's `predictor`
    assert res.exit_code == 0, res.output
    state = torch.load(tmp_path / "started" / "checkpoint.pt", weights_only=True)["net"]
    start = load_model("faces64").network("predictor").heads[0][0].weight
    assert (state["heads.0.0.weight"] - start).abs().max() <= 1.5e-3 < start.abs().max()  # one Adam step away
    res = runner.invoke(app, [*started, "--start-from", "no-such-model"])
    assert res.exit_code != 0 and "no-such-model" in res.output and "Traceback" not in res.output

    photos = []
    for name in ("lfw-7", "astronaut"):
        photos += ["--images", str(tmp_path / f"{name}.png")]
        Image.fromarray(face_photo(name)).save(photos[-1])
    res = runner.invoke(app, ["calibrate", "--model", str(model_dir), "--regime", "encoder", *photos])
    assert res.exit_code == 0, res.output
    config = json.loads((model_dir / "config.json").read_text())
    assert "W+ encoder" in config["tau_encoder_calibration"]["method"] and config["tau"] == model.tau
    assert load_model(model_dir).tau_for("encoder") == config["tau_encoder"] > 0


def test_training_runs_data_parallel_under_torchrun(tmp_path):
    """Two CPU processes (gloo): one log, one checkpoint, and both ranks end with the same weights."""
    script = tmp_path / "ddp.py"
    script.write_text(
        "import os, torch\n"
        "from saminv.models.model_dir import load_model\n"
        "from saminv.training.encoders import EncoderConfig, EncoderTrainer\n"
        f"run = EncoderTrainer(load_model('faces64'), r'{tmp_path / 'run'}',"
        " EncoderConfig(wplus_steps=2, delta_steps=1, batch=2, generated=1))\n"
        "run.train(progress=False)\n"
        "flat = torch.cat([p.detach().flatten() for p in run.net.parameters()])\n"
        f"torch.save(flat, r'{tmp_path}/rank%s.pt' % os.environ['RANK'])\n")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                         capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(rank0, rank1)


def test_cli_trains_encoders_into_a_model_directory(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("config.json", "weights.safetensors"):
        shutil.copy(load_model("faces64").path / name, model_dir / name)
    args = ["train", "encoder", "--out", str(tmp_path / "run"), "--wplus-steps", "2", "--delta-steps", "1",
            "--batch", "2", "--generated", "1"]
    res = runner.invoke(app, [*args, "--into", str(model_dir)])
    assert res.exit_code == 0, res.output
    entry = json.loads((model_dir / "config.json").read_text())["encoders"]
    assert entry["trained"]["steps"] == 3 and entry["trained"]["config"]["batch"] == 2
    assert load_model(model_dir).network("encoders").wplus.n_latent == 10
    res = runner.invoke(app, [*args[:-2], "--generated", "2"])
    assert res.exit_code == 2 and "--generated 2 must be smaller than --batch 2" in res.output
