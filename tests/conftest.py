"""Shared fixtures: a tiny generated UTKFace-style folder and a Config whose paths all point into tmp."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Config
from demo import generate_dataset
from tests.helpers import make_config, write_splits


@pytest.fixture(scope="session")
def face_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 synthetic faces (48 px) in UTKFace's naming, generated once per test session."""
    folder = tmp_path_factory.mktemp("faces") / "UTKFace"
    generate_dataset(folder, 120, seed=0, size=48)
    return folder


@pytest.fixture
def split_config(tmp_path: Path, face_folder: Path) -> Config:
    """A config whose csv_dir already holds the data set CSV and the three splits of `face_folder`."""
    return write_splits(make_config(tmp_path, face_folder, check_images=False))
