"""Checks on the real UTKFace faces in ../shared/data (skipped when that folder is absent)."""

from dataclasses import replace
from pathlib import Path

import pytest

import eda
import split_dataset
from custom_dataset_dataloader import build_dataloader, write_dataset_csv
from tests.helpers import REAL_DATA, make_config

UTK64 = REAL_DATA / "utkface64"
UTK200 = REAL_DATA / "utkface200"
needs_real_data = pytest.mark.skipif(not UTK64.is_dir() or not UTK200.is_dir(),
                                     reason="real UTKFace folders in ../shared/data are absent")


@needs_real_data
@pytest.mark.parametrize(("folder", "kept", "malformed"), [(UTK64, 18981, 3), (UTK200, 7811, 1)])
def test_real_names_parse_with_the_known_malformed_ones(folder, kept, malformed):
    with pytest.warns(UserWarning, match="do not follow"):
        frame, bad_names, _ = eda.scan_folder(str(folder), check_images=False)
    assert len(frame) == kept and len(bad_names) == malformed
    assert frame["age"].min() == 1 and frame["age"].max() >= 110  # the old-age tail is kept


@needs_real_data
def test_real_split_is_stratified(tmp_path):
    with pytest.warns(UserWarning):
        frame, _, _ = eda.scan_folder(str(UTK64), check_images=False)
    splits = split_dataset.stratified_split(frame, 0.1, 0.1, seed=42, min_per_bin=10)
    assert [len(split) for split in splits.values()] == pytest.approx([0.8 * len(frame), 0.1 * len(frame),
                                                                      0.1 * len(frame)], abs=15)
    for split in splits.values():
        assert abs(split["age"].mean() - frame["age"].mean()) < 0.5
        assert abs(split["age"].quantile(0.9) - frame["age"].quantile(0.9)) <= 2


@needs_real_data
def test_real_faces_load_through_the_cache(tmp_path):
    with pytest.warns(UserWarning):
        frame, _, _ = eda.scan_folder(str(UTK200), check_images=False)
    cfg = make_config(tmp_path, UTK200, image_size=64, batch_size=32)
    write_dataset_csv(frame.sample(96, random_state=0), Path(cfg.csv_dir) / "test_set.csv")
    images, ages, _, _ = next(iter(build_dataloader(replace(cfg, num_workers=2), "test")))
    assert images.shape == (32, 3, 64, 64) and images.std() > 0.3
    assert ((ages >= 1) & (ages <= 116)).all()
