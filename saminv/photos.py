"""Real face photos that ship with installed packages (no downloads), cropped to the face.

* ``astronaut``: scikit-image's portrait of Eileen Collins (NASA), 512 x 512 RGB, face crop 220 px;
* ``lfw-<i>``: scikit-image's ``lfw_subset`` (Labeled Faces in the Wild), 25 x 25 grayscale face crops,
  i = 0..199 (as RGB; upscaled by the preprocessing);
* ``messi``: Debian ``opencv-doc`` ``messi5.jpg`` face crop, when that package is installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from saminv.errors import InputError

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
LFW_COUNT = 200


def _astronaut() -> np.ndarray:
    from skimage.data import astronaut

    return astronaut()[10:230, 118:338]


def _lfw(i: int) -> np.ndarray:
    from skimage.data import lfw_subset

    face = (lfw_subset()[i] * 255).round().astype(np.uint8)
    return np.repeat(face[:, :, None], 3, axis=2)


def _messi() -> np.ndarray:
    from PIL import Image

    path = OPENCV_DATA / "messi5.jpg"
    if not path.is_file():
        raise InputError("photo 'messi' needs Debian's opencv-doc (apt-get install opencv-doc)")
    return np.asarray(Image.open(path).convert("RGB"))[52:132, 196:276]


def photo_names() -> list[str]:
    return ["astronaut", "messi"] + [f"lfw-{i}" for i in range(LFW_COUNT)]


def face_photo(name: str) -> np.ndarray:
    """The named face crop as an H x W x 3 uint8 RGB array; raises InputError for an unknown name."""
    if name == "astronaut":
        return _astronaut()
    if name == "messi":
        return _messi()
    if name.startswith("lfw-") and name[4:].isdigit() and int(name[4:]) < LFW_COUNT:
        return _lfw(int(name[4:]))
    raise InputError(f"unknown photo {name!r}: astronaut, messi or lfw-0 .. lfw-{LFW_COUNT - 1}")
