"""The held-out registry faces and the validation faces: pinned archives, checked downloads, crops read out of
the archives."""

import hashlib
import importlib.util
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.data import coffee
from typer.testing import CliRunner

from saminv.cli import app
from saminv.errors import InputError
from saminv.photos import (FACE_ARCHIVES, REGISTRY_FACES, VALIDATION_FACES, FaceArchive, face_archive_dir, face_photo,
                           held_out_faces, held_out_photos, photo_group, validation_faces)

_spec = importlib.util.spec_from_file_location("fetch_faces", Path(__file__).parents[1] / "benchmarks" / "fetch_faces.py")
fetch_faces = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fetch_faces)  # the set-up script behind `make faces` (saminv itself downloads nothing)
fetch_face_archives = fetch_faces.fetch_face_archives


def test_fetch_keeps_only_archives_whose_sha256_matches(tmp_path):
    source = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(source, "w:gz") as tar:
        png = io.BytesIO()
        Image.fromarray(coffee()).save(png, format="PNG")
        info = tarfile.TarInfo("pkg-1.0/tests/coffee.png")
        info.size = png.tell()
        tar.addfile(info, io.BytesIO(png.getvalue()))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    out = tmp_path / "faces"

    with pytest.raises(InputError, match="sha256 mismatch"):
        fetch_face_archives(out, {"pkg": FaceArchive(source.name, source.as_uri(), "0" * 64)})
    assert not list(out.glob("*"))  # nothing half-written, no .part left
    with pytest.raises(InputError, match="cannot download"):
        fetch_face_archives(out, {"pkg": FaceArchive(source.name, (tmp_path / "missing.tar.gz").as_uri(), digest)})

    good = {"pkg": FaceArchive(source.name, source.as_uri(), digest)}
    with pytest.raises(InputError, match="cannot write"):  # the directory's place is taken by a file
        fetch_face_archives(source / "faces", good)
    [path] = fetch_face_archives(out, good)
    assert path.read_bytes() == source.read_bytes()
    source.unlink()  # present: not downloaded again
    assert fetch_face_archives(out, good) == [path]


def test_held_out_faces_crop_the_boxes_out_of_the_fetched_archives(tmp_path):
    # A stand-in for face_recognition's sdist: its four members at their real sizes, made from a real photo.
    archive = FACE_ARCHIVES["face_recognition"].filename
    members = {name: member for name, (key, member, _) in REGISTRY_FACES.items() if key == "face_recognition"}
    sizes = {"biden": (970, 2204), "obama": (910, 1137), "obama2": (626, 1200), "obama3": (1434, 2333)}
    assert set(members) == set(sizes)
    photos = {name: np.asarray(Image.fromarray(coffee()).resize(sizes[name])) for name in members}
    with tarfile.open(tmp_path / archive, "w:gz") as tar:
        for name, member in members.items():
            data = io.BytesIO()
            Image.fromarray(photos[name]).save(data, format="PNG")
            info = tarfile.TarInfo(member)
            info.size = data.tell()
            tar.addfile(info, io.BytesIO(data.getvalue()))

    faces = dict(held_out_faces(tmp_path))  # only this archive is there
    assert list(faces) == ["biden", "obama", "obama2", "obama3"]
    for name, crop in faces.items():
        left, top, side = REGISTRY_FACES[name][2]
        assert crop.shape == (side, side, 3) and photo_group(name) == "faces"
        assert np.array_equal(crop, photos[name][top:top + side, left:left + side])
    assert held_out_faces(tmp_path / "empty") == []
    (tmp_path / archive).write_bytes(b"not an archive")
    with pytest.raises(InputError, match="delete the file"):
        held_out_faces(tmp_path)


def test_validation_faces_crop_their_boxes_out_of_other_archives(tmp_path):
    # Stand-ins for the three npm archives: each member a real photo just large enough for its boxes.
    assert not {a for a, _ in VALIDATION_FACES} & {a for a, _, _ in REGISTRY_FACES.values()}  # other photos, other people
    with pytest.raises(InputError, match="make faces"):
        validation_faces(tmp_path)
    photos = {}
    for archive in {a for a, _ in VALIDATION_FACES}:
        with tarfile.open(tmp_path / FACE_ARCHIVES[archive].filename, "w:gz") as tar:
            for (key, member), boxes in VALIDATION_FACES.items():
                if key != archive:
                    continue
                size = (max(l + s for l, _, s in boxes), max(t + s for _, t, s in boxes))
                photos[member] = np.asarray(Image.fromarray(coffee()).resize(size))
                data = io.BytesIO()
                Image.fromarray(photos[member]).save(data, format="PNG")
                info = tarfile.TarInfo(member)
                info.size = data.tell()
                tar.addfile(info, io.BytesIO(data.getvalue()))
    crops = validation_faces(tmp_path)
    expected = [photos[member][t:t + s, l:l + s] for (_, member), boxes in VALIDATION_FACES.items() for l, t, s in boxes]
    assert len(crops) == 36 and all(np.array_equal(c, e) for c, e in zip(crops, expected))


def test_registry_face_before_fetch_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMINV_CACHE", str(tmp_path))
    res = CliRunner().invoke(app, ["sample-photo", "obama", "--out", str(tmp_path / "obama.png")])
    assert res.exit_code == 2 and "make faces" in res.output and not (tmp_path / "obama.png").exists()
    assert all(photo_group(name) != "faces" for name, _ in held_out_photos(nonface_patches=1))


@pytest.mark.skipif(not all((face_archive_dir() / a.filename).is_file() for a in FACE_ARCHIVES.values()),
                    reason="face archives not fetched (make faces)")
def test_fetched_registry_faces():
    for archive in FACE_ARCHIVES.values():
        assert hashlib.sha256((face_archive_dir() / archive.filename).read_bytes()).hexdigest() == archive.sha256
    faces = held_out_faces()
    assert [n for n, _ in faces] == list(REGISTRY_FACES)
    for name, crop in faces:
        assert crop.shape[0] == crop.shape[1] >= 112 and crop.shape[2] == 3 and crop.std() > 20
        assert np.array_equal(face_photo(name), crop)
    groups = [photo_group(n) for n, _ in held_out_photos(nonface_patches=1)]
    assert groups.count("faces") == len(REGISTRY_FACES) and groups[-1] == "nonface_patches"
    crops = validation_faces()
    assert len(crops) == 36 and all(c.shape[0] == c.shape[1] >= 153 and c.shape[2] == 3 and c.std() > 20 for c in crops)
    assert not any(np.array_equal(c[:112, :112], f[:112, :112]) for c in crops for _, f in faces)
