"""Several data sets in one training: the All-Age-Faces and FairFace readers with their own splits, the bin loss,
the combined split files, a training on exact ages and bins together, and the alignment on real faces."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import eda
import split_dataset
from custom_dataset_dataloader import SPLITS, DataError, age_ranges, read_dataset_csv, write_dataset_csv
from model import DistributionHead, RegressionHead, label_error, label_loss
from tests.helpers import REAL_DATA, make_config

FAIRFACE_BINS = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70")


def write_aaf(root: Path, face_folder: Path, count: int = 40) -> Path:
    """An All-Age-Faces release layout: 'original images/NNNNNAaa.jpg' and 'image sets/{train,val}.txt'."""
    images = root / "original images"
    images.mkdir(parents=True)
    (root / "image sets").mkdir()
    faces = sorted(face_folder.glob("*.jpg"))
    lines = {"train.txt": [], "val.txt": []}
    for index in range(count):
        age = 2 + (index * 7) % 78
        name = f"{index:05d}A{age:02d}.jpg"
        shutil.copy(faces[index % len(faces)], images / name)
        lines["val.txt" if index % 2 else "train.txt"].append(f"{name} {index % 3 % 2}")
    for file_name, rows in lines.items():
        (root / "image sets" / file_name).write_text("\n".join(rows) + "\n")
    return root


def write_fairface(root: Path, face_folder: Path, count: int = 60) -> Path:
    """A FairFace release layout: train/ and val/ with fairface_label_{train,val}.csv (age bins)."""
    faces = sorted(face_folder.glob("*.jpg"))
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        rows = []
        for index in range(count // 2):
            name = f"{split}/{index}.jpg"
            shutil.copy(faces[(index * 2 + (split == "val")) % len(faces)], root / name)
            rows.append({"file": name, "age": FAIRFACE_BINS[index % 9], "gender": ["Male", "Female"][index % 2],
                         "race": "White", "service_test": True})
        pd.DataFrame(rows).to_csv(root / f"fairface_label_{split}.csv", index=False)
    return root


def test_aaf_reader_and_its_own_split(tmp_path: Path, face_folder: Path) -> None:
    root = write_aaf(tmp_path / "aaf", face_folder)
    frame, malformed, _ = eda.scan_folder(str(root), check_images=False, dataset_format="aaf")
    assert len(frame) == 40 and not malformed
    first = frame.set_index("image_name").loc["original images/00001A09.jpg"]
    assert first["age"] == 9 and first["official_split"] == "test" and first["subject"] == "00001"
    # the release's rule: 0 female, 1 male
    assert frame.set_index("image_name").loc["original images/00000A02.jpg", "gender"] == "female"
    assert frame.set_index("image_name").loc["original images/00001A09.jpg", "gender"] == "male"
    cfg = make_config(tmp_path, root, dataset_format="aaf")
    write_dataset_csv(frame, Path(cfg.csv_dir) / "aaf_dataset.csv")
    splits = split_dataset.main(cfg)
    assert set(splits["test"]["official_split"]) == {"test"} and len(splits["test"]) == 20
    assert set(splits["train"]["official_split"]) == set(splits["valid"]["official_split"]) == {"train"}
    assert len(splits["train"]) + len(splits["valid"]) == 20 and len(splits["valid"]) >= 1


def test_aaf_reader_names_a_folder_without_its_lists(tmp_path: Path) -> None:
    (tmp_path / "original images").mkdir()
    with pytest.raises(DataError, match=r"image sets/train\.txt"):
        eda.scan_folder(str(tmp_path), check_images=False, dataset_format="aaf")


def test_fairface_val_is_never_trained_on(tmp_path: Path, face_folder: Path) -> None:
    root = write_fairface(tmp_path / "fairface", face_folder)
    cfg = make_config(tmp_path, root, dataset_format="fairface")
    eda.main(replace(cfg, check_images=False))
    splits = split_dataset.main(cfg)
    assert splits["test"]["image_name"].str.startswith("val/").all() and len(splits["test"]) == 30
    trained = pd.concat([splits["train"], splits["valid"]])
    assert trained["image_name"].str.startswith("train/").all() and len(trained) == 30
    assert splits["train"]["age"].isna().all()  # bins stay bins


def test_a_bin_label_pulls_the_predicted_mass_inside_the_bin() -> None:
    torch.manual_seed(0)
    head = DistributionHead(8, 0.0, 116, "dex", label_sigma=2.0)
    head.set_age_statistics(33.0, 15.0)
    features = torch.randn(16, 8)
    low, high = torch.full((16,), 50.0), torch.full((16,), 60.0)  # the bin 50-59
    optimiser = torch.optim.SGD(head.parameters(), lr=0.5)

    def mass_inside() -> float:
        probabilities = head(features).softmax(1)  # (16, 117)
        return probabilities[:, 50:60].sum(1).mean().item()

    before = mass_inside()
    for _ in range(200):
        optimiser.zero_grad()
        loss = label_loss(head, head(features), torch.stack([low, high], 1))
        loss.backward()
        optimiser.step()
    assert before < 0.2 and mass_inside() > 0.9
    ages = head.ages(head(features))  # the mass moved in from below: it gathers at the near edge, the age with it
    assert ((ages > 48) & (ages < 60)).all()
    # the open bin: 'more than 70' is [70, inf), its mass every age from 70 up
    open_loss = head.range_loss(head(features), torch.full((16,), 70.0), torch.full((16,), np.inf))
    assert torch.isfinite(open_loss) and open_loss > 0


def test_mixed_batches_take_each_label_by_its_kind() -> None:
    head = RegressionHead(4, 0.0, 116)
    head.set_age_statistics(30.0, 10.0)
    outputs = torch.tensor([0.0, 0.0, 0.0])  # every face predicted 30
    targets = torch.tensor([[20.0, 20.0], [30.0, 40.0], [40.0, 50.0]])  # exact 20; the bins 30-39 and 40-49
    assert label_error(head.ages(outputs), targets).tolist() == [10.0, 0.0, 10.0]
    # l1 on the exact row (10), the distance to the bin on the others (0 and 10): their mean
    assert label_loss(head, outputs, targets).item() == pytest.approx(20 / 3)
    assert label_loss(head, outputs, torch.tensor([20.0, 30.0, 40.0])).item() == pytest.approx(20 / 3)


def test_combined_splits_keep_each_source_and_refuse_a_face_in_two_splits(tmp_path: Path) -> None:
    folders = []
    for source, binned in (("utk", False), ("fairface", True)):
        folder = tmp_path / source
        for index, split in enumerate(SPLITS):
            rows = pd.DataFrame({"image_name": [f"{source}/{split}_{row}.jpg" for row in range(3)],
                                 "age": [np.nan if binned else 20.0 + row for row in range(3)],
                                 "gender": "male", "ethnicity": "white"})
            if binned:
                rows["age_bin"] = ["20-29", "30-39", "more than 70"]
            write_dataset_csv(rows.assign(source=source), folder / f"{split}_set.csv")
            del index
        folders.append(str(folder))
    cfg = make_config(tmp_path, tmp_path, combine=",".join(folders), csv_dir=str(tmp_path / "mix"))
    splits = split_dataset.main(cfg)
    train = read_dataset_csv(tmp_path / "mix" / "train_set.csv")
    assert set(train["source"]) == {"utk", "fairface"} and len(splits["train"]) == 6
    ranges = age_ranges(train)
    assert ranges[train["source"].eq("utk").to_numpy(), 0].tolist() == [20, 21, 22]
    assert ranges[train["source"].eq("fairface").to_numpy()].tolist() == [[20, 30], [30, 40], [70, np.inf]]
    test_file = tmp_path / "fairface" / "test_set.csv"
    test = read_dataset_csv(test_file)
    write_dataset_csv(test.assign(image_name=["fairface/train_0.jpg", *test["image_name"][1:]]), test_file)
    with pytest.raises(DataError, match=r"fairface/train_0\.jpg is in the train and the test split"):
        split_dataset.main(cfg)


@pytest.mark.slow
def test_one_training_on_exact_ages_and_bins_reports_each_source(tmp_path: Path, face_folder: Path) -> None:
    import train

    names = sorted(path.name for path in face_folder.glob("*.jpg"))
    rows = []
    for position, name in enumerate(names):
        age = int(name.split("_")[0])
        binned = position % 2 == 1  # half the faces labelled by their FairFace bin only
        label = next(label for label in FAIRFACE_BINS if age < _upper(label)) if binned else ""
        rows.append({"image_name": name, "age": np.nan if binned else age, "gender": "male", "ethnicity": "white",
                     "age_bin": label or np.nan, "source": "bins" if binned else "exact"})
    frame = pd.DataFrame(rows)
    cfg = make_config(tmp_path, face_folder, epochs=2, head="dex")
    for split, part in split_dataset.stratified_split(frame, 0.2, 0.2, 0, 5).items():
        write_dataset_csv(part, split_dataset.split_csv_path(cfg, split))
    results = train.main(cfg)
    assert set(results["test_by_source"]) == {"bins", "exact"}
    assert 0 <= results["test_by_source"]["bins"]["in_bin"] <= 1 and results["test_by_source"]["exact"]["mae"] > 0
    assert np.isfinite(results["test_mae"]) and 0 <= results["test_in_bin"] <= 1
    assert {"valid_bins_in_bin", "valid_exact_mae"} <= results["history"][0].keys()


def _upper(label: str) -> float:
    from custom_dataset_dataloader import age_bin_bounds

    return age_bin_bounds(label)[1]


@pytest.mark.skipif(not (REAL_DATA / "utkface200").is_dir(), reason="needs ../shared/data/utkface200")
def test_alignment_puts_real_faces_on_the_template(tmp_path: Path) -> None:
    import align
    from faces import ALIGNMENT_TEMPLATES, build_detector

    names = sorted(path.name for path in (REAL_DATA / "utkface200").glob("*.jpg"))[:60:6]  # 10 real faces
    rows = pd.DataFrame({"image_name": names, "age": [int(name.split("_")[0]) for name in names],
                         "gender": "male", "ethnicity": "white"})
    cfg = make_config(tmp_path, REAL_DATA / "utkface200", aligned_dir=str(tmp_path / "aligned"), aligned_size=128)
    for split in SPLITS:
        write_dataset_csv(rows, split_dataset.split_csv_path(cfg, split))
    counts = align.main(cfg)
    assert counts["aligned"] >= 27 and counts["no_face"] <= 3  # each face three times: once per split file
    aligned = read_dataset_csv(Path(cfg.csv_dir) / "aligned" / "test_set.csv")
    assert aligned["source"].eq(Path(cfg.csv_dir).name).all()
    detector, template = build_detector("yunet"), np.asarray(ALIGNMENT_TEMPLATES["face"].landmarks) * 128
    offsets = []
    for name in aligned["image_name"]:
        face = np.asarray(Image.open(Path(cfg.aligned_dir) / name).convert("RGB"))
        assert face.shape == (128, 128, 3)
        padded = np.pad(face, ((64, 64), (64, 64), (0, 0)))
        found = detector.detect_faces(padded, min_face_size=40)
        if found:
            offsets.append(np.abs(found[0].landmarks - 64 - template).mean())
    # found again, the landmarks sit within a few pixels of the template (YuNet's own jitter between passes)
    assert len(offsets) >= 8 and np.median(offsets) < 4.0
    # a second run keeps the faces it wrote; another template in the same folder is refused
    assert align.main(cfg)["aligned"] == counts["aligned"]
    with pytest.raises(SystemExit, match="another template"):
        align.main(replace(cfg, alignment_template="head"))


def test_a_backbone_brings_its_native_input_size_and_a_typed_size_wins() -> None:
    from config import parse_config

    assert parse_config(["--model_name=agev1_resnet10"]).image_size == 64
    assert parse_config(["--model_name=agev1_resnet10", "--image_size=96"]).image_size == 96
    assert parse_config(["--model_name=resnet18"]).image_size == 128  # no native size: config.py's


def test_analysis_names_a_mixed_csv_and_what_to_run_instead(tmp_path: Path, face_folder: Path) -> None:
    from analysis import errors
    from model import SHIPPED_MODEL

    names = sorted(path.name for path in face_folder.glob("*.jpg"))[:4]
    mixed = pd.DataFrame({"image_name": names, "age": [20.0, np.nan, 30.0, np.nan], "gender": "male",
                          "ethnicity": "white", "age_bin": [np.nan, "20-29", np.nan, "30-39"]})
    write_dataset_csv(mixed, tmp_path / "mixed.csv")
    cfg = replace(make_config(tmp_path, face_folder), checkpoint=str(SHIPPED_MODEL),
                  test_csv=str(tmp_path / "mixed.csv"), given_keys=("data_dir",))
    with pytest.raises(DataError, match="mixes exact ages and age bins"):
        errors.main(cfg)
