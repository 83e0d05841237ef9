"""Training data for the invertibility predictors (SAM paper Sec. 3.2): images whose invertibility varies
across each image, inverted in every latent space, with the LPIPS spatial error maps e_l (Eq. 1).

Each data set belongs to one inversion regime (``DataConfig.regime``): ``optimization`` inverts with
single-space optimizations (``steps`` each, all spaces of a shard in one batch; minutes per shard on a
CPU), ``encoder`` with the model's trained encoders (one pass per space; seconds per shard). The
predictor trained on it (``saminv train predictor``) is that regime's (``predictor`` or
``encoder_predictor``). Encoder data must be remade whenever the encoders change.

No large photo collection exists offline, so the default data set (``DataConfig.source`` ``pool``)
draws from four sources, picked by item index:

* ``teacher``    samples of the DCGAN face teacher (the data faces64 was distilled from);
* ``generated``  samples of the model itself (well invertible in W+);
* ``photo``      random crops of real photos shipped by scikit-image, scikit-learn and Debian opencv-doc,
                 with flips and colour jitter;
* ``composite``  a teacher face (soft elliptical mask, random scale and place) pasted on a real-photo crop.

A data set may instead hold one fixed set of square photos (:class:`PhotoSetSource`): ``validation-faces``,
the 36 real face crops of ``make faces`` (:func:`saminv.photos.validation_faces`; sharp real faces, which
the pool lacks), ``nonface-patches``, lfw_subset's 90 training non-face patches
(:func:`saminv.photos.training_nonface_patches`; near-uniform 25 px backgrounds, whose F6 and F8 optimizations
often end above their F4 error), or ``images``, the user's ``--images`` alone. ``saminv train predictor``
can train on several data sets at once.

The held-out real photos (:func:`saminv.photos.held_out_photos`: the astronaut, six opencv-doc photos,
the 16 registry faces and lfw_subset's non-face patches 100-109) never enter training; they are the test
set of the predictor and encoders. All 100 LFW faces (lfw_subset 0-99) are in the training pool. Every
item is a pure function of (its index, the seed), so shards can be generated in any order, by any number
of processes, and resumed.

Shards ``shard_<k>.npz`` hold ``images`` uint8 [B, R, R, 3], ``reconstructions`` uint8 [B, S, R, R, 3],
``errors`` float16 [B, S, R, R] (LPIPS spatial maps), ``wplus`` float16 [B, n_latent, w_dim] (the W+
inversion), ``sources`` [B] str, and ``spaces`` [S] str; ``info.json`` records the settings.

A measured map is noisy: the same photo mirrored left-right, inverted again and its map mirrored back, gives
a visibly different map. With ``DataConfig.mirror`` each shard also holds ``errors_mirrored`` float16
[B, S, R, R], that second measurement, and the predictor trains on the mean of the two
(:func:`saminv.training.predictor.load_shards`). Turning ``mirror`` on for an existing data set adds the
second measurement to its shards and leaves everything else in them as it was.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from saminv.imageio import atomic_write, from_tensor_range, resize_square, save_json
from saminv.inversion.feedforward import encode_each_space
from saminv.inversion.optimize import InversionConfig
from saminv.inversion.sam import invert_spaces
from saminv.models.lpips import LPIPS
from saminv.models.model_dir import Model
from saminv.photos import (HELD_OUT_OPENCV, LFW_FACES, OPENCV_DATA, lfw_items, training_nonface_patches,
                           validation_faces)

SOURCES = ("teacher", "generated", "photo", "composite")
PHOTO_SETS = ("pool", "validation-faces", "nonface-patches", "images")  # DataConfig.source: the pool or a photo set
PHOTO_LOAD_SCALE = 4  # --images files load at this many times the model's resolution, so crops keep detail
SKIMAGE_TRAIN = ("brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass", "gravel",
                 "horse", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina", "rocket", "text")


@dataclass
class DataConfig:
    """Settings of an invertibility data set (recorded in info.json)."""

    count: int = 1024
    shard_size: int = 8
    steps: int = 100  # optimization steps per single-space inversion (optimization regime)
    seed: int = 0
    regime: str = "optimization"  # or "encoder" (the model's encoders invert)
    source: str = "pool"  # one of PHOTO_SETS
    mirror: bool = False  # also measure each image mirrored left-right (errors_mirrored)


def training_photos(extra: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """The real photos training may crop from (H x W x 3 uint8), none held out; ``extra``
    (the user's ``--images``) are added."""
    import skimage.data

    photos = []
    for name in SKIMAGE_TRAIN:
        try:
            img = np.asarray(getattr(skimage.data, name)())
        except Exception:  # some skimage images need a download; use what ships
            continue
        img = img.astype(np.uint8) * 255 if img.dtype == bool else img.astype(np.uint8)
        photos.append(np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img[:, :, :3])
    from sklearn.datasets import load_sample_images

    photos += list(load_sample_images().images)
    if OPENCV_DATA.is_dir():
        for path in sorted(OPENCV_DATA.glob("*.jpg")) + sorted(OPENCV_DATA.glob("*.png")):
            if path.name in HELD_OUT_OPENCV:
                continue
            img = Image.open(path)
            if min(img.size) >= 128:
                photos.append(np.asarray(img.convert("RGB")))
    return photos + lfw_items(range(LFW_FACES)) + list(extra or [])


def _crop(rng: np.random.Generator, photo: np.ndarray, resolution: int) -> Image.Image:
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(0.3, 1.0))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    img = Image.fromarray(photo[y:y + side, x:x + side]).resize((resolution, resolution), Image.Resampling.LANCZOS)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def _jitter(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    x = img.astype(np.float32)
    x = (x - x.mean()) * rng.uniform(0.8, 1.2) + x.mean() * rng.uniform(0.8, 1.2)  # contrast, brightness
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * rng.uniform(0.7, 1.3)  # saturation
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


class ImageSource:
    """Deterministic training images: ``image(i)`` -> (R x R x 3 uint8, source name)."""

    def __init__(self, model: Model, seed: int = 0, extra_photos: list[np.ndarray] | None = None) -> None:
        from saminv.training.teacher import load_teacher

        self.model, self.seed = model, seed
        self.resolution = model.generator.cfg.resolution
        self.teacher = load_teacher()
        self.photos = training_photos(extra_photos)

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, i])

    @torch.no_grad()
    def _teacher_face(self, rng: np.random.Generator) -> np.ndarray:
        z = torch.from_numpy(rng.standard_normal((1, 100)).astype(np.float32)).view(1, 100, 1, 1)
        img = from_tensor_range(self.teacher(z)[0].numpy())
        return resize_square(img, self.resolution)

    @torch.no_grad()
    def _generated(self, rng: np.random.Generator) -> np.ndarray:
        G = self.model.generator
        z = torch.from_numpy(rng.standard_normal((1, G.cfg.z_dim)).astype(np.float32))
        return from_tensor_range(G(z, truncation=float(rng.uniform(0.5, 1.0)))[0].numpy())

    def image(self, i: int) -> tuple[np.ndarray, str]:
        """Training image number ``i``: uint8 [R, R, 3] and its source, ``SOURCES[i % 4]``: a DCGAN teacher
        face, a model sample (truncation 0.5-1), a random crop of a training photo, or a teacher face
        pasted over such a crop; crops and composites get flips and colour jitter. The same ``(seed, i)``
        always gives the same image."""
        rng = self._rng(i)
        source = SOURCES[i % len(SOURCES)]
        r = self.resolution
        if source == "teacher":
            img = self._teacher_face(rng)
        elif source == "generated":
            img = self._generated(rng)
        elif source == "photo":
            img = np.asarray(_crop(rng, self.photos[rng.integers(len(self.photos))], r))
        else:
            background = _crop(rng, self.photos[rng.integers(len(self.photos))], r)
            size = int(r * rng.uniform(0.45, 0.85))
            face = Image.fromarray(self._teacher_face(rng)).resize((size, size), Image.Resampling.LANCZOS)
            mask = Image.new("L", (size, size), 0)
            ImageDraw.Draw(mask).ellipse((size * 0.12, size * 0.05, size * 0.88, size * 0.98), fill=255)
            mask = mask.filter(ImageFilter.GaussianBlur(size / 24))
            background.paste(face, (int(rng.integers(0, r - size + 1)), int(rng.integers(0, r - size + 1))), mask)
            img = np.asarray(background)
        return _jitter(rng, img) if source in ("photo", "composite") else img, source


class PhotoSetSource:
    """Training images from one fixed set of square H x H x 3 uint8 ``photos``: ``image(i)`` -> (R x R x 3
    uint8, ``name``). Item i < n (n photos) is photo i whole, resized; item n + j is crop j: photo
    (3j + floor(3j / n)) mod n (a stride of 3 spreads neighbouring crops over different source pictures,
    shifted by one each lap), 75-92 % of its side at a random place, mirrored for odd j. The crops' draws come
    in sequence from ``default_rng(seed)`` and are replayed up to j, so every item is a pure function of
    (i, seed) and the set may grow."""

    def __init__(self, model: Model, photos: list[np.ndarray], name: str, seed: int = 0) -> None:
        self.model, self.photos, self.name, self.seed = model, photos, name, seed
        self.resolution = model.generator.cfg.resolution

    def image(self, i: int) -> tuple[np.ndarray, str]:
        n = len(self.photos)
        if i < n:
            return resize_square(self.photos[i], self.resolution), self.name
        rng = np.random.default_rng(self.seed)
        for j in range(i - n + 1):
            photo = self.photos[(3 * j + 3 * j // n) % n]
            side = int(photo.shape[0] * rng.uniform(0.75, 0.92))
            y, x = rng.integers(0, photo.shape[0] - side + 1, 2)
        img = resize_square(photo[y:y + side, x:x + side], self.resolution)
        return (img[:, ::-1].copy() if j % 2 else img), self.name


def image_source(model: Model, cfg: DataConfig, extra_photos: list[np.ndarray] | None) -> ImageSource | PhotoSetSource:
    """The images of a data set of ``cfg.source``. Raises ValueError for an unknown source, ``images``
    without photos, or ``validation-faces`` or ``nonface-patches`` with photos; InputError for
    ``validation-faces`` before ``make faces``."""
    if cfg.source not in PHOTO_SETS:
        raise ValueError(f"--source must be one of {', '.join(PHOTO_SETS)}, got {cfg.source!r}")
    if cfg.source == "pool":
        return ImageSource(model, cfg.seed, extra_photos)
    if cfg.source == "images":
        if not extra_photos:
            raise ValueError("--source images needs --images (your photos)")
        return PhotoSetSource(model, list(extra_photos), "image", cfg.seed)
    if extra_photos:
        raise ValueError(f"--images joins the pool or forms the images set, not the {cfg.source} set")
    if cfg.source == "validation-faces":
        return PhotoSetSource(model, validation_faces(), "validation-face", cfg.seed)
    # nonface-patches, each patch upscaled as an --images file is (to PHOTO_LOAD_SCALE x R, then to R)
    side = PHOTO_LOAD_SCALE * model.generator.cfg.resolution
    patches = [resize_square(p, side) for p in training_nonface_patches()]
    return PhotoSetSource(model, patches, "nonface-patch", cfg.seed)


def shard_indices(cfg: DataConfig, rank: int, world: int) -> list[int]:
    """The shard numbers this process (``rank`` of ``world``) generates: every world-th one."""
    n_shards = -(-cfg.count // cfg.shard_size)
    return [k for k in range(n_shards) if k % world == rank]


def measure(model: Model, lpips: LPIPS, images: np.ndarray, k: int, cfg: DataConfig,
            names: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Invert ``images`` uint8 [B, R, R, 3] (shard ``k``) in every space of ``names`` (S), as ``cfg.regime``
    says, in one batch. Returns the W+ codes float32 [B, n_latent, w_dim], the renders float32
    [S, B, 3, R, R] in [-1, 1] and the LPIPS spatial error maps float32 [B, S, R, R] (SAM Eq. 1)."""
    target = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    if cfg.regime == "encoder":
        return encode_each_space(model, lpips, target, names)
    torch.manual_seed(cfg.seed * 100_003 + k)
    inv = invert_spaces(model, lpips, target, names, InversionConfig(steps=cfg.steps))
    wplus = inv.codes.wplus.view(len(names), len(images), *inv.codes.wplus.shape[1:])[names.index("W+")]
    return wplus, inv.images, inv.error_maps.permute(1, 0, 2, 3)


def mirrored_errors(model: Model, lpips: LPIPS, images: np.ndarray, k: int, cfg: DataConfig,
                    names: list[str]) -> np.ndarray:
    """The error maps of ``images`` uint8 [B, R, R, 3] measured on their left-right mirror images and
    mirrored back onto them: float16 [B, S, R, R] (the second measurement of ``DataConfig.mirror``)."""
    _, _, errors = measure(model, lpips, np.ascontiguousarray(images[:, :, ::-1]), k, cfg, names)
    return errors.flip(-1).numpy().astype(np.float16)


def generate_shard(source: ImageSource | PhotoSetSource, lpips: LPIPS, k: int, cfg: DataConfig, names: list[str]) -> dict:
    """Invert the images of shard ``k`` in every space (one batch) and return the arrays of the shard."""
    model = source.model
    start, stop = k * cfg.shard_size, min((k + 1) * cfg.shard_size, cfg.count)
    items = [source.image(i) for i in range(start, stop)]
    images = np.stack([img for img, _ in items])
    wplus, renders, errors = measure(model, lpips, images, k, cfg, names)
    recon = np.stack([[from_tensor_range(renders[s, b].numpy()) for s in range(len(names))]
                      for b in range(len(items))])
    return {"images": images, "reconstructions": recon,
            "errors": errors.numpy().astype(np.float16),
            "wplus": wplus.numpy().astype(np.float16), "sources": np.array([s for _, s in items]),
            "spaces": np.array(names)}


def shard_path(directory: Path, k: int) -> Path:
    """The file of shard ``k`` of the data set in ``directory``."""
    return Path(directory) / f"shard_{k:05d}.npz"


def needs_work(path: Path, cfg: DataConfig) -> bool:
    """Whether shard ``path`` is missing, or lacks the second measurement that ``cfg.mirror`` asks for."""
    if not path.is_file():
        return True
    if not cfg.mirror:
        return False
    with np.load(path) as shard:
        return "errors_mirrored" not in shard.files


def recorded_config(directory: Path) -> DataConfig | None:
    """The settings that the data set in ``directory`` records in its ``info.json``, or None when it has none
    (data sets older than info.json). Settings older data sets lack take :class:`DataConfig`'s defaults."""
    info = Path(directory) / "info.json"
    if not info.is_file():
        return None
    recorded = json.loads(info.read_text())
    return DataConfig(**{f.name: recorded[f.name] for f in fields(DataConfig) if f.name in recorded})


def unfinished_shards(directory: Path) -> list[str]:
    """The file names of the shards that the data set in ``directory`` asks for (its ``info.json``: count, shard
    size, mirror) but lacks, or holds without their second measurement: empty when it is finished or has no
    info.json. Such a data set is still being made, or its making stopped; the command that made it resumes it."""
    cfg = recorded_config(directory)
    if cfg is None:
        return []
    return [shard_path(directory, k).name for k in shard_indices(cfg, 0, 1) if needs_work(shard_path(directory, k), cfg)]


def generate_dataset(model: Model, out: Path, cfg: DataConfig, rank: int = 0, world: int = 1,
                     extra_photos: list[np.ndarray] | None = None, progress: bool = True) -> list[Path]:
    """Write this process's missing shards into ``out`` (resumable), and with ``cfg.mirror`` add the second
    measurement to its shards that lack it. Returns the shards it wrote.

    Raises ValueError when ``out`` holds a data set made with other settings, one with mirrored measurements
    while ``cfg.mirror`` is off, or for a bad ``cfg.source`` (:func:`image_source`); InputError for
    ``validation-faces`` before ``make faces``."""
    if cfg.regime == "encoder":
        model.network("encoders")  # raises InputError before any work when the model has none
    source = image_source(model, cfg, extra_photos)  # bad settings fail before anything is written
    out.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in model.generator.spaces]
    info = {"model": model.name, "spaces": names, "extra_photos": len(extra_photos or []), **asdict(cfg)}
    info_path = out / "info.json"
    grows = ("count", "mirror")  # a data set may grow (--count, --mirror), but items must be made the same way
    existing = {"regime": "optimization", "source": "pool", "mirror": False,
                **(json.loads(info_path.read_text()) if info_path.is_file() else info)}
    if {k: v for k, v in existing.items() if k not in grows} != {k: v for k, v in info.items() if k not in grows}:
        raise ValueError(f"{out} holds a data set with other settings ({existing}); use another --out")
    if existing["mirror"] and not cfg.mirror:
        raise ValueError(f"{out} holds mirrored measurements: pass --mirror to add to it")
    if rank == 0 and (not info_path.is_file() or existing["count"] < cfg.count or existing["mirror"] != cfg.mirror):
        save_json(info_path, {**info, "count": max(cfg.count, existing["count"])})
    todo = [k for k in shard_indices(cfg, rank, world) if needs_work(shard_path(out, k), cfg)]
    if not todo:
        return []
    lpips = LPIPS()
    written = []
    for k in tqdm(todo, desc=f"invertibility shards (rank {rank}/{world})", unit="shard", disable=not progress):
        path = shard_path(out, k)
        if not needs_work(path, cfg):  # another process made it meanwhile
            continue
        if path.is_file():  # an existing shard, which lacks only its second measurement
            with np.load(path) as shard:
                arrays = {name: shard[name] for name in shard.files}
        else:
            arrays = generate_shard(source, lpips, k, cfg, names)
        if cfg.mirror:
            arrays["errors_mirrored"] = mirrored_errors(source.model, lpips, arrays["images"], k, cfg, names)
        atomic_write(path, lambda p: np.savez(p, **arrays))
        written.append(path)
    return written
