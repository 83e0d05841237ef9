"""The direction library of a model: named latent directions, each with the w+ layers it moves.

A :class:`Direction` is a vector per W+ layer, ``vector`` [n_latent, w_dim] float32, applied to the
layers ``first..last`` (inclusive) only: the edit of strength ``s`` is ``w+ + s * vector`` there.
Directions found in W are broadcast to every layer. Sources:

* ``ganspace:K``  principal component K of mapped w (GANSpace, Härkönen et al. 2020);
* ``sefa:K``      eigenvector K of A^T A, A the row-normalised modulation (affine) weights of the
                  convolutions of the chosen layers (SeFa, Shen & Zhou 2021, Eq. 5);
* a boundary      the normal of a linear SVM separating labelled w (InterFaceGAN, Shen et al. 2020);
* a pair          the w+ difference of two inverted images over chosen layers (PadInv's customised edits);
* an array        a user's ``.npy`` of shape (n_latent, w_dim) or (w_dim,).

GANSpace, SeFa and boundary directions are scaled so that strength 1 moves w by one standard
deviation of the mapped w along the direction; pair and array directions are used as given.

The library is ``directions.safetensors`` in the model directory: one tensor per name, and in its
metadata the layers and source of each. ``ganspace:K`` and ``sefa:K`` that are not stored are
computed on the fly (deterministically, all layers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from saminv.errors import InputError
from saminv.imageio import atomic_write, load_array
from saminv.models.model_dir import Model
from saminv.models.stylegan2 import Generator

LIBRARY_FILE = "directions.safetensors"
SAMPLES = 10_000  # mapped w used by GANSpace and for the strength scale
COMPUTED_PREFIXES = ("ganspace", "sefa")


@dataclass(frozen=True)
class Direction:
    """A named edit: ``vector`` [n_latent, w_dim] float32 moving w+ layers ``layers`` (inclusive)."""

    name: str
    vector: Tensor
    layers: tuple[int, int]
    source: str

    def offset(self, strength: float) -> Tensor:
        """The w+ offset [n_latent, w_dim] of an edit of ``strength``: zero outside ``layers``."""
        first, last = self.layers
        out = torch.zeros_like(self.vector)
        out[first:last + 1] = strength * self.vector[first:last + 1]
        return out

    def with_layers(self, layers: tuple[int, int] | None) -> "Direction":
        """This direction on the inclusive w+ layer range ``layers`` (None: keep its own).

        Raises InputError when the range is empty or outside the model's w+ rows.
        """
        return self if layers is None else replace(self, layers=check_layers(layers, self.vector.shape[0]))


def check_layers(layers: tuple[int, int], n_latent: int) -> tuple[int, int]:
    """Validate an inclusive layer range of w+; raises InputError when it is empty or out of range."""
    first, last = layers
    if not 0 <= first <= last < n_latent:
        raise InputError(f"layers {first}-{last} out of range: this model's w+ has layers 0-{n_latent - 1}")
    return int(first), int(last)


def parse_layers(text: str | None, n_latent: int) -> tuple[int, int] | None:
    """"3-5" -> (3, 5); "4" -> (4, 4); None -> None. Raises InputError for anything else."""
    if text is None:
        return None
    parts = text.split("-")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise InputError(f"--layers {text!r}: expected i-j or i (w+ layer indices 0-{n_latent - 1})")
    return check_layers((int(parts[0]), int(parts[-1])), n_latent)


def _broadcast(unit: Tensor, n_latent: int) -> Tensor:
    return unit.float().view(1, -1).repeat(n_latent, 1).contiguous()


@torch.no_grad()
def mapped_w(G: Generator, n: int = SAMPLES, seed: int = 0) -> Tensor:
    """``n`` mapped samples w [n, w_dim] float32 (z ~ N(0, I) with a fixed seed, no truncation)."""
    z = torch.randn(n, G.cfg.z_dim, generator=torch.Generator().manual_seed(seed))
    return torch.cat([G.mapping(z[i:i + 2000].to(G.mapping.w_avg.device)).cpu() for i in range(0, n, 2000)])


def _sigma_scaled(units: Tensor, w: Tensor) -> Tensor:
    """Scale unit directions [K, D] by the std of w [n, D] projected on each."""
    return units * (w @ units.t()).std(dim=0).view(-1, 1)


def ganspace(G: Generator, num: int, samples: int = SAMPLES, seed: int = 0) -> list[Direction]:
    """The top ``num`` principal components of mapped w (GANSpace), one standard deviation long."""
    from sklearn.decomposition import PCA

    w = mapped_w(G, samples, seed)
    num = min(num, G.cfg.w_dim)
    pca = PCA(n_components=num, svd_solver="full").fit(w.double().numpy())
    units = torch.from_numpy(pca.components_).float()
    vectors = units * torch.from_numpy(np.sqrt(pca.explained_variance_)).float().view(-1, 1)
    last = G.cfg.n_latent - 1
    return [Direction(f"ganspace:{i}", _broadcast(v, G.cfg.n_latent), (0, last),
                      f"GANSpace PCA of {samples} mapped w (seed {seed}), component {i}") for i, v in enumerate(vectors)]


def conv_affines(G: Generator, layers: tuple[int, int]) -> list[Tensor]:
    """The effective modulation weights [in_ch, w_dim] of the convolutions driven by w+ layers ``layers``."""
    first, last = layers
    out = []
    for block in G.synthesis.blocks:
        k = 2 * block.index
        for index, conv in ((k - 1, block.conv0), (k, block.conv1)):
            if conv is not None and first <= index <= last:
                affine = conv.conv.affine
                out.append(affine.weight * affine.scale)
    return out


def sefa(G: Generator, num: int, layers: tuple[int, int] | None = None, samples: int = SAMPLES) -> list[Direction]:
    """Closed-form factorization (SeFa): top ``num`` eigenvectors of A^T A, A the stacked, row-normalised
    modulation weights of the convolutions of ``layers`` (default all). The directions apply to those
    layers and are scaled to one standard deviation of mapped w."""
    layers = check_layers(layers or (0, G.cfg.n_latent - 1), G.cfg.n_latent)
    with torch.no_grad():
        a = torch.cat(conv_affines(G, layers)).double().cpu()
        if a.numel() == 0:
            raise InputError(f"layers {layers[0]}-{layers[1]} drive no convolution")
        a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
        eigvals, eigvecs = torch.linalg.eigh(a.t() @ a)
        units = eigvecs[:, torch.argsort(eigvals, descending=True)[:num]].t()
        units = units * torch.sign(units[torch.arange(len(units)), units.abs().argmax(dim=1)]).view(-1, 1)
        vectors = _sigma_scaled(units.float(), mapped_w(G, samples))
    return [Direction(f"sefa:{i}", _broadcast(v, G.cfg.n_latent), layers,
                      f"SeFa eigenvector {i} of the conv modulation weights of layers {layers[0]}-{layers[1]}")
            for i, v in enumerate(vectors)]


def boundary(G: Generator, w: np.ndarray, labels: np.ndarray, name: str,
             layers: tuple[int, int] | None = None) -> Direction:
    """InterFaceGAN boundary: the unit normal of a linear SVM separating w [N, w_dim] by binary
    ``labels`` [N] (pointing toward label 1), one standard deviation of mapped w long.
    Raises InputError for mismatched shapes or labels that are not two classes."""
    from sklearn.svm import LinearSVC

    w = np.asarray(w, dtype=np.float64)
    labels = np.asarray(labels).ravel()
    if w.ndim != 2 or w.shape[1] != G.cfg.w_dim or len(w) != len(labels):
        raise InputError(f"boundary needs latents (N, {G.cfg.w_dim}) and N labels, got {w.shape} and {labels.shape}")
    classes = np.unique(labels)
    if len(classes) != 2:
        raise InputError(f"boundary needs exactly two label values, got {len(classes)}")
    svm = LinearSVC(C=1.0, max_iter=10_000).fit(w, labels == classes[1])
    unit = torch.from_numpy(svm.coef_[0] / np.linalg.norm(svm.coef_[0])).float().view(1, -1)
    vector = _sigma_scaled(unit, mapped_w(G))[0]
    return Direction(name, _broadcast(vector, G.cfg.n_latent), layers or (0, G.cfg.n_latent - 1),
                     f"linear SVM boundary on {len(w)} labelled latents")


def pair(wplus_from: Tensor, wplus_to: Tensor, name: str, layers: tuple[int, int] | None = None) -> Direction:
    """Custom edit from an image pair: w+ (to) - w+ (from), both [n_latent, w_dim] (or [1, n_latent, w_dim])."""
    a, b = wplus_from.detach().cpu().reshape(-1, wplus_from.shape[-1]), wplus_to.detach().cpu().reshape(-1, wplus_to.shape[-1])
    assert a.shape == b.shape, (a.shape, b.shape)
    return Direction(name, (b - a).float().contiguous(), layers or (0, a.shape[0] - 1), "difference of two inversions")


def from_array(array: np.ndarray, name: str, G: Generator, layers: tuple[int, int] | None = None,
               source: str = "user array") -> Direction:
    """A user's direction: (n_latent, w_dim) per layer or (w_dim,) for all. Raises InputError on other shapes."""
    n, d = G.cfg.n_latent, G.cfg.w_dim
    array = np.asarray(array)
    if array.shape == (d,) or array.shape == (1, d):
        vector = _broadcast(torch.from_numpy(array.astype(np.float32)).view(-1), n)
    elif array.shape == (n, d):
        vector = torch.from_numpy(array.astype(np.float32)).contiguous()
    else:
        raise InputError(f"direction {name!r} has shape {array.shape}; expected ({n}, {d}) or ({d},)")
    if not torch.isfinite(vector).all():
        raise InputError(f"direction {name!r} holds NaN or infinite values")
    return Direction(name, vector, check_layers(layers or (0, n - 1), n), source)


# ------------------------------------------------------------------------------------------ library

def load_library(model_dir: Path) -> dict[str, Direction]:
    """The directions stored in ``model_dir`` (empty when it has none). Raises InputError if the file is broken."""
    path = Path(model_dir) / LIBRARY_FILE
    if not path.is_file():
        return {}
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("directions", "{}"))
        return {name: Direction(name, tensors[name], tuple(meta[name]["layers"]), meta[name]["source"])
                for name in tensors}
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise InputError(f"{path}: broken direction library ({str(e).splitlines()[0]})") from None


def save_directions(model_dir: Path, directions: list[Direction]) -> Path:
    """Add (or replace) ``directions`` in the library of ``model_dir``, atomically. Raises InputError when
    the directory is not writable."""
    library = load_library(model_dir)
    library.update({d.name: d for d in directions})
    tensors = {name: d.vector.detach().cpu().float().contiguous() for name, d in library.items()}
    meta = {name: {"layers": list(d.layers), "source": d.source} for name, d in library.items()}
    path = Path(model_dir) / LIBRARY_FILE
    try:
        atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"directions": json.dumps(meta)}))
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e} (copy the model directory and pass it as --model)") from None
    return path


def resolve(model: Model, spec: str, layers: tuple[int, int] | None = None) -> Direction:
    """The direction named ``spec``: a name in the model's library, ``ganspace:K`` / ``sefa:K`` (computed
    when not stored) or a path to a ``.npy``. ``layers`` overrides the direction's own layers.
    Raises InputError for unknown names, unreadable files, wrong shapes or layers out of range."""
    G = model.generator
    library = load_library(model.path) if model.path is not None else {}
    if spec in library:
        direction = library[spec]
        if direction.vector.shape != (G.cfg.n_latent, G.cfg.w_dim):
            raise InputError(f"stored direction {spec!r} has shape {tuple(direction.vector.shape)}, "
                             f"not ({G.cfg.n_latent}, {G.cfg.w_dim}) of this model")
    elif spec.endswith(".npy"):
        direction = from_array(load_array(spec), Path(spec).stem, G, source=f"user array {spec}")
    else:
        prefix, _, index = spec.partition(":")
        if prefix not in COMPUTED_PREFIXES or not index.isdigit():
            known = ", ".join(sorted(library)) or "none stored"
            raise InputError(f"unknown direction {spec!r}: use ganspace:K, sefa:K, a .npy file, or a stored name ({known})")
        k = int(index)
        if k >= G.cfg.w_dim:
            raise InputError(f"{spec}: K must be < {G.cfg.w_dim}")
        direction = (ganspace(G, k + 1) if prefix == "ganspace" else sefa(G, k + 1))[k]
    return direction.with_layers(layers)
