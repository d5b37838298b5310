"""Fine-tuning recipes for agev1_resnet10 (the face-pretrained backbone) on UTKFace's 64 px copy, side by side with
the default EfficientNet-Lite0: learning rates, the backbone's rate, augmentation, input size, heads.

Each recipe is config.py's defaults plus the changes in RECIPES, trained by train.main on the default split files
(csv_dataset/, from eda.py + split_dataset.py on ../shared/data/utkface64). A recipe whose run folder already holds
a results.json of the same recipe hash is read back, not trained again, so the script can be stopped and rerun.

Reads:  ../shared/data/utkface64 and csv_dataset/{train,valid,test}_set.csv
Writes: checkpoints/utk64_agev1_<recipe>/ and runs/utk64_agev1_<recipe>/ (train.py's outputs),
        results/agev1_recipes.csv (one row per recipe: test MAE with and without flip TTA, CS@5, best valid MAE,
        seconds per epoch)

Run:  python -m experiments.agev1_recipes                          # every recipe, about 4 min each at 64 px
      python -m experiments.agev1_recipes --recipes=64px,96px      # some of them
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from statistics import mean
from typing import Any

import pandas as pd

import train
from config import RECIPE_FIELDS, RUN_FIELDS, Config, parse_config, recipe_hash
from files import write_csv
from model import config_from_model_file, resolve_preprocessing

BASE = {"data_dir": "../shared/data/utkface64", "model_name": "agev1_resnet10", "image_size": 64, "tta": True}
NO_HEAD_START = {"pretrained_head": False}  # the head starts from zeros (predicting about the mean age)
FACE = {**NO_HEAD_START, "backbone_lr_scale": 0.3}  # --preset=face's changes to BASE
LIGHT = {"erase_probability": 0.0, "rotation_degrees": 5.0, "color_jitter": 0.1}  # lighter train augmentation
RECIPES: dict[str, dict[str, Any]] = {  # in the order they run
    # config.py's recipe (AdamW 1e-3, weight decay 0.05, DEX with label_sigma 2, 10 epochs, EMA), head from zeros
    "64px": NO_HEAD_START,
    "64px_light_augmentation": {**NO_HEAD_START, **LIGHT},
    # the head starts as the network's own age classifier
    "64px_head_start": {"pretrained_head": True},
    "64px_head_start_lr_3e-4": {"pretrained_head": True, "lr": 3e-4},
    "64px_backbone_lr_0.3": {**NO_HEAD_START, "backbone_lr_scale": 0.3},
    # the backbone at a fraction of the head's rate
    "64px_head_start_backbone_lr_0.3": {"pretrained_head": True, "backbone_lr_scale": 0.3},
    "64px_backbone_lr_0.1": {**NO_HEAD_START, "backbone_lr_scale": 0.1},
    "96px_backbone_lr_0.3": {**NO_HEAD_START, "image_size": 96, "backbone_lr_scale": 0.3},
    # (pretrained_head acts on distribution heads only: these two ran with it set, as it then was the default)
    "64px_l1_backbone_lr_0.3": {"pretrained_head": True, "head": "l1", "backbone_lr_scale": 0.3},
    "64px_coral_backbone_lr_0.3": {"pretrained_head": True, "head": "coral", "backbone_lr_scale": 0.3},
    # around the best (--preset=face): the rate, the batch, mixup, another distribution head, twice the epochs
    "64px_backbone_lr_0.3_lr_2e-3": {**FACE, "lr": 2e-3},
    "64px_backbone_lr_0.3_batch_32": {**FACE, "batch_size": 32},
    "64px_backbone_lr_0.3_mixup_0.2": {**FACE, "mixup_alpha": 0.2},
    "64px_backbone_lr_0.3_mean_variance": {**FACE, "head": "mean_variance"},
    "64px_backbone_lr_0.3_20_epochs": {**FACE, "epochs": 20},
}
OUTPUT = Path("results") / "agev1_recipes.csv"
COLUMNS = ("recipe", "changes", "image_size", "epochs", "best_valid_mae", "test_mae", "test_mae_tta", "test_cs5",
           "seconds_per_epoch", "recipe_hash", "run_name")


def run_recipe(cfg: Config, name: str, recipes: dict[str, dict[str, Any]] = RECIPES,
               prefix: str = "utk64_agev1_") -> dict[str, Any]:
    """Train one recipe of `recipes` (or read its finished run back) into run <prefix><name>; returns its row."""
    changes = {**recipes[name]}
    recipe_cfg = replace(cfg, **changes, run_name=f"{prefix}{name}")
    run_dir = Path(recipe_cfg.runs_dir) / recipe_cfg.run_name
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else None
    if results is None:
        results = train.main(recipe_cfg)
    else:  # the stored config with what older files left out filled in, as the run was made
        stored = config_from_model_file(json.loads((run_dir / "config.json").read_text()), run_dir / "config.json")
        if recipe_hash(stored) != recipe_hash(resolve_preprocessing(recipe_cfg)):
            raise SystemExit(f"error: {results_path} holds another recipe; move that run away to train {name}")
    return {"recipe": name, "changes": json.dumps(changes), "image_size": recipe_cfg.image_size,
            "epochs": recipe_cfg.epochs, "best_valid_mae": round(results["best_valid_mae"], 3),
            "test_mae": round(results["test_mae"], 3),
            "test_mae_tta": round(results.get("test_mae_tta", float("nan")), 3),
            "test_cs5": round(results["test_cs5"], 3),
            "seconds_per_epoch": round(mean(row["seconds"] for row in results["history"]), 1),
            "recipe_hash": recipe_hash(resolve_preprocessing(recipe_cfg)), "run_name": recipe_cfg.run_name}


def write_rows(rows: list[dict[str, Any]], path: Path = OUTPUT,
               recipes: dict[str, dict[str, Any]] = RECIPES) -> pd.DataFrame:
    """Merge `rows` into the CSV by recipe name (other recipes' rows are kept), in `recipes`' order."""
    fresh = pd.DataFrame(rows, columns=COLUMNS)
    if path.is_file():
        earlier = pd.read_csv(path, dtype={"recipe_hash": str})
        fresh = pd.concat([earlier[~earlier["recipe"].isin(fresh["recipe"])], fresh], ignore_index=True)
    order = {name: index for index, name in enumerate(recipes)}
    table = fresh.sort_values("recipe", key=lambda names: names.map(order)).reset_index(drop=True)
    write_csv(table, path)
    return table


def main(cfg: Config, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the named recipes (all by default), one after the other; returns their rows."""
    rows = []
    for name in names or list(RECIPES):
        rows.append(run_recipe(cfg, name))
        write_rows(rows)
        print(f"{name}: test MAE {rows[-1]['test_mae']} ({rows[-1]['test_mae_tta']} with TTA) -> {OUTPUT}")
    return rows


def parse_arguments(arguments: list[str]) -> tuple[Config, list[str] | None]:
    """--recipes=a,b (names from RECIPES) and parse_config's --key=value, with BASE for keys left out."""
    names = None
    rest = []
    for argument in arguments:
        if argument.startswith("--recipes="):
            names = [name for name in argument.split("=", 1)[1].split(",") if name]
            unknown = [name for name in names if name not in RECIPES]
            if unknown:
                raise SystemExit(f"error: unknown recipe(s) {', '.join(unknown)}; valid: {', '.join(RECIPES)}")
        else:
            rest.append(argument)
    given = {argument.split("=", 1)[0] for argument in rest}
    base = [f"--{key}={value}" for key, value in BASE.items() if f"--{key}" not in given]
    return parse_config(base + rest, reads=(*RECIPE_FIELDS, *RUN_FIELDS)), names


if __name__ == "__main__":
    main(*parse_arguments(sys.argv[1:]))
