"""Estimate the age of every face in a photo, a folder of photos, a video file or a webcam stream.

Reads:  --checkpoint: a train.py checkpoint (best.pt), or a file from export_jit.py (model.torchscript runs with
        torch alone, model.onnx with onnxruntime alone: no model code needed); '' = the newest
        checkpoints/*/best.pt. --input: an image, a folder of images, a video file, or a camera index (0).
Writes: annotated images / video (a box and the age per face) at --output (default under pics/inference/), and a
        JSON line per face beside it (<output>.jsonl, or predictions.jsonl in an output folder):
        {"source", "frame", "box": [x, y, w, h], "landmarks": [[x, y] x 5], "age", "spread", "adult_probability"}
        (spread and the calibrated P(age >= 18) for distribution heads of a .pt checkpoint, else null).

Each face is found by faces.FaceDetector (MTCNN: a box and five landmarks) and aligned on its landmarks with the
crop geometry stored in the model file, which train.py measured on the training images: the model sees the same
kind of crop it was trained on. All faces of a frame are predicted in one batch; --tta averages with the mirrored
face. --no_detect treats every input image as an already-cropped face. In a video a face is tracked by box
overlap and its age smoothed across frames. Unreadable files are named in a warning and skipped; a photo without
a face is reported, not an error.

Run:  python inference.py --input=photo.jpg [--checkpoint=checkpoints/<run>/best.pt] [--output=annotated.jpg]
      python inference.py --input=0          (webcam; q or Esc quits)
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from config import Config, atomic_write_path, parse_config, print_config, resolve_device
from custom_dataset_dataloader import (
    IMAGE_SUFFIXES,
    build_transforms,
    describe_read_error,
    open_rgb_image,
    resize_square,
)
from faces import DEFAULT_CROP_GEOMETRY, CropGeometry, FaceDetector
from model import ADULT_AGE, config_from_model_file, load_model, newest_checkpoint

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}
# the codec each annotated-video suffix is written with: browsers play VP8 WebM (app.py writes it); OpenCV's wheels
# carry no H.264 encoder, so an .mp4 gets MPEG-4 Part 2, which desktop players open
VIDEO_CODECS = {".webm": "VP80", ".avi": "MJPG"}


def is_torchscript(path: Path) -> bool:
    """TorchScript archives hold compiled code; train.py checkpoints hold only data."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


@dataclass
class Predictions:
    """What a model says about N face crops, in years: ages (N,); for distribution heads of a .pt checkpoint also
    the spread (N,) and the calibrated P(age >= ADULT_AGE) (N,), else None."""

    ages: np.ndarray
    spreads: np.ndarray | None = None
    adult_probabilities: np.ndarray | None = None


class AgePredictor:
    """Loads any model file this project writes and predicts ages (years) for uint8 face crops (N, 3, S, S)."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        path = Path(path)
        if not path.is_file():
            raise SystemExit(f"error: model file {path} does not exist")
        self.device = torch.device(device)
        self.kind, self.session = "checkpoint", None
        if path.suffix == ".onnx":
            import onnxruntime

            self.kind = "onnx"
            options = onnxruntime.SessionOptions()
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # leave the CPU to the detector
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            metadata = self.session.get_modelmeta().custom_metadata_map
            config, geometry = json.loads(metadata["config"]), json.loads(metadata.get("crop_geometry", "null"))
        elif is_torchscript(path):
            self.kind = "torchscript"
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")  # deprecated, works
            extra_files = {"config.json": "", "crop_geometry.json": ""}
            self.model = torch.jit.load(str(path), map_location=self.device, _extra_files=extra_files)
            config, geometry = json.loads(extra_files["config.json"]), json.loads(extra_files["crop_geometry.json"])
        else:
            self.model, _, checkpoint = load_model(path, self.device)
            config, geometry = checkpoint["config"], checkpoint.get("crop_geometry")
        self.cfg = config_from_model_file(config)
        measured = CropGeometry.from_dict(geometry)
        self.crop_geometry = measured or DEFAULT_CROP_GEOMETRY
        if measured is None:
            warnings.warn(f"{path} carries no landmark crop geometry (an older file, or training faces the detector "
                          "did not find); aligning faces like UTKFace's crops (faces.DEFAULT_CROP_GEOMETRY)",
                          stacklevel=2)
        self.transform = build_transforms(self.cfg, train=False)
        self.image_size = self.cfg.image_size

    @torch.inference_mode()
    def predict_details(self, crops: np.ndarray, tta: bool = False) -> Predictions:
        """uint8 crops (N, 3, S, S) -> ages, spreads and P(age >= ADULT_AGE), each (N,). The spread (the standard
        deviation of the predicted age distribution) and the probability (calibrated by the head's temperature)
        exist for the heads that predict a distribution, in a .pt checkpoint; exported files return ages only.
        With tta, all three are averaged with the mirrored crops'."""
        if len(crops) == 0:
            return Predictions(np.zeros(0, dtype=np.float32))
        images = self.transform(torch.from_numpy(np.ascontiguousarray(crops)))  # (N, 3, S, S) float
        if tta:
            images = torch.cat([images, images.flip(-1)])  # (2N, 3, S, S)
        spreads = probabilities = None
        if self.kind == "onnx":
            ages = torch.from_numpy(self.session.run(None, {"images": images.numpy()})[0])
        elif self.kind == "checkpoint" and self.model.head.has_spread:
            head = self.model.head
            outputs = self.model.head_outputs(images.to(self.device))  # (N, K)
            ages, spreads = head.ages(outputs).cpu(), head.spread(outputs).cpu()
            if head.has_probabilities:
                probabilities = head.probability_at_least(outputs, ADULT_AGE).float().cpu()
        else:
            ages = self.model(images.to(self.device)).float().cpu()  # (N,) or (2N,)

        def merged(values: torch.Tensor | None) -> np.ndarray | None:
            if values is None:
                return None
            return (values.view(2, -1).mean(0) if tta else values).numpy()  # (N,)

        return Predictions(merged(ages), merged(spreads), merged(probabilities))

    def predict(self, crops: np.ndarray, tta: bool = False) -> np.ndarray:
        """uint8 crops (N, 3, S, S) -> ages (N,) float years."""
        return self.predict_details(crops, tta).ages


@dataclass
class Face:
    box: tuple[float, float, float, float]  # x, y, w, h in pixels of the frame
    age: float
    spread: float | None = None
    track: int | None = None
    landmarks: np.ndarray | None = None  # (5, 2) x, y in pixels (faces.LANDMARK_NAMES), None without detection
    adult_probability: float | None = None  # calibrated P(age >= ADULT_AGE); distribution heads of .pt files only


def estimate_faces(
    image: np.ndarray, predictor: AgePredictor, detector: FaceDetector | None, tta: bool = False
) -> list[Face]:
    """Every face in an RGB frame (H, W, 3), predicted in one batch; without a detector the frame is the face."""
    from PIL import Image

    size = predictor.image_size
    if detector is None:
        boxes, landmarks = [(0.0, 0.0, float(image.shape[1]), float(image.shape[0]))], [None]
        crops = [resize_square(Image.fromarray(image), size, predictor.cfg.interpolation)]
    else:
        detected = detector.detect_faces(image)
        boxes, landmarks = [face.box for face in detected], [face.landmarks for face in detected]
        crops = [predictor.crop_geometry.crop(image, face.landmarks, size, predictor.cfg.interpolation)
                 for face in detected]
    predictions = predictor.predict_details(
        np.stack(crops) if crops else np.zeros((0, 3, size, size), np.uint8), tta
    )

    def floats(values: np.ndarray | None) -> list[float | None]:
        return [None] * len(predictions.ages) if values is None else [float(value) for value in values]

    return [Face(box, float(age), spread, landmarks=points, adult_probability=probability)
            for box, age, spread, probability, points in zip(
                boxes, predictions.ages, floats(predictions.spreads), floats(predictions.adult_probabilities),
                landmarks, strict=True)]


def draw_faces(image: np.ndarray, faces: list[Face], fps: float | None = None) -> np.ndarray:
    """A BGR copy of the RGB frame with a box and an age label per face (and the FPS when given)."""
    import cv2

    canvas = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    thickness = max(1, round(max(image.shape[:2]) / 400))
    for face in faces:
        x, y, width, height = (round(value) for value in face.box)
        label = f"{face.age:.0f}" if face.spread is None else f"{face.age:.0f} +/- {face.spread:.0f}"
        cv2.rectangle(canvas, (x, y), (x + width, y + height), (0, 220, 0), thickness)
        for point_x, point_y in [] if face.landmarks is None else face.landmarks:
            cv2.circle(canvas, (round(point_x), round(point_y)), thickness + 1, (0, 220, 0), -1)
        scale = max(0.5, width / 160)
        (text_width, text_height), baseline = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        top = max(0, y - text_height - baseline - 4)
        cv2.rectangle(canvas, (x, top), (x + text_width + 6, top + text_height + baseline + 4), (0, 220, 0), -1)
        cv2.putText(canvas, label, (x + 3, top + text_height + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0),
                    thickness, cv2.LINE_AA)
    if fps is not None:
        cv2.putText(canvas, f"{fps:.1f} FPS", (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 2, cv2.LINE_AA)
    return canvas


def box_overlaps(first: list[tuple], second: list[tuple]) -> torch.Tensor:
    """Intersection over union of every (x, y, w, h) box in `first` with every one in `second`: (N, M), by
    torchvision.ops.box_iou."""
    from torchvision.ops import box_convert, box_iou

    def corners(boxes: list[tuple]) -> torch.Tensor:
        return box_convert(torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4), "xywh", "xyxy")  # (N, 4)

    return box_iou(corners(first), corners(second))


def box_overlap(first: tuple, second: tuple) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    return float(box_overlaps([first], [second])[0, 0])


@dataclass
class FaceTracker:
    """Matches faces across video frames by box overlap and smooths each face's age (exponential average)."""

    smoothing: float = 0.7
    max_missing_frames: int = 10
    tracks: dict[int, dict[str, Any]] = field(default_factory=dict)
    next_id: int = 0

    def update(self, faces: list[Face], frame_index: int) -> list[Face]:
        unmatched = set(self.tracks)
        known = list(self.tracks)
        overlaps = box_overlaps([face.box for face in faces], [self.tracks[track]["box"] for track in known])  # (N, T)
        for index, face in enumerate(faces):
            candidates = {track: float(overlaps[index, known.index(track)]) for track in unmatched}
            best = max(candidates, key=candidates.get, default=None)
            if best is not None and candidates[best] > 0.3:
                unmatched.discard(best)
                track = self.tracks[best]
                track["age"] = self.smoothing * track["age"] + (1 - self.smoothing) * face.age
                face.track = best
            else:
                face.track, self.next_id = self.next_id, self.next_id + 1
                self.tracks[face.track] = {"age": face.age}
            self.tracks[face.track].update(box=face.box, seen=frame_index)
            face.age = self.tracks[face.track]["age"]
        for track in [track for track, state in self.tracks.items()
                      if frame_index - state["seen"] > self.max_missing_frames]:
            del self.tracks[track]
        return faces


def face_rows(source: str, frame: int | None, faces: list[Face]) -> list[dict[str, Any]]:
    """One JSON-ready dict per face: source, frame, box (x, y, w, h), landmarks, age, spread, adult_probability
    (and track in videos)."""
    rows = []
    for face in faces:
        landmarks = None if face.landmarks is None else np.round(face.landmarks, 1).tolist()
        row = {"source": source, "frame": frame, "box": [round(value, 1) for value in face.box],
               "landmarks": landmarks, "age": round(face.age, 2),
               "spread": None if face.spread is None else round(face.spread, 2),
               "adult_probability": None if face.adult_probability is None else round(face.adult_probability, 3)}
        if face.track is not None:
            row["track"] = face.track
        rows.append(row)
    return rows


def _write_image(path: Path, canvas: np.ndarray) -> None:
    import cv2

    with atomic_write_path(path) as temporary:
        ok, encoded = cv2.imencode(path.suffix if path.suffix else ".jpg", canvas)
        if not ok:
            raise ValueError(f"cannot encode an image as {path.suffix}")
        temporary.write_bytes(encoded.tobytes())


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_write_path(path) as temporary:
        temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))


def run_on_images(cfg: Config, paths: list[Path], output: Path, folder_output: bool,
                  predictor: AgePredictor, detector: FaceDetector | None) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        try:
            image = np.asarray(open_rgb_image(path))
        except Exception as error:  # noqa: BLE001 - any unreadable file: name it and go on
            warnings.warn(f"skipping {path}: not a readable image ({describe_read_error(error, path)})", stacklevel=2)
            continue
        faces = estimate_faces(image, predictor, detector, cfg.tta)
        if not faces:
            print(f"{path}: no face found")
        else:
            print(f"{path}: {len(faces)} face(s), age(s) " + ", ".join(f"{face.age:.1f}" for face in faces))
        rows += face_rows(str(path), None, faces)
        target = output / f"{path.stem}_age.jpg" if folder_output else output
        _write_image(target, draw_faces(image, faces))
    _write_rows(output / "predictions.jsonl" if folder_output else output.with_suffix(".jsonl"), rows)
    return rows


def _display_available() -> bool:
    return sys.platform in ("win32", "darwin") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def run_on_video(cfg: Config, source: str | int, output: Path | None, predictor: AgePredictor,
                 detector: FaceDetector | None) -> list[dict[str, Any]]:
    import cv2

    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise SystemExit(f"error: cannot open the video or camera {source!r}")
    fps_in = capture.get(cv2.CAP_PROP_FPS) or 25.0
    writer, rows, tracker = None, [], FaceTracker(cfg.smoothing)
    show = cfg.show and _display_available()
    frame_index, started, fps = 0, time.perf_counter(), None
    temporary = output.with_name(f".{output.stem}.{os.getpid()}.tmp{output.suffix}") if output else None
    keep = False  # the video is renamed into place only after the loop ends normally (or Ctrl-C stops a stream)
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frame_started = time.perf_counter()
            image = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            faces = tracker.update(estimate_faces(image, predictor, detector, cfg.tta), frame_index)
            rows += face_rows(str(source), frame_index, faces)
            elapsed = time.perf_counter() - frame_started
            fps = 1 / elapsed if fps is None else 0.9 * fps + 0.1 / max(elapsed, 1e-6)
            canvas = draw_faces(image, faces, fps)
            if temporary is not None:
                if writer is None:
                    height, width = canvas.shape[:2]
                    codec = cv2.VideoWriter_fourcc(*VIDEO_CODECS.get(output.suffix.lower(), "mp4v"))
                    writer = cv2.VideoWriter(str(temporary), codec, fps_in, (width, height))
                writer.write(canvas)
            if show:
                try:
                    cv2.imshow("age estimation (q to quit)", canvas)
                    if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                        break
                except cv2.error:  # a build without GUI support (opencv-python-headless): carry on headless
                    show = False
            frame_index += 1
        keep = True
    except KeyboardInterrupt:
        keep = True  # stopping a webcam recording with Ctrl-C keeps what was recorded
        print(f"\nstopped after {frame_index} frames")
    finally:
        capture.release()
        if writer is not None:
            writer.release()
            if keep:
                os.replace(temporary, output)
            else:  # a failure midway: no half-written video under the output name
                temporary.unlink(missing_ok=True)
        if show:
            cv2.destroyAllWindows()
    seconds = time.perf_counter() - started
    print(f"{frame_index} frames in {seconds:.1f}s ({frame_index / max(seconds, 1e-9):.1f} FPS), {len(rows)} face rows")
    if output is not None:
        _write_rows(output.with_suffix(".jsonl"), rows)
    return rows


def main(cfg: Config) -> list[dict[str, Any]]:
    """Run the model on --input; returns one dict per face (source, frame, box, age, spread)."""
    print_config(cfg, "inference.py")
    if not cfg.input:
        raise SystemExit("error: pass --input=<image, folder, video or camera index>")
    predictor = AgePredictor(cfg.checkpoint or newest_checkpoint(cfg), resolve_device(cfg.device))
    detector = None if cfg.no_detect else FaceDetector(cfg.min_face_size)
    print(f"model: {predictor.kind} {predictor.cfg.model_name} at {predictor.image_size}px; crop geometry "
          f"{predictor.crop_geometry}")
    default_folder = Path(cfg.pics_dir) / "inference"
    source = Path(cfg.input)
    if cfg.input.isdigit():
        return run_on_video(cfg, int(cfg.input), Path(cfg.output) if cfg.output else None, predictor, detector)
    if source.is_dir():
        paths = sorted(path for path in source.iterdir() if path.is_file() and not path.name.startswith(".")
                       and path.suffix.lower() in IMAGE_SUFFIXES)
        skipped = sorted(path.name for path in source.iterdir() if path.is_file()
                         and path.suffix.lower() not in IMAGE_SUFFIXES and not path.name.startswith("."))
        if skipped:
            warnings.warn(f"skipping {len(skipped)} non-image file(s) in {source}: {', '.join(skipped)}", stacklevel=2)
        return run_on_images(cfg, paths, Path(cfg.output) if cfg.output else default_folder, True, predictor, detector)
    if not source.is_file():
        raise SystemExit(f"error: --input={cfg.input} is neither a file, a folder nor a camera index")
    if source.suffix.lower() in VIDEO_SUFFIXES:
        output = Path(cfg.output) if cfg.output else default_folder / f"{source.stem}_age.mp4"
        return run_on_video(cfg, str(source), output, predictor, detector)
    output = Path(cfg.output) if cfg.output else default_folder / f"{source.stem}_age.jpg"
    rows = run_on_images(cfg, [source], output, False, predictor, detector)
    print(f"wrote {output} and {output.with_suffix('.jsonl')}")
    return rows


if __name__ == "__main__":
    main(parse_config(sys.argv[1:]))
