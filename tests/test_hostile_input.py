"""The second bad-input corpus: what a hostile new user tries. Each case runs a stage as the command line would
(`main(parse_config([...]))`), and checks three things: it ends in a one-line message or warning that says what
happened (any other exception is a traceback and fails the case), it does not hang (the cases that could block
run in a thread with a deadline), and every file that existed before it is byte-identical afterwards.

The classes: outputs that would replace an input or a user's file; non-regular files (FIFOs) and symlink loops;
the data folder as a boundary; labels out of range or listed twice; too little data to split; stored configs as
input; settings out of range; per-file failures in folder inference; malformed or non-UTF-8 CSVs; NaN results;
and (the third round) a run folder claimed atomically, repeated split rows used once, inputs that only look like a
camera index, NaN / infinite / negative tuning lists, a flag given twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import eda
import export_jit
import files
import inference
import split_dataset
import train
from config import Config, config_to_dict, parse_config
from custom_dataset_dataloader import build_dataset, read_dataset_csv
from demo import generate_dataset
from faces import DEFAULT_CROP_GEOMETRY
from model import AgeEstimationModel, save_checkpoint
from tests.helpers import make_config, write_splits


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every regular file under root (FIFOs and links left alone: reading a FIFO would block)."""
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(root.rglob("*"))
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 50_000_000
            and files.OURS not in path.parts}  # our own records of what we wrote change with every write


def run_case(root: Path, call: Callable[[], object], seconds: float = 120,
             asked: tuple[Path, ...] = ()) -> tuple[str, str]:
    """Run `call` with a deadline; returns (the SystemExit message or '', all warnings joined). Fails on a hang,
    on any exception but SystemExit, on a message over one line, and on any pre-existing file changed but those
    the command was asked to write (`asked`: a rerun replacing its own outputs)."""
    before = _snapshot(root)
    outcome: dict[str, object] = {}

    def target() -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                call()
                outcome["message"] = ""
            except SystemExit as stop:
                outcome["message"] = str(stop.code)
            except BaseException as error:  # noqa: BLE001 - reported as the traceback it would be
                outcome["error"] = error
            outcome["warnings"] = "\n".join(str(warning.message) for warning in caught)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"hang: still running after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    message = outcome["message"]
    assert "\n" not in message, f"a message of more than one line: {message}"
    after = _snapshot(root)
    changed = [name for name, digest in before.items()
               if after.get(name) != digest and name not in {str(path) for path in asked}]
    assert not changed, f"pre-existing files changed or removed: {changed}"
    return message, outcome["warnings"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """A data folder of 90 generated faces with its splits, and a small DEX checkpoint with a crop geometry."""
    root = tmp_path_factory.mktemp("hostile")
    data = root / "UTKFace"
    generate_dataset(data, 90, seed=3, size=48)
    cfg = write_splits(make_config(root, data, check_images=False))
    torch.manual_seed(0)
    model = AgeEstimationModel("resnet18", image_size=32, head="dex")
    model.set_age_statistics(35.0, 15.0)
    checkpoint = root / "model" / "best.pt"
    checkpoint.parent.mkdir()
    model_cfg = Config(model_name="resnet18", pretrained=False, image_size=32, head="dex")
    save_checkpoint(checkpoint, model, model_cfg, crop_geometry=DEFAULT_CROP_GEOMETRY.to_dict())
    photos = root / "photos"
    photos.mkdir()
    faces = sorted(data.iterdir())
    for name, face in (("a.jpg", faces[0]), ("a.png", faces[1]), ("b.jpg", faces[2])):
        Image.open(face).resize((96, 96)).save(photos / name)
    Image.open(faces[3]).save(photos / "b_age.jpg")  # the user's own file that happens to have our naming
    return {"root": root, "cfg": cfg, "checkpoint": checkpoint, "photos": photos, "model_cfg": model_cfg,
            "model": model}


def _inference(workspace: dict, *arguments: str) -> Callable[[], object]:
    base = [f"--checkpoint={workspace['checkpoint']}", "--no_detect", "--device=cpu", "--show=false"]
    return lambda: inference.main(parse_config([*base, *arguments]))


# --- 1. nothing we write replaces an input or a user's file -------------------------------------------------

def test_an_output_that_is_the_input_is_refused(workspace):
    photo = workspace["photos"] / "b.jpg"
    message, _ = run_case(workspace["root"], _inference(workspace, f"--input={photo}", f"--output={photo}"))
    assert "is also an input of this run" in message


def test_an_existing_user_file_is_never_replaced_but_our_own_output_is(workspace, tmp_path):
    user_file = tmp_path / "holiday.jpg"
    shutil.copy(workspace["photos"] / "a.jpg", user_file)
    photo = workspace["photos"] / "b.jpg"
    message, _ = run_case(tmp_path, _inference(workspace, f"--input={photo}", f"--output={user_file}"))
    assert "was not written by inference.py" in message
    ours = tmp_path / "b_annotated.png"
    for _ in range(2):  # the second run replaces what the first one wrote
        message, _ = run_case(tmp_path, _inference(workspace, f"--input={photo}", f"--output={ours}"),
                              asked=(ours, ours.with_suffix(".jsonl")))
        assert message == "" and files.written_by_us(ours)


def test_folder_inference_into_its_own_folder_keeps_every_photo(workspace, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(workspace["photos"], photos)
    message, _ = run_case(tmp_path, _inference(workspace, f"--input={photos}", f"--output={photos}"))
    assert message == ""
    rows = [json.loads(line) for line in (photos / "predictions.jsonl").read_text().splitlines()]
    assert {Path(row["source"]).name for row in rows} == {"a.jpg", "a.png", "b.jpg", "b_age.jpg"}  # all four read
    written = {path.name for path in photos.iterdir() if files.written_by_us(path)}
    # a.jpg and a.png get two names; b.jpg's result avoids the user's own b_age.jpg
    assert written >= {"a_jpg_age.jpg", "a_png_age.jpg", "b_age_2.jpg", "b_age_age.jpg"}
    ours = tuple(photos / name for name in (*written, "predictions.jsonl"))
    message, _ = run_case(tmp_path, _inference(workspace, f"--input={photos}", f"--output={photos}"), asked=ours)
    assert message == "" and len(list(photos.glob("*_2_age.jpg"))) == 0  # a rerun leaves our annotations out
    assert len((photos / "predictions.jsonl").read_text().splitlines()) == 4


def test_export_never_replaces_the_checkpoint_or_a_user_file(workspace, tmp_path):
    checkpoint = workspace["checkpoint"]
    export = lambda output: lambda: export_jit.main(parse_config(  # noqa: E731
        [f"--checkpoint={checkpoint}", f"--output={output}"]))
    message, _ = run_case(workspace["root"], export(checkpoint))
    assert "is the checkpoint being exported" in message
    notes = tmp_path / "notes.torchscript"
    notes.write_text("my notes")
    message, _ = run_case(tmp_path, export(notes))
    assert "was not written by export_jit.py" in message
    good = tmp_path / "model.torchscript"
    for _ in range(2):
        message, _ = run_case(tmp_path, export(good), asked=(good,))
        assert message == "" and files.written_by_us(good)
    assert not (tmp_path / files.OURS).exists() or not any((tmp_path / files.OURS).glob("*.torchscript"))


@pytest.mark.slow  # two short trainings
def test_resume_writes_where_the_command_line_says(workspace, tmp_path):
    cfg = replace(workspace["cfg"], checkpoint_dir=str(tmp_path / "original"), runs_dir=str(tmp_path / "runs"),
                  pics_dir=str(tmp_path / "pics"), epochs=1, run_name="t1")
    train.main(cfg)
    shutil.copytree(tmp_path / "original", tmp_path / "copy")
    original = _snapshot(tmp_path / "original")
    resumed = replace(cfg, checkpoint_dir=str(tmp_path / "copy"), runs_dir=str(tmp_path / "copy_runs"), epochs=2,
                      resume=True, lr=0.5, given_keys=("checkpoint_dir", "runs_dir", "epochs", "resume", "lr"))
    message, caught = run_case(tmp_path / "original", lambda: train.main(resumed))
    assert message == "" and "ignored: lr" in caught
    assert _snapshot(tmp_path / "original") == original
    assert torch.load(tmp_path / "copy" / "t1" / "last.pt", weights_only=True)["epoch"] == 2
    assert (tmp_path / "copy_runs" / "t1").is_dir()


# --- 2. nothing hangs: FIFOs and symlink loops --------------------------------------------------------------

@pytest.mark.parametrize("use_cache", [True, False])
def test_a_fifo_listed_in_a_split_is_refused_by_name(workspace, tmp_path, use_cache):
    data = tmp_path / "data"
    shutil.copytree(workspace["cfg"].data_dir, data)
    os.mkfifo(data / "30_0_0_fifo.jpg")
    (data / "31_0_0_loop.jpg").symlink_to(data / "31_0_0_loop.jpg")
    frame = read_dataset_csv(Path(workspace["cfg"].csv_dir) / "test_set.csv")
    extra = pd.DataFrame({"image_name": ["30_0_0_fifo.jpg", "31_0_0_loop.jpg"], "age": [30, 31],
                          "gender": ["male"] * 2, "ethnicity": ["white"] * 2})
    csv_path = tmp_path / "test_set.csv"
    pd.concat([frame, extra]).to_csv(csv_path, index=False)
    cfg = replace(workspace["cfg"], data_dir=str(data), use_cache=use_cache, cache_dir=str(tmp_path / "cache"))
    result = {}
    _, caught = run_case(tmp_path, lambda: result.setdefault("set", build_dataset(cfg, "test",
                                                                                  csv_path=str(csv_path))), 60)
    assert "30_0_0_fifo.jpg' is not a regular file" in caught and "31_0_0_loop.jpg' cannot be resolved" in caught
    assert len(result["set"]) == len(frame)
    result["set"][0]  # reading an image does not block either


def test_eda_lists_no_fifo_and_no_symlink_out_of_the_folder(workspace, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(workspace["cfg"].data_dir, data)
    outside = tmp_path / "outside" / "50_1_0_20170109150557335.jpg"
    outside.parent.mkdir()
    shutil.copy(next(data.iterdir()), outside)
    (data / "50_1_0_20170109150557335.jpg.chip.jpg").symlink_to(outside)
    (data / "51_1_0_20170109150557335.jpg").symlink_to("/etc/passwd")
    os.mkfifo(data / "52_1_0_20170109150557335.jpg")
    cfg = make_config(tmp_path, data)
    result = {}
    _, caught = run_case(tmp_path, lambda: result.setdefault("frame", eda.main(cfg)), 120)
    names = set(result["frame"]["image_name"])
    assert not {"50_1_0_20170109150557335.jpg.chip.jpg", "51_1_0_20170109150557335.jpg",
                "52_1_0_20170109150557335.jpg"} & names
    assert caught.count("points outside the data folder") == 2


def test_rows_leading_out_of_the_folder_are_skipped_and_named(workspace, tmp_path):
    frame = read_dataset_csv(Path(workspace["cfg"].csv_dir) / "test_set.csv")
    outside = tmp_path / "outside.jpg"
    shutil.copy(workspace["photos"] / "a.jpg", outside)
    extra = pd.DataFrame({"image_name": ["../" * 30 + "etc/passwd", str(outside)], "age": [30, 31],
                          "gender": ["male"] * 2, "ethnicity": ["white"] * 2})
    csv_path = tmp_path / "evil.csv"
    pd.concat([frame, extra]).to_csv(csv_path, index=False)
    result = {}
    _, caught = run_case(tmp_path, lambda: result.setdefault("set", build_dataset(
        replace(workspace["cfg"], use_cache=False), "test", csv_path=str(csv_path))))
    assert "2 row(s) refused" in caught and caught.count("points outside the data folder") == 2
    assert len(result["set"]) == len(frame)


# --- 4. labels are checked where they enter ----------------------------------------------------------------

@pytest.mark.parametrize("age", ["500", "inf", "1e308", "-3"])
def test_an_age_out_of_range_names_the_file_and_line(workspace, tmp_path, age):
    frame = pd.read_csv(Path(workspace["cfg"].csv_dir) / "train_set.csv", dtype=str)
    frame.loc[2, "age"] = age
    csv_path = tmp_path / "train_set.csv"
    frame.to_csv(csv_path, index=False)
    message, _ = run_case(tmp_path, lambda: build_dataset(workspace["cfg"], "train", csv_path=str(csv_path)))
    assert f"{csv_path}: 1 age(s) outside 0..116" in message and "line 4" in message


def test_an_image_listed_twice_is_kept_once(workspace, tmp_path):
    data = Path(workspace["cfg"].data_dir)
    names = sorted(path.name for path in data.iterdir())[:30]
    labels = tmp_path / "labels.csv"
    lines = ["path,age"] + [f"{name},{20 + index}" for index, name in enumerate(names)]
    lines += [f"{names[0]},70", f"./{names[1]},71"]  # the same images again, one in another spelling
    labels.write_text("\n".join(lines) + "\n")
    cfg = make_config(tmp_path, data, dataset_format="csv", labels_csv=str(labels), check_images=False)
    result = {}
    _, caught = run_case(tmp_path, lambda: result.setdefault("frame", eda.main(cfg)))
    assert len(result["frame"]) == 30 and caught.count("listed again; its first row is kept") == 2
    assert result["frame"].set_index("image_name").loc[names[0], "age"] == 20


def test_a_data_set_too_small_to_split_stops(workspace, tmp_path):
    cfg = make_config(tmp_path, workspace["cfg"].data_dir)
    Path(cfg.csv_dir).mkdir(parents=True)
    read_dataset_csv(Path(workspace["cfg"].csv_dir) / "test_set.csv").head(2).to_csv(
        Path(cfg.csv_dir) / "utkface_dataset.csv", index=False)
    message, _ = run_case(tmp_path, lambda: split_dataset.main(cfg))
    assert "too few for a non-empty" in message and not (Path(cfg.csv_dir) / "train_set.csv").exists()


# --- 5. settings and stored configs ---------------------------------------------------------------------

@pytest.mark.parametrize("argument", [
    "--lr=-1", "--lr=nan", "--weight_decay=nan", "--normalize_std=0,0,0", "--smoothing=5", "--ema_decay=2",
    "--max_age=0", "--dropout=2", "--seed=-1", "--num_workers=-1", "--image_size=100000", "--batch_size=0",
])
def test_a_setting_out_of_range_stops_before_any_work(tmp_path, argument):
    message, _ = run_case(tmp_path, lambda: parse_config([argument]))
    assert message.startswith("error: ") and argument[2:].split("=")[0] in message


@pytest.mark.parametrize(("change", "expected"), [
    ({"image_size": -1}, "image_size=-1 must lie in"), ({"image_size": "64"}, "image_size='64' is not a int"),
    ({"image_size": 64.5}, "is not a int"), ({"image_size": 100000}, "image_size=100000 must lie in"),
    ({"dropout": 5}, "dropout=5.0 must lie in"), ({"normalize_std": [0, 0, 0]}, "normalize_std"),
    ({"max_age": 50}, "the weights do not fit"), (None, "not a dict"), ([1, 2], "not a dict"),
])
def test_a_damaged_stored_config_is_named(workspace, tmp_path, change, expected):
    checkpoint = torch.load(workspace["checkpoint"], weights_only=True)
    checkpoint["config"] = change if not isinstance(change, dict) else {**checkpoint["config"], **change}
    path = tmp_path / "best.pt"
    torch.save(checkpoint, path)
    message, _ = run_case(tmp_path, lambda: inference.AgePredictor(path))
    assert str(path) in message and expected in message


@pytest.mark.slow  # an export first
@pytest.mark.parametrize("config_text", ["{garbled", None])
def test_a_torchscript_file_with_a_damaged_config_entry_is_named(workspace, tmp_path, config_text):
    good = tmp_path / "model.torchscript"
    export_jit.main(parse_config([f"--checkpoint={workspace['checkpoint']}", f"--output={good}"]))
    damaged = tmp_path / "damaged.torchscript"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(damaged, "w") as target:
        for item in source.infolist():
            if item.filename.endswith("/extra/config.json"):
                if config_text is None:
                    continue  # the entry is missing
                target.writestr(item, config_text)
            else:
                target.writestr(item, source.read(item.filename))
    message, _ = run_case(tmp_path, lambda: inference.AgePredictor(damaged))
    assert str(damaged) in message and "config.json" in message


# --- 6. one bad file never ends a batch; bad output paths fail before the work -------------------------------

def test_a_file_whose_result_cannot_be_written_is_a_warning(workspace, tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.jpg", "b.jpg"):
        shutil.copy(workspace["photos"] / name, photos / name)
    shutil.copy(workspace["photos"] / "b.jpg", photos / ("x" * 250 + ".jpg"))  # near the 255-byte name limit
    write_image = inference.write_image

    def failing_for_b(path, canvas):  # b's annotated copy meets a full disk
        if path.name.startswith("b_"):
            raise OSError(28, "No space left on device")
        write_image(path, canvas)

    monkeypatch.setattr(inference, "write_image", failing_for_b)
    output = tmp_path / "annotated"
    message, caught = run_case(tmp_path, _inference(workspace, f"--input={photos}", f"--output={output}"))
    assert message == "" and "could not be written" in caught
    rows = (output / "predictions.jsonl").read_text().splitlines()
    assert sorted(Path(json.loads(row)["source"]).name for row in rows) == sorted(["a.jpg", "x" * 250 + ".jpg"])
    assert (output / ("x" * 200 + "_age.jpg")).is_file()  # the long name's copy under a shortened name


@pytest.mark.parametrize(("input_name", "output_name", "expected"), [
    ("b.jpg", "g.txt", "an annotated photo is written as"),
    ("clip.mp4", "clip_out.txt", "an annotated video is written as"),
    ("photos", "existing_file.jpg", "a folder input needs an output folder"),
])
def test_a_bad_output_path_fails_before_the_work(workspace, tmp_path, input_name, output_name, expected):
    import cv2

    source = workspace["photos"] / input_name if input_name != "photos" else workspace["photos"]
    if input_name == "clip.mp4":
        source = tmp_path / "clip.mp4"
        writer = cv2.VideoWriter(str(source), cv2.VideoWriter_fourcc(*"mp4v"), 5, (64, 64))
        for _ in range(3):
            writer.write(np.full((64, 64, 3), 120, np.uint8))
        writer.release()
    output = tmp_path / output_name
    if output_name == "existing_file.jpg":
        shutil.copy(workspace["photos"] / "a.jpg", output)
    message, _ = run_case(workspace["root"], _inference(workspace, f"--input={source}", f"--output={output}"))
    assert expected in message


def test_a_video_into_a_missing_folder_is_written(workspace, tmp_path):
    import cv2

    source = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(source), cv2.VideoWriter_fourcc(*"mp4v"), 5, (64, 64))
    for _ in range(3):
        writer.write(np.full((64, 64, 3), 120, np.uint8))
    writer.release()
    output = tmp_path / "new" / "folder" / "clip_age.mp4"
    message, _ = run_case(workspace["root"], _inference(workspace, f"--input={source}", f"--output={output}"))
    assert message == "" and output.is_file() and output.with_suffix(".jsonl").is_file()


@pytest.mark.parametrize(("content", "expected"), [
    ("image_name,age\nb\xe9b\xe9.jpg,30\n".encode("latin-1"), "is not UTF-8 text"),
    (b"not,a\n\"csv", "not a well-formed CSV"),
])
def test_a_csv_that_is_not_utf8_or_not_csv_is_one_sentence(tmp_path, content, expected):
    path = tmp_path / "train_set.csv"
    path.write_bytes(content)
    message, _ = run_case(tmp_path, lambda: read_dataset_csv(path))
    assert str(path) in message and expected in message


def test_a_utf16_csv_is_read(workspace, tmp_path):
    frame = read_dataset_csv(Path(workspace["cfg"].csv_dir) / "test_set.csv")
    path = tmp_path / "test_set.csv"
    path.write_bytes(frame.to_csv(index=False).encode("utf-16"))
    assert read_dataset_csv(path).equals(frame)


def test_appa_real_with_a_blank_age_or_a_missing_column(tmp_path):
    root = tmp_path / "appa"
    (root / "train").mkdir(parents=True)
    Image.new("RGB", (40, 40), (150, 120, 100)).save(root / "train" / "000001.jpg")
    Image.new("RGB", (40, 40), (150, 120, 100)).save(root / "train" / "000002.jpg")
    (root / "gt_avg_train.csv").write_text("file_name,num_ratings,apparent_age_avg,apparent_age_std,real_age\n"
                                           "000001.jpg,30,24.5,3.0,22\n000002.jpg,30,30.0,3.0,\n")
    cfg = make_config(tmp_path, root, dataset_format="appa_real")
    result = {}
    _, caught = run_case(tmp_path, lambda: result.setdefault("frame", eda.main(cfg)))
    assert result["frame"]["image_name"].tolist() == ["train/000001.jpg"] and "gt_avg_train.csv line 3" in caught
    (root / "gt_avg_train.csv").write_text("file_name,apparent_age_avg\n000001.jpg,24.5\n")
    message, _ = run_case(tmp_path, lambda: eda.main(cfg))
    assert "lacks the column(s) ['real_age']" in message


def test_nan_predictions_are_null_in_json_and_drawn_as_a_question_mark():
    face = inference.Face((1.0, 2.0, 30.0, 30.0), float("nan"), float("nan"), adult_probability=float("nan"))
    row = inference.face_rows("x.jpg", None, [face])[0]
    json.dumps(row, allow_nan=False)  # valid JSON
    assert row["age"] is None and row["spread"] is None and row["adult_probability"] is None
    assert inference._age_text(face.age) == "?"
    canvas = inference.draw_faces(np.zeros((64, 64, 3), np.uint8), [face])
    assert canvas.shape == (64, 64, 3)


# --- 7. the third round: run folders, repeated rows, odd inputs, tuning lists, repeated flags ----------------

def test_two_trainings_with_one_run_name_never_share_a_folder(workspace, tmp_path):
    """The run folder is claimed by an atomic mkdir: a second claim of the same name (another training started at
    the same moment, before either wrote anything) gets the next suffix."""
    cfg = replace(workspace["cfg"], checkpoint_dir=str(tmp_path / "checkpoints"), runs_dir=str(tmp_path / "runs"),
                  run_name="same")
    first, second = train.new_run_name(cfg), train.new_run_name(cfg)
    assert (first, second) == ("same", "same_2")
    assert (tmp_path / "checkpoints" / "same").is_dir() and (tmp_path / "checkpoints" / "same_2").is_dir()
    assert train.new_run_name(cfg, claim=False) == "same_3" and not (tmp_path / "checkpoints" / "same_3").exists()


def test_a_split_listing_one_image_many_times_uses_it_once(workspace, tmp_path):
    cfg = replace(workspace["cfg"], csv_dir=str(tmp_path / "csv"), cache_dir=str(tmp_path / "cache"))
    rows = read_dataset_csv(Path(workspace["cfg"].csv_dir) / "train_set.csv")
    repeated = pd.concat([rows.head(5)] + [rows.head(1)] * 2000, ignore_index=True)
    Path(cfg.csv_dir).mkdir()
    repeated.to_csv(Path(cfg.csv_dir) / "train_set.csv", index=False)
    result = {}
    _, caught = run_case(tmp_path, lambda: result.setdefault("dataset", build_dataset(cfg, "train")))
    assert len(result["dataset"]) == 5 and "2000 row(s) repeat an image" in caught and "lines 7, 8" in caught


@pytest.mark.parametrize("text", ["²", "٣x", "0x1"])
def test_an_input_that_only_looks_like_a_camera_index_is_a_path(workspace, tmp_path, text):
    message, _ = run_case(tmp_path, _inference(workspace, f"--input={text}"))
    assert "neither a file, a folder nor a camera index" in message


@pytest.mark.parametrize(("setting", "text"), [
    ("tune_learning_rates", "1e-3,nan"), ("tune_learning_rates", "inf"), ("tune_learning_rates", "-1e-3"),
    ("tune_weight_decays", "0,-0.1"), ("tune_weight_decays", ","),
])
def test_a_bad_tuning_list_stops_before_any_trial(workspace, tmp_path, monkeypatch, setting, text):
    import hyperparameters_tuning

    monkeypatch.setattr(hyperparameters_tuning, "initial_loss", lambda cfg: pytest.fail("a step ran"))
    cfg = replace(workspace["cfg"], **{setting: text}, runs_dir=str(tmp_path / "runs"))
    message, _ = run_case(tmp_path, lambda: hyperparameters_tuning.main(cfg))
    assert message.startswith("error: ") and ("must lie in" in message or "at least one number" in message)


def test_a_flag_given_twice_is_refused():
    with pytest.raises(SystemExit, match="--lr is given twice"):
        parse_config(["--lr=1e-3", "--epochs=2", "--lr=3e-3"])


@pytest.mark.parametrize(("geometry", "expected"), [
    ({"landmarks": DEFAULT_CROP_GEOMETRY.to_dict()["landmarks"], "measured_on": float("inf")}, "measured_on"),
    ({"landmarks": [[0, 0]] * 5, "measured_on": 10}, "do not describe a face"),
    ({"landmarks": [[0.3, 0.3], [0.7, 0.3], [0.5, 0.3], [0.35, 0.3], [0.65, 0.3]], "measured_on": 10},
     "do not describe a face"),
])
def test_a_degenerate_stored_crop_geometry_is_refused_by_inference_and_export(workspace, tmp_path, geometry,
                                                                              expected):
    path = tmp_path / "odd" / "best.pt"
    path.parent.mkdir()
    save_checkpoint(path, workspace["model"], workspace["model_cfg"], crop_geometry={"yunet": geometry})
    message, _ = run_case(tmp_path, lambda: inference.AgePredictor(path))
    assert str(path) in message and expected in message
    message, _ = run_case(tmp_path, lambda: export_jit.main(replace(Config(), checkpoint=str(path))))
    assert str(path) in message and expected in message and not (path.parent / "model.torchscript").exists()


def test_a_model_with_nan_weights_is_named_as_broken_everywhere(workspace, tmp_path):
    """inference, analysis and export refuse a checkpoint whose weights hold NaN; --resume refuses such a last.pt;
    an export that answers NaN is refused by inference."""
    from analysis import errors

    model = AgeEstimationModel("resnet18", image_size=32, head="dex")
    model.load_state_dict(workspace["model"].state_dict())
    with torch.no_grad():
        model.head[-1].weight.fill_(float("nan"))
    path = tmp_path / "broken" / "best.pt"
    path.parent.mkdir()
    save_checkpoint(path, model, workspace["model_cfg"], crop_geometry=DEFAULT_CROP_GEOMETRY.to_dict())
    for call in (lambda: inference.AgePredictor(path),
                 lambda: errors.main(replace(workspace["cfg"], checkpoint=str(path))),
                 lambda: export_jit.main(replace(Config(), checkpoint=str(path)))):
        message, _ = run_case(tmp_path, call)
        assert "the model is broken" in message and str(path) in message
    last = tmp_path / "checkpoints" / "diverged" / "last.pt"
    last.parent.mkdir(parents=True)
    save_checkpoint(last, model, workspace["cfg"], epoch=1)
    resume = replace(workspace["cfg"], checkpoint_dir=str(tmp_path / "checkpoints"), run_name="diverged",
                     resume=True)
    message, _ = run_case(tmp_path, lambda: train.main(resume))
    assert "NaN or infinite weights" in message and "cannot be continued" in message
    exported = tmp_path / "broken.torchscript"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, and what export_jit writes
        traced = torch.jit.trace(model.eval(), torch.zeros(1, 3, 32, 32))
        torch.jit.save(traced, str(exported), _extra_files={
            "config.json": json.dumps(config_to_dict(workspace["model_cfg"])), "crop_geometry.json": "null"})
    message, _ = run_case(tmp_path, lambda: inference.AgePredictor(exported))
    assert "the model is broken" in message


def test_a_fifo_or_a_device_as_output_is_refused_without_opening_it(workspace, tmp_path):
    fifo = tmp_path / "output.jpg"
    os.mkfifo(fifo)
    photo = next(workspace["photos"].glob("*.jpg"))
    message, _ = run_case(tmp_path, _inference(workspace, f"--input={photo}", f"--output={fifo}"), seconds=60)
    assert "not a regular file" in message
    for output in (tmp_path / "model.torchscript", Path("/dev/full")):
        if output.suffix and not output.exists():
            os.mkfifo(output)
        message, _ = run_case(tmp_path, lambda output=output: export_jit.main(
            replace(Config(), checkpoint=str(workspace["checkpoint"]), output=str(output))), seconds=60)
        assert "not a regular file" in message


def test_ownership_comes_from_what_we_wrote_never_from_emptiness(workspace, tmp_path):
    """A user's video beside an empty .jsonl, and a user's .jsonl that starts with a blank line, are not ours."""
    video, rows = tmp_path / "holiday.mp4", tmp_path / "holiday.jsonl"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42 a user's video")
    rows.write_text("")
    results = tmp_path / "results.jsonl"
    results.write_text("\n{\"source\": \"x\", \"box\": [0, 0, 1, 1], \"age\": 30}\n")
    import cv2

    photo = next(workspace["photos"].glob("*.jpg"))
    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 5, (48, 48))
    for _ in range(3):
        writer.write(np.asarray(Image.open(photo).resize((48, 48)))[:, :, ::-1].copy())
    writer.release()
    for source, output in ((clip, video), (photo, tmp_path / "results.jpg")):
        message, _ = run_case(tmp_path, _inference(workspace, f"--input={source}", f"--output={output}"))
        assert "was not written by inference.py" in message
    ours = tmp_path / "ours.jpg"
    run_case(tmp_path, _inference(workspace, f"--input={photo}", f"--output={ours}"))
    assert files.written_by_us(ours.with_suffix(".jsonl"))  # recorded in the folder's manifest
    message, _ = run_case(tmp_path, _inference(workspace, f"--input={photo}", f"--output={ours}"),
                          asked=(ours, ours.with_suffix(".jsonl")))
    assert message == ""  # our own outputs are replaced by a rerun
    ours.with_suffix(".jsonl").write_text("")  # ... but not once someone else has changed them
    assert not files.written_by_us(ours.with_suffix(".jsonl"))


def test_a_rerun_that_stops_early_leaves_the_earlier_results_whole(workspace, tmp_path, monkeypatch):
    folder = tmp_path / "out"
    run_case(tmp_path, _inference(workspace, f"--input={workspace['photos']}", f"--output={folder}"))
    complete = (folder / "predictions.jsonl").read_text()
    assert complete.count("\n") == 4  # four photos, one face each

    # Ctrl+C while the third photo (in the run's order) is searched: by its pixels, not by the order of the
    # calls, which the worker threads run in any order
    third = np.asarray(Image.open(sorted(workspace["photos"].iterdir())[2]).convert("RGB"))  # b.jpg

    def fail_on_the_third(image, predictor, detector):
        if image.shape == third.shape and np.array_equal(image, third):
            raise KeyboardInterrupt
        return original(image, predictor, detector)

    original = inference.find_faces
    monkeypatch.setattr(inference, "find_faces", fail_on_the_third)
    monkeypatch.setattr(inference, "PHOTOS_PER_MODEL_CALL", 1)
    with pytest.raises(SystemExit, match=r"^stopped by Ctrl-C$"):  # one line, no traceback
        _inference(workspace, f"--input={workspace['photos']}", f"--output={folder}")()
    assert (folder / "predictions.jsonl").read_text() == complete
    # the two photos before it were predicted and annotated: their rows are the partial results
    partial = (folder / "predictions.partial.jsonl").read_text().splitlines()
    assert partial == complete.splitlines()[:2]
    monkeypatch.setattr(inference, "find_faces", original)
    _inference(workspace, f"--input={workspace['photos']}", f"--output={folder}")()  # a complete rerun
    assert not (folder / "predictions.partial.jsonl").exists()  # supersedes the partial rows it had left


def test_a_failed_write_of_the_results_is_a_failure(workspace, tmp_path, monkeypatch):
    import errno

    record = files.record_written

    def full_disk(path):  # the photo is written; the rows file is not
        if Path(path).suffix == ".jsonl":
            raise OSError(errno.ENOSPC, "No space left on device")
        record(path)

    photo = next(workspace["photos"].glob("*.jpg"))
    output = tmp_path / "photo_age.jpg"
    monkeypatch.setattr(files, "record_written", full_disk)
    message, _ = run_case(tmp_path, _inference(workspace, f"--input={photo}", f"--output={output}"),
                          asked=(output, output.with_suffix(".jsonl")))
    assert "could not be written" in message and "No space left" in message


def test_stale_temporary_files_of_dead_writers_are_cleaned_and_live_ones_kept(tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    ours = tmp_path / files.OURS
    ours.mkdir()
    stale = [ours / f"{dead}.0123abcd.last.pt", ours / f"{dead}.89abcdef.model.torchscript"]
    live = [ours / f"{os.getpid()}.0123abcd.best.pt", ours / f"{os.getppid()}.0123abcd.model.onnx"]
    # a user's files that look like temporaries, beside the output: never looked at
    users = [tmp_path / f".last.pt.{dead}.tmp", tmp_path / ".thesis.20240101.tmp.docx",
             tmp_path / f".model.{dead}.checking.onnx"]
    for path in (*stale, *live, *users):
        path.write_bytes(b"x")
    assert sorted(files.sweep_temporaries(tmp_path)) == sorted(stale)
    assert all(path.exists() for path in (*live, *users)) and not any(path.exists() for path in stale)


def test_too_little_free_space_stops_an_export_before_it_writes(workspace, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    output = tmp_path / "model.torchscript"
    message, _ = run_case(tmp_path, lambda: export_jit.main(
        replace(Config(), checkpoint=str(workspace["checkpoint"]), output=str(output))))
    assert "not enough free space" in message and not output.exists() and not list(tmp_path.glob(".*"))


def test_an_unreadable_single_photo_is_a_failure_not_a_success(workspace, tmp_path):
    fake = tmp_path / "holiday.jpg"
    fake.write_bytes(b"\xff\xd8\xff not really a JPEG")
    output = tmp_path / "holiday_age.jpg"
    message, caught = run_case(tmp_path, _inference(workspace, f"--input={fake}", f"--output={output}"),
                               asked=(output.with_suffix(".jsonl")))
    assert "no annotated photo was written" in message and "not a readable image" in caught
    assert not output.exists()


def test_a_fake_torchscript_archive_is_one_sentence(workspace, tmp_path):
    fake = tmp_path / "model.torchscript"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("model/code/__torch__.py", "def forward(self): pass")
        archive.writestr("model/extra/config.json", "{}")
    photo = next(workspace["photos"].glob("*.jpg"))
    message, _ = run_case(tmp_path, lambda: inference.main(parse_config(
        [f"--checkpoint={fake}", f"--input={photo}", f"--output={tmp_path / 'out.jpg'}", "--no_detect"])))
    assert "is not a loadable TorchScript file" in message and str(fake) in message


def test_skipped_label_rows_are_named_by_line(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("image_name,age,gender,ethnicity\na.jpg,20,male,white\nb.jpg,,male,white\n,30,male,white\n")
    with pytest.warns(UserWarning, match=r"skipping 2 row\(s\) .* \(line 3, 4\)"):
        frame = read_dataset_csv(path)
    assert list(frame["image_name"]) == ["a.jpg"]


@pytest.mark.parametrize("where", ["under_a_file", "too_long"])
def test_an_output_folder_that_cannot_be_written_stops_before_the_work(workspace, tmp_path, where):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    folder = blocker / "sub" if where == "under_a_file" else tmp_path / ("x" * 300)
    cfg = replace(workspace["cfg"], csv_dir=str(folder))
    message, _ = run_case(tmp_path, lambda: eda.main(cfg))
    assert message.startswith("error: --csv_dir=") and "cannot be written" in message
    message, _ = run_case(tmp_path, lambda: train.main(replace(workspace["cfg"], checkpoint_dir=str(folder))))
    assert message.startswith("error: --checkpoint_dir=") and "cannot be written" in message
    photo = next(workspace["photos"].glob("*.jpg"))
    message, _ = run_case(tmp_path, _inference(workspace, f"--input={photo}", f"--output={folder / 'out.jpg'}"))
    assert "cannot be written" in message


def test_a_ten_thousand_character_input_path_is_one_sentence(workspace, tmp_path):
    message, _ = run_case(tmp_path, _inference(workspace, "--input=" + "x" * 10_000 + ".jpg"))
    assert message.startswith("error: --input=xxx") and len(message) < 300


def test_eda_never_replaces_another_data_folders_csv(workspace, tmp_path):
    other = tmp_path / "other"
    generate_dataset(other, 40, seed=5, size=48)
    cfg = replace(workspace["cfg"], csv_dir=str(tmp_path / "csv"), pics_dir=str(tmp_path / "pics"),
                  check_images=False)
    eda.main(cfg)  # the first data set's CSV, recorded as made from its folder
    message, _ = run_case(tmp_path, lambda: eda.main(replace(cfg, data_dir=str(other))))
    assert "holds the data set CSV of" in message and "its own --csv_dir" in message
    message, _ = run_case(tmp_path, lambda: eda.main(cfg), asked=tuple((tmp_path / "csv").iterdir()) + tuple(
        (tmp_path / "pics").iterdir()))
    assert message == ""  # the same folder again: its CSV is rewritten


def test_crop_geometry_measurement_skips_an_image_that_would_need_terabytes(tmp_path):
    from faces import measure_crop_geometry

    strip = tmp_path / "strip.png"
    Image.fromarray(np.zeros((1, 50_000, 3), np.uint8)).save(strip)  # upscaled to 192 px high: 9.6 M px wide
    message, _ = run_case(tmp_path, lambda: measure_crop_geometry([strip], minimum_found=1, detector_name="yunet"))
    assert message == ""


def test_a_400_megapixel_png_is_refused_by_its_header(tmp_path):
    import zlib

    import app

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = (20_000).to_bytes(4, "big") + (20_000).to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])  # 400 MP RGB
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 100))
                     + chunk(b"IEND", b""))
    with pytest.raises(app.InputError, match="more pixels than the app's limit"):
        app.read_photo(bomb, 40_000_000)


def test_a_detector_failure_on_one_upload_is_the_apps_message_not_a_traceback(workspace, tmp_path, monkeypatch):
    import app

    def odd_shape(*_):
        raise RuntimeError("OpenCV(4.x) (-215:Assertion failed) !ssize.empty() in function 'resize'")

    monkeypatch.setattr(app, "estimate_faces", odd_shape)
    shelf = app.ModelShelf({"model": workspace["checkpoint"]})
    photo = next(workspace["photos"].glob("*.jpg"))
    with pytest.raises(app.InputError, match=r"its faces could not be found \(RuntimeError: OpenCV"):
        app.estimate_photo(shelf, photo, "model", False, 40, 40_000_000)


# --- 7. the fourth round: each class a sentence, bounded, never silent ----------------------------------------

def test_a_nul_byte_in_an_image_name_is_a_refused_row(workspace, tmp_path):
    from custom_dataset_dataloader import check_image_names

    accepted, refused = check_image_names(workspace["cfg"].data_dir, ["a\0b.jpg"])
    assert not accepted and "NUL byte" in refused[0]


def test_a_float_image_with_nan_pixels_is_named_not_turned_black(workspace, tmp_path):
    values = np.full((64, 64), 0.5, dtype=np.float32)
    values[3, 3] = np.nan
    photo = tmp_path / "nan.tiff"
    Image.fromarray(values, mode="F").save(photo)
    output = tmp_path / "nan_age.jpg"
    message, caught = run_case(tmp_path, _inference(workspace, f"--input={photo}", f"--output={output}"))
    assert "no annotated photo was written" in message and "NaN or infinite" in caught
    assert not output.exists() and not output.with_suffix(".jsonl").exists()  # no empty rows file either


def test_a_photo_over_the_pixel_limit_is_refused_before_decoding(workspace, tmp_path):
    photo = tmp_path / "huge.png"
    Image.new("RGB", (3000, 2000), (120, 100, 90)).save(photo)
    output = tmp_path / "huge_age.jpg"
    message, caught = run_case(tmp_path, _inference(workspace, f"--input={photo}", f"--output={output}",
                                                    "--max_image_pixels=1000000"))
    assert "no annotated photo was written" in message and "3000 x 2000 pixels" in caught


def test_a_video_without_frames_is_an_error_and_writes_nothing(workspace, tmp_path):
    import cv2

    clip = tmp_path / "empty.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 5, (48, 48))
    writer.release()
    output = tmp_path / "empty_age.mp4"
    message, _ = run_case(tmp_path, _inference(workspace, f"--input={clip}", f"--output={output}"))
    assert "no frame could be read" in message
    assert not output.exists() and not output.with_suffix(".jsonl").exists()


class _Pickled:  # a class is pickled by reference: loading it would import and run code
    pass


@pytest.mark.parametrize(("entries", "expected"), [
    ({"extra": _Pickled()}, "pickled Python objects or code, which are never loaded"),
    ({"model": [1, 2, 3]}, "its 'model' entry is not a state dict"),
])
def test_a_checkpoint_with_code_or_without_a_state_dict_is_one_sentence(workspace, tmp_path, entries, expected):
    checkpoint = torch.load(workspace["checkpoint"], weights_only=True)
    path = tmp_path / "best.pt"
    torch.save({**checkpoint, **entries}, path)
    message, _ = run_case(tmp_path, lambda: inference.AgePredictor(path))
    assert expected in message and "weights_only" not in message


def test_an_unreadable_sub_folder_of_the_data_is_named_and_left_out(tmp_path, monkeypatch):
    data = tmp_path / "data"
    generate_dataset(data / "readable", 6, seed=1, size=32)
    generate_dataset(data / "locked", 4, seed=2, size=32)
    scandir = os.scandir

    def denied(path):  # what a folder without read permission gives a user who is not root
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.warns(UserWarning, match=r"1 folder\(s\) under .* cannot be read and are left out: locked/"):
        names = eda.list_images(data)
    assert len(names) == 6 and all(name.startswith("readable/") for name in names)


def test_a_warning_about_many_bad_names_stays_one_short_line(tmp_path):
    data = tmp_path / "data"
    generate_dataset(data, 4, seed=1, size=32)
    for index in range(30):  # names UTKFace's parser cannot read
        shutil.copy(next(data.glob("*.jpg")), data / f"holiday_{index:02d}.jpg")
    with pytest.warns(UserWarning) as caught:
        frame, malformed, _ = eda.scan_folder(str(data), False)
    message = next(str(warning.message) for warning in caught if "holiday_00" in str(warning.message))
    assert len(frame) == 4 and len(malformed) == 30
    assert "holiday_19" in message and "holiday_20" not in message and "(10 more)" in message


def test_the_folder_summary_counts_only_the_photos_written(workspace, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(workspace["photos"] / "a.jpg", photos / "a.jpg")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not an image")
    message, caught = run_case(tmp_path, _inference(workspace, f"--input={photos}", f"--output={tmp_path / 'out'}"))
    assert message == "" and "broken.jpg" in caught
    assert "wrote 1 annotated image(s) (1 photo(s) skipped, named above)" in capsys.readouterr().out
