"""Shared fixtures: a tiny generated UTKFace-style folder and a Config whose paths all point into tmp."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Config
from demo import generate_dataset

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_config(root: Path, data_dir: Path, **changes) -> Config:
    """A quick CPU config with every output under `root`."""
    base = Config(
        data_dir=str(data_dir),
        csv_dir=str(root / "csv"),
        checkpoint_dir=str(root / "checkpoints"),
        pics_dir=str(root / "pics"),
        runs_dir=str(root / "runs"),
        cache_dir=str(root / "cache"),
        model_name="resnet18",
        pretrained=False,
        image_size=32,
        batch_size=16,
        epochs=1,
        lr=2e-3,
        num_workers=0,
        device="cpu",
    )
    return replace(base, **changes)


@pytest.fixture(scope="session")
def face_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 synthetic faces (48 px) in UTKFace's naming, generated once per test session."""
    folder = tmp_path_factory.mktemp("faces") / "UTKFace"
    generate_dataset(folder, 120, seed=0, size=48)
    return folder


def write_splits(cfg: Config) -> Config:
    """Write the data set CSV of cfg.data_dir and its three splits into cfg.csv_dir; returns cfg."""
    import eda
    import split_dataset
    from custom_dataset_dataloader import write_dataset_csv

    frame, _, _ = eda.scan_folder(cfg.data_dir, check_images=False)
    write_dataset_csv(frame, Path(cfg.csv_dir) / "utkface_dataset.csv")
    splits = split_dataset.stratified_split(frame, 0.1, 0.1, cfg.seed, cfg.min_images_per_age_bin)
    for name, split in splits.items():
        write_dataset_csv(split, split_dataset.split_csv_path(cfg, name))
    return cfg


@pytest.fixture
def split_config(tmp_path: Path, face_folder: Path) -> Config:
    """A config whose csv_dir already holds the data set CSV and the three splits of `face_folder`."""
    return write_splits(make_config(tmp_path, face_folder, check_images=False))
