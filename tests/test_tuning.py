import csv
import shlex
from dataclasses import replace
from pathlib import Path

import pytest

import hyperparameters_tuning as tuning
import train
from config import parse_config

pytestmark = pytest.mark.slow  # whole trainings or subprocesses: left out by -m "not slow"


def test_five_steps_rank_by_valid_mae_and_resume_from_the_csv(split_config, monkeypatch):
    cfg = replace(split_config, tune_learning_rates="1e-3,3e-3", tune_weight_decays="0,1e-4", tune_epochs=1,
                  tune_overfit_images=32, tune_overfit_epochs=10, lr=3e-3, batch_size=16,
                  head="l1")  # a zero-initialised L1 head predicts exactly the mean age (step 1 compares equal)
    results = tuning.main(cfg)

    step1 = results["initial_loss"]
    assert step1["model_loss"] == pytest.approx(step1["mean_predictor_loss"], rel=1e-4)  # zero-initialised head
    losses = results["overfit_losses"]
    assert len(losses) == 10 and losses[-1] < 0.6 * losses[0]
    grid_path = Path(cfg.runs_dir) / "tuning" / "grid.csv"
    with grid_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and set(rows[0]) == set(tuning.GRID_COLUMNS)
    assert {(float(row["lr"]), float(row["weight_decay"])) for row in rows} == {
        (1e-3, 0.0), (3e-3, 0.0), (1e-3, 1e-4), (3e-3, 1e-4)}
    assert results["best"]["valid_mae"] == min(float(row["valid_mae"]) for row in rows)
    assert f"--lr={results['best']['lr']:g}" in results["command"]
    printed = shlex.split(results["command"])
    assert printed[:2] == ["python", "train.py"]
    assert parse_config(printed[2:]) == replace(cfg, lr=results["best"]["lr"], weight_decay=results["best"][
        "weight_decay"], epochs=max(cfg.epochs, 10 * cfg.tune_epochs))  # the tuned recipe (head, paths ...), longer
    assert "--head=l1" in printed and f"--csv_dir={cfg.csv_dir}" in printed
    assert (Path(cfg.pics_dir) / "tuning_grid.png").is_file()

    calls = []
    monkeypatch.setattr(train, "main", lambda trial: calls.append(trial) or pytest.fail("re-ran a finished trial"))
    assert len(tuning.sweep(cfg, grid_path, [(1e-3, 0.0), (3e-3, 1e-4)])) == 2 and calls == []

    # another recipe (here another head) in the same CSV runs its own trials instead of reusing these
    def fake_training(trial):
        calls.append(trial)
        return {"best_valid_mae": 9.0, "history": [{"valid_cs5": 0.1, "train_loss": 1.0, "seconds": 0.1}]}

    monkeypatch.setattr(train, "main", fake_training)
    other = tuning.sweep(replace(cfg, head="dex"), grid_path, [(1e-3, 0.0), (3e-3, 1e-4)])
    assert [(trial.head, trial.lr) for trial in calls] == [("dex", 1e-3), ("dex", 3e-3)]
    assert [row["valid_mae"] for row in other] == [9.0, 9.0]  # ranked among its own trials only
    assert len(tuning.read_grid(grid_path)) == 6


def test_bad_value_lists_are_clear_errors():
    with pytest.raises(SystemExit, match="comma-separated"):
        tuning.parse_values("1e-3,fast")


def test_the_overfit_step_turns_every_augmentation_and_regulariser_off(split_config, monkeypatch):
    cfg = replace(split_config, erase_probability=0.5, mixup_alpha=0.4, weight_decay=0.05, dropout=0.2,
                  tune_overfit_images=32, tune_overfit_epochs=2)
    seen = []
    monkeypatch.setattr(train, "main", lambda trial: seen.append(trial) or {"history": [{"train_loss": 1.0}]})
    tuning.overfit_subset(cfg)
    (trial,) = seen
    assert (trial.erase_probability, trial.mixup_alpha, trial.weight_decay, trial.dropout) == (0, 0, 0, 0)
    assert (trial.rotation_degrees, trial.translate_fraction, trial.scale_jitter, trial.color_jitter) == (0, 0, 0, 0)
    assert not trial.flip and trial.epochs == 2
