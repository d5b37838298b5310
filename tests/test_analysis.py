"""The analysis suite on a checkpoint trained for one epoch on generated faces: error tables, sensitivity, heat-maps,
cross-data-set exclusion."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import train
from analysis import errors, heatmaps, prepare_evaluation, sensitivity
from custom_dataset_dataloader import read_dataset_csv, split_csv_path
from model import AgeEstimationModel
from tests.helpers import make_config, write_splits

pytestmark = pytest.mark.slow  # whole trainings or subprocesses: left out by -m "not slow"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, face_folder):
    """(config pointing at a one-epoch checkpoint of the generated faces, that checkpoint's results)."""
    cfg = write_splits(make_config(tmp_path_factory.mktemp("analysis"), face_folder, check_images=False,
                                   head="dex", run_name="analysed"))
    results = train.main(cfg)
    return replace(cfg, checkpoint=results["best_checkpoint"], bootstrap_samples=200), results


def test_error_table_groups_cover_the_test_set(trained):
    cfg, results = trained
    result = errors.main(cfg)
    table = result["table"]
    groups = table[~table["group"].str.startswith("largest_gap")]
    for grouping in errors.GROUPINGS[:3]:  # every generated face has an age, a gender and an ethnicity
        assert groups.loc[groups["grouping"] == grouping, "images"].sum() == results["test_images"]
    assert result["mae"] == pytest.approx(results["test_mae"], abs=1e-3)  # the same evaluate() as training
    bounded = groups[groups["images"] >= 2]  # one face has no interval (NaN)
    assert (bounded["mae_low"] <= bounded["mae"] + 1e-9).all() and (bounded["mae"] <= bounded["mae_high"] + 1e-9).all()
    assert groups.loc[groups["images"] == 1, "mae_low"].isna().all()
    predictions = pd.read_csv(result["predictions_path"])
    assert len(predictions) == results["test_images"]
    assert np.allclose(predictions["error"], predictions["predicted"] - predictions["age"], atol=1e-3)
    tag = Path(result["table_path"]).name.removesuffix("_errors.csv")
    assert (Path(cfg.pics_dir) / f"errors_{tag}_groups.png").is_file()
    assert (Path(cfg.pics_dir) / f"errors_{tag}_reliability.png").is_file()  # the dex head's P(age >= 18)
    assert set(result["age_gate"]) == {"minors_passed_age", "adults_refused_age", "minors_passed_probability",
                                       "adults_refused_probability"}


def test_bootstrap_interval_brackets_the_mean():
    generator = np.random.default_rng(0)
    assert errors.bootstrap_interval(np.full(50, 3.0), 100, generator) == (3.0, 3.0)
    values = generator.normal(10.0, 2.0, 400)
    low, high = errors.bootstrap_interval(values, 500, generator)
    assert low < values.mean() < high and high - low < 0.6  # about 4 standard errors (2 / sqrt(400) = 0.1)


def test_severity_zero_is_the_clean_image():
    pixels = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    for kind, levels in sensitivity.SEVERITIES.items():
        assert torch.equal(sensitivity.perturb(pixels, kind, levels[0], torch.Generator()), pixels), kind
        stronger = sensitivity.perturb(pixels, kind, levels[-1], torch.Generator().manual_seed(0))
        assert stronger.dtype == torch.uint8 and stronger.shape == pixels.shape
        assert not torch.equal(stronger, pixels), kind


def test_sensitivity_table_and_flip_consistency(trained):
    cfg, results = trained
    result = sensitivity.main(cfg)
    table = result["table"]
    assert len(table) == sum(len(levels) for levels in sensitivity.SEVERITIES.values())
    assert np.allclose(table.loc[table["level_index"] == 0, "mae"], result["clean_mae"])
    assert result["clean_mae"] == pytest.approx(results["test_mae"], abs=1e-3)
    assert result["flip_difference"] >= 0 and Path(result["figure_path"]).is_file()


@pytest.mark.parametrize("model_name", ["resnet18", "efficientnet", "vit", "efficientnet_lite0",
                                        "timm/vit_small_patch16_224"])
def test_heatmaps_have_the_image_shape_and_are_non_negative(model_name):
    torch.manual_seed(0)
    model = AgeEstimationModel(model_name, image_size=32, head="l1").eval()
    torch.nn.init.normal_(model.head[1].weight, std=0.1)
    maps = heatmaps.compute_heatmaps(model, model_name, torch.randn(3, 3, 32, 32))
    assert maps.shape == (3, 32, 32) and (maps >= 0).all() and (maps <= 1 + 1e-6).all()


def test_heatmap_suite_writes_band_shares(trained):
    cfg, _ = trained
    result = heatmaps.main(replace(cfg, heatmap_images=24))
    bands = result["table"][list(heatmaps.FACE_BANDS)]
    sums = bands.sum(axis=1).to_numpy()
    assert len(result["table"]) >= 2 and (np.isclose(sums, 1.0, atol=1e-6) | (sums == 0)).all()  # 0: an empty map
    assert Path(result["average_path"]).is_file() and Path(result["table_path"]).is_file()


def test_exclude_csv_leaves_out_the_training_faces(trained):
    cfg, _ = trained
    whole = Path(cfg.csv_dir) / "utkface_dataset.csv"
    setup = prepare_evaluation(replace(cfg, test_csv=str(whole), exclude_csv=str(split_csv_path(cfg, "train"))))
    kept = read_dataset_csv(setup.csv_path)
    train_names = set(read_dataset_csv(split_csv_path(cfg, "train"))["image_name"])
    assert len(kept) == len(read_dataset_csv(whole)) - len(train_names)
    assert not train_names & set(kept["image_name"])


def test_a_data_dir_typed_on_the_command_line_wins_over_the_checkpoints_even_when_it_is_the_default(trained):
    """--data_dir=data/UTKFace equals config.py's default, yet it was typed: it must not be replaced by the
    checkpoint's data_dir (the checkpoint's is used only when none was given)."""
    from config import Config, parse_config

    cfg, _ = trained
    typed = parse_config([f"--checkpoint={cfg.checkpoint}", f"--data_dir={Config.data_dir}"])
    assert prepare_evaluation(typed).model_cfg.data_dir == Config.data_dir
    untyped = parse_config([f"--checkpoint={cfg.checkpoint}"])
    assert prepare_evaluation(untyped).model_cfg.data_dir == cfg.data_dir  # from the checkpoint
