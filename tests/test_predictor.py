"""The invertibility predictor S_l: shapes, and that training on real inversion data fits it."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from saminv.cli import app
from saminv.errors import InputError
from saminv.imageio import resize_square
from saminv.inversion.feedforward import predicted_maps
from saminv.inversion.sam import to_target
from saminv.inversion.selection import segment, segment_means
from saminv.models.efficientnet import EfficientNetLite0, PYRAMID_CHANNELS
from saminv.models.model_dir import load_model
from saminv.models.predictor import InvertibilityPredictor
from saminv.photos import face_photo
from saminv.training.invertibility_data import DataConfig, generate_dataset
from saminv.training.predictor import PredictorConfig, PredictorTrainer, load_shards, shifted


def test_backbone_pyramid_shapes():
    levels = EfficientNetLite0().eval().pyramid(torch.zeros(1, 3, 128, 128))
    assert [tuple(x.shape[1:]) for x in levels] == [(c, 128 // s, 128 // s) for c, s in zip(PYRAMID_CHANNELS, (4, 8, 16, 32))]


def test_predictor_maps_are_non_negative_per_space():
    net = InvertibilityPredictor(["W+", "F4", "F8"]).eval()
    with torch.no_grad():
        maps = net(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert maps.shape == (2, 3, 64, 64) and (maps >= 0).all()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("invdata")
    generate_dataset(load_model("faces64"), out, DataConfig(count=8, shard_size=4, steps=10), progress=False)
    return out


def test_training_fits_measured_error_maps(data, tmp_path):
    images, errors, spaces = load_shards(data)
    assert images.shape == (8, 64, 64, 3) and errors.shape == (8, 5, 64, 64) and spaces[0] == "W+"
    run = PredictorTrainer(data, tmp_path, PredictorConfig(steps=40, batch=4, checkpoint_every=20))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    y = torch.from_numpy(errors)

    def mse():
        run.net.eval()
        with torch.no_grad():
            return (run.net(x) - y).square().mean().item()

    before = mse()
    run.train(progress=False)
    assert mse() < 0.5 * before
    assert run.step == 40 and (tmp_path / "checkpoint.pt").is_file()
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lrs[:31] == [pytest.approx(1e-3)] * 31  # constant, then the cosine ramp-down over the last 25 %
    assert all(a > b for a, b in zip(lrs[30:], lrs[31:])) and lrs[-1] < 3e-5
    assert run.opt.param_groups[1]["lr"] == pytest.approx(0.1 * run.opt.param_groups[0]["lr"])  # ImageNet trunk
    resumed = PredictorTrainer(data, tmp_path, PredictorConfig(steps=40, batch=4))
    assert resumed.step == 40


def test_missing_data_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shard"):
        load_shards(tmp_path)


def test_an_unfinished_data_set_is_refused_until_its_command_finishes_it(data, tmp_path):
    """A data set that lacks shards its info.json asks for, or their second measurement (--mirror), is still
    being made or was stopped: training on it would give a predictor that its command does not describe. Its
    own command resumes it, and the shard it makes again equals the one that was lost."""
    partial = tmp_path / "partial"
    shutil.copytree(data, partial)
    (partial / "shard_00001.npz").unlink()
    with pytest.raises(ValueError, match=r"unfinished: 1 shard\(s\) missing or measured once \(shard_00001.npz\)"):
        load_shards(partial)
    res = CliRunner().invoke(app, ["train", "predictor", "--data", str(partial), "--steps", "1",
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "rerun the saminv train invertibility-data command" in res.output, res.output
    assert res.output.count("\n") == 1 and not (tmp_path / "run").exists()  # one line; no run directory left behind

    generate_dataset(load_model("faces64"), partial, DataConfig(count=8, shard_size=4, steps=10), progress=False)
    for resumed, original in zip(load_shards(partial), load_shards(data)):
        assert np.array_equal(resumed, original)

    once = tmp_path / "once"
    shutil.copytree(data, once)
    info = json.loads((once / "info.json").read_text())
    (once / "info.json").write_text(json.dumps({**info, "mirror": True}))  # as --mirror on it records, before it ends
    with pytest.raises(ValueError, match="2 shard"):
        load_shards(once)


def test_several_data_sets_pool_when_their_spaces_and_regime_agree(data, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(data, other)
    images, errors, _ = load_shards(data)
    pooled = PredictorTrainer([data, other], tmp_path / "run", PredictorConfig(steps=1))
    assert np.array_equal(pooled.images, np.concatenate([images, images])) and pooled.regime == "optimization"
    assert np.array_equal(pooled.errors, np.concatenate([errors, errors]))
    info = json.loads((other / "info.json").read_text())
    (other / "info.json").write_text(json.dumps({**info, "regime": "encoder"}))
    with pytest.raises(ValueError, match="mix regimes"):
        PredictorTrainer([data, other], tmp_path / "run2", PredictorConfig(steps=1))
    shard = dict(np.load(other / "shard_00000.npz"))
    np.savez(other / "shard_00000.npz", **{**shard, "spaces": np.array(["W+", "F2", "F4", "F6", "F10"])})
    with pytest.raises(ValueError, match="spaces"):
        load_shards(data, other)


def test_start_from_another_predictor_keeps_its_weights_and_this_datas_scale(data, tmp_path):
    start = load_model("faces64").network("encoder_predictor")
    run = PredictorTrainer(data, tmp_path / "a", PredictorConfig(steps=1), start=start)
    _, errors, spaces = load_shards(data)
    assert torch.equal(run.net.smooth.weight, start.smooth.weight)
    assert torch.allclose(run.net.scale, torch.from_numpy(errors.mean(axis=(0, 2, 3))))
    assert not torch.allclose(run.net.scale, start.scale)  # encoder errors are larger than optimization ones
    with pytest.raises(ValueError, match="spaces"):
        PredictorTrainer(data, tmp_path / "b", PredictorConfig(steps=1), start=InvertibilityPredictor(["W+", "F2"]))
    with pytest.raises(ValueError, match="width"):
        PredictorTrainer(data, tmp_path / "c", PredictorConfig(steps=1), start=InvertibilityPredictor(spaces, width=32))


def test_cli_trains_into_a_model_directory_then_calibrates_its_maps_tau(data, tmp_path, monkeypatch):
    """A new predictor drops the previous predictor's tau_predicted when its calibration cannot be matched again
    (here: the validation faces are not fetched); `saminv calibrate --maps predicted` then gives one tau per space:
    the quantile of its per-segment errors at the measured maps' pass rate."""
    monkeypatch.setenv("SAMINV_CACHE", str(tmp_path / "cache"))  # no face archives
    model_dir = tmp_path / "model"
    shutil.copytree(load_model("faces64").path, model_dir)
    before = json.loads((model_dir / "config.json").read_text())
    runner = CliRunner()
    res = runner.invoke(app, ["train", "predictor", "--data", str(data), "--steps", "3", "--batch", "2",
                              "--out", str(tmp_path / "run"), "--into", str(model_dir)])
    assert res.exit_code == 0, res.output
    config = json.loads((model_dir / "config.json").read_text())
    assert config["predictor"]["trained"]["steps"] == 3 and config["tau"] == before["tau"]
    assert "tau_predicted" not in config and "tau_predicted_calibration" not in config
    with pytest.raises(InputError, match="saminv calibrate --regime optimization --maps predicted"):
        load_model(model_dir).tau_for("optimization", "predicted")

    photos = [resize_square(face_photo(n), 64) for n in ("astronaut", "lfw-3")]
    args = ["calibrate", "--model", str(model_dir), "--maps", "predicted", "--steps", "20"]
    for i, photo in enumerate(photos):
        Image.fromarray(photo).save(tmp_path / f"{i}.png")
        args += ["--images", str(tmp_path / f"{i}.png")]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    config = json.loads((model_dir / "config.json").read_text())
    taus, record = config["tau_predicted"], config["tau_predicted_calibration"]
    names = [s.name for s in load_model(model_dir).generator.spaces]
    assert list(taus) == names and record["tau"] == config["tau"] and record["images"] == 2
    assert 0 < record["measured_pass_rates"]["F8"] and record["measured_pass_rates"]["W+"] < 1  # 20 steps: W+ is poor
    maps = predicted_maps(load_model(model_dir), torch.cat([to_target(p) for p in photos]), names).numpy()
    predicted = np.concatenate([segment_means(m, segment(p)) for m, p in zip(maps, photos)], axis=1)
    for s, name in enumerate(names):
        assert taus[name] == pytest.approx(np.quantile(predicted[s], record["measured_pass_rates"][name]), abs=2e-4)
    assert load_model(model_dir).tau_for("optimization", "predicted") == taus


def test_a_retrained_predictor_gets_taus_matched_to_the_recorded_pass_rates(data, tmp_path):
    """`train predictor --into` reuses the measured pass rates of the previous predictor's calibration on a named
    validation set: the taus equal a full `saminv calibrate --maps predicted` of the new predictor."""
    model_dir = tmp_path / "model"
    shutil.copytree(load_model("faces64").path, model_dir)
    runner = CliRunner()
    calibrate = ["calibrate", "--model", str(model_dir), "--maps", "predicted", "--validation", "photos", "--steps", "5"]
    assert runner.invoke(app, calibrate).exit_code == 0
    first_taus, first = (json.loads((model_dir / "config.json").read_text())[k] for k in ("tau_predicted",
                                                                                        "tau_predicted_calibration"))
    assert first["steps"] == 5 and first["validation"] == "saminv.photos.validation_photos"
    res = runner.invoke(app, ["train", "predictor", "--data", str(data), "--steps", "3", "--batch", "2",
                              "--out", str(tmp_path / "run"), "--into", str(model_dir)])
    assert res.exit_code == 0 and "matched to the previous calibration" in res.output, res.output
    config = json.loads((model_dir / "config.json").read_text())
    rematched, record = config["tau_predicted"], config["tau_predicted_calibration"]
    assert record["measured_pass_rates"] == first["measured_pass_rates"] and record["segments"] == first["segments"]
    assert record["measured"] == "pass rates of the previous calibration"
    assert runner.invoke(app, calibrate).exit_code == 0  # the full calibration of the new predictor
    assert json.loads((model_dir / "config.json").read_text())["tau_predicted"] == rematched
    assert rematched != first_taus  # the new predictor's own errors, not the old taus


def test_the_seed_decides_a_runs_batches_and_repeats_it(data, tmp_path):
    """`saminv train predictor --seed`: the same seed gives the same weights, another seed other batches and so
    other weights (from the same --start-from); the run's record keeps the seed."""
    def train(name: str, seed: int) -> dict[str, torch.Tensor]:
        res = CliRunner().invoke(app, ["train", "predictor", "--data", str(data), "--steps", "2", "--batch", "2",
                                       "--seed", str(seed), "--start-from", "faces64", "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        state = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        assert state["config"]["seed"] == seed
        return state["net"]

    first, again, other = train("a", 0), train("b", 0), train("c", 1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_shifted_moves_each_item_by_its_offset_with_reflect_padding():
    photo = to_target(resize_square(face_photo("astronaut"), 64))  # [1, 3, 64, 64] in [-1, 1]
    batch = torch.cat([photo, photo])
    moved = shifted(batch, np.array([[3, 3], [0, 6]]), 3)
    assert moved.shape == batch.shape and torch.equal(moved[0], photo[0])  # offset == shift: no move
    assert torch.equal(moved[1, :, 3:, :-3], photo[0, :, :-3, 3:])  # down 3 rows, left 3 columns
    assert torch.equal(moved[1, :, 2, :-3], photo[0, :, 1, 3:])  # reflect padding: input row 1 again above row 0


def test_shift_moves_images_and_maps_together(data, tmp_path):
    """With --shift each training image and its error maps move (and flip) together, so a map that is a
    function of its image stays that function of the image in every batch; without it no item moves."""
    def unmoved_items(shift: int) -> list[bool]:
        run = PredictorTrainer(data, tmp_path / f"s{shift}", PredictorConfig(steps=1, batch=8, shift=shift))
        grey = torch.from_numpy(run.images.astype(np.float32).mean(axis=3) / 127.5 - 1)  # [N, R, R]
        run.errors = grey[:, None].expand(-1, len(run.spaces), -1, -1).numpy()
        x, y = run.batch()
        assert torch.allclose(y, x.mean(dim=1, keepdim=True).expand_as(y), atol=1e-5)
        stored = [*grey, *grey.flip(-1)]
        return [any(torch.allclose(item, g, atol=1e-5) for g in stored) for item in x.mean(dim=1)]

    assert all(unmoved_items(0))
    assert not all(unmoved_items(3))
    with pytest.raises(ValueError, match="shift 64"):
        PredictorTrainer(data, tmp_path / "big", PredictorConfig(steps=1, shift=64))
