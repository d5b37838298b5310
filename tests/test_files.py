"""files.py's policy, as the stages apply it: never replace what is not ours, one run per output folder, a split
written as one, temporaries recognised by more than their name, no empty run folder after a failed start."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

import files
import inference
import split_dataset
import train
from config import Config, UsageError, parse_config
from custom_dataset_dataloader import DataError
from demo import generate_dataset
from model import AgeEstimationModel, save_checkpoint
from tests.helpers import make_config, write_splits

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("files")
    folder = root / "UTKFace"
    generate_dataset(folder, 60, seed=5, size=40)
    cfg = make_config(root, folder, check_images=False)
    torch.manual_seed(0)
    model = AgeEstimationModel("resnet18", image_size=32, head="dex")
    checkpoint = root / "best.pt"
    save_checkpoint(checkpoint, model, Config(model_name="resnet18", pretrained=False, image_size=32, head="dex"))
    photos = root / "photos"
    photos.mkdir()
    for index, face in enumerate(sorted(folder.iterdir())[:3]):
        Image.open(face).resize((64, 64)).save(photos / f"photo_{index}.jpg")
    return {"root": root, "folder": folder, "cfg": cfg, "checkpoint": checkpoint, "photos": photos}


def test_an_atomic_write_renames_only_a_complete_file_and_records_it(tmp_path):
    target = tmp_path / "table.csv"
    with pytest.raises(RuntimeError), files.atomic_write_path(target, record=True) as temporary:
        temporary.write_text("half")
        raise RuntimeError("stopped midway")
    assert not target.exists() and not (tmp_path / files.OURS).exists()  # nothing left, not even our folder
    files.write_csv(pd.DataFrame({"a": [1]}), target, record=True)
    assert target.read_text() == "a\n1\n" and files.written_by_us(target)
    target.write_text("a\n2\n")  # someone changed it: no longer ours to replace
    assert not files.written_by_us(target)
    with pytest.raises(UsageError, match="was not written by"):
        files.claim_outputs([target])


def test_files_of_one_result_are_renamed_together_or_not_at_all(tmp_path):
    paths = [tmp_path / f"{name}.csv" for name in ("train", "valid", "test")]
    for path in paths:
        path.write_text("old\n")
    frames = [pd.DataFrame({"x": [1]}), pd.DataFrame({"x": [2]}), "not a frame"]  # the third write fails
    with pytest.raises(AttributeError):
        files.write_csvs(frames, paths)
    assert [path.read_text() for path in paths] == ["old\n"] * 3


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s lock until its stdin closes."""
    code = textwrap.dedent(f"""
        import sys, files
        with files.folder_lock({str(folder)!r}, "the other run"):
            print("held", flush=True)
            sys.stdin.read()
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPOSITORY, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_into_an_output_folder_is_refused_with_the_first_named(data, tmp_path):
    output = tmp_path / "annotated"
    holder = _hold_lock(output)
    try:
        arguments = [f"--checkpoint={data['checkpoint']}", "--no_detect", f"--input={data['photos']}",
                     f"--output={output}", "--show=false"]
        with pytest.raises(SystemExit, match=rf"is being written by another run \(the other run, process "
                                             rf"{holder.pid}"):
            inference.main(parse_config(arguments))
        assert not (output / "predictions.jsonl").exists()
    finally:
        holder.stdin.close()
        holder.wait(30)
    rows = inference.main(parse_config(arguments))  # the lock went with its run
    assert len(rows) == 3 and not (output / files.OURS / "lock").exists()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    holder = _hold_lock(tmp_path)
    holder.kill()
    holder.wait(30)
    assert (tmp_path / files.OURS / "lock").exists()
    with files.folder_lock(tmp_path, "this run"):
        pass
    assert not (tmp_path / files.OURS).exists()


def test_split_never_replaces_a_users_file_and_writes_disjoint_splits(data, tmp_path):
    cfg = replace(data["cfg"], csv_dir=str(tmp_path / "csv"), pics_dir=str(tmp_path / "pics"))
    write_splits(cfg)  # the data set CSV and split files written as a user would (not recorded as ours)
    before = (tmp_path / "csv" / "train_set.csv").read_text()
    with pytest.raises(UsageError, match=r"train_set.csv exists and was not written by split_dataset.py"):
        split_dataset.main(cfg)
    assert (tmp_path / "csv" / "train_set.csv").read_text() == before
    for name in ("train", "valid", "test"):
        (tmp_path / "csv" / f"{name}_set.csv").unlink()
    splits = split_dataset.main(cfg)
    names = [set(split["image_name"]) for split in splits.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    splits = split_dataset.main(cfg)  # its own files: replaced
    assert files.written_by_us(tmp_path / "csv" / "valid_set.csv")


def test_training_refuses_splits_that_share_an_image_and_leaves_no_empty_run_folder(data, tmp_path):
    cfg = write_splits(replace(data["cfg"], csv_dir=str(tmp_path / "csv"), checkpoint_dir=str(tmp_path / "ck"),
                               runs_dir=str(tmp_path / "runs"), run_name="overlap"))
    train_rows = pd.read_csv(tmp_path / "csv" / "train_set.csv")
    test_rows = pd.read_csv(tmp_path / "csv" / "test_set.csv")
    pd.concat([test_rows, train_rows.head(1)]).to_csv(tmp_path / "csv" / "test_set.csv", index=False)
    with pytest.raises(DataError, match=rf"{train_rows['image_name'][0]} is in the train and the test split"):
        train.main(cfg)
    assert not (tmp_path / "ck" / "overlap").exists() and not (tmp_path / "runs" / "overlap").exists()


@pytest.mark.parametrize("setting", ["--run_name=../../x", "--run_name=a/b", "--run_name=..", "--device=foo",
                                     "--device=meta", "--device=cuda:abc"])
def test_a_run_name_is_a_name_and_a_device_one_torch_runs(setting):
    with pytest.raises(UsageError) as stop:
        parse_config([setting])
    assert setting.split("=")[0][2:] in str(stop.value) and "\n" not in str(stop.value)


def test_nothing_but_our_hidden_folder_is_swept(tmp_path):
    users = [tmp_path / ".thesis.20240101.tmp.docx", tmp_path / ".photos.2023.checking.zip"]
    for path in users:
        path.write_bytes(b"mine")
    files.write_csv(pd.DataFrame({"a": [1]}), tmp_path / "table.csv")
    ours = tmp_path / files.OURS
    ours.mkdir(exist_ok=True)
    stale = ours / f"{2**22 + 7}.0123abcd.table.csv"  # a temporary of a process that is gone
    stale.write_bytes(b"x")
    files.write_csv(pd.DataFrame({"a": [2]}), tmp_path / "table.csv")
    assert all(path.read_bytes() == b"mine" for path in users) and not stale.exists()
    assert set(os.listdir(tmp_path)) == {".thesis.20240101.tmp.docx", ".photos.2023.checking.zip", "table.csv"}


def test_a_full_disk_while_a_checkpoint_is_saved_is_one_sentence_and_keeps_the_old_one(tmp_path, monkeypatch):
    from model import CheckpointError

    model = AgeEstimationModel("resnet18", image_size=32, head="dex")
    path = tmp_path / "last.pt"
    save_checkpoint(path, model, Config(model_name="resnet18", pretrained=False, image_size=32))
    before = path.read_bytes()

    def full_disk(*arguments, **options):  # what torch's stream writer raises when the disk fills
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 2048")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"last.pt could not be written \(RuntimeError") as stop:
        save_checkpoint(path, model, Config(model_name="resnet18", pretrained=False, image_size=32))
    assert "\n" not in str(stop.value) and path.read_bytes() == before
    assert not (tmp_path / files.OURS).exists()  # the half-written temporary is gone


def test_the_demo_never_deletes_photos_it_did_not_generate(tmp_path):
    import demo

    photos = tmp_path / "my_photos"
    photos.mkdir()
    mine = photos / "30_0_0_20200101000000000.jpg"
    Image.new("RGB", (40, 40), (120, 100, 90)).save(mine)
    before = mine.read_bytes()
    cfg = replace(Config(), data_dir=str(photos), demo_num_images=5)
    with pytest.raises(SystemExit, match="holds images the demo did not generate"):
        demo.main(cfg)
    assert mine.read_bytes() == before and len(list(photos.glob("*.jpg"))) == 1


def test_a_full_disk_while_the_cache_is_written_is_one_sentence(data, tmp_path, monkeypatch):
    from custom_dataset_dataloader import build_dataset

    cfg = write_splits(replace(data["cfg"], csv_dir=str(tmp_path / "csv"), cache_dir=str(tmp_path / "cache")))

    def full_disk(descriptor, offset, length):  # the blocks cannot be taken: what a full disk answers
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full_disk, raising=False)
    with pytest.raises(DataError, match=r"could not be written \(OSError: the disk is full\)") as stop:
        build_dataset(cfg, "valid")
    assert "\n" not in str(stop.value) and not list((tmp_path / "cache").glob("*.npy"))
