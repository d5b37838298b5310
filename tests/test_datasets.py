"""Readers of the common data set layouts (tiny fakes of each) and the subject-exclusive split."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import eda
import split_dataset
from custom_dataset_dataloader import read_dataset_csv
from tests.helpers import make_config


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 24, 3), 128, np.uint8)).save(path)


def test_fgnet_names_give_subject_and_age(tmp_path):
    for name in ("001A02.JPG", "001A10.JPG", "002A43a.JPG", "002A43b.jpg", "notes.jpg"):
        _image(tmp_path / "images" / name)
    with pytest.warns(UserWarning, match="1 file name"):
        frame, malformed, _ = eda.scan_folder(str(tmp_path), True, "fgnet")
    assert malformed == ["images/notes.jpg"]
    assert frame["age"].tolist() == [2, 10, 43, 43] and frame["subject"].tolist() == ["001", "001", "002", "002"]


def test_agedb_names_give_age_gender_and_subject(tmp_path):
    for name in ("0_MariaCallas_35_f.jpg", "1_MariaCallas_40_f.jpg", "7_Jean_Paul_Sartre_60_m.jpg"):
        _image(tmp_path / name)
    frame, _, _ = eda.scan_folder(str(tmp_path), True, "agedb")
    assert frame.set_index("image_name").loc["7_Jean_Paul_Sartre_60_m.jpg", ["age", "gender", "subject"]].tolist() \
        == [60, "male", "Jean_Paul_Sartre"]
    assert sorted(frame["gender"]) == ["female", "female", "male"]


def test_appa_real_reads_real_and_apparent_age(tmp_path):
    (tmp_path / "gt_avg_train.csv").write_text(
        "file_name,num_ratings,apparent_age_avg,apparent_age_std,real_age\n"
        "000001.jpg,30,24.5,3.1,22\n000002.jpg,28,51.0,4.0,55\n000009.jpg,10,30,2,31\n")
    (tmp_path / "allcategories_train.csv").write_text(
        "file,user,gender,race,makeup,time,happiness\n000001.jpg,a,female,asian,no,no,no\n"
        "000002.jpg,b,male,caucasian,no,no,no\n")
    _image(tmp_path / "train" / "000001.jpg_face.jpg")
    _image(tmp_path / "train" / "000001.jpg")
    _image(tmp_path / "train" / "000002.jpg")  # no aligned crop: the full image is used
    with pytest.warns(UserWarning, match="train/000009.jpg"):
        frame, _, _ = eda.scan_folder(str(tmp_path), True, "appa_real")
    assert frame["image_name"].tolist() == ["train/000001.jpg_face.jpg", "train/000002.jpg"]
    assert frame["age"].tolist() == [22, 55] and frame["apparent_age"].tolist() == [24.5, 51.0]
    assert frame["gender"].tolist() == ["female", "male"] and frame["ethnicity"].tolist() == ["asian", "white"]


def test_labels_csv_for_morph_or_any_folder(tmp_path):
    for name in ("a/1.jpg", "a/2.jpg", "b/3.png"):
        _image(tmp_path / "faces" / name)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,age,gender,subject\na/1.jpg,30,M,s1\na/2.jpg,31.6,F,s2\nb/3.png,abc,M,s3\n"
                      "missing.jpg,20,M,s4\n")
    with pytest.warns(UserWarning, match="2 file name"):
        frame, bad, _ = eda.scan_folder(str(tmp_path / "faces"), True, "csv", str(labels))
    assert sorted(bad) == ["b/3.png", "missing.jpg"]
    assert frame["age"].tolist() == [30, 32] and frame["gender"].tolist() == ["male", "female"]
    assert frame["subject"].tolist() == ["s1", "s2"] and (frame["ethnicity"] == "unknown").all()


def test_eda_and_a_subject_split_end_to_end(tmp_path):
    faces = tmp_path / "FGNET" / "images"
    for subject in range(1, 31):
        for age in range(2, 2 + 4 * (subject % 5 + 1), 4):
            _image(faces / f"{subject:03d}A{age:02d}.JPG")
    cfg = make_config(tmp_path, tmp_path / "FGNET", dataset_format="fgnet", subject_split=True)
    eda.main(cfg)
    splits = split_dataset.main(cfg)
    subjects = [set(split["subject"]) for split in splits.values()]
    assert not (subjects[0] & subjects[1] or subjects[0] & subjects[2] or subjects[1] & subjects[2])
    whole = read_dataset_csv(Path(cfg.csv_dir) / "fgnet_dataset.csv")
    assert sum(len(split) for split in splits.values()) == len(whole)
    assert all(len(split) for split in splits.values())
    assert "subject" in read_dataset_csv(Path(cfg.csv_dir) / "train_set.csv")
