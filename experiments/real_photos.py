"""The variants table of RESULTS.md's "Real photos": each model file with inference's resolution setting off and on,
on the UTKFace 64 px test split, on FairFace-540 through the detector, and on the pasted-scene crop proof.

Reads:  --checkpoint (one or more model files, comma-separated; default: the newest checkpoints/*/best.pt or the
        shipped model), ../shared/data/utkface64 with csv_dataset/test_set.csv (eda.py + split_dataset.py),
        ../shared/data/fairface540 with csv_dataset/fairface540/fairface_dataset.csv (eda.py
        --dataset_format=fairface), ../shared/data/utkface200 for the pasted scenes.
Writes: results/real_photos.csv (one row per model file and setting; a rerun replaces the rows of its own files
        and settings), results/real_photos_fairface_groups.csv (FairFace-540 per bin and gender, the same rows)
        and runs/analysis/ (analysis.errors' tables and figures); prints the table.

For each setting (match_training_resolution false, then true):
- UTKFace test MAE / CS@5: every test face as the training cache sees it (load_image at the model's size) through
  inference.AgePredictor, so the resolution setting applies as it does to a user's crop (64 px faces: ~no-op);
  and the same predictions scored as FairFace's bins are (the share inside the bin of each face's true age, the
  distance to it): what the model reaches on faces like its training faces, the reference for FairFace's figures;
- FairFace-540: analysis.errors --detect=true (YuNet, alignment, the largest face): share inside the bin, mean
  distance to the bin, photos without a face;
- crop proof: benchmarks.inference.detection_proof on 100 pasted scenes (YuNet), mean |age of the detected crop -
  age of the original crop|;
- the setting's own cost: milliseconds per face of change_resolution on a batch of 16 crops (median of 50).

Run:  python -m experiments.real_photos --checkpoint=checkpoints/<run>/best.pt[,models/age_lite0_mix.pt] [--tta]
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis import ANALYSIS_SETTINGS
from config import Config, parse_config, print_config
from custom_dataset_dataloader import (
    age_bin_bounds,
    change_resolution,
    distance_to_bins,
    load_image,
    read_dataset_csv,
    screen_rows,
)
from files import write_csv
from model import choose_model_files

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
UTKFACE_TEST = (SHARED / "utkface64", Path("csv_dataset/test_set.csv"))
FAIRFACE = (SHARED / "fairface540", Path("csv_dataset/fairface540/fairface_dataset.csv"))
SCENE_FACES = SHARED / "utkface200"
FAIRFACE_BINS = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70")
RESULTS_CSV = Path("results/real_photos.csv")
BINS_CSV = Path("results/real_photos_fairface_groups.csv")  # FairFace-540 per bin and gender, each model and setting


def test_split_mae(predictor: Any, tta: bool) -> dict[str, float]:
    """MAE and CS@5 of `predictor` on the UTKFace 64 px test split, each face as the training cache decodes it."""
    data_dir, csv_path = UTKFACE_TEST
    frame, files = screen_rows(read_dataset_csv(csv_path), data_dir, csv_path)
    ages = frame["age"].to_numpy(float)
    predicted = []
    for start in range(0, len(files), 256):
        crops = np.stack([load_image(file.path, predictor.image_size, predictor.cfg.interpolation)
                          for file in files[start:start + 256]])
        predicted.append(predictor.predict(crops, tta))
    predicted = np.concatenate(predicted)
    errors = np.abs(predicted - ages)
    # the same predictions scored as FairFace scores its bins: what share of in-distribution faces, with exact
    # labels, this model puts inside a ten-year bin (the reference for FairFace's share)
    bins = pd.Series([bin_of(age) for age in ages])
    distance = distance_to_bins(predicted, bins)
    return {"utk64_test_mae": float(errors.mean()), "utk64_test_cs5": float((errors <= 5).mean()),
            "utk64_test_faces": len(errors), "utk64_test_inside_fairface_bin": float((distance == 0).mean()),
            "utk64_test_distance_fairface_bin": float(distance.mean())}


def bin_of(age: float) -> str:
    """FairFace's bin label of an exact age: 0-2, 3-9, 10-19, ..., 60-69, more than 70."""
    for label in FAIRFACE_BINS:
        low, high = age_bin_bounds(label)
        if low <= age < high:
            return label
    raise ValueError(f"age {age} falls in no FairFace bin")


def resolution_cost(image_size: int, side: int, repeats: int = 50) -> float:
    """Median milliseconds per face of change_resolution on 16 crops of image_size, down to `side`."""
    crops = torch.randint(0, 256, (16, 3, image_size, image_size), dtype=torch.uint8)
    timings = []
    for _ in range(repeats + 3):
        started = time.perf_counter()
        change_resolution(crops, side)
        timings.append((time.perf_counter() - started) * 1000 / len(crops))
    return float(np.median(timings[3:]))


def measure(cfg: Config, checkpoint: Path, match: bool) -> dict[str, Any]:
    """One row of the table: `checkpoint` with match_training_resolution=match."""
    from analysis import errors
    from benchmarks.inference import detection_proof
    from inference import AgePredictor

    predictor = AgePredictor(checkpoint, views=cfg.tta_views, match_resolution=match)
    row: dict[str, Any] = {"model": str(checkpoint), "match_training_resolution": match,
                           "face_resolution": predictor.face_resolution, "tta": cfg.tta}
    row |= test_split_mae(predictor, cfg.tta)
    data_dir, csv_path = FAIRFACE
    fairface = errors.main(replace(
        cfg, checkpoint=str(checkpoint), data_dir=str(data_dir), test_csv=str(csv_path), detect=True,
        match_training_resolution=match, given_keys=(*cfg.given_keys, "data_dir")))
    row |= {"fairface_inside_bin": fairface["inside_bin"], "fairface_distance": fairface["distance"],
            "fairface_no_face": fairface["no_face"]}
    row["groups"] = fairface["table"].assign(model=str(checkpoint), match_training_resolution=match, tta=cfg.tta)
    proof = detection_proof(predictor, sorted(SCENE_FACES.glob("*.jpg")), scenes=100, seed=cfg.seed,
                            detector_name="yunet", tta=cfg.tta)
    row |= {"crop_proof_mean_abs_difference": proof["mean_abs_age_difference"],
            "crop_proof_standard_error": proof["standard_error"]}
    side = predictor.face_resolution or predictor.image_size
    row["resolution_ms_per_face"] = resolution_cost(predictor.image_size, side) if match else 0.0
    return row


SETTINGS = (*ANALYSIS_SETTINGS, "bootstrap_samples")  # what this script reads (its --help)


def main(cfg: Config) -> pd.DataFrame:
    """Measure every model file with the setting off and on; write and print the table."""
    print_config(cfg, "experiments.real_photos", SETTINGS)
    checkpoints = choose_model_files(cfg)
    rows = [measure(cfg, checkpoint, match) for checkpoint in checkpoints for match in (False, True)]
    groups = pd.concat([row.pop("groups") for row in rows], ignore_index=True)
    table = merged(pd.DataFrame(rows), RESULTS_CSV)
    write_csv(table, RESULTS_CSV, "%.4f")
    write_csv(merged(groups, BINS_CSV), BINS_CSV, "%.4f")
    print(table.to_string(index=False, float_format="%.3f"))
    print(f"wrote {RESULTS_CSV} and {BINS_CSV}")
    return table


def merged(fresh: pd.DataFrame, path: Path) -> pd.DataFrame:
    """`fresh` after the rows of `path` that belong to other model files or settings (a rerun replaces its own)."""
    if not path.is_file():
        return fresh
    earlier = pd.read_csv(path)
    keys = ["model", "match_training_resolution", "tta"]
    replaced = pd.MultiIndex.from_frame(earlier[keys].astype(str)).isin(
        pd.MultiIndex.from_frame(fresh[keys].astype(str)))
    return pd.concat([earlier[~replaced], fresh], ignore_index=True)


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], reads=SETTINGS))
