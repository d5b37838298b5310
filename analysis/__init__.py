"""Analyses of a trained checkpoint on a CSV of faces; each writes its tables to runs/analysis/ and figures to pics/.

    python -m analysis.errors       error and bias by age decade, gender, ethnicity (bootstrap intervals)
    python -m analysis.sensitivity  MAE under growing brightness, blur, noise, JPEG, rotation, occlusion, ...
    python -m analysis.heatmaps     Grad-CAM maps per age group (CNNs; Grad-CAM on the token grid for the ViT)

Every analysis takes --checkpoint (default: the newest checkpoints/*/best.pt, else the shipped model) and
--test_csv (default: that checkpoint's own test split; with --data_dir and --dataset_format typed instead, the
whole folder read in that layout, e.g. --dataset_format=fairface --data_dir=../shared/data/fairface540). Images
are read and resized exactly as the checkpoint was trained (its image size and normalisation, from the config
stored in it), so a CSV of another data set gives a cross-data-set result: pass its --data_dir and --test_csv, and
--exclude_csv to leave out faces that the training set also holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from config import PREDICTION_FIELDS, Config, resolve_device, stored_recipe_for_run
from custom_dataset_dataloader import DataError, read_dataset_csv, split_csv_path, write_dataset_csv
from model import AgeEstimationModel, choose_model_files, load_model

# What every analysis script reads (each adds its own): the model file and how it predicts, the faces to analyse
# (typed data_dir / csv_dir win over the checkpoint's), how they are loaded, where the tables and figures go.
ANALYSIS_SETTINGS = (*PREDICTION_FIELDS, "data_dir", "csv_dir", "dataset_format", "labels_csv", "test_csv",
                     "exclude_csv", "batch_size", "num_workers", "use_cache", "loading", "mixed_precision", "cache_dir",
                     "pics_dir", "runs_dir", "max_age", "seed")


@dataclass
class Evaluation:
    """A checkpoint's model and the data to analyse, in the checkpoint's own preprocessing."""

    model: AgeEstimationModel  # eval mode, on `device`
    model_cfg: Config  # the checkpoint's config with the data paths of this analysis
    csv_path: Path  # the CSV of the faces analysed (after --exclude_csv)
    device: torch.device
    tag: str  # <run>__<csv stem>: names every output file
    checkpoint: Path  # the model file analysed (of an ensemble, its first member, whose model and data these are)
    members: tuple[Path, ...] = ()  # every model file of an ensemble (--checkpoint=a.pt,b.pt), else just checkpoint


def analysis_dir(cfg: Config) -> Path:
    return Path(cfg.runs_dir) / "analysis"


def exclude_rows(frame: pd.DataFrame, exclude_csv: str) -> pd.DataFrame:
    """`frame` without the rows whose file name (the last path part) appears in any of the comma-separated CSVs."""
    names: set[str] = set()
    for path in filter(None, (part.strip() for part in exclude_csv.split(","))):
        names.update(Path(name).name for name in read_dataset_csv(path)["image_name"])
    return frame[~frame["image_name"].map(lambda name: Path(name).name).isin(names)]


def scanned_csv(cfg: Config) -> Path:
    """--data_dir and --dataset_format typed, no --test_csv: the folder read in its layout by eda.scan_folder (all
    of it: another data set's photos are test faces for this model), written to runs/analysis/ as a project CSV."""
    import eda

    frame, _, _ = eda.scan_folder(cfg.data_dir, check_images=False, dataset_format=cfg.dataset_format,
                                  labels_csv=cfg.labels_csv)
    path = analysis_dir(cfg) / f"{Path(cfg.data_dir).resolve().name}_{cfg.dataset_format}.csv"
    write_dataset_csv(frame, path)
    print(f"read {len(frame)} labelled images of {cfg.data_dir} ({cfg.dataset_format}) into {path}")
    return path


def prepare_evaluation(cfg: Config, ensemble: bool = False) -> Evaluation:
    """Load the checkpoint and resolve the CSV: data_dir and csv_dir come from the command line when given,
    otherwise from the checkpoint (its own test split). With ensemble=True --checkpoint may name several model files
    (a,b): the first one's data and test split are used, and the tag names them all."""
    members = choose_model_files(cfg)
    if len(members) > 1 and not ensemble:
        raise SystemExit(f"error: this analysis takes one model file; --checkpoint={cfg.checkpoint} names "
                         f"{len(members)} (ensembles: python -m analysis.errors)")
    checkpoint = members[0]
    device = resolve_device(cfg.device)
    model, trained_cfg, _ = load_model(checkpoint, device)
    model_cfg = stored_recipe_for_run(trained_cfg, cfg, (
        "cache_dir", "use_cache", "loading", "batch_size", "num_workers", "device", "mixed_precision", "seed"))
    if cfg.test_csv:
        csv_path = Path(cfg.test_csv)
    elif "dataset_format" in cfg.given_keys and "data_dir" in cfg.given_keys:
        csv_path = scanned_csv(cfg)  # a data set folder in its own layout, read as eda.py reads it
    else:
        csv_path = split_csv_path(model_cfg, "test")
    runs = [path.parent.name if path.name == "best.pt" else path.stem for path in members]  # shipped: its name
    tag = f"{'+'.join(runs)}__{csv_path.stem}"
    if cfg.exclude_csv:
        frame = read_dataset_csv(csv_path, model_cfg.max_age)
        kept = exclude_rows(frame, cfg.exclude_csv)
        if kept.empty:
            raise DataError(f"--exclude_csv={cfg.exclude_csv} leaves none of the {len(frame)} rows of {csv_path}")
        print(f"{csv_path}: {len(kept)} of {len(frame)} rows kept after leaving out those in {cfg.exclude_csv}")
        tag += "__excluded"
        csv_path = analysis_dir(cfg) / f"{tag}.csv"
        write_dataset_csv(kept, csv_path)
    print(f"checkpoint {checkpoint}: {trained_cfg.model_name}, head {trained_cfg.head}, {trained_cfg.image_size} px; "
          f"analysing {csv_path} with images from {model_cfg.data_dir}")
    return Evaluation(model, model_cfg, csv_path, device, tag, checkpoint, tuple(members))
