"""Ages on real photos: resolution augmentation (both loading paths alike), the training faces' resolution stored
and matched at inference and in exports, split files of two copies of one data set, FairFace's binned labels,
analysis.errors through the detector, and the shipped model (its card's hash, Grace Hopper's age)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import eda
import split_dataset
from custom_dataset_dataloader import (
    BatchAugmentation,
    ResolutionDegradation,
    age_bin_bounds,
    build_dataloader,
    build_transforms,
    change_resolution,
    degrade_face,
    distance_to_bins,
    face_resolution,
    read_dataset_csv,
    write_dataset_csv,
)
from model import SHIPPED_MODEL
from tests.helpers import REAL_DATA

IMAGES = REAL_DATA.parent / "images"
GRACE_HOPPER = IMAGES / "grace_hopper_512x512.jpg"
FAIRFACE = REAL_DATA / "fairface540"
MODEL_CARD = SHIPPED_MODEL.parent / "README.md"
NO_AUGMENTATION = {"flip": False, "rotation_degrees": 0.0, "translate_fraction": 0.0, "scale_jitter": 0.0,
                   "color_jitter": 0.0, "erase_probability": 0.0}


def _detail(pixels: torch.Tensor) -> float:
    """Mean absolute difference between horizontal neighbours: how much fine detail an image holds."""
    values = pixels.float()
    return float((values[..., 1:] - values[..., :-1]).abs().mean())


def _checkerboard(size: int = 64) -> torch.Tensor:
    """uint8 (3, size, size): 2-px squares, all fine detail."""
    rows = torch.arange(size).view(-1, 1) // 2
    columns = torch.arange(size).view(1, -1) // 2
    board = ((rows + columns) % 2 * 255).to(torch.uint8)
    return board.expand(3, size, size).clone()


def test_change_resolution_keeps_the_size_and_removes_the_detail():
    board = _checkerboard().unsqueeze(0)  # (1, 3, 64, 64)
    shrunk = change_resolution(board, 16)
    assert shrunk.shape == board.shape and shrunk.dtype == torch.uint8
    assert _detail(shrunk) < 0.2 * _detail(board)
    assert torch.equal(change_resolution(board, 64), board)  # at (or above) the side: unchanged
    flat = torch.full((2, 3, 64, 64), 90, dtype=torch.uint8)
    assert torch.equal(change_resolution(flat, 20), flat)  # a flat image has nothing to lose


def test_degrade_face_is_deterministic_and_each_step_acts():
    board = _checkerboard()
    first, second = degrade_face(board, 40, 1.0, 50), degrade_face(board, 40, 1.0, 50)
    assert torch.equal(first, second) and first.shape == board.shape and first.dtype == torch.uint8
    assert _detail(degrade_face(board, 64, 1.5, 95)) < _detail(board)  # the blur alone
    assert not torch.equal(degrade_face(board, 64, 0.0, 30), board)  # JPEG alone changes pixels


def test_resolution_degradation_draws_within_its_ranges():
    degradation = ResolutionDegradation(1.0, 24, 1.0, 30)
    torch.manual_seed(0)
    draws = [degradation.draw(128) for _ in range(400)]
    sides, sigmas, qualities = zip(*draws, strict=True)
    assert 24 <= min(sides) and max(sides) <= 128 and len(set(sides)) > 30
    assert 0 <= min(sigmas) and max(sigmas) <= 1.0
    assert 30 <= min(qualities) and max(qualities) <= 95
    half = ResolutionDegradation(0.5, 24, 1.0, 30)
    torch.manual_seed(1)
    share = np.mean([half.draw(128) is not None for _ in range(2000)])
    assert 0.45 < share < 0.55


def test_resolution_degradation_gives_a_batch_what_it_gives_face_by_face():
    degradation = ResolutionDegradation(0.5, 16, 1.0, 30)
    faces = torch.stack([_checkerboard(32)] * 12)
    torch.manual_seed(3)
    batch = degradation(faces)
    torch.manual_seed(3)
    one_by_one = torch.stack([degradation(face) for face in faces])
    assert torch.equal(batch, one_by_one)
    changed = [(face != original).any().item() for face, original in zip(batch, faces, strict=True)]
    assert 0 < sum(changed) < len(changed)


def test_both_loading_paths_degrade_the_same_faces_alike(split_config):
    """The transform of the plain path and the batch augmentation of the fast path, on the same faces and seed."""
    cfg = replace(split_config, **NO_AUGMENTATION, resolution_probability=0.5, image_size=32)
    plain, fast = build_transforms(cfg, train=True), BatchAugmentation(cfg, train=True)
    faces = torch.stack([_checkerboard(32)] * 8)
    torch.manual_seed(5)
    expected = torch.stack([plain(face) for face in faces])
    torch.manual_seed(5)
    torch.testing.assert_close(fast(faces), expected, atol=1e-6, rtol=0)
    assert BatchAugmentation(cfg, train=False).degradation is None  # evaluation never degrades


def test_face_resolution_is_the_median_stored_side(tmp_path):
    for index, side in enumerate((40, 64, 64, 200)):
        Image.new("RGB", (side, side), (120, 90, 60)).save(tmp_path / f"{index}.jpg")
    frame = pd.DataFrame({"image_name": [f"{index}.jpg" for index in range(4)]})
    assert face_resolution(frame, str(tmp_path)) == 64
    assert face_resolution(frame.assign(image_name="missing.jpg"), str(tmp_path)) is None


def test_matched_split_keeps_each_face_with_its_other_copy(split_config):
    """A second copy of the faces (another folder, same file names) lands in the split of its first copy."""
    reference = {name: read_dataset_csv(split_dataset.split_csv_path(split_config, name)) for name in
                 split_dataset.SPLITS}
    first = pd.concat(reference.values(), ignore_index=True)
    copies = first.assign(image_name="large/" + first["image_name"])
    extra = first.head(30).assign(image_name=[f"other/new_{index}.jpg" for index in range(30)])
    splits = split_dataset.matched_split(pd.concat([copies, extra], ignore_index=True), reference, split_config)
    for name, rows in splits.items():
        copied = rows[rows["image_name"].str.startswith("large/")]["image_name"].str.removeprefix("large/")
        assert set(copied) == set(reference[name]["image_name"])
    assert sum(len(rows) for rows in splits.values()) == len(copies) + len(extra)
    new = pd.concat([rows.assign(split=name) for name, rows in splits.items()])
    assert (new["image_name"].str.startswith("other/").groupby(new["split"]).sum() > 0).all()


def test_age_bins_and_the_distance_to_them():
    assert age_bin_bounds("0-2") == (0, 3) and age_bin_bounds("30-39") == (30, 40)
    assert age_bin_bounds("more than 70") == (70, float("inf")) and age_bin_bounds("70+") == (70, float("inf"))
    for bad in ("adult", "40-30", ""):
        with pytest.raises(ValueError):
            age_bin_bounds(bad)
    distances = distance_to_bins(np.array([39.9, 40.5, 27.0, 90.0, 65.0]),
                                 pd.Series(["30-39", "30-39", "30-39", "more than 70", "more than 70"]))
    np.testing.assert_allclose(distances, [0.0, 0.5, 3.0, 0.0, 5.0])


def _fairface_release(root: Path, face_folder: Path) -> list[str]:
    """A FairFace-style release folder: train/ and val/ images and their two label files; returns the bins."""
    bins = ["0-2", "3-9", "20-29", "more than 70", "50-59", "10-19"]
    faces = sorted(face_folder.glob("*.jpg"))[:len(bins)]
    for split, start in (("train", 0), ("val", 3)):
        (root / split).mkdir(parents=True)
        rows = []
        for index, (face, label) in enumerate(zip(faces[start:start + 3], bins[start:start + 3], strict=True)):
            Image.open(face).save(root / split / f"{index + 1}.jpg")
            rows.append({"file": f"{split}/{index + 1}.jpg", "age": label, "gender": "Female",
                         "race": "East Asian", "service_test": "True"})
        pd.DataFrame(rows).to_csv(root / f"fairface_label_{split}.csv", index=False)
    return bins


def test_fairface_release_reads_as_bins_never_exact_ages(tmp_path, face_folder):
    release = tmp_path / "fairface"
    bins = _fairface_release(release, face_folder)
    frame, malformed, _ = eda.scan_folder(str(release), check_images=True, dataset_format="fairface")
    assert not malformed and len(frame) == 6
    assert sorted(frame["age_bin"]) == sorted(bins)
    assert frame["age"].isna().all() and set(frame["ethnicity"]) == {"asian"} and set(frame["gender"]) == {"female"}
    path = tmp_path / "fairface_dataset.csv"
    write_dataset_csv(frame, path)
    reread = read_dataset_csv(path)
    assert reread["age"].isna().all() and list(reread["age_bin"]) == list(frame["age_bin"])


def test_a_binned_csv_gives_age_ranges_to_train_on(tmp_path, face_folder, split_config):
    """Bins are labels a model learns from (the DEX head: the mass inside the bin), never made exact ages."""
    release = tmp_path / "fairface"
    _fairface_release(release, face_folder)
    frame, _, _ = eda.scan_folder(str(release), check_images=False, dataset_format="fairface")
    csv_dir = tmp_path / "binned"
    for name in split_dataset.SPLITS:
        write_dataset_csv(frame, csv_dir / f"{name}_set.csv")
    loader = build_dataloader(replace(split_config, data_dir=str(release), csv_dir=str(csv_dir)), "train")
    _, ranges, _, _ = next(iter(loader))
    assert ranges.ndim == 2 and ranges.shape[1] == 2 and (ranges[:, 0] < ranges[:, 1]).all()


def test_a_data_set_folder_is_analysed_in_its_own_layout_with_no_csv(tmp_path, face_folder):
    """analysis --dataset_format=fairface --data_dir=<release> with no --test_csv reads the folder as eda.py does."""
    from analysis import prepare_evaluation
    from config import Config, folders_under

    release = tmp_path / "fairface"
    bins = _fairface_release(release, face_folder)
    cfg = replace(Config(), **folders_under(tmp_path), checkpoint=str(SHIPPED_MODEL), device="cpu",
                  dataset_format="fairface", data_dir=str(release), given_keys=("dataset_format", "data_dir"))
    setup = prepare_evaluation(cfg)
    frame = read_dataset_csv(setup.csv_path)
    assert setup.model_cfg.data_dir == str(release) and sorted(frame["age_bin"]) == sorted(bins)


def test_a_bad_bin_row_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("image_name,age,gender,ethnicity,age_bin\na.jpg,,male,white,30-39\nb.jpg,,male,white,old\n")
    with pytest.warns(UserWarning, match="skipping 1 row"):
        frame = read_dataset_csv(path)
    assert list(frame["image_name"]) == ["a.jpg"]


@pytest.mark.slow
def test_stored_face_resolution_reaches_inference_and_the_exports(tmp_path, split_config):
    """train.py stores the training faces' side; inference shrinks crops to it (or not) and both exports carry it."""
    import export_jit
    import inference
    import train

    cfg = replace(split_config, image_size=64, run_name="resolution")
    checkpoint = Path(train.main(cfg)["best_checkpoint"])
    stored = torch.load(checkpoint, weights_only=True)["face_resolution"]
    assert stored == 48  # the generated faces are 48 px, enlarged to 64
    matched, plain = inference.AgePredictor(checkpoint), inference.AgePredictor(checkpoint, match_resolution=False)
    assert matched.match_resolution and not plain.match_resolution
    crops = torch.stack([_checkerboard(64)] * 2).numpy()
    assert not np.allclose(matched.predict(crops), plain.predict(crops), atol=1e-4)
    for export_format in ("torchscript", "onnx"):
        result = export_jit.main(replace(cfg, checkpoint=str(checkpoint), format=export_format))
        exported = inference.AgePredictor(result["path"])
        assert exported.face_resolution == 48
        np.testing.assert_allclose(exported.predict(crops), matched.predict(crops), atol=1e-3)
    half = export_jit.main(replace(cfg, checkpoint=str(checkpoint), format="half",
                                   output=str(tmp_path / "shipped.pt")))
    assert half["sha256"] == hashlib.sha256(Path(half["path"]).read_bytes()).hexdigest()
    state = torch.load(half["path"], weights_only=True)
    assert state["face_resolution"] == 48 and state["weights_dtype"] == "float16"
    assert all(tensor.dtype == torch.float16 for tensor in state["model"].values() if tensor.is_floating_point())
    np.testing.assert_allclose(inference.AgePredictor(half["path"]).predict(crops), matched.predict(crops), atol=0.25)


@pytest.mark.slow
@pytest.mark.skipif(not FAIRFACE.is_dir(), reason="../shared/data/fairface540 is absent")
def test_errors_through_the_detector_scores_fairface_by_bin(tmp_path, split_config):
    """analysis.errors --detect=true on the real FairFace-540 photos with a one-epoch model: every bin scored, the
    photos without a face listed, the figure written."""
    import train
    from analysis import errors

    cfg = replace(split_config, image_size=32, run_name="fairface")
    checkpoint = train.main(cfg)["best_checkpoint"]
    csv_dir = tmp_path / "fairface_csv"
    eda.main(replace(cfg, dataset_format="fairface", data_dir=str(FAIRFACE), csv_dir=str(csv_dir),
                     check_images=False))
    frame = read_dataset_csv(csv_dir / "fairface_dataset.csv")
    subset = frame.groupby("age_bin", sort=False).head(8)  # 72 photos, 8 a bin: the test stays quick
    write_dataset_csv(subset, csv_dir / "subset.csv")
    result = errors.main(replace(cfg, checkpoint=checkpoint, data_dir=str(FAIRFACE), detect=True,
                                 test_csv=str(csv_dir / "subset.csv"), bootstrap_samples=50,
                                 given_keys=("data_dir",)))
    table = result["table"]
    assert result["images"] + result["no_face"] == len(subset) == 72 and result["no_face"] <= 1
    assert len(table[table["grouping"] == "bin"]) == 9
    assert 0 <= result["inside_bin"] <= 1 and result["distance"] >= 0
    predictions = pd.read_csv(result["predictions_path"])
    assert predictions["predicted"].notna().all() and predictions["age"].isna().all()
    assert (Path(cfg.pics_dir) / f"errors_{result['tag']}_bins.png").is_file()


def _card_hash() -> str:
    match = re.search(r"sha256[`:\s]*([0-9a-f]{64})", MODEL_CARD.read_text(encoding="utf-8"))
    assert match, f"{MODEL_CARD} names no sha256 of the shipped model"
    return match[1]


def test_the_shipped_model_is_the_file_its_card_describes():
    assert SHIPPED_MODEL.is_file(), "the shipped model is missing from models/"
    assert SHIPPED_MODEL.stat().st_size <= 8_500_000
    assert hashlib.sha256(SHIPPED_MODEL.read_bytes()).hexdigest() == _card_hash()
    state = torch.load(SHIPPED_MODEL, weights_only=True)
    config = state["config"]
    assert state["face_resolution"] and state["crop_geometry"] and config["image_size"] > 0
    assert json.dumps(config)  # a plain, JSON-able recipe


@pytest.mark.skipif(not GRACE_HOPPER.is_file(), reason="../shared/images is absent")
def test_the_shipped_model_gives_grace_hopper_her_age(tmp_path):
    """inference.py with no --checkpoint and no checkpoints: the shipped model, and Grace Hopper (77) at 62-92."""
    import inference
    from config import Config, folders_under

    cfg = replace(Config(), **folders_under(tmp_path), input=str(GRACE_HOPPER),
                  output=str(tmp_path / "grace_age.jpg"), device="cpu")
    rows = inference.main(cfg)
    assert len(rows) == 1
    assert 62 <= rows[0]["age"] <= 92, rows[0]
