"""Train on one, test on another: every model file scored on every data set's test part, in colour and in grey,
with the bias on children and teenagers, and on FairFace-540 through the detector (RESULTS.md, "Several data sets").

Reads:  --checkpoint (model files, comma-separated), --test_sources (the aligned split folders align.py wrote, one
        per data set, comma-separated; their faces under --aligned_dir), ../shared/data/fairface540 with
        csv_dataset/fairface540/fairface_dataset.csv (eda.py --dataset_format=fairface).
Writes: results/matrix.csv (a row per model file x test source x colour/grey; a rerun replaces its own rows),
        results/matrix_groups.csv (per age bin / decade and per ethnicity of each source, colour only); prints both.

The test parts are faces align.py found with YuNet and warped onto the one template, the very steps inference.py
takes on a user's photo (it keeps the largest face where align.py keeps the centred one). Exact labels give the
MAE, CS@5 and the bias (mean signed error) of the ages 0-9 and 10-19; FairFace's bins give the share inside the
bin, the distance to it, and the bias as the signed distance (negative: predicted younger than the bin). Grey: each
face's luminance (ITU-R 601) in all three channels, as a scanned black-and-white print gives.

Run:  python -m experiments.matrix --checkpoint=checkpoints/a/best.pt,checkpoints/b/best.pt \\
          --aligned_dir=../data/aligned_face \\
          --test_sources=csv_dataset/utk64_face,csv_dataset/fairface_face,csv_dataset/aaf_face
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from config import Config, parse_config, print_config
from files import write_csv

RESULTS_CSV = Path("results/matrix.csv")
GROUPS_CSV = Path("results/matrix_groups.csv")
FAIRFACE_540 = (Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "fairface540",
                Path("csv_dataset/fairface540/fairface_dataset.csv"))
LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601, what PIL's convert("L") uses


def to_grey(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Normalised faces (B, 3, H, W) -> the same faces in grey, normalised again (the normalisation is linear per
    channel, so undoing it, mixing the channels and redoing it is exact)."""
    mean_tensor = torch.tensor(mean, dtype=images.dtype).view(1, 3, 1, 1)
    std_tensor = torch.tensor(std, dtype=images.dtype).view(1, 3, 1, 1)
    pixels = images * std_tensor + mean_tensor
    grey = (pixels * torch.tensor(LUMINANCE, dtype=images.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return (grey.expand_as(pixels) - mean_tensor) / std_tensor


@torch.inference_mode()
def predict(model: Any, loader: Any, grey: bool, model_cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted ages (N,), labels (N, 2) ranges) over an ordered loader."""
    predictions, labels = [], []
    for images, targets, _, _ in loader:
        if grey:
            images = to_grey(images, model_cfg.normalize_mean, model_cfg.normalize_std)
        predictions.append(model(images))
        labels.append(targets if targets.ndim == 2 else targets[:, None].expand(-1, 2))
    return torch.cat(predictions), torch.cat(labels)


def score(predicted: torch.Tensor, ranges: torch.Tensor) -> dict[str, float]:
    """MAE / CS@5 (exact labels) or share inside the bin / distance (bins), and the bias of 0-9 and 10-19."""
    from metrics import label_metrics
    from model import signed_label_error

    metrics = label_metrics(predicted, ranges)
    row = {key: metrics.get(key, np.nan) for key in ("mae", "cs5", "in_bin", "bin_distance")}
    signed, start = signed_label_error(predicted, ranges), ranges[:, 0]
    for low, high in ((0, 10), (10, 20)):
        rows = (start >= low) & (start < high)
        row[f"bias_{low}_{high - 1}"] = signed[rows].mean().item() if rows.any() else np.nan
    return row


def groups(frame: pd.DataFrame, predicted: torch.Tensor, ranges: torch.Tensor) -> pd.DataFrame:
    """Per age group (the bin, or the decade of an exact age) and per ethnicity: faces, MAE or share inside the
    bin, distance, bias."""
    from custom_dataset_dataloader import decade_start
    from model import signed_label_error

    frame = frame.reset_index(drop=True).assign(
        error=(predicted - ranges[:, 0]).abs().numpy(), signed=signed_label_error(predicted, ranges).numpy())
    binned = bool((ranges[:, 0] != ranges[:, 1]).any())
    frame["distance"] = frame["signed"].abs()
    frame["age_group"] = frame["age_bin"] if binned else [f"{int(d)}-{int(d) + 9}"
                                                           for d in decade_start(ranges[:, 0].numpy())]
    rows = []
    for grouping in ("age_group", "ethnicity"):
        for label, part in frame.groupby(grouping, sort=True):
            rows.append({"grouping": grouping, "group": label, "faces": len(part), "bias": part["signed"].mean(),
                         **({"in_bin": (part["distance"] == 0).mean(), "bin_distance": part["distance"].mean()}
                            if binned else {"mae": part["error"].mean()})})
    return pd.DataFrame(rows)


def measure(cfg: Config, checkpoint: str) -> tuple[list[dict[str, Any]], list[pd.DataFrame]]:
    """Rows of the matrix and group tables for one model file."""
    from analysis import errors
    from custom_dataset_dataloader import build_dataloader
    from model import load_model

    model, model_cfg, _ = load_model(checkpoint)
    rows, tables = [], []
    for folder in [part.strip() for part in cfg.test_sources.split(",") if part.strip()]:
        data_cfg = replace(model_cfg, data_dir=cfg.aligned_dir, csv_dir=folder, num_workers=cfg.num_workers,
                           cache_dir=cfg.cache_dir, batch_size=128)
        loader = build_dataloader(data_cfg, "test")
        frame = loader.dataset.frame
        for grey in (False, True):
            predicted, ranges = predict(model, loader, grey, model_cfg)
            rows.append({"model": checkpoint, "test": Path(folder).name, "grey": grey, "faces": len(predicted),
                         **score(predicted, ranges)})
            if not grey:
                tables.append(groups(frame, predicted, ranges).assign(model=checkpoint, test=Path(folder).name))
    data_dir, csv_path = FAIRFACE_540
    if data_dir.is_dir() and csv_path.is_file():
        found = errors.main(replace(cfg, checkpoint=checkpoint, data_dir=str(data_dir), test_csv=str(csv_path),
                                    detect=True, given_keys=(*cfg.given_keys, "data_dir")))
        rows.append({"model": checkpoint, "test": "fairface540 (photos, YuNet)", "grey": False, "faces": 540,
                     "in_bin": found["inside_bin"], "bin_distance": found["distance"]})
    return rows, tables


def merged(fresh: pd.DataFrame, path: Path) -> pd.DataFrame:
    """`fresh` after the rows of `path` that belong to other model files (a rerun replaces its own)."""
    if not path.is_file():
        return fresh
    earlier = pd.read_csv(path)
    return pd.concat([earlier[~earlier["model"].isin(fresh["model"])], fresh], ignore_index=True)


SETTINGS = ("checkpoint", "aligned_dir", "test_sources", "cache_dir", "num_workers", "bootstrap_samples",
            "detector", "match_training_resolution", "runs_dir", "pics_dir", "seed")  # its --help


def main(cfg: Config) -> pd.DataFrame:
    """Score every model file on every source's test part; write and print the matrix."""
    from model import model_files

    print_config(cfg, "experiments.matrix", SETTINGS)
    rows, tables = [], []
    for checkpoint in model_files(cfg.checkpoint):
        model_rows, model_tables = measure(cfg, str(checkpoint))
        rows += model_rows
        tables += model_tables
    table = merged(pd.DataFrame(rows), RESULTS_CSV)
    write_csv(table, RESULTS_CSV, "%.4f")
    write_csv(merged(pd.concat(tables, ignore_index=True), GROUPS_CSV), GROUPS_CSV, "%.4f")
    print(table.to_string(index=False, float_format="%.3f"))
    print(f"wrote {RESULTS_CSV} and {GROUPS_CSV}")
    return table


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], reads=SETTINGS))
