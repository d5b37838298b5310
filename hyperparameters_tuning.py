"""The seed's five-step tuning procedure, each trial a call of train.main (no copied training loop).

1. The error of the untrained model on one batch, beside the error of always predicting the mean training age
   (every head starts at the mean age, so both should about match: a sanity check of the data and the head).
2. Overfit a small fixed training subset (tune_overfit_images, no augmentation, no regularisation) and show the
   training loss going towards zero: the model and the optimisation can learn.
3. A learning-rate sweep (tune_learning_rates) for tune_epochs epochs each.
4. A learning-rate x weight-decay grid (tune_learning_rates x tune_weight_decays), one row per trial in
   runs/tuning/grid.csv (recipe, lr, weight_decay, valid_mae, train_loss, seconds) and a heat-map
   pics/tuning_grid.png. Trials are ranked by valid MAE, never by training loss. Each row is keyed by the trial's
   recipe (config.recipe_hash: model, head, data, augmentation, optimiser, lr, weight decay, epochs...): an
   interrupted sweep resumes without running a finished trial again, and a sweep of another recipe (another
   backbone, say) runs its own trials instead of reusing these.
5. Print the command that trains the best setting for longer.

Every trial is seeded by `seed` and runs in its own folder under runs/tuning/ and checkpoints/tuning/.
Reads:  the split CSVs and images (as train.py). Writes: runs/tuning/*.csv, pics/tuning_*.png, tuning runs.

Run:  python hyperparameters_tuning.py --model_name=resnet18 --pretrained=false --image_size=64 --tune_epochs=3
"""

from __future__ import annotations

import math
import shlex
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

import train
from config import (
    RECIPE_FIELDS,
    RUN_FIELDS,
    Config,
    parse_config,
    print_config,
    range_problem,
    recipe_hash,
    seed_everything,
    to_argv,
)
from custom_dataset_dataloader import build_dataloader, read_dataset_csv, split_csv_path, write_dataset_csv
from files import save_figure, write_csv
from model import build_model, resolve_preprocessing

# recipe: config.recipe_hash of the trial (its lr, weight decay and epochs included), which marks it done
GRID_COLUMNS = ("recipe", "lr", "weight_decay", "valid_mae", "valid_cs5", "train_loss", "seconds")


def parse_values(text: str, setting: str = "lr") -> list[float]:
    """The comma-separated values of a tune_* list, each checked against the range of `setting` (config.RANGES:
    NaN, infinite or negative values stop here, before any trial runs)."""
    try:
        values = [float(value) for value in text.split(",") if value.strip()]
    except ValueError:
        raise SystemExit(f"error: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise SystemExit(f"error: expected at least one number for {setting}, got {text!r}")
    problems = [problem for value in values if (problem := range_problem(setting, value))]
    if problems:
        raise SystemExit(f"error: {text!r}: {'; '.join(problems)}")
    return values


def trial_config(cfg: Config, name: str, **changes) -> Config:
    """A trial's config: its own run folders under tuning/, never resuming, never overwriting, and no crop
    geometry (a trial only ranks a recipe; the printed command trains the model that inference will use)."""
    return replace(cfg, run_name=name, resume=False, runs_dir=str(Path(cfg.runs_dir) / "tuning"),
                   checkpoint_dir=str(Path(cfg.checkpoint_dir) / "tuning"), crop_geometry_images=0, **changes)


def initial_loss(cfg: Config) -> dict[str, float]:
    """Step 1: the untrained model's error (years) on one training batch vs a mean-age predictor's; every head
    starts at the mean age (the distribution heads at a discretised normal around it, whose expectation is a little
    above the mean because ages below 0 are cut off)."""
    seed_everything(cfg.seed)
    loader = build_dataloader(resolve_preprocessing(replace(cfg, num_workers=0)), "train")
    ages_all = torch.tensor(loader.dataset.ages)
    model = build_model(replace(cfg, pretrained=False)).eval()
    model.set_age_statistics(ages_all.mean().item(), ages_all.std().item())
    images, ages, _, _ = next(iter(loader))
    with torch.no_grad():
        model_loss = (model(images) - ages).abs().mean().item()
    mean_loss = (ages - ages_all.mean()).abs().mean().item()
    print(f"step 1: untrained model's mean absolute error on one batch {model_loss:.2f} years; "
          f"mean-age predictor {mean_loss:.2f} years")
    return {"model_loss": model_loss, "mean_predictor_loss": mean_loss}


def overfit_subset(cfg: Config) -> list[float]:
    """Step 2: train on a fixed subset, evaluated on itself, without augmentation or regularisation."""
    frame = read_dataset_csv(split_csv_path(cfg, "train"), cfg.max_age)
    subset = frame.sample(min(cfg.tune_overfit_images, len(frame)), random_state=cfg.seed).sort_index()
    with tempfile.TemporaryDirectory(prefix="overfit_") as folder:
        for split in ("train", "valid", "test"):
            write_dataset_csv(subset, Path(folder) / f"{split}_set.csv")
        results = train.main(trial_config(
            cfg, "overfit", csv_dir=folder, epochs=cfg.tune_overfit_epochs, rotation_degrees=0.0, color_jitter=0.0,
            translate_fraction=0.0, scale_jitter=0.0, flip=False, erase_probability=0.0, mixup_alpha=0.0, dropout=0.0,
            weight_decay=0.0,
        ))
    losses = [row["train_loss"] for row in results["history"]]
    trajectory = " -> ".join(f"{loss:.2f}" for loss in losses)
    print(f"step 2: training loss ({cfg.head}) on {len(subset)} fixed images: {trajectory}")
    return losses


def read_grid(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    frame = pd.read_csv(path, dtype={"recipe": str})
    if "recipe" not in frame:  # a grid written before trials were keyed by their recipe: none of it can be matched
        return []
    return frame.to_dict("records")


def write_grid(path: Path, rows: list[dict[str, float]]) -> None:
    write_csv(pd.DataFrame(rows, columns=list(GRID_COLUMNS)), path)


def sweep(cfg: Config, path: Path, settings: list[tuple[float, float]]) -> list[dict[str, float]]:
    """Run every (lr, weight_decay) of this recipe not yet in the CSV at `path`; returns this recipe's rows, best
    valid MAE first. Rows of other recipes (another model, head, data set...) stay in the CSV but are neither
    skipped for nor ranked against."""
    rows = read_grid(path)
    done = {row["recipe"] for row in rows}
    own = []
    for lr, weight_decay in settings:
        trial = trial_config(cfg, f"{path.stem}_lr{lr:g}_wd{weight_decay:g}", lr=lr, weight_decay=weight_decay,
                             epochs=cfg.tune_epochs)
        recipe = recipe_hash(trial)
        if recipe in done:
            print(f"  lr={lr:g} weight_decay={weight_decay:g}: recipe {recipe} already in {path}, skipped")
            own += [row for row in rows if row["recipe"] == recipe]
            continue
        results = train.main(trial)
        history = results["history"]
        rows.append({"recipe": recipe, "lr": lr, "weight_decay": weight_decay, "valid_mae": results["best_valid_mae"],
                     "valid_cs5": max(row["valid_cs5"] for row in history),
                     "train_loss": history[-1]["train_loss"], "seconds": sum(row["seconds"] for row in history)})
        own.append(rows[-1])
        write_grid(path, rows)  # after every trial: an interrupted sweep loses at most one trial
    return sorted(own, key=lambda row: row["valid_mae"] if math.isfinite(row["valid_mae"]) else math.inf)


def plot_grid(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    learning_rates = sorted({row["lr"] for row in rows})
    weight_decays = sorted({row["weight_decay"] for row in rows})
    values = np.full((len(weight_decays), len(learning_rates)), np.nan)
    for row in rows:
        values[weight_decays.index(row["weight_decay"]), learning_rates.index(row["lr"])] = row["valid_mae"]
    figure, axis = plt.subplots(figsize=(1.5 * len(learning_rates) + 2.5, 1.0 * len(weight_decays) + 1.8))
    sns.heatmap(values, annot=True, fmt=".2f", cmap="viridis_r", ax=axis, cbar_kws={"label": "valid MAE"},
                xticklabels=[f"{value:g}" for value in learning_rates],
                yticklabels=[f"{value:g}" for value in weight_decays])
    axis.set(xlabel="learning rate", ylabel="weight decay", title="valid MAE (years), lower is better")
    save_figure(figure, path)


SETTINGS = (*RECIPE_FIELDS, *RUN_FIELDS, "tune_learning_rates", "tune_weight_decays", "tune_epochs",
            "tune_overfit_images", "tune_overfit_epochs")  # what this script reads (its --help)


def main(cfg: Config) -> dict:
    """The five steps; returns the step results and the best (lr, weight_decay) by valid MAE."""
    print_config(cfg, "hyperparameters_tuning.py", SETTINGS)
    learning_rates = parse_values(cfg.tune_learning_rates, "lr")
    weight_decays = parse_values(cfg.tune_weight_decays, "weight_decay")
    tuning_dir = Path(cfg.runs_dir) / "tuning"
    step1 = initial_loss(cfg)
    step2 = overfit_subset(cfg)
    print(f"\nstep 3: learning-rate sweep, {cfg.tune_epochs} epochs each (weight decay {cfg.weight_decay:g})")
    step3 = sweep(cfg, tuning_dir / "lr_sweep.csv", [(lr, cfg.weight_decay) for lr in learning_rates])
    for row in sorted(step3, key=lambda row: row["lr"]):
        print(f"  lr={row['lr']:<8g} valid MAE {row['valid_mae']:6.2f}  train loss {row['train_loss']:6.2f}")
    print(f"\nstep 4: learning rate x weight decay, {len(learning_rates) * len(weight_decays)} trials")
    grid_path = tuning_dir / "grid.csv"
    step4 = sweep(cfg, grid_path, [(lr, wd) for wd in weight_decays for lr in learning_rates])
    plot_grid(step4, Path(cfg.pics_dir) / "tuning_grid.png")
    best = step4[0]
    print(f"  best: lr={best['lr']:g} weight_decay={best['weight_decay']:g} valid MAE {best['valid_mae']:.2f} "
          f"(table {grid_path}, heat-map {Path(cfg.pics_dir) / 'tuning_grid.png'})")
    epochs = max(cfg.epochs, 10 * cfg.tune_epochs)
    # every setting of the winning trial that differs from config.py's defaults (head, scheduler, label_sigma,
    # csv_dir, ...), so the printed line trains the recipe that was tuned, only for longer
    winner = replace(cfg, lr=best["lr"], weight_decay=best["weight_decay"], epochs=epochs)
    command = shlex.join(["python", "train.py", *to_argv(winner, always=("lr", "weight_decay", "epochs"))])
    print(f"\nstep 5: train the best setting longer:\n  {command}")
    return {"initial_loss": step1, "overfit_losses": step2, "lr_sweep": step3, "grid": step4, "best": best,
            "command": command, "winner": winner}


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], reads=SETTINGS))
