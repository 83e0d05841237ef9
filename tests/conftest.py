"""Fixtures shared by several test files."""

import json
import shutil

import pytest
import torch

from saminv.models.model_dir import load_model, save_network
from saminv.models.predictor import InvertibilityPredictor
from saminv.training.encoders import EncoderConfig, EncoderTrainer


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A copy of faces64 with briefly trained encoders (W+ and Δf stages) and untrained predictors of both regimes."""
    base = load_model("faces64")
    model_dir = tmp_path_factory.mktemp("model") / "faces64"
    model_dir.mkdir()
    for name in ("config.json", "weights.safetensors"):
        shutil.copy(base.path / name, model_dir / name)
    config = json.loads((model_dir / "config.json").read_text())
    for kind in ("predictor", "encoder_predictor", "encoders"):
        config.pop(kind, None)
    (model_dir / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    run = EncoderTrainer(base, tmp_path_factory.mktemp("run"),
                         EncoderConfig(wplus_steps=12, delta_steps=8, batch=4, generated=2, checkpoint_every=10))
    run.train(progress=False)
    save_network(model_dir, "encoders", run.net, run.record())
    for kind in ("predictor", "encoder_predictor"):
        save_network(model_dir, kind, InvertibilityPredictor([s.name for s in base.generator.spaces]), {"steps": 0})
    return load_model(model_dir), run
