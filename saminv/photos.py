"""Real face photos that ship with installed packages (no downloads), cropped to the face.

* ``astronaut``: scikit-image's portrait of Eileen Collins (NASA), 512 x 512 RGB, face crop 220 px;
* ``lfw-<i>``: scikit-image's ``lfw_subset`` (Labeled Faces in the Wild), 25 x 25 grayscale face crops,
  i = 0..99 (as RGB; upscaled by the preprocessing). Its items 100-199 are *not* faces but background
  patches of the same photos (mostly near-uniform); :func:`held_out_photos` names them ``lfw-nonface-<i>``;
* ``messi``: Debian ``opencv-doc`` ``messi5.jpg`` face crop, when that package is installed.

:func:`validation_photos` are other real photos of scikit-image (no faces, none of the above), two
square crops each, for calibrating a model's tau on content it was not trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from saminv.errors import InputError

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
LFW_FACES = 100  # lfw_subset items 0-99 are faces, 100-199 non-face background patches


def _astronaut() -> np.ndarray:
    from skimage.data import astronaut

    return astronaut()[10:230, 118:338]


def _lfw(i: int) -> np.ndarray:
    """Item i of scikit-image's lfw_subset (a face for i < LFW_FACES) as 25 x 25 x 3 uint8."""
    from skimage.data import lfw_subset

    face = (lfw_subset()[i] * 255).round().astype(np.uint8)
    return np.repeat(face[:, :, None], 3, axis=2)


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


HELD_OUT_OPENCV = {"messi5.jpg": "messi", "butterfly.jpg": "butterfly", "squirrel_cls.jpg": "squirrel",
                   "HappyFish.jpg": "fish", "smarties.png": "smarties", "lena.jpg": "lena"}
HELD_OUT_LFW = range(LFW_FACES, 2 * LFW_FACES)  # the non-face patches; every LFW face is in the training pool
NONFACE_PREFIX = "lfw-nonface-"


def held_out_photos(nonface_patches: int = len(HELD_OUT_LFW)) -> list[tuple[str, np.ndarray]]:
    """The real photos no training step sees, as (name, H x W x 3 uint8): the astronaut and messi face
    crops, the other held-out opencv-doc photos (when installed; whole images) and the first
    ``nonface_patches`` of lfw_subset's non-face background patches (items 100-199, named
    ``lfw-nonface-<i>``; 25 x 25, mostly near-uniform). The predictor and encoder evaluations run on these."""
    from PIL import Image

    photos = [("astronaut", _astronaut())]
    for file, name in HELD_OUT_OPENCV.items():
        if (OPENCV_DATA / file).is_file():
            photos.append((name, _messi() if name == "messi" else np.asarray(Image.open(OPENCV_DATA / file).convert("RGB"))))
    return photos + [(f"{NONFACE_PREFIX}{i}", _lfw(i)) for i in list(HELD_OUT_LFW)[:nonface_patches]]


def face_photo(name: str) -> np.ndarray:
    """The named face crop as an H x W x 3 uint8 RGB array; raises InputError for an unknown name."""
    if name == "astronaut":
        return _astronaut()
    if name == "messi":
        return _messi()
    if name.startswith("lfw-") and name[4:].isdigit() and int(name[4:]) < LFW_FACES:
        return _lfw(int(name[4:]))
    raise InputError(f"unknown photo {name!r}: astronaut, messi or lfw-0 .. lfw-{LFW_FACES - 1}")
