from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import demo
import eda
from config import folders_under

pytestmark = pytest.mark.slow  # whole trainings or subprocesses: left out by -m "not slow"


def test_generated_faces_follow_the_utkface_format(tmp_path):
    paths = demo.generate_dataset(tmp_path, 40, seed=3, size=40)
    assert len(paths) == 40
    for path in paths:
        labels = eda.parse_utkface_name(path.name)
        assert labels is not None and 1 <= labels[0] <= 90
        with Image.open(path) as image:
            assert image.size == (40, 40) and image.mode == "RGB"


def test_generated_labels_are_spread_like_utkface():
    labels = demo.sample_labels(5000, np.random.default_rng(0))
    ages = np.array([age for age, _, _ in labels])
    assert ages.min() == 1 and ages.max() == 90 and 25 < np.median(ages) < 35
    assert {gender for _, gender, _ in labels} == {0, 1} and {race for _, _, race in labels} == set(range(5))


def test_age_changes_the_face():
    """The same random draw at two ages gives clearly different faces; at one age, identical ones."""
    young = np.asarray(demo.draw_face(8, "male", "white", np.random.default_rng(5)), dtype=float)
    again = np.asarray(demo.draw_face(8, "male", "white", np.random.default_rng(5)), dtype=float)
    old = np.asarray(demo.draw_face(75, "male", "white", np.random.default_rng(5)), dtype=float)
    assert np.array_equal(young, again)
    assert np.abs(young - old).mean() > 10


def test_demo_runs_every_stage_end_to_end(tmp_path, monkeypatch):
    import train

    evaluated_caches, evaluate_checkpoint = [], train.evaluate_checkpoint

    def recorded(*arguments, **keywords):
        evaluated_caches.append(keywords.get("cache_dir"))
        return evaluate_checkpoint(*arguments, **keywords)

    monkeypatch.setattr(train, "evaluate_checkpoint", recorded)
    cfg = replace(
        demo.DEMO_DEFAULTS,
        data_dir=str(tmp_path / "UTKFace"), **folders_under(tmp_path), demo_num_images=80, epochs=1, image_size=32,
        num_workers=0,
    )
    results = demo.main(cfg)
    assert Path(results["best_checkpoint"]).is_file()
    assert results["reloaded_test_mae"] == results["test_mae"] or abs(
        results["reloaded_test_mae"] - results["test_mae"]) < 0.05  # reloaded checkpoint gives the same metric
    # the checkpoint stores the recipe alone: its reloaded evaluation decodes into the demo's cache, not ./cache
    assert evaluated_caches == [cfg.cache_dir] and list(Path(cfg.cache_dir).glob("test_set_32px_*.npy"))
    assert len(list(Path(cfg.pics_dir).glob("*.png"))) == 6
    assert len(list((tmp_path / "UTKFace").glob("*.jpg"))) == 80
