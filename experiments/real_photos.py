"""The variants table of RESULTS.md's "Real photos": each model file with inference's resolution setting off and on,
on the UTKFace 64 px test split, on FairFace-540 through the detector, and on the pasted-scene crop proof.

Reads:  --checkpoint (one or more model files, comma-separated; default: the newest checkpoints/*/best.pt or the
        shipped model), ../shared/data/utkface64 with csv_dataset/test_set.csv (eda.py + split_dataset.py),
        ../shared/data/fairface540 with csv_dataset/fairface540/fairface_dataset.csv (eda.py
        --dataset_format=fairface), ../shared/data/utkface200 for the pasted scenes.
Writes: results/real_photos.csv (one row per model file and setting; appended rows replace earlier ones of the
        same file and setting) and runs/analysis/ (analysis.errors' tables for FairFace); prints the table.

For each setting (match_training_resolution false, then true):
- UTKFace test MAE / CS@5: every test face as the training cache sees it (load_image at the model's size) through
  inference.AgePredictor, so the resolution setting applies as it does to a user's crop (64 px faces: ~no-op);
- FairFace-540: analysis.errors --detect=true (YuNet, alignment, the largest face): share inside the bin, mean
  distance to the bin, photos without a face;
- crop proof: benchmark_inference.detection_proof on 100 pasted scenes (YuNet), mean |age of the detected crop -
  age of the original crop|;
- the setting's own cost: milliseconds per face of change_resolution on a batch of 16 crops (median of 50).

Run:  python -m experiments.real_photos --checkpoint=checkpoints/<run>/best.pt[,models/age_lite0_utkface.pt] [--tta]
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

from config import Config, parse_config, print_config, write_csv
from custom_dataset_dataloader import change_resolution, load_image, read_dataset_csv, screen_rows
from model import newest_checkpoint

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
UTKFACE_TEST = (SHARED / "utkface64", Path("csv_dataset/test_set.csv"))
FAIRFACE = (SHARED / "fairface540", Path("csv_dataset/fairface540/fairface_dataset.csv"))
SCENE_FACES = SHARED / "utkface200"
RESULTS_CSV = Path("results/real_photos.csv")


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
    errors = np.abs(np.concatenate(predicted) - ages)
    return {"utk64_test_mae": float(errors.mean()), "utk64_test_cs5": float((errors <= 5).mean()),
            "utk64_test_faces": len(errors)}


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
    from benchmark_inference import detection_proof
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
    proof = detection_proof(predictor, sorted(SCENE_FACES.glob("*.jpg")), scenes=100, seed=cfg.seed,
                            detector_name="yunet", tta=cfg.tta)
    row |= {"crop_proof_mean_abs_difference": proof["mean_abs_age_difference"],
            "crop_proof_standard_error": proof["standard_error"]}
    side = predictor.face_resolution or predictor.image_size
    row["resolution_ms_per_face"] = resolution_cost(predictor.image_size, side) if match else 0.0
    return row


def main(cfg: Config) -> pd.DataFrame:
    """Measure every model file with the setting off and on; write and print the table."""
    print_config(cfg, "experiments.real_photos")
    checkpoints = [Path(part) for part in cfg.checkpoint.split(",") if part] or [newest_checkpoint(cfg)]
    rows = [measure(cfg, checkpoint, match) for checkpoint in checkpoints for match in (False, True)]
    table = pd.DataFrame(rows)
    if RESULTS_CSV.is_file():  # keep the rows of other model files and settings
        earlier = pd.read_csv(RESULTS_CSV)
        keys = ["model", "match_training_resolution", "tta"]
        fresh = pd.MultiIndex.from_frame(table[keys].astype(str))
        earlier = earlier[~pd.MultiIndex.from_frame(earlier[keys].astype(str)).isin(fresh)]
        table = pd.concat([earlier, table], ignore_index=True)
    write_csv(table, RESULTS_CSV, "%.4f")
    print(table.to_string(index=False, float_format="%.3f"))
    print(f"wrote {RESULTS_CSV}")
    return table


if __name__ == "__main__":
    main(parse_config(sys.argv[1:]))
