"""saminv's model directory: ``config.json`` + ``weights.safetensors`` (one concept, used everywhere).

``config.json`` holds the generator architecture, the SAM latent spaces with their shapes, the
calibrated tau, the preprocessing and where the weights came from. ``weights.safetensors`` holds
the generator state_dict plus the W-prior statistics used by the Mahalanobis regularizer
(``w_prior.mean`` [w_dim], ``w_prior.precision`` [w_dim, w_dim], both float32).

Trained feed-forward networks join the directory as ``<kind>.safetensors`` (float16 weights) with
an entry ``config.json[kind]`` (constructor arguments, sha256, how they were trained): ``encoders``
(the W+ and Δf encoders) and one invertibility predictor S_l per inversion regime (:data:`PREDICTORS`):
``predictor`` regresses the errors the optimization leaves in each space, ``encoder_predictor`` the
errors the encoders leave. Each regime has its own calibrated tau (``tau``, ``tau_encoder``): the
encoders leave about ten times the optimization's error, so one threshold cannot serve both. The
optimization regime's predicted maps have their own, one per space (``tau_predicted``, :data:`TAU_KEYS`): the
predictor regresses the errors of its data set's step budget, not those of the default optimization.

``--model`` accepts a built-in name (a directory inside ``saminv/builtin``), a model directory or a
StyleGAN2 checkpoint (rosinality ``.pt`` or NVIDIA ``.pkl``, converted once into a cache directory, see
:mod:`saminv.models.checkpoints`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import save as save_safetensors

from saminv.errors import InputError
from saminv.imageio import atomic_write, file_sha256
from saminv.models.stylegan2 import Generator, GeneratorConfig

FORMAT = "saminv-model"
FORMAT_VERSION = 1
DEFAULT_TAU = 0.225  # the official SAM default, used until a model is calibrated
PRIOR_SLOPE = 5.0  # LeakyReLU(w, 5) undoes the mapping's last LeakyReLU(0.2) before the Gaussian fit
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin"
REGIMES = ("optimization", "encoder")  # who inverts: per-image optimization, or the feed-forward encoders
PREDICTORS = {"optimization": "predictor", "encoder": "encoder_predictor"}  # network kind of each regime's S_l
# config.json key of the tau for each (regime, maps): a threshold belongs to the error scale of the maps it
# cuts. Measured maps: the regime's own errors. The optimization ``predictor`` learned its data set's
# errors (100 steps for faces64), which exceed the default 200-step optimization's by a factor that differs
# per space, so its maps get one tau per space (a dict; saminv.inversion.calibration). Encoder mode anchors
# predicted maps to the measured W+ error: ``tau_encoder``; optimize mode anchors them too and derives its
# per-space taus from ``tau`` and ``tau_predicted`` (saminv.inversion.selection.anchored_taus).
TAU_KEYS = {("optimization", "measured"): "tau", ("optimization", "predicted"): "tau_predicted",
            ("encoder", "measured"): "tau_encoder", ("encoder", "predicted"): "tau_encoder"}


@dataclass
class WPrior:
    """Gaussian fit of LeakyReLU(w, 5) over mapped samples (SAM Eq. 7): mean [D], precision [D, D]."""

    mean: torch.Tensor
    precision: torch.Tensor

    @classmethod
    @torch.no_grad()
    def estimate(cls, G: Generator, n: int = 5000, seed: int = 0) -> "WPrior":
        """Fit on ``n`` w = mapping(z), z ~ N(0, I) seeded by ``seed`` (official SAM: 5,000 samples);
        the covariance gets 1e-6 on its diagonal before inversion (float64, stored float32)."""
        g = torch.Generator().manual_seed(seed)
        w = G.mapping(torch.randn(n, G.cfg.z_dim, generator=g)).double()
        v = torch.nn.functional.leaky_relu(w, PRIOR_SLOPE)
        mean = v.mean(0)
        cov = torch.cov(v.t()) + 1e-6 * torch.eye(v.shape[1], dtype=torch.float64)
        return cls(mean.float(), torch.linalg.inv(cov).float())

    def mahalanobis(self, ws: torch.Tensor) -> torch.Tensor:
        """Mean squared Mahalanobis distance of LeakyReLU(ws, 5) [..., D] to the fit; a scalar."""
        d = torch.nn.functional.leaky_relu(ws, PRIOR_SLOPE) - self.mean
        return ((d @ self.precision) * d).sum(-1).mean()


@dataclass
class Model:
    """A loaded model directory: the generator (eval mode) with its SAM settings."""

    generator: Generator
    prior: WPrior
    tau: float = DEFAULT_TAU
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    networks: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        """The config's ``name``, else the directory's name."""
        return self.meta.get("name") or (self.path.name if self.path else "model")

    def to(self, device: str | torch.device) -> "Model":
        """Move the generator, the W prior and every loaded network to ``device`` (in place); returns self."""
        self.generator.to(device)
        self.prior = WPrior(self.prior.mean.to(device), self.prior.precision.to(device))
        for net in self.networks.values():
            net.to(device)
        return self

    def tau_for(self, regime: str, maps: str = "measured") -> float | dict[str, float]:
        """The calibrated tau for ``maps`` ("measured" or "predicted") of an inversion regime
        (:data:`REGIMES`; :data:`TAU_KEYS`): one float, or one per space name (the optimization
        predictor's maps). Raises InputError when that tau was never calibrated."""
        key = TAU_KEYS[regime, maps]
        if key == "tau":
            return self.tau
        if key not in self.meta:
            calibrated = next(rm for rm, k in TAU_KEYS.items() if k == key)  # the calibration that stores key
            raise InputError(f"model {self.name} has no calibrated tau for the {regime} regime's {maps} maps "
                             f"(saminv calibrate --regime {calibrated[0]} --maps {calibrated[1]})")
        value = self.meta[key]
        return {k: float(v) for k, v in value.items()} if isinstance(value, dict) else float(value)

    def has_network(self, kind: str) -> bool:
        """Whether the directory holds trained ``kind`` weights (a :data:`PREDICTORS` kind or "encoders")."""
        return kind in self.networks or (kind in self.meta and self.path is not None)

    def network(self, kind: str) -> torch.nn.Module:
        """The trained ``kind`` network (eval mode, gradients off), loaded on first use.

        Raises InputError when the model has none or its file is broken."""
        if kind not in self.networks:
            if not self.has_network(kind):
                how = {"encoder_predictor": "invertibility-data --regime encoder, then saminv train predictor"}.get(kind, kind)
                raise InputError(f"model {self.name} has no trained {kind} (train one: saminv train {how})")
            self.networks[kind] = _load_network(self.path, kind, self.meta[kind]).to(self.generator.mapping.w_avg.device)
        return self.networks[kind]


def config_dict(model: Model) -> dict:
    """The config.json content of ``model``: format and version, its metadata (w_avg stats, taus,
    networks), the generator architecture, its latent spaces and tau."""
    G = model.generator
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        **{k: v for k, v in model.meta.items() if k not in ("format", "version", "generator", "spaces", "tau")},
        "generator": G.cfg.to_dict(),
        "spaces": [{"name": s.name, "block": s.block, "shape": list(s.shape)} for s in G.spaces],
        "tau": model.tau,
        "preprocess": {"resolution": G.cfg.resolution, "crop": "center", "range": [-1.0, 1.0], "layout": "NCHW"},
    }


def save_model(model: Model, out: Path, overwrite: bool = False) -> Path:
    """Write ``model`` as a model directory at ``out`` atomically (temp dir, then rename).

    Raises FileExistsError if ``out`` exists and ``overwrite`` is False.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.generator.state_dict().items()}
        tensors["w_prior.mean"] = model.prior.mean.cpu().contiguous()
        tensors["w_prior.precision"] = model.prior.precision.cpu().contiguous()
        save_file(tensors, str(tmp / "weights.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config_dict(model), indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    model.path = out
    return out


def load_model_dir(path: Path) -> Model:
    """Load a model directory; raises InputError (one clear line) when it is not a valid one."""
    path = Path(path)
    cfg_path, w_path = path / "config.json", path / "weights.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise InputError(f"{path}: not a saminv model directory (needs config.json and weights.safetensors)")
    try:
        meta = json.loads(cfg_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
        cfg = GeneratorConfig.from_dict(meta["generator"])
        tensors = load_file(str(w_path))
        G = Generator(cfg)
        prior = WPrior(tensors.pop("w_prior.mean"), tensors.pop("w_prior.precision"))
        G.load_state_dict(tensors, strict=True)
    except (ValueError, KeyError, TypeError, RuntimeError, SafetensorError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: broken model directory: {str(e).splitlines()[0]}") from None
    return Model(G.eval().requires_grad_(False), prior, float(meta.get("tau", DEFAULT_TAU)), meta, path)


def _network_class(kind: str) -> type[torch.nn.Module]:
    if kind in PREDICTORS.values():
        from saminv.models.predictor import InvertibilityPredictor

        return InvertibilityPredictor
    if kind == "encoders":
        from saminv.models.encoders import SamEncoders

        return SamEncoders
    raise ValueError(f"unknown network kind {kind!r} (expected {', '.join(PREDICTORS.values())} or encoders)")


def _load_network(path: Path, kind: str, entry: dict) -> torch.nn.Module:
    file = path / f"{kind}.safetensors"
    try:
        if file_sha256(file) != entry["sha256"]:
            raise ValueError("sha256 mismatch")
        net = _network_class(kind)(**entry["init"])
        tensors = load_file(str(file))
        reference = net.state_dict()
        net.load_state_dict({k: v.to(reference[k].dtype) for k, v in tensors.items() if k in reference}, strict=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        raise InputError(f"{file}: broken {kind} weights: {str(e).splitlines()[0]}") from None
    return net.eval().requires_grad_(False)


def save_network(model_dir: Path, kind: str, net: torch.nn.Module, trained: dict) -> None:
    """Add a trained network to a model directory: ``<kind>.safetensors`` (float16 weights, written to
    a temp file and renamed) and ``config.json[kind]`` = {init, sha256, trained}. Replaces an older one."""
    model_dir = Path(model_dir)
    _network_class(kind)
    blob = save_safetensors({k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
                             for k, v in net.state_dict().items()})
    meta = json.loads((model_dir / "config.json").read_text())
    meta[kind] = {"init": net.init_kwargs(), "sha256": hashlib.sha256(blob).hexdigest(), "trained": trained}
    atomic_write(model_dir / f"{kind}.safetensors", lambda p: p.write_bytes(blob))
    atomic_write(model_dir / "config.json", lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))


def builtin_names() -> list[str]:
    """Names of the models shipped inside the package (``saminv/builtin/<name>/config.json``)."""
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "config.json").is_file()) if BUILTIN_DIR.is_dir() else []


def cache_dir() -> Path:
    """saminv's cache (converted checkpoints, the face archives of `make faces`): ``$SAMINV_CACHE``, else ``~/.cache/saminv``."""
    return Path(os.environ.get("SAMINV_CACHE", Path.home() / ".cache" / "saminv"))


def load_model(spec: str | Path, device: str | torch.device = "cpu") -> Model:
    """Resolve ``--model``: a built-in name, a model directory, or a StyleGAN2 checkpoint (rosinality ``.pt``,
    NVIDIA ``.pkl``).

    A checkpoint is converted on first use into ``$SAMINV_CACHE/models/<sha256[:16]>`` (default
    ``~/.cache/saminv``). Raises InputError with one clear line for anything else.
    """
    spec_str = str(spec)
    if spec_str in builtin_names():
        return load_model_dir(BUILTIN_DIR / spec_str).to(device)
    path = Path(spec_str).expanduser()
    if path.is_dir():
        return load_model_dir(path).to(device)
    if path.is_file():
        from saminv.models.checkpoints import convert_checkpoint

        target = cache_dir() / "models" / file_sha256(path)[:16]
        if not (target / "config.json").is_file():
            save_model(convert_checkpoint(path), target, overwrite=True)
        return load_model_dir(target).to(device)
    names = ", ".join(builtin_names()) or "none installed"
    raise InputError(f"--model {spec_str!r}: no such built-in model ({names}), directory or checkpoint file")
