import shutil
from pathlib import Path

import pandas as pd
import pytest

import eda
from custom_dataset_dataloader import DataError
from tests.helpers import make_config


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("26_1_2_20170116174525125.jpg.chip.jpg", (26, "female", "asian")),
        ("1_0_0_20161219140623097.jpg", (1, "male", "white")),
        ("116_1_4_20170112213500903.jpg.chip.jpg", (116, "female", "others")),
        ("61_1_20170109150557335.jpg.chip.jpg", None),  # missing field, as in the real data set
        ("39_1_20170116174525125.jpg.chip.jpg", None),
        ("999_0_0_20170116174525125.jpg", None),  # absurd age
        ("25_2_0_20170116174525125.jpg", None),  # unknown gender code
        ("25_0_7_20170116174525125.jpg", None),  # unknown race code
        ("x_0_0_20170116174525125.jpg", None),
        ("notes.jpg", None),
    ],
)
def test_parse_utkface_name(name, expected):
    assert eda.parse_utkface_name(name) == expected


def test_eda_writes_csv_and_figures_and_lists_bad_files(tmp_path, face_folder):
    data_dir = tmp_path / "UTKFace"
    shutil.copytree(face_folder, data_dir)
    (data_dir / "61_1_20170109150557335.jpg.chip.jpg").write_bytes((face_folder / next(
        p.name for p in face_folder.iterdir())).read_bytes())  # malformed name
    (data_dir / "30_0_1_20170109150557335.jpg.chip.jpg").write_bytes(b"not a jpeg")  # unreadable
    (data_dir / "92_1_0_20170109150557335.jpg.chip.jpg").write_bytes(next(face_folder.iterdir()).read_bytes())
    (data_dir / ".hidden_1_0_0_1.jpg").write_bytes(b"")
    (data_dir / "readme.txt").write_text("not an image")
    cfg = make_config(tmp_path, data_dir)

    with pytest.warns(UserWarning) as caught:
        frame = eda.main(cfg)
    messages = " ".join(str(warning.message) for warning in caught)
    assert "61_1_20170109150557335.jpg.chip.jpg" in messages
    assert "30_0_1_20170109150557335.jpg.chip.jpg" in messages

    written = pd.read_csv(Path(cfg.csv_dir) / "utkface_dataset.csv")
    assert list(written.columns) == ["image_name", "age", "gender", "ethnicity"]
    assert len(written) == len(frame) == 121  # 120 generated + the 92-year-old; bad files left out
    assert written["age"].max() == 92  # the 85+ tail is kept
    assert set(written["gender"]) <= {"male", "female"}
    assert set(written["ethnicity"]) <= {"white", "black", "asian", "indian", "others"}
    for figure in ("eda_samples", "eda_histograms", "eda_gender_ethnicity", "eda_age_by_group"):
        assert (Path(cfg.pics_dir) / f"{figure}.png").stat().st_size > 5000


def test_crosstab_totals_match(face_folder):
    frame, _, _ = eda.scan_folder(str(face_folder), check_images=False)
    table = eda.gender_ethnicity_table(frame)
    assert table.loc["total", "total"] == len(frame)
    assert table.drop(index="total", columns="total").values.sum() == len(frame)


def test_missing_folder_is_one_clear_sentence(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*demo\.py"):
        eda.scan_folder(str(tmp_path / "nowhere"))


def test_folder_without_usable_images_stops_clearly(tmp_path):
    (tmp_path / "holiday.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="no usable UTKFace images"), pytest.warns(UserWarning):
        eda.scan_folder(str(tmp_path))


def test_ages_over_max_age_are_left_out_by_eda_as_the_split_would_refuse_them(tmp_path, face_folder):
    import split_dataset

    data_dir = tmp_path / "UTKFace"
    shutil.copytree(face_folder, data_dir)
    (data_dir / "118_1_0_20170109150557335.jpg.chip.jpg").write_bytes(next(face_folder.iterdir()).read_bytes())
    cfg = make_config(tmp_path, data_dir)
    with pytest.warns(UserWarning, match=r"1 image\(s\) labelled older than max_age=116 left out "
                                         r"\(118_1_0_.*--max_age=118"):
        frame = eda.main(cfg)
    assert frame["age"].max() <= 116 and "118_1_0_20170109150557335.jpg.chip.jpg" not in set(frame["image_name"])
    split_dataset.main(cfg)  # the split accepts what eda wrote
