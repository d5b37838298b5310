"""Helpers the test files share (fixtures live in conftest.py): a quick CPU config with every output in a folder
of the test's own, the split CSVs of a folder, and where the real data of ../shared lives."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from config import Config, folders_under

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_config(root: Path, data_dir: Path, **changes) -> Config:
    """A quick CPU config with every output under `root`, its preprocessing resolved as train.py resolves it (the
    data pipeline takes resolved configs only)."""
    from model import resolve_preprocessing

    base = Config(
        data_dir=str(data_dir),
        **folders_under(root),
        model_name="resnet18",
        pretrained=False,
        image_size=32,
        batch_size=16,
        epochs=1,
        lr=2e-3,
        weight_decay=1e-4,  # the scratch recipe's (--preset=scratch): what these tests were written against
        erase_probability=0.0,
        num_workers=0,
        device="cpu",
        crop_geometry_images=0,  # ~5 s of detection per training; test_train measures it once
    )
    return resolve_preprocessing(replace(base, **changes))


def with_backbone(cfg: Config, **changes) -> Config:
    """`cfg` for another backbone: its preprocessing cleared, so train.py resolves that backbone's own."""
    return replace(cfg, normalize_mean=(), normalize_std=(), interpolation="", **changes)


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
