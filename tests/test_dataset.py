import contextlib
import io
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import custom_dataset_dataloader as data
from custom_dataset_dataloader import DataError, build_dataloader, build_dataset, load_image


def test_items_have_the_promised_shapes_types_and_ranges(split_config):
    dataset = build_dataset(split_config, "train")
    image, age, gender, ethnicity = dataset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert -3.0 < image.min() < image.max() < 3.0  # ImageNet-normalised
    assert age.dtype == torch.float32 and 0 < age.item() <= 120
    assert gender in (0, 1) and ethnicity in range(5)


def test_loader_batches_and_drops_nothing_in_eval(split_config):
    cfg = replace(split_config, batch_size=8)
    train_loader, test_loader = build_dataloader(cfg, "train"), build_dataloader(cfg, "test")
    images, ages, genders, ethnicities = next(iter(train_loader))
    assert images.shape == (8, 3, 32, 32) and ages.shape == (8,) and genders.shape == ethnicities.shape == (8,)
    assert sum(len(batch[1]) for batch in test_loader) == len(test_loader.dataset)


def test_loader_with_worker_processes(split_config):
    loader = build_dataloader(replace(split_config, num_workers=2, batch_size=8), "valid")
    assert sum(len(ages) for _, ages, _, _ in loader) == len(loader.dataset)


@pytest.mark.parametrize("num_workers", [0, 2])  # 2: worker processes write the cache file themselves
def test_cache_matches_direct_decoding(split_config, num_workers):
    cached = build_dataset(replace(split_config, num_workers=num_workers), "test")
    direct = build_dataset(replace(split_config, use_cache=False), "test")
    assert cached.cache_path is not None and direct.cache_path is None
    for index in range(len(cached)):
        assert torch.equal(cached[index][0], direct[index][0])


def test_cache_is_reused_then_rebuilt_when_the_csv_or_size_changes(split_config, monkeypatch):
    decoded = []
    original = data.load_image
    monkeypatch.setattr(data, "load_image", lambda path, size, interpolation: decoded.append(path)
                        or original(path, size, interpolation))
    build_dataset(split_config, "valid")
    first = len(decoded)
    assert first > 0
    build_dataset(split_config, "valid")
    assert len(decoded) == first  # reused: nothing decoded again
    csv_path = data.split_csv_path(split_config, "valid")
    frame = pd.read_csv(csv_path)
    frame.iloc[:-1].to_csv(csv_path, index=False)
    build_dataset(split_config, "valid")
    assert len(decoded) == first + len(frame) - 1  # new CSV: new cache
    build_dataset(replace(split_config, image_size=40), "valid")
    assert len(decoded) == first + 2 * len(frame) - 2  # new size: new cache
    assert len(list(Path(split_config.cache_dir).glob("valid_set_*.npy"))) == 3


def test_each_image_is_resolved_once_and_the_cache_key_is_unchanged(split_config, monkeypatch):
    resolved = []
    original = data._resolve_in
    monkeypatch.setattr(data, "_resolve_in", lambda root, name: resolved.append(name) or original(root, name))
    dataset = build_dataset(split_config, "valid")  # a cache miss: screening, key and decoding
    assert sorted(resolved) == sorted(dataset.frame["image_name"])  # once each, not once per step
    frame = data.read_dataset_csv(data.split_csv_path(split_config, "valid"))
    screened, files = data.screen_rows(frame, split_config.data_dir, "valid")
    assert [Path(file.path) for file in files] == [data.resolve_image_path(split_config.data_dir, name)
                                            for name in screened["image_name"]]
    key = data._cache_key(screened, split_config.data_dir, 32, "bicubic")
    assert data._cache_key(screened, split_config.data_dir, 32, "bicubic", files) == key  # old caches stay valid
    touched = Path(split_config.data_dir) / screened["image_name"].iloc[0]
    before = touched.stat()
    try:
        os.utime(touched, ns=(before.st_atime_ns, before.st_mtime_ns + 1))  # an edited file must give a new key
        _, files = data.screen_rows(frame, split_config.data_dir, "valid")
        assert data._cache_key(screened, split_config.data_dir, 32, "bicubic", files) != key
    finally:
        os.utime(touched, ns=(before.st_atime_ns, before.st_mtime_ns))  # the folder is shared by the session


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unreadable_image_is_named_and_left_out(split_config, tmp_path, num_workers):
    frame = pd.read_csv(data.split_csv_path(split_config, "valid"))
    broken = Path(split_config.data_dir) / frame.at[0, "image_name"]
    original_bytes = broken.read_bytes()
    try:
        broken.write_bytes(original_bytes[:200])  # truncated JPEG
        cfg = replace(split_config, cache_dir=str(tmp_path / "fresh_cache"), num_workers=num_workers)
        with pytest.warns(UserWarning, match=frame.at[0, "image_name"]):
            dataset = build_dataset(cfg, "valid")
        assert len(dataset) == len(frame) - 1
        assert dataset[0][0].shape == (3, 32, 32)
        direct = build_dataset(replace(cfg, use_cache=False), "valid")
        assert all(torch.equal(dataset[index][0], direct[index + 1][0]) for index in range(len(dataset)))
    finally:
        broken.write_bytes(original_bytes)


def test_rows_outside_the_data_folder_are_refused(split_config, tmp_path):
    csv_path = tmp_path / "evil.csv"
    pd.DataFrame({"image_name": ["../../etc/passwd"], "age": [30], "gender": ["male"],
                  "ethnicity": ["white"]}).to_csv(csv_path, index=False)
    with pytest.raises(DataError, match="none of the images"), pytest.warns(UserWarning, match="outside the data fol"):
        build_dataset(split_config, "test", csv_path=str(csv_path))


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "is empty"), ("path,label\na.jpg,3\n", "lacks the column"), ("image_name,age\na.jpg,x\n", "no usable rows")],
)
def test_bad_csvs_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    expect_warning = pytest.warns(UserWarning) if "usable" in message else contextlib.nullcontext()
    with pytest.raises(DataError, match=message), expect_warning:
        data.read_dataset_csv(path)


def test_missing_data_dir_names_the_fix(split_config):
    with pytest.raises(DataError, match="--data_dir"):
        build_dataset(replace(split_config, data_dir="no/such/folder"), "test")


def _save(image: Image.Image, tmp_path: Path, name: str, **kwargs) -> Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_load_image_handles_every_common_format(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    paths = [
        _save(rgb, tmp_path, "rgb.jpg"),
        _save(rgb.convert("L"), tmp_path, "gray.jpg"),
        _save(rgb.convert("CMYK"), tmp_path, "cmyk.jpg"),
        _save(rgb.convert("RGBA"), tmp_path, "rgba.png"),
        _save(rgb.convert("P"), tmp_path, "palette.png"),
        _save(Image.fromarray((np.arange(60 * 80).reshape(60, 80) * 13).astype(np.uint16)), tmp_path, "deep.png"),
    ]
    for path in paths:
        pixels = load_image(path, 24)
        assert pixels.shape == (3, 24, 24) and pixels.dtype == np.uint8, path.name


def test_load_image_applies_exif_orientation(tmp_path):
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, :40] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(buffer.getvalue())
    loaded = load_image(path, 40).astype(float)  # (3, 40, 40): the white half is now on top
    assert loaded[:, :15].mean() > 200 and loaded[:, 25:].mean() < 50
