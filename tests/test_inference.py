import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import export_jit
import files
import inference
from config import Config
from faces import (
    DEFAULT_CROP_GEOMETRIES,
    DEFAULT_CROP_GEOMETRY,
    DETECTORS,
    CropGeometry,
    FaceDetector,
    build_detector,
    geometries_from_dict,
    measure_crop_geometry,
)
from model import AgeEstimationModel, build_model, load_checkpoint, save_checkpoint
from tests.helpers import REAL_DATA

HOPPER = REAL_DATA.parent / "images" / "grace_hopper_512x512.jpg"
UTK200 = REAL_DATA / "utkface200"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small untrained-but-non-trivial checkpoint with a stored crop geometry."""
    cfg = Config(model_name="resnet18", pretrained=False, image_size=32, head="l1")
    torch.manual_seed(0)
    model = AgeEstimationModel("resnet18", image_size=32)
    model.set_age_statistics(35.0, 15.0)
    torch.nn.init.normal_(model.head[1].weight, std=0.05)
    path = tmp_path_factory.mktemp("model") / "best.pt"
    save_checkpoint(path, model, cfg, crop_geometry=DEFAULT_CROP_GEOMETRY.to_dict())
    return path


def _smooth_image(size: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB uint8 image (size, size, 3): no detail finer than resampling can keep."""
    noise = np.random.default_rng(seed).integers(0, 255, (6, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(noise).resize((size, size), Image.Resampling.BICUBIC))


def test_crop_geometry_round_trips_through_a_rotated_enlarged_face():
    """A training-like crop placed into a photo rotated by 20 degrees, 2.5 x larger, is cut back out from its
    landmarks: the same pixels as the original crop resized."""
    import cv2

    geometry = DEFAULT_CROP_GEOMETRY
    assert CropGeometry.from_dict(geometry.to_dict()) == geometry
    assert CropGeometry.from_dict({"center_dx": 0.0, "center_dy": 0.1, "scale": 1.0}) is None  # older, box-based
    original = _smooth_image(64)
    angle, scale, centre = np.radians(20), 2.5, np.array([300.0, 220.0])
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = np.hstack([rotation, (centre - rotation @ np.array([31.5, 31.5]))[:, None]])  # crop -> photo pixels
    photo = cv2.warpAffine(original, matrix, (640, 480), flags=cv2.INTER_CUBIC)
    landmarks = (np.array(geometry.landmarks) * 64 - 0.5) @ rotation.T + matrix[:, 2] + 0.5  # (5, 2)
    recovered = geometry.crop(photo, landmarks, 32)  # (3, 32, 32)
    expected = np.asarray(Image.fromarray(original).resize((32, 32), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert recovered.shape == (3, 32, 32) and recovered.dtype == np.uint8
    inner = (slice(None), slice(2, -2), slice(2, -2))  # the border mixes in the photo's black surroundings
    assert np.abs(recovered[inner].astype(int) - expected[inner]).mean() < 3


@pytest.mark.parametrize("name", list(DETECTORS))
def test_every_detector_loads_offline_and_finds_no_face_in_noise(name):
    detector = build_detector(name)
    assert detector.name == name and detector.detect_faces(_smooth_image(300, seed=3)) == []
    assert detector.detect_faces(_smooth_image(200, seed=4)[:, :, 0]) == []  # grayscale is accepted


def test_stored_geometries_are_read_by_detector_and_old_files_mean_mtcnn():
    old, new = DEFAULT_CROP_GEOMETRY.to_dict(), {name: g.to_dict() for name, g in DEFAULT_CROP_GEOMETRIES.items()}
    assert geometries_from_dict(old) == {"mtcnn": DEFAULT_CROP_GEOMETRY}  # a file from before detectors were a choice
    assert geometries_from_dict(new) == DEFAULT_CROP_GEOMETRIES
    assert geometries_from_dict(None) == {} and geometries_from_dict({"center_dx": 0.0, "scale": 1.0}) == {}
    with pytest.raises(ValueError, match="unknown detectors"):
        geometries_from_dict({"haar": old})
    with pytest.raises(ValueError, match="5 \\(x, y\\) pairs"):
        geometries_from_dict({"yunet": {"landmarks": [[0.1, 0.2]]}})


def test_mtcnn_weights_load_with_matching_shapes():
    from faces import OutputNetwork, ProposalNetwork, RefinementNetwork, load_mtcnn_weights

    for network, name in ((ProposalNetwork(), "pnet"), (RefinementNetwork(), "rnet"), (OutputNetwork(), "onet")):
        network.load_keras_weights(load_mtcnn_weights(name))  # raises on any shape mismatch or left-over array


def test_box_overlap():
    assert inference.box_overlap((0, 0, 10, 10), (0, 0, 10, 10)) == pytest.approx(1.0)
    assert inference.box_overlap((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert inference.box_overlap((0, 0, 10, 10), (20, 20, 5, 5)) == 0.0


def test_tracker_smooths_a_face_and_separates_two():
    tracker = inference.FaceTracker(smoothing=0.5)
    first = tracker.update([inference.Face((0, 0, 50, 50), 30.0), inference.Face((200, 0, 50, 50), 60.0)], 0)
    second = tracker.update([inference.Face((2, 1, 50, 50), 40.0), inference.Face((201, 0, 50, 50), 60.0)], 1)
    assert first[0].track == second[0].track != second[1].track
    assert second[0].age == pytest.approx(35.0) and second[1].age == pytest.approx(60.0)


@pytest.mark.parametrize("export_format", ["torchscript", "onnx"])
def test_exports_match_eager_and_carry_their_config(checkpoint, tmp_path, export_format):
    output = tmp_path / f"model.{export_format}"
    result = export_jit.main(Config(checkpoint=str(checkpoint), format=export_format, output=str(output)))
    assert result["max_abs_difference"] <= export_jit.TOLERANCE[export_format]
    exported, eager = inference.AgePredictor(output), inference.AgePredictor(checkpoint)
    assert exported.cfg == eager.cfg
    assert exported.crop_geometries == eager.crop_geometries == {"mtcnn": DEFAULT_CROP_GEOMETRY}
    crops = np.random.default_rng(0).integers(0, 255, (3, 3, 32, 32), dtype=np.uint8)
    assert np.allclose(exported.predict(crops), eager.predict(crops), atol=1e-3)
    assert np.allclose(exported.predict(crops, tta=True), eager.predict(crops, tta=True), atol=1e-3)


@pytest.mark.parametrize("model_name", ["efficientnet", pytest.param("vit", marks=pytest.mark.slow)])
def test_every_backbone_traces(tmp_path, model_name):
    cfg = Config(model_name=model_name, pretrained=False, image_size=32, head="l1")
    model = AgeEstimationModel(model_name, image_size=32)
    torch.nn.init.normal_(model.head[1].weight, std=0.05)
    save_checkpoint(tmp_path / "best.pt", model, cfg)
    result = export_jit.main(Config(checkpoint=str(tmp_path / "best.pt")))
    assert result["max_abs_difference"] <= 1e-4


def test_no_detect_folder_run_writes_one_row_per_image_and_skips_bad_files(checkpoint, tmp_path, face_folder):
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted(face_folder.iterdir())[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("hello")
    Image.new("LA", (40, 40)).save(folder / "gray_alpha.png")
    output = tmp_path / "annotated"
    cfg = Config(checkpoint=str(checkpoint), input=str(folder), output=str(output), no_detect=True)
    with pytest.warns(UserWarning) as caught:
        rows = inference.main(cfg)
    messages = " ".join(str(warning.message) for warning in caught)
    assert "broken.jpg" in messages and "notes.txt" in messages
    assert len(rows) == 4 and all(0 < row["age"] < 120 for row in rows)
    lines = (output / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["source"] for line in lines] == [row["source"] for row in rows]
    assert len(list(output.glob("*_age.jpg"))) == 4


def test_image_without_a_face_is_reported_not_an_error(checkpoint, tmp_path, capsys):
    blank = tmp_path / "wall.png"
    Image.new("RGB", (320, 240), (200, 190, 180)).save(blank)
    rows = inference.main(Config(checkpoint=str(checkpoint), input=str(blank), output=str(tmp_path / "out.jpg")))
    assert rows == [] and "no face found" in capsys.readouterr().out
    assert (tmp_path / "out.jpg").is_file() and (tmp_path / "out.jsonl").read_text() == ""


def write_face_video(video: Path, face_folder: Path, frames: int = 6) -> Path:
    """A 64 x 64 mp4 of one generated face, `frames` frames long."""
    import cv2

    face = np.asarray(Image.open(sorted(face_folder.iterdir())[0]).resize((64, 64)))
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (64, 64))
    for _ in range(frames):
        writer.write(cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
    writer.release()
    return video


def test_video_path_runs_headless(checkpoint, tmp_path, face_folder):
    import cv2

    video = write_face_video(tmp_path / "clip.mp4", face_folder)
    output = tmp_path / "clip_age.mp4"
    cfg = Config(checkpoint=str(checkpoint), input=str(video), output=str(output), no_detect=True, show=False)
    rows = inference.main(cfg)
    assert [row["frame"] for row in rows] == list(range(6)) and {row["track"] for row in rows} == {0}
    capture = cv2.VideoCapture(str(output))
    assert capture.isOpened() and int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 6
    capture.release()


def test_detected_faces_in_a_generated_video_keep_one_track(checkpoint, tmp_path):
    """The detection path end to end on generated data: a drawn face (the first of a few the detector accepts;
    MTCNN was trained on photos and rejects some drawings) moves through a headless video and is found in every
    frame with its box, landmarks and one track."""
    import cv2

    from demo import generate_dataset

    detector = FaceDetector()
    canvas = np.full((240, 320, 3), 128, np.uint8)
    for path in generate_dataset(tmp_path / "drawn", 12, seed=0, size=120):
        face = np.asarray(Image.open(path).convert("RGB"))
        frame = canvas.copy()
        frame[60:180, 100:220] = face
        if detector.detect_faces(frame):
            break
    else:
        pytest.fail("the detector found none of 12 generated faces")
    video = tmp_path / "walk.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (320, 240))
    for step in range(4):
        frame = canvas.copy()
        frame[60:180, 90 + 6 * step:210 + 6 * step] = face  # moves 6 px right per frame
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    rows = inference.main(Config(checkpoint=str(checkpoint), input=str(video), output=str(tmp_path / "walk_age.mp4"),
                                 show=False))
    assert [row["frame"] for row in rows] == [0, 1, 2, 3] and {row["track"] for row in rows} == {0}
    for row in rows:  # the drawn face fills part of its 120 px tile: its box lies within the tile, moving with it
        x, y, width, height = row["box"]
        left = 90 + 6 * row["frame"]
        assert left - 5 <= x and x + width <= left + 125 and 55 <= y and y + height <= 185 and width > 30
        assert len(row["landmarks"]) == 5 and 0 < row["age"] < 120


def test_a_video_run_that_fails_midway_leaves_no_partial_file(checkpoint, tmp_path, face_folder, monkeypatch):
    video = write_face_video(tmp_path / "clip.mp4", face_folder)
    calls = []

    def failing_draw(image, faces, fps=None):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return image

    monkeypatch.setattr(inference, "draw_faces", failing_draw)
    output = tmp_path / "clip_age.mp4"
    with pytest.raises(RuntimeError, match="disk full"):
        inference.main(Config(checkpoint=str(checkpoint), input=str(video), output=str(output), no_detect=True,
                              show=False))
    assert not output.exists() and list(tmp_path.glob(".clip_age*")) == []


def test_missing_input_is_a_clear_error(checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="neither a file"):
        inference.main(Config(checkpoint=str(checkpoint), input=str(tmp_path / "nothing.jpg")))


needs_real_faces = pytest.mark.skipif(not HOPPER.is_file() or not UTK200.is_dir(),
                                      reason="real faces in ../shared are absent")


@needs_real_faces
def test_one_face_found_in_a_real_portrait(checkpoint, tmp_path):
    rows = inference.main(Config(checkpoint=str(checkpoint), input=str(HOPPER), output=str(tmp_path / "hopper.jpg")))
    assert len(rows) == 1
    x, _, width, _ = rows[0]["box"]
    assert 100 < width < 350 and 0 <= x and x + width <= 512
    assert (tmp_path / "hopper.jpg").stat().st_size > 10000


@needs_real_faces
@pytest.mark.parametrize("name", list(DETECTORS))
def test_each_detector_finds_the_portrait_face_with_five_ordered_landmarks(name):
    faces = build_detector(name).detect_faces(np.asarray(Image.open(HOPPER).convert("RGB")))
    assert len(faces) == 1
    (x, y, width, height), points = faces[0].box, faces[0].landmarks
    assert points.shape == (5, 2) and 100 < width < 350 and faces[0].score > 0.5
    assert ((points[:, 0] > x) & (points[:, 0] < x + width) & (points[:, 1] > y) & (points[:, 1] < y + height)).all()
    left_eye, right_eye, nose, mouth_left, mouth_right = points  # faces.LANDMARK_NAMES: left as seen in the image
    assert left_eye[0] < nose[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])


@needs_real_faces
def test_the_detectors_agree_on_the_portrait_and_yunet_finds_a_face_filling_a_large_photo():
    image = np.asarray(Image.open(HOPPER).convert("RGB"))
    (mtcnn,), (yunet,) = build_detector("mtcnn").detect_faces(image), build_detector("yunet").detect_faces(image)
    assert np.abs(mtcnn.landmarks - yunet.landmarks).max() < 0.1 * mtcnn.box[2]  # the same eyes, nose and mouth
    large = np.asarray(Image.open(HOPPER).convert("RGB").resize((2048, 2048), Image.Resampling.BICUBIC))
    faces = build_detector("yunet", min_face_size=12).detect_faces(large)  # a 700 px face: the coarse pass finds it
    assert len(faces) == 1 and inference.box_overlap(faces[0].box, [value * 4 for value in yunet.box]) > 0.6


@needs_real_faces
def test_one_yunet_detector_shared_by_threads_gives_each_image_its_own_faces():
    from concurrent.futures import ThreadPoolExecutor

    portrait = Image.open(HOPPER).convert("RGB")
    images = [np.asarray(portrait.resize((side, side))) for side in (256, 512, 640, 384)] * 4  # sizes interleaved
    detector = build_detector("yunet")
    alone = [detector.detect(image) for image in images]
    with ThreadPoolExecutor(8) as pool:  # as the app's request threads share one detector
        together = list(pool.map(detector.detect, images))
    assert together == alone and all(len(boxes) == 1 for boxes in alone)


@needs_real_faces
def test_old_model_files_run_with_mtcnn_and_new_ones_with_their_yunet_geometry(checkpoint, tmp_path):
    old_rows = inference.main(Config(checkpoint=str(checkpoint), input=str(HOPPER), output=str(tmp_path / "a.jpg")))
    mtcnn_rows = inference.main(Config(checkpoint=str(checkpoint), input=str(HOPPER), output=str(tmp_path / "b.jpg"),
                                       detector="mtcnn"))
    assert old_rows == mtcnn_rows and len(old_rows) == 1  # an old file predicts exactly as before YuNet
    checkpoint_file = torch.load(checkpoint, weights_only=True)
    checkpoint_file["crop_geometry"] = {name: g.to_dict() for name, g in DEFAULT_CROP_GEOMETRIES.items()}
    torch.save(checkpoint_file, tmp_path / "new.pt")
    predictor = inference.AgePredictor(tmp_path / "new.pt")
    assert predictor.detector_name("yunet") == "yunet" and predictor.detector_name("mtcnn") == "mtcnn"
    new_rows = inference.main(Config(checkpoint=str(tmp_path / "new.pt"), input=str(HOPPER),
                                     output=str(tmp_path / "c.jpg")))
    assert len(new_rows) == 1 and new_rows[0]["landmarks"] != old_rows[0]["landmarks"]  # YuNet's own landmarks


@needs_real_faces
def test_real_faces_pasted_into_scenes_are_found():
    from benchmarks.inference import paste_scene

    rng = np.random.default_rng(0)
    paths = sorted(UTK200.glob("*.jpg"))[::400]
    detector, found, total = FaceDetector(), 0, 0
    for start in range(0, 12, 3):
        scene, boxes, _ = paste_scene(paths[start:start + 3], rng)
        detected = detector.detect(scene)
        for target in boxes:
            total += 1
            found += max((inference.box_overlap(target, box) for box in detected), default=0) >= 0.4
    assert total >= 10 and found / total >= 0.9  # 99.6 % of 249 in benchmarks.inference


@needs_real_faces
@pytest.mark.parametrize("name", list(DETECTORS))
def test_geometry_measured_on_real_crops_is_close_to_the_default(name):
    geometry = measure_crop_geometry(sorted(UTK200.glob("*.jpg"))[::300][:25], detector_name=name)
    assert geometry is not None and geometry.measured_on >= 20
    assert np.abs(np.array(geometry.landmarks) - np.array(DEFAULT_CROP_GEOMETRIES[name].landmarks)).max() < 0.03


def test_a_checkpoint_without_landmark_geometry_uses_the_default(tmp_path):
    cfg = Config(model_name="resnet18", pretrained=False, image_size=32, head="l1")
    save_checkpoint(tmp_path / "old.pt", AgeEstimationModel("resnet18", image_size=32), cfg,
                    crop_geometry={"center_dx": 0.01, "center_dy": 0.09, "scale": 0.95, "measured_on": 100})
    with pytest.warns(UserWarning, match="no landmark crop geometry"):
        predictor = inference.AgePredictor(tmp_path / "old.pt")
    assert predictor.crop_geometries == {} and predictor.geometry_for("mtcnn") == DEFAULT_CROP_GEOMETRY


def test_pretrained_flag_is_ignored_when_rebuilding(checkpoint):
    predictor = inference.AgePredictor(checkpoint)
    assert replace(predictor.cfg, pretrained=True).model_name == "resnet18"


@pytest.mark.slow  # a one-epoch training first
def test_int8_export_is_checked_in_years_on_the_test_split(split_config, monkeypatch):
    import train

    results = train.main(replace(split_config, epochs=1, run_name="int8"))
    checkpoint = Path(results["best_checkpoint"])
    export = Config(checkpoint=str(checkpoint), format="onnx", quantize="int8", num_workers=0,
                    cache_dir=split_config.cache_dir)
    monkeypatch.setattr(export_jit, "INT8_TOLERANCE_YEARS", 100.0)  # the pass path, whatever this tiny model does
    result = export_jit.main(export)
    int8_path = Path(result["int8_path"])
    assert int8_path.name == "model.int8.onnx" and int8_path.stat().st_size < Path(result["path"]).stat().st_size
    assert result["int8_method"] == "u8s8" and np.isfinite(result["int8_test_mae"])
    int8, fp32 = inference.AgePredictor(int8_path), inference.AgePredictor(result["path"])
    assert int8.cfg == fp32.cfg  # the config travels into the quantised file too
    crops = np.random.default_rng(0).integers(0, 255, (4, 3, 32, 32), dtype=np.uint8)
    assert np.abs(int8.predict(crops) - fp32.predict(crops)).max() < 5  # int8 noise, not another model
    int8_path.unlink()
    monkeypatch.setattr(export_jit, "INT8_TOLERANCE_YEARS", -1.0)  # no quantisation can pass: nothing written
    with pytest.raises(export_jit.ExportError, match="nothing was written"):
        export_jit.main(export)
    # no temporary left: our hidden folder holds only the records of what was written (model.onnx)
    assert not int8_path.exists() and [path.name for path in (checkpoint.parent / files.OURS).iterdir()] == ["written"]


def test_folder_inference_batches_photos_and_matches_one_photo_at_a_time(checkpoint, tmp_path):
    """11 photos (one model call of 8, one of 3, decoded ahead, written by a thread): the same rows, in the same
    order, as predicting each photo alone."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(11):
        Image.fromarray(_smooth_image(48, seed=index)).save(photos / f"photo_{index:02d}.png")
    (photos / "photo_05.png").write_bytes(b"broken")  # one unreadable photo among them
    cfg = Config(checkpoint=str(checkpoint), input=str(photos), output=str(tmp_path / "out"), no_detect=True,
                 device="cpu")
    with pytest.warns(UserWarning, match="photo_05.png: not a readable image"):
        rows = inference.main(cfg)
    predictor = inference.AgePredictor(checkpoint)
    expected = []
    for path in sorted(photos.iterdir()):
        if path.name != "photo_05.png":
            image = np.asarray(Image.open(path).convert("RGB"))
            expected += inference.face_rows(str(path), None, inference.estimate_faces(image, predictor, None))
    assert [row["source"] for row in rows] == [row["source"] for row in expected]
    assert np.allclose([row["age"] for row in rows], [row["age"] for row in expected], atol=0.02)
    assert len(list((tmp_path / "out").glob("*_age.jpg"))) == 10


@pytest.mark.parametrize(("tta", "views", "model_keeps_its_threads"), [(False, 1, False), (True, 1, True),
                                                                     (False, 3, True)])
def test_folder_inference_leaves_the_model_every_thread_when_it_predicts_several_copies(
        checkpoint, tmp_path, monkeypatch, tta, views, model_keeps_its_threads):
    """One crop per face: the model runs on the cores the detecting workers leave; with the flip or moved views it
    is the slower half and keeps every thread. Either way the count is restored afterwards."""
    paths = []
    for index in range(3):
        paths.append(tmp_path / f"photo_{index}.png")
        Image.fromarray(_smooth_image(48, seed=index)).save(paths[-1])
    predictor = inference.AgePredictor(checkpoint, views=views)
    seen, predict_details = [], predictor.predict_details

    def predict_counting_threads(crops: np.ndarray, tta: bool) -> inference.Predictions:
        seen.append(torch.get_num_threads())  # the threads the model call runs on
        return predict_details(crops, tta)

    monkeypatch.setattr(predictor, "predict_details", predict_counting_threads)
    shared = max(1, (os.cpu_count() or 1) - inference.PHOTO_WORKERS)  # the model's threads beside the workers
    previous = torch.get_num_threads()
    torch.set_num_threads(shared + 1)  # more than that, whatever this test process was given
    try:
        inference.run_on_images(Config(tta=tta, no_detect=True), paths, inference.folder_targets(paths, tmp_path / "o"),
                                tmp_path / "rows.jsonl", predictor, None)
        assert seen == [shared + 1 if model_keeps_its_threads else shared]
        assert torch.get_num_threads() == shared + 1
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("detector_name", ["yunet", "mtcnn"])
def test_folder_inference_with_a_detector_matches_one_photo_at_a_time(checkpoint, tmp_path, detector_name):
    """A real portrait three times (as is, mirrored, shrunk): the worker threads find the same faces and the batched
    model call gives the same ages as each photo alone, and PyTorch's and OpenCV's thread counts are restored."""
    if not HOPPER.is_file():
        pytest.skip("../shared/images absent: the real-photo check needs grace_hopper_512x512.jpg")
    stored = load_checkpoint(checkpoint)
    geometry = DEFAULT_CROP_GEOMETRY.to_dict()
    stored["crop_geometry"] = {"mtcnn": geometry, "yunet": geometry}  # both measured: main runs the one asked for
    checkpoint = tmp_path / "best.pt"
    torch.save(stored, checkpoint)
    photos = tmp_path / "photos"
    photos.mkdir()
    portrait = Image.open(HOPPER).convert("RGB")
    portrait.save(photos / "a.jpg")
    portrait.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photos / "b.jpg")
    portrait.resize((320, 320)).save(photos / "c.jpg")
    import cv2

    threads, detector_threads = torch.get_num_threads(), cv2.getNumThreads()
    rows = inference.main(Config(checkpoint=str(checkpoint), input=str(photos), output=str(tmp_path / "out"),
                                 detector=detector_name, device="cpu"))
    assert (torch.get_num_threads(), cv2.getNumThreads()) == (threads, detector_threads)
    predictor, detector = inference.AgePredictor(checkpoint), build_detector(detector_name)
    assert predictor.detector_name(detector_name) == detector_name
    expected = []
    for path in sorted(photos.iterdir()):
        image = np.asarray(Image.open(path).convert("RGB"))
        expected += inference.face_rows(str(path), None, inference.estimate_faces(image, predictor, detector))
    assert len(rows) == len(expected) >= 3  # the portrait's face in every photo
    assert [row["source"] for row in rows] == [row["source"] for row in expected]
    assert [row["box"] for row in rows] == [row["box"] for row in expected]
    assert np.allclose([row["age"] for row in rows], [row["age"] for row in expected], atol=0.02)


def test_folder_inference_skips_a_photo_whose_face_search_fails(checkpoint, tmp_path):
    """A detector error on one photo (here a ValueError for the 40 px one) is a warning naming it; the others are
    still annotated, as in the per-photo loop."""

    class FailingOnSmallPhotos:
        name = "mtcnn"

        def detect_faces(self, image: np.ndarray) -> list:
            if image.shape[1] == 40:
                raise ValueError("no faces in 40 px photos")
            if image.shape[1] == 56:  # what an OpenCV assertion looks like: not an OSError nor a ValueError
                raise RuntimeError("(-215:Assertion failed) !ssize.empty()")
            return []

    photos = tmp_path / "photos"
    photos.mkdir()
    paths = []
    for index, size in enumerate((48, 40, 56)):
        paths.append(photos / f"photo_{index}.png")
        Image.fromarray(_smooth_image(size, seed=index)).save(paths[-1])
    targets = inference.folder_targets(paths, tmp_path / "out")
    predictor = inference.AgePredictor(checkpoint)
    with pytest.warns(UserWarning) as caught:
        rows, _ = inference.run_on_images(Config(), paths, targets, tmp_path / "out" / "predictions.jsonl", predictor,
                                       FailingOnSmallPhotos())
    messages = " ".join(str(warning.message) for warning in caught)
    assert "photo_1.png: its faces could not be found (ValueError" in messages
    assert "photo_2.png: its faces could not be found (RuntimeError: (-215:Assertion failed)" in messages
    assert rows == [] and sorted(path.name for path in (tmp_path / "out").glob("*_age.jpg")) == ["photo_0_age.jpg"]


def test_jittered_views_keep_the_crop_and_move_copies_as_named():
    images = torch.zeros(2, 3, 64, 64)
    images[:, :, 30:34, 30:34] = 1.0  # a bright square in the middle
    views = inference.jittered_views(images, len(inference.VIEW_MOVES))
    assert views.shape == (2 * len(inference.VIEW_MOVES), 3, 64, 64)
    assert torch.equal(views[:2], images)  # the crop itself comes first, untouched
    columns = torch.arange(64, dtype=torch.float32)

    def centre_x(image: torch.Tensor) -> float:
        weights = image[0].sum(0)  # (W,)
        return float((weights * columns).sum() / weights.sum())

    shift = inference.VIEW_SHIFT * 64  # about 1 px at 64
    assert centre_x(views[2]) - centre_x(images[0]) == pytest.approx(shift, abs=0.05)  # moved right
    assert centre_x(views[4]) - centre_x(images[0]) == pytest.approx(-shift, abs=0.05)  # moved left
    assert torch.equal(views[2], views[3]) and not torch.equal(views[2], views[4])  # one move per face, in order
    assert inference.jittered_views(images, 1) is images


@pytest.mark.parametrize("head", ["l1", "dex"])
def test_many_copies_go_through_the_model_in_chunks_with_the_same_answers(tmp_path, monkeypatch, head):
    """A folder's faces times their views and mirrors can number hundreds: they go through the model at most
    MODEL_BATCH_SIZE at a time, and every chunk's ages, spreads and probabilities land on their own faces."""
    cfg = Config(model_name="resnet18", pretrained=False, image_size=32, head=head)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.set_age_statistics(35.0, 15.0)
    for weight in model.head.parameters():  # the head starts at zero (every face the mean age): make faces differ
        if weight.dim() == 2:
            torch.nn.init.normal_(weight, std=0.05)
    save_checkpoint(tmp_path / "best.pt", model, cfg)
    predictor = inference.AgePredictor(tmp_path / "best.pt", views=3)
    crops = np.stack([_smooth_image(32, seed).transpose(2, 0, 1) for seed in range(5)])  # (5, 3, 32, 32)
    whole = predictor.predict_details(crops, tta=True)  # 3 views x 2 mirrors x 5 faces = 30 crops in one call
    batch_sizes = []
    predictor.model.backbone.register_forward_pre_hook(lambda module, inputs: batch_sizes.append(len(inputs[0])))
    monkeypatch.setattr(inference, "MODEL_BATCH_SIZE", 4)
    chunked = predictor.predict_details(crops, tta=True)
    assert batch_sizes == [4] * 7 + [2]
    np.testing.assert_allclose(chunked.ages, whole.ages, atol=1e-4)
    assert np.ptp(whole.ages) > 0.01  # the faces differ, so a chunk put on the wrong faces would show
    if head == "dex":
        np.testing.assert_allclose(chunked.spreads, whole.spreads, atol=1e-4)
        np.testing.assert_allclose(chunked.adult_probabilities, whole.adult_probabilities, atol=1e-5)


def test_views_average_the_model_over_the_moved_copies(checkpoint):
    crops = np.stack([_smooth_image(32, seed).transpose(2, 0, 1) for seed in range(3)])  # (3, 3, 32, 32)
    plain = inference.AgePredictor(checkpoint)
    steady = inference.AgePredictor(checkpoint, views=5)
    images = plain.transform(torch.from_numpy(crops))
    moved = inference.jittered_views(images, 5)  # (15, 3, 32, 32)
    with torch.inference_mode():
        each = plain.model(moved.contiguous(memory_format=torch.channels_last)).view(5, 3)  # (views, N)
    np.testing.assert_allclose(steady.predict(crops), each.mean(0).numpy(), atol=1e-4)
    np.testing.assert_allclose(plain.predict(crops), each[0].numpy(), atol=1e-4)
    with_mirror = steady.predict(crops, tta=True)
    assert with_mirror.shape == (3,) and not np.allclose(with_mirror, steady.predict(crops))
    with pytest.raises(SystemExit, match="tta_views"):
        inference.AgePredictor(checkpoint, views=len(inference.VIEW_MOVES) + 1)
