"""Generator distillation: the teacher, training steps, resuming, export and the Fréchet report."""

import json

import pytest
import torch
from typer.testing import CliRunner

from saminv.cli import app
from saminv.models.model_dir import load_model_dir
from saminv.training.generator import DistillConfig, Distiller, export_model
from saminv.training.report import frechet_report
from saminv.training.teacher import load_teacher


def test_teacher_renders_faces_in_range():
    T = load_teacher()
    z = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats, image = T.features(z)
        assert torch.equal(image, T(z))
    assert image.shape == (4, 3, 64, 64) and image.min() >= -1 and image.max() <= 1
    assert [tuple(f.shape[1:]) for f in feats] == [(512, 4, 4), (256, 8, 8), (128, 16, 16), (64, 32, 32)]
    assert image.std(dim=0).mean() > 0.1  # different z, different faces


@pytest.fixture()
def tiny_run(tmp_path):
    torch.manual_seed(0)
    return Distiller(tmp_path / "run", DistillConfig(batch=2, checkpoint_every=2, adv_weight=1.0, r1_every=2))


def test_steps_lower_the_paired_loss_and_log(tiny_run):
    tiny_run.train(steps=6, progress=False)
    log = [json.loads(line) for line in (tiny_run.out_dir / "log.jsonl").read_text().splitlines()]
    assert {"pair_l1", "pair_psnr", "hint", "g_adv", "d_loss", "r1"} <= set(log[0])
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["pair_l1"])) for r in log)


def test_resume_restores_the_run(tiny_run):
    tiny_run.train(steps=4, progress=False)
    resumed = Distiller(tiny_run.out_dir, tiny_run.cfg)
    assert resumed.step == 4
    for a, b in zip(resumed.G_ema.state_dict().values(), tiny_run.G_ema.state_dict().values()):
        assert torch.equal(a, b)
    # the random stream is restored too: the next step is identical in both (torch's RNG is global)
    rng = torch.get_rng_state()
    after_resume = resumed.train_step()["pair_l1"]
    torch.set_rng_state(rng)
    assert after_resume == pytest.approx(tiny_run.train_step()["pair_l1"], rel=1e-5)


def test_export_writes_a_model_directory(tiny_run, tmp_path):
    tiny_run.train(steps=2, progress=False)
    out = export_model(tiny_run, tmp_path / "model")
    m = load_model_dir(out)
    assert m.generator.cfg.resolution == 64 and m.generator.cfg.z_dim == 100
    assert [s.name for s in m.generator.spaces] == ["W+", "F2", "F4", "F6", "F8"]
    assert m.prior.precision.shape == (512, 512)
    # w_avg is the mean of mapped samples
    with torch.no_grad():
        w = m.generator.mapping(torch.randn(4000, 100))
    assert torch.allclose(m.generator.mapping.w_avg, w.mean(0), atol=0.1 * w.std(0).mean().item())


def test_frechet_report_orders_untrained_student_above_the_floor(tiny_run, tmp_path):
    model = load_model_dir(export_model(tiny_run, tmp_path / "model"))
    report = frechet_report(model, n=48)
    assert report["fd_student_teacher"] > 2 * report["fd_teacher_teacher_floor"] > 0


def test_train_cli_resumes_and_exports(tmp_path):
    runner = CliRunner()
    args = ["train", "generator", "--out", str(tmp_path / "run"), "--steps", "1", "--batch", "2",
            "--export", str(tmp_path / "model")]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and (tmp_path / "model" / "config.json").is_file()
    res = runner.invoke(app, [*args[:5], "2", *args[6:]])
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2
