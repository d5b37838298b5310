"""Shared fixtures: a tiny generated UTKFace-style folder and a Config whose paths all point into tmp.

The suite runs in one process per core (pytest-xdist, pyproject.toml's addopts); each worker then gets its share of
the cores as PyTorch/OpenMP threads, set before the tests import torch and inherited by their subprocesses.
Measured on 2 cores (RESULTS.md, "Demo and the test suite"): two workers at 2 threads each were slower than one
process, because OpenMP threads spin while the other worker holds the core; two at 1 thread each halve its time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Config
from demo import generate_dataset
from tests.helpers import make_config, write_splits


def pytest_configure(config: pytest.Config) -> None:
    """In an xdist worker: cores / workers threads (a user's OMP_NUM_THREADS wins), before a test imports torch."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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
