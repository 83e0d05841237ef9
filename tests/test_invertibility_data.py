"""The predictor's training data: image sources, held-out photos, shards, resume and rank sharding."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from saminv.cli import app
from saminv.models.model_dir import load_model
from saminv.photos import face_photo, held_out_photos, training_nonface_patches
from saminv.imageio import load_image, resize_square
from saminv.training.invertibility_data import (PHOTO_LOAD_SCALE, SOURCES, DataConfig, ImageSource, PhotoSetSource,
                                                generate_dataset, image_source, shard_indices, training_photos)

runner = CliRunner()


@pytest.fixture(scope="module")
def model():
    return load_model("faces64")


@pytest.fixture(scope="module")
def source(model):
    return ImageSource(model, seed=0)


def test_items_are_deterministic_and_cover_every_source(source):
    items = [source.image(i) for i in range(8)]
    assert [s for _, s in items] == list(SOURCES) * 2
    for img, _ in items:
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and img.std() > 5
    again, _ = source.image(2)
    assert np.array_equal(again, items[2][0])
    assert not np.array_equal(items[2][0], items[6][0])


def test_held_out_photos_never_enter_the_training_pool():
    pool = training_photos()
    assert len(pool) > 100
    from skimage.data import astronaut, lfw_subset

    nonface_patch = np.repeat((lfw_subset()[105] * 255).round().astype(np.uint8)[:, :, None], 3, axis=2)
    trained_lfw = np.repeat((lfw_subset()[7] * 255).round().astype(np.uint8)[:, :, None], 3, axis=2)
    for photo in (astronaut(), face_photo("astronaut"), nonface_patch):
        assert not any(p.shape == photo.shape and np.array_equal(p, photo) for p in pool)
    assert any(p.shape == trained_lfw.shape and np.array_equal(p, trained_lfw) for p in pool)
    held_out_patches = [img for name, img in held_out_photos() if name.startswith("lfw-nonface-")]
    trained_patches = training_nonface_patches()
    assert len(held_out_patches) == 10 and len(trained_patches) == 90
    assert np.array_equal(held_out_patches[5], nonface_patch)
    assert not any(np.array_equal(h, t) for h in held_out_patches for t in trained_patches)  # no patch is in both


def test_shards_resume_and_split_across_ranks(model, tmp_path):
    cfg = DataConfig(count=6, shard_size=2, steps=2)
    assert shard_indices(cfg, 0, 2) == [0, 2] and shard_indices(cfg, 1, 2) == [1]
    written = generate_dataset(model, tmp_path, cfg, rank=1, world=2, progress=False)
    assert [p.name for p in written] == ["shard_00001.npz"]
    written = generate_dataset(model, tmp_path, cfg, progress=False)  # one process: the rest
    assert sorted(p.name for p in written) == ["shard_00000.npz", "shard_00002.npz"]
    assert generate_dataset(model, tmp_path, cfg, progress=False) == []
    shard = np.load(tmp_path / "shard_00001.npz")
    assert shard["images"].shape == (2, 64, 64, 3) and shard["reconstructions"].shape == (2, 5, 64, 64, 3)
    assert shard["errors"].shape == (2, 5, 64, 64) and (shard["errors"] >= 0).all()
    assert list(shard["spaces"]) == ["W+", "F2", "F4", "F6", "F8"] and list(shard["sources"]) == ["photo", "composite"]
    assert json.loads((tmp_path / "info.json").read_text())["count"] == 6
    grown = generate_dataset(model, tmp_path, DataConfig(count=8, shard_size=2, steps=2), progress=False)
    assert [p.name for p in grown] == ["shard_00003.npz"]  # a data set grows; earlier shards are kept
    with pytest.raises(ValueError, match="other settings"):
        generate_dataset(model, tmp_path, DataConfig(count=6, shard_size=2, steps=3), progress=False)


def test_cli_rank_out_of_range(tmp_path):
    res = runner.invoke(app, ["train", "invertibility-data", "--out", str(tmp_path), "--rank", "2", "--world", "2"])
    assert res.exit_code == 2 and "--rank" in res.output


def test_a_photo_set_gives_each_photo_whole_then_pure_crops(model):
    import skimage.data

    photos = [resize_square(np.asarray(getattr(skimage.data, name)()), 256) for name in ("astronaut", "chelsea", "coffee")]
    photos.append(resize_square(face_photo("messi"), 256))
    source = PhotoSetSource(model, photos, "image", seed=0)
    for i, photo in enumerate(photos):
        img, name = source.image(i)
        assert name == "image" and np.array_equal(img, resize_square(photo, 64))
    crops = [source.image(i)[0] for i in range(4, 12)]  # crops 0-7 take photos 0, 3, 2, 1, 0, 3, 2, 1
    assert all(c.shape == (64, 64, 3) and c.dtype == np.uint8 for c in crops)
    assert np.array_equal(PhotoSetSource(model, photos, "image", seed=0).image(9)[0], crops[5])  # pure in (i, seed)
    assert not np.array_equal(PhotoSetSource(model, photos, "image", seed=1).image(9)[0], crops[5])
    # a crop covers 75-92 % of its photo: closer to that photo's whole image than to the others'
    for j, crop in enumerate(crops):
        unmirrored = crop[:, ::-1] if j % 2 else crop
        dist = [np.abs(unmirrored.astype(float) - resize_square(p, 64)).mean() for p in photos]
        assert int(np.argmin(dist)) == (3 * j + 3 * j // 4) % 4


def test_photo_set_sources_and_their_bad_settings(model, tmp_path):
    import skimage.data

    photos = [np.asarray(skimage.data.astronaut())[:256, :256], np.asarray(skimage.data.chelsea())[:300, :300]]
    written = generate_dataset(model, tmp_path, DataConfig(count=3, shard_size=3, steps=2, source="images"),
                               extra_photos=photos, progress=False)
    shard = np.load(written[0])
    assert list(shard["sources"]) == ["image"] * 3 and np.array_equal(shard["images"][1], resize_square(photos[1], 64))
    assert json.loads((tmp_path / "info.json").read_text())["source"] == "images"
    with pytest.raises(ValueError, match="needs --images"):
        image_source(model, DataConfig(source="images"), None)
    with pytest.raises(ValueError, match="not the validation-faces set"):
        image_source(model, DataConfig(source="validation-faces"), photos)
    with pytest.raises(ValueError, match="not the nonface-patches set"):
        image_source(model, DataConfig(source="nonface-patches"), photos)
    with pytest.raises(ValueError, match="other settings"):  # a pool data set cannot continue a photo set
        generate_dataset(model, tmp_path, DataConfig(count=3, shard_size=3, steps=2), progress=False)
    res = runner.invoke(app, ["train", "invertibility-data", "--out", str(tmp_path / "x"), "--source", "ffhq"])
    assert res.exit_code == 2 and "--source must be one of pool, validation-faces, nonface-patches, images" in res.output
    assert not (tmp_path / "x").exists()


def test_the_nonface_patch_set_is_the_training_patches_taken_as_images_files(model, tmp_path):
    """--source nonface-patches gives lfw_subset's patches 110-199 exactly as --source images does with those patches
    saved as PNG files (the way faces64's predictor data was first made): Lanczos to 4R, then to R."""
    from PIL import Image

    patches = training_nonface_patches()
    for i in (0, 89):
        Image.fromarray(patches[i]).save(tmp_path / f"patch{i}.png")
    res = runner.invoke(app, ["train", "invertibility-data", "--out", str(tmp_path / "x"), "--source", "nonface-patches",
                              "--images", str(tmp_path / "patch0.png")])
    assert res.exit_code == 2 and "not the nonface-patches set" in res.output

    patch_set = image_source(model, DataConfig(source="nonface-patches"), None)
    side = PHOTO_LOAD_SCALE * model.generator.cfg.resolution  # as the CLI loads --images files
    pngs = [load_image(tmp_path / f"patch{i}.png", side) for i in (0, 89)]
    images_set = image_source(model, DataConfig(source="images"), pngs)
    for i, j in ((0, 0), (89, 1)):
        img, name = patch_set.image(i)
        assert name == "nonface-patch" and img.shape == (64, 64, 3) and np.array_equal(img, images_set.image(j)[0])
    dist = [np.abs(patch_set.image(0)[0].astype(float) - resize_square(patches[k], 64)).mean() for k in range(90)]
    assert int(np.argmin(dist)) == 0 and dist[0] < 2  # item 0 is patch 110, up to the two-step resize


def test_mirror_adds_a_second_measurement_of_the_mirrored_photo(model, tmp_path):
    """--mirror on an existing data set keeps its shards and adds ``errors_mirrored``: exactly the maps that
    the mirror image, inverted as a data set of its own, gets, mirrored back. The two measurements of the
    same photo differ, and the predictor's data holds their mean."""
    from PIL import Image

    from saminv.training.predictor import load_shards

    Image.fromarray(resize_square(face_photo("astronaut"), 256)).save(tmp_path / "face.png")
    args = ["train", "invertibility-data", "--out", str(tmp_path / "a"), "--source", "images", "--images",
            str(tmp_path / "face.png"), "--count", "1", "--shard-size", "1", "--steps", "3"]
    assert runner.invoke(app, args).exit_code == 0
    before = dict(np.load(tmp_path / "a" / "shard_00000.npz"))
    res = runner.invoke(app, args + ["--mirror"])
    assert res.exit_code == 0 and "wrote 1 shards" in res.output
    assert "wrote 0 shards" in runner.invoke(app, args + ["--mirror"]).output
    after = np.load(tmp_path / "a" / "shard_00000.npz")
    assert all(np.array_equal(after[key], value) for key, value in before.items())
    assert json.loads((tmp_path / "a" / "info.json").read_text())["mirror"] is True
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "pass --mirror" in res.output

    mirror_image = load_image(tmp_path / "face.png", 256)[:, ::-1]
    generate_dataset(model, tmp_path / "b", DataConfig(count=1, shard_size=1, steps=3, source="images"),
                     extra_photos=[np.ascontiguousarray(mirror_image)], progress=False)
    measured_mirrored = np.load(tmp_path / "b" / "shard_00000.npz")
    assert np.array_equal(measured_mirrored["images"][0], after["images"][0, :, ::-1])
    assert np.array_equal(after["errors_mirrored"], measured_mirrored["errors"][..., ::-1])
    first, second = after["errors"].astype(np.float32), after["errors_mirrored"].astype(np.float32)
    assert np.abs(first - second).mean() > 0.01 * first.mean()  # a second measurement, not a copy
    _, errors, _ = load_shards(tmp_path / "a")
    assert np.allclose(errors, (first + second) / 2)
