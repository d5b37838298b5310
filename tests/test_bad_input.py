"""A folder like a user's real download: every stage runs over it without a crash, naming what it rejects."""

import io
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import eda
import inference
import split_dataset
import train
from custom_dataset_dataloader import DataError
from tests.helpers import make_config

STAMP = "20170109150557335"


def build_corpus(folder: Path, faces: Path) -> tuple[set[str], set[str]]:
    """Good faces plus every kind of bad file; returns (names that must be rejected, odd names that must be kept)."""
    folder.mkdir(parents=True)
    good = sorted(faces.iterdir())
    for path in good[:60]:
        shutil.copy(path, folder / path.name)
    sample = Image.open(good[0]).convert("RGB")
    jpeg = good[0].read_bytes()
    rejected = {
        f"40_0_0_{STAMP}.jpg.chip.jpg": b"",  # zero bytes
        f"41_1_1_{STAMP}.jpg.chip.jpg": jpeg[: len(jpeg) // 3],  # truncated
        f"42_0_2_{STAMP}.jpg.chip.jpg": b"this is a text file, not a JPEG",
        f"61_1_{STAMP}.jpg.chip.jpg": jpeg,  # missing field, as in UTKFace itself
        f"-1_0_0_{STAMP}.jpg": jpeg,
        f"999_0_0_{STAMP}.jpg": jpeg,
        f"abc_0_0_{STAMP}.jpg": jpeg,
        f"30_7_0_{STAMP}.jpg": jpeg,  # unknown gender code
    }
    for name, content in rejected.items():
        (folder / name).write_bytes(content)
    bomb = f"48_0_0_{STAMP}.png"
    Image.new("1", (20000, 20000)).save(folder / bomb)  # decompression-bomb size, tiny file
    kept = {
        f"43_1_3_{STAMP}.png": sample.convert("RGBA"),
        f"45_1_0_{STAMP}.jpg": sample.convert("CMYK"),
        f"46_0_1_{STAMP}.jpg": sample.convert("L"),
        f"50_0_0_with space {STAMP}.jpg": sample,
        f"51_1_0_café-ü-{STAMP}.jpg": sample,
        f"52_1_0_{STAMP}duplicate.jpg": sample,
    }
    for name, image in kept.items():
        image.save(folder / name)
    deep = np.asarray(sample.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(deep).save(folder / f"44_0_4_{STAMP}.png")  # 16-bit
    exif = sample.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    sample.save(buffer, format="JPEG", exif=exif.tobytes())
    (folder / f"47_1_2_{STAMP}.jpg").write_bytes(buffer.getvalue())  # EXIF-rotated
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden_49_0_0_x.jpg").write_bytes(jpeg)
    return {*rejected, bomb}, {*kept, f"44_0_4_{STAMP}.png", f"47_1_2_{STAMP}.jpg"}


@pytest.mark.slow
def test_every_stage_survives_a_messy_folder(tmp_path, face_folder):
    data_dir = tmp_path / "download"
    rejected, kept = build_corpus(data_dir, face_folder)
    cfg = make_config(tmp_path, data_dir, check_images=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = eda.main(cfg)
    messages = "\n".join(str(warning.message) for warning in caught)
    for name in rejected:
        assert messages.count(name) == 1, f"{name} should be named exactly once"
    assert kept <= set(frame["image_name"])
    assert len(frame) == 60 + len(kept)
    assert not any(name.startswith(".") for name in frame["image_name"])

    split_dataset.main(cfg)
    results = train.main(replace(cfg, epochs=1, run_name="messy"))
    assert np.isfinite(results["test_mae"])
    rows = inference.main(replace(cfg, checkpoint=results["best_checkpoint"], input=str(data_dir),
                                  output=str(tmp_path / "annotated"), no_detect=True))
    readable_but_misnamed = 5  # inference ignores labels: a malformed name with good pixels still gets a row
    assert len(rows) == len(frame) + readable_but_misnamed


def test_a_folder_with_nothing_usable_stops_with_one_sentence(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"")
    (folder / f"20_0_0_{STAMP}.jpg").write_bytes(b"truncated")
    with pytest.raises(DataError) as error, pytest.warns(UserWarning):
        eda.main(make_config(tmp_path, folder))
    assert error.value.code.startswith("error: no usable UTKFace images") and "\n" not in error.value.code


def test_split_csvs_with_bad_rows(tmp_path, face_folder):
    cfg = make_config(tmp_path, face_folder)
    Path(cfg.csv_dir).mkdir(parents=True)
    pd.DataFrame({"image_name": ["a.jpg", "b.jpg", None], "age": [30, "x", 40]}).to_csv(
        Path(cfg.csv_dir) / "utkface_dataset.csv", index=False)
    with pytest.warns(UserWarning, match="skipping 2 row"), pytest.raises(DataError, match="too few for a non-empty"):
        split_dataset.main(cfg)
    assert not (Path(cfg.csv_dir) / "train_set.csv").exists()  # no empty split files
