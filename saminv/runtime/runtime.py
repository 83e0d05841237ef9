"""The torch-free runtime: inverts (feed-forward SAM), renders, generates and edits with a bundle's ONNX files.

Only numpy, onnxruntime, Pillow, scikit-image (SLIC segments) and safetensors' numpy reader are
imported (never torch). Stages run
in the manifest's order; tensors go from one stage to the next as onnxruntime ``OrtValue`` s through
I/O binding, so with the CUDA or TensorRT execution provider they stay on the GPU between blocks.

Images are returned as H x W x 3 uint8 (or N x H x W x 3); internally NCHW float32 in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from saminv.imageio import images_to_uint8, load_image, resize_square, to_tensor_range
from saminv.inversion.selection import layer_map
from saminv.runtime.bundle import Bundle, BundleError, check_session_io, open_bundle


@dataclass
class RuntimeInversion:
    """A feed-forward inversion: ``image`` the composed reconstruction R x R x 3 uint8, ``codes`` its SAM
    codes (one image), ``maps`` the predicted invertibility maps [S, R, R] float32 (per space of ``codes.names``;
    before they are anchored to the measured W+ error)."""

    image: np.ndarray
    codes: "RuntimeCodes"
    maps: np.ndarray


@dataclass
class RuntimeCodes:
    """SAM codes of N images as numpy arrays: ``wplus`` [N, n_latent, w_dim] float32; ``deltas`` maps a
    space name ("F6") to delta_f [N, C, r, r]; ``labels`` [N, R, R] int (index into ``names``)."""

    wplus: np.ndarray
    labels: np.ndarray
    names: list[str]
    deltas: dict[str, np.ndarray] = field(default_factory=dict)


def load_codes(path: str | Path) -> RuntimeCodes:
    """Read a ``codes.safetensors`` written by ``saminv invert`` (without torch)."""
    import json

    from safetensors import safe_open
    from safetensors.numpy import load_file

    try:
        t = load_file(str(path))
        with safe_open(str(path), "numpy") as f:
            meta = f.metadata() or {}
        deltas = {k.split(".", 1)[1]: t[k] for k in t if k.startswith("delta.")}
        return RuntimeCodes(t["wplus"].astype(np.float32), t["labels"][None].astype(np.int64),
                            json.loads(meta["spaces"]), deltas)
    except Exception as e:  # safetensors raises several types for broken files
        raise BundleError(f"{path}: not a saminv codes file ({str(e).splitlines()[0]})") from None


def run_synthesis(run, stages: list[dict], resolution: int, wplus: np.ndarray,
                  deltas: dict[str, np.ndarray] | None = None, masks: dict[str, np.ndarray] | None = None,
                  keep: dict[str, tuple] | None = None, record: dict | None = None, feeds_log: dict | None = None):
    """Chain the synthesis stages of a manifest: the composed image of w+ [N, n_latent, w_dim] (paper Eq. 3-4).

    ``run(name, feeds, output_names)`` runs one stage and returns its outputs (numpy arrays or OrtValues,
    which are fed on unchanged). ``deltas``/``masks``: per space name, delta_f [N, C, r, r] and
    full-resolution masks [N, 1, R, R] (absent spaces get zeros). ``keep``: per space, the (f, rgb) outputs
    of an unedited pass to blend back under the mask (editing); ``record`` receives those values of this
    pass; ``feeds_log`` receives each stage's feeds (for benchmarks). Returns the last stage's image output.
    """
    n = wplus.shape[0]
    deltas, masks, keep = deltas or {}, masks or {}, keep or {}
    f = rgb = None
    for stage in stages:
        a, b = stage["w_rows"]
        feeds = {} if f is None else {"f_in": f, "rgb_in": rgb}
        feeds["w_slice"] = np.ascontiguousarray(wplus[:, a:b])
        space = stage["space"]
        if space is not None:
            c, r = stage["inputs"]["delta"][1], stage["inputs"]["delta"][2]
            zeros_f = np.zeros((n, c, r, r), np.float32)
            feeds["mask"] = masks.get(space, np.zeros((n, 1, resolution, resolution), np.float32))
            feeds["delta"] = deltas.get(space, zeros_f)
            if space in keep:
                feeds["keep"] = np.ones((n, 1, 1, 1), np.float32)
                feeds["f_keep"], feeds["rgb_keep"] = keep[space]
            else:
                feeds.update(keep=np.zeros((n, 1, 1, 1), np.float32), f_keep=zeros_f,
                             rgb_keep=np.zeros((n, 3, r, r), np.float32))
        if feeds_log is not None:
            feeds_log[stage["name"]] = feeds
        if space is None:
            return run(stage["name"], feeds, ["image"])[0]
        f, rgb_blend, rgb = run(stage["name"], feeds, ["f_out", "rgb_blend", "rgb_out"])
        if record is not None:
            record[space] = (f, rgb_blend)
    return rgb


class Runtime:
    """Run a bundle. ``providers``: onnxruntime execution providers, default CPU only (pass e.g.
    ``["CUDAExecutionProvider", "CPUExecutionProvider"]`` when onnxruntime-gpu is installed).
    Raises BundleError for a missing, corrupt or mismatched bundle."""

    def __init__(self, bundle: str | Path | Bundle, providers: Sequence[str] | None = None,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        m = self.bundle.manifest
        self.resolution, self.n_latent, self.w_dim, self.z_dim = m["resolution"], m["n_latent"], m["w_dim"], m["z_dim"]
        self.w_avg = np.asarray(m["w_avg"], dtype=np.float32)
        self.tau = m.get("tau_encoder")  # the runtime inverts with the encoders: their regime's tau
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.device = "cuda" if any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in self.providers) else "cpu"
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # Each stage's session has its own thread pool; spinning pools of idle stages would steal the
        # cores from the running one (measured: 3x slower chains on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {}
        for stage in m["stages"] + m.get("networks", []):
            file = self.bundle.path / stage["file"]
            try:
                session = ort.InferenceSession(str(file), options, providers=self.providers)
            except Exception as e:  # onnxruntime raises its own exception types
                raise BundleError(f"{file}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None
            check_session_io(session, stage, file)
            self.sessions[stage["name"]] = session
        self.directions = self._load_directions()

    # ------------------------------------------------------------------------------------ stages

    def run_stage(self, name: str, feeds: dict, outputs: list[str]) -> list:
        """Run one stage with I/O binding; feeds are numpy arrays or OrtValues; returns OrtValues."""
        session = self.sessions[name]
        binding = session.io_binding()
        for key, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(key, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(key, value)
        for key in outputs:
            binding.bind_output(key, self.device)
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    def mapping(self, z: np.ndarray) -> np.ndarray:
        """z [N, z_dim] float32 -> w [N, w_dim]."""
        return self.run_stage("mapping", {"z": z.astype(np.float32)}, ["w"])[0].numpy()

    def synthesize(self, wplus: np.ndarray, deltas: dict[str, np.ndarray] | None = None,
                   masks: dict[str, np.ndarray] | None = None, keep: dict[str, tuple] | None = None,
                   record: dict | None = None, feeds_log: dict | None = None) -> np.ndarray:
        """The composed image [N, 3, R, R] float32 of w+ [N, n_latent, w_dim] (see :func:`run_synthesis`)."""
        wplus = np.ascontiguousarray(wplus, dtype=np.float32)
        if wplus.shape[1:] != (self.n_latent, self.w_dim):
            raise BundleError(f"w+ has shape {wplus.shape}, this bundle needs (N, {self.n_latent}, {self.w_dim})")
        return run_synthesis(self.run_stage, self.bundle.synthesis_stages, self.resolution, wplus, deltas, masks, keep,
                             record, feeds_log).numpy()

    # ------------------------------------------------------------------------------------ user API

    def generate(self, n: int = 1, seed: int = 0, truncation: float = 1.0) -> np.ndarray:
        """``n`` random samples N x R x R x 3 uint8 (z ~ N(0, I) from numpy's generator with ``seed``)."""
        z = np.random.default_rng(seed).standard_normal((n, self.z_dim)).astype(np.float32)
        w = self.mapping(z)
        w = self.w_avg + truncation * (w - self.w_avg)
        return images_to_uint8(self.synthesize(np.repeat(w[:, None], self.n_latent, axis=1)))

    def _masks(self, codes: RuntimeCodes) -> dict[str, np.ndarray]:
        return {name: (codes.labels == i).astype(np.float32)[:, None] for i, name in enumerate(codes.names)
                if name in codes.deltas}

    def render(self, codes: RuntimeCodes | str | Path) -> np.ndarray:
        """The reconstruction of SAM codes: N x R x R x 3 uint8."""
        codes = codes if isinstance(codes, RuntimeCodes) else load_codes(codes)
        return images_to_uint8(self.synthesize(codes.wplus, codes.deltas, self._masks(codes)))

    def _load_directions(self) -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
        entries = self.bundle.manifest.get("directions", [])
        if not entries:
            return {}
        arrays = np.load(self.bundle.path / "directions.npz", allow_pickle=False)
        return {e["name"]: (arrays[e["key"]].astype(np.float32), tuple(e["layers"])) for e in entries}

    def direction_offset(self, direction: str | np.ndarray, strength: float,
                         layers: tuple[int, int] | None = None) -> np.ndarray:
        """The w+ offset [n_latent, w_dim] of ``direction`` (a name in the bundle or an array
        (n_latent, w_dim) / (w_dim,)) at ``strength`` on its layers (or ``layers``)."""
        if isinstance(direction, str):
            if direction not in self.directions:
                raise BundleError(f"unknown direction {direction!r}; this bundle has {', '.join(self.directions) or 'none'}")
            vector, own = self.directions[direction]
        else:
            vector, own = np.asarray(direction, dtype=np.float32), (0, self.n_latent - 1)
            if vector.shape == (self.w_dim,):
                vector = np.repeat(vector[None], self.n_latent, axis=0)
            if vector.shape != (self.n_latent, self.w_dim):
                raise BundleError(f"direction has shape {vector.shape}; expected ({self.n_latent}, {self.w_dim}) or ({self.w_dim},)")
        first, last = layers or own
        if not 0 <= first <= last < self.n_latent:
            raise BundleError(f"layers {first}-{last} out of range 0-{self.n_latent - 1}")
        offset = np.zeros_like(vector)
        offset[first:last + 1] = strength * vector[first:last + 1]
        return offset

    def edit(self, codes: RuntimeCodes | str | Path, direction: str | np.ndarray, strength: float | Sequence[float],
             layers: tuple[int, int] | None = None) -> np.ndarray:
        """Edit SAM codes of one image by the per-layer rule (paper Sec. 3.4; same rule as
        :mod:`saminv.editing.edit`): R x R x 3 uint8, or S x R x R x 3 for a sequence of strengths."""
        codes = codes if isinstance(codes, RuntimeCodes) else load_codes(codes)
        masks = self._masks(codes)
        unedited: dict = {}
        self.synthesize(codes.wplus, codes.deltas, masks, record=unedited)
        keep = {space: unedited[space] for space in masks}
        values = [strength] if np.isscalar(strength) else list(strength)
        images = [images_to_uint8(self.synthesize(codes.wplus + self.direction_offset(direction, float(s), layers),
                                           codes.deltas, masks, keep=keep))[0] for s in values]
        return images[0] if np.isscalar(strength) else np.stack(images)

    def require_inversion_networks(self) -> None:
        """Raise BundleError unless the bundle carries the encoder predictor, the W+ encoder, LPIPS and tau_encoder."""
        missing = [n for n in ("encoder_predictor", "encoder_wplus", "lpips_spatial") if n not in self.sessions]
        if missing:
            raise BundleError(f"{self.bundle.path}: this bundle has no {' or '.join(missing)}; export a model "
                              "trained with them (saminv train encoder; saminv train invertibility-data --regime encoder, "
                              "then saminv train predictor)")
        if self.tau is None:
            raise BundleError(f"{self.bundle.path}: the manifest has no tau_encoder; calibrate the model "
                              "(saminv calibrate --regime encoder) and export it again")

    def invert(self, image: str | Path | Image.Image | np.ndarray) -> RuntimeInversion:
        """Feed-forward SAM inversion of one image (a path, a PIL image or an H x W x 3 uint8 array;
        centre-cropped and resized to the bundle's resolution): the W+ encoder, its reconstruction (and F_k
        features) and that reconstruction's LPIPS error, the encoder predictor's invertibility maps anchored
        to it, the layer map by segments and tau (``self.tau``, the manifest's tau_encoder), the Δf
        encoders of the spaces in use, and the composed image (paper Eq. 3-4). Raises BundleError when
        the bundle has no predictor or encoders, InputError for an unreadable image."""
        self.require_inversion_networks()
        pixels = load_image(image, self.resolution) if isinstance(image, (str, Path)) else \
            resize_square(image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)), self.resolution)
        x = to_tensor_range(pixels)
        names = [s["name"] for s in self.bundle.manifest["spaces"]]
        wplus = self.run_stage("encoder_wplus", {"image": x}, ["wplus"])[0].numpy()
        features: dict = {}
        reconstruction = self.synthesize(wplus, record=features)
        maps = self.run_stage("encoder_predictor", {"image": x}, ["maps"])[0].numpy()[0]
        measured_wplus = self.run_stage("lpips_spatial", {"image": x, "reconstruction": reconstruction},
                                        ["error"])[0].numpy()[0, 0] if names[0] == "W+" else None
        labels = layer_map(maps, pixels, self.tau, measured_wplus=measured_wplus)
        masks = {name: (labels == i).astype(np.float32)[None, None] for i, name in enumerate(names)
                 if name != "W+" and (labels == i).any()}
        deltas = {name: self.run_stage(f"encoder_{name}", {"image": x, "reconstruction": reconstruction,
                                                          "features": features[name][0]}, ["delta"])[0].numpy()
                  for name in masks}
        codes = RuntimeCodes(wplus, labels[None], names, deltas)
        return RuntimeInversion(images_to_uint8(self.synthesize(wplus, deltas, masks))[0], codes, maps)
