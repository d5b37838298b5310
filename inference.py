"""Estimate the age of every face in a photo, a folder of photos, a video file or a webcam stream.

Reads:  --checkpoint: a train.py checkpoint (best.pt), or a file from export_jit.py (model.torchscript runs with
        torch alone, model.onnx with onnxruntime alone: no model code needed); '' = the shipped model
        models/age_lite0_mix.pt (its card: models/README.md), so a fresh clone estimates ages with no training;
        'latest' = the best.pt of your newest finished run (model.choose_model_files); several files separated by
        commas are an ensemble (AgeEnsemble: their ages averaged). --input: an image, a folder of images, a video file,
        or a camera index (0).
Writes: annotated images / video (a box and the age per face) at --output (default under pics/inference/), and a
        JSON line per face beside it (<output>.jsonl, or predictions.jsonl in an output folder):
        {"source", "frame", "box": [x, y, w, h], "landmarks": [[x, y] x 5], "age", "spread", "adult_probability"}
        (spread and the calibrated P(age >= 18) for distribution heads of a .pt checkpoint, else null).

Each face is found by the detector --detector names (faces.py: YuNet by default, or MTCNN; both give a box and five
landmarks) and aligned on its landmarks with the crop geometry the model file stores for that detector, which
train.py measured on the training images: the model sees the same kind of crop it was trained on. With
--match_training_resolution (the default) the aligned crop is also shrunk to the side the training faces really had
(the model file's face_resolution, e.g. 64 for UTKFace's 64 px copy) and enlarged back to the input size: a sharp
photo's face then holds no more detail than the training faces did (RESULTS.md, "Real photos"). A model file
written before YuNet existed stores MTCNN's geometry alone and runs with MTCNN, exactly as before. All faces of a
frame are predicted in one batch; --tta averages with the mirrored face, --tta_views=V over the crop and V - 1
copies moved by 2 px (at 128 px), 2° or 2 % (steadier against how the face was framed, V times the model's time).
--no_detect treats every input image as an already-cropped face. A folder is pipelined (run_on_images): worker
threads decode photos and find their faces ahead, the faces of several photos share one model call, and a thread
writes the annotated files; the rows are those of one photo at a time, in the same order. In a video a face is
tracked by box overlap and its age smoothed across frames.
Unreadable files are named in a warning and skipped; a photo without a face is reported, not an error.

Run:  python inference.py --input=photo.jpg [--checkpoint=checkpoints/<run>/best.pt] [--output=annotated.jpg]
      python inference.py --input=0          (webcam; q or Esc quits)
      python inference.py --input=photo.jpg --checkpoint=models/age_lite0_mix.pt,checkpoints/<run>/best.pt
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from config import PREDICTION_FIELDS, Config, parse_config, print_config, resolve_device
from custom_dataset_dataloader import (
    IMAGE_SUFFIXES,
    build_transforms,
    change_resolution,
    describe_read_error,
    open_rgb_image,
    resize_square,
)
from faces import DEFAULT_CROP_GEOMETRIES, CropGeometry, Detector, build_detector, geometries_from_dict
from files import (
    atomic_write_path,
    claim_outputs,
    commit,
    discard,
    folder_lock,
    remove_ours,
    temporary_path,
    written_by_us,
)
from model import ADULT_AGE, choose_model_files, config_from_model_file, fold_batch_norms, load_model, model_files

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}
# the codec each annotated-video suffix is written with: browsers play VP8 WebM (app.py writes it); OpenCV's wheels
# carry no H.264 encoder, so an .mp4 gets MPEG-4 Part 2, which desktop players open
VIDEO_CODECS = {".webm": "VP80", ".avi": "MJPG"}
WRITABLE_VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov")


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


IMAGE_OUTPUT_SUFFIXES = (".jpg", ".jpeg", ".png")  # what an annotated photo is written as
# written into every annotated photo (JPEG comment, PNG text) to say where it comes from; whether a rerun may replace
# a file is decided by files.written_by_us alone (the record of what we wrote), as for every output
OUTPUT_MARK = "annotated by inference.py (facial age estimation)"


def folder_targets(paths: list[Path], folder: Path) -> dict[Path, Path]:
    """The annotated file of each input photo in an output folder: <stem>_age.jpg, with the suffix in the name
    when two inputs share a stem (a.jpg, a.png), and a number added where the name is taken by an input or by a
    file inference.py did not write, so no input is overwritten and no two inputs share an output."""
    from collections import Counter

    stems, sources = Counter(path.stem for path in paths), {path.resolve() for path in paths}
    targets, taken = {}, set()
    for path in paths:
        base = path.stem if stems[path.stem] == 1 else f"{path.stem}_{path.suffix[1:].lower()}"
        base = base[:200]  # a photo named near the file system's 255-byte limit still gets an annotated copy
        target, number = folder / f"{base}_age.jpg", 1
        while (target.resolve() in sources or target in taken
               or (target.exists() and not written_by_us(target))):
            number += 1
            target = folder / f"{base}_age_{number}.jpg"
        targets[path] = target
        taken.add(target)
    return targets


def _stored_json(path: Path, text: str | None, entry: str) -> Any:
    """An export's stored JSON entry, or one sentence naming the file: exports are input too."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        raise SystemExit(f"error: {path} has no readable {entry} entry (missing or not JSON); export it again with "
                         "python export_jit.py") from None


# The moves of jittered_views, in the order they are added: (shift x, shift y as fractions of the side, degrees,
# zoom). About the landmark jitter of a detector on a 60-250 px face, to which a model's answer is sensitive
# (RESULTS.md, "Inference: detectors, crop consistency, latency").
VIEW_SHIFT, VIEW_DEGREES, VIEW_ZOOM = 0.016, 2.0, 0.02
VIEW_MOVES = ((0.0, 0.0, 0.0, 0.0), (VIEW_SHIFT, 0.0, 0.0, 0.0), (-VIEW_SHIFT, 0.0, 0.0, 0.0),
              (0.0, VIEW_SHIFT, 0.0, 0.0), (0.0, -VIEW_SHIFT, 0.0, 0.0), (0.0, 0.0, VIEW_DEGREES, 0.0),
              (0.0, 0.0, -VIEW_DEGREES, 0.0), (0.0, 0.0, 0.0, VIEW_ZOOM), (0.0, 0.0, 0.0, -VIEW_ZOOM))


def jittered_views(images: torch.Tensor, views: int) -> torch.Tensor:
    """Normalised crops (N, 3, S, S) -> (views N, 3, S, S): the crops, then one copy of them per move in
    VIEW_MOVES[1:views] (fixed, so a face always gets the same answer), edges replicated. Averaging the model over
    them makes its answer steadier against a crop framed a pixel or a degree differently."""
    if views == 1:
        return images
    count = len(images)
    theta = []
    for shift_x, shift_y, degrees, zoom in VIEW_MOVES[1:views]:
        angle, scale = math.radians(degrees), 1 + zoom
        # affine_grid maps output to input coordinates (units: half the side): the inverse of the move
        theta.append([[math.cos(angle) / scale, math.sin(angle) / scale, -2 * shift_x],
                      [-math.sin(angle) / scale, math.cos(angle) / scale, -2 * shift_y]])
    theta = torch.tensor(theta, dtype=images.dtype).repeat_interleave(count, 0)  # ((views - 1) N, 2, 3)
    repeated = images.repeat(views - 1, 1, 1, 1)  # view-major: copy v of face i at v N + i
    grid = torch.nn.functional.affine_grid(theta, list(repeated.shape), align_corners=False)
    moved = torch.nn.functional.grid_sample(repeated, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return torch.cat([images, moved])  # (views N, 3, S, S)


# Crops per model call at most. Past a few dozen a call's time per crop grows as its activations outgrow the CPU's
# caches, and a folder with --tta_views=5 gathers about 90 crops per call; 16 was the fastest of 8, 16 and 32 there.
MODEL_BATCH_SIZE = 16


class AgePredictor:
    """Loads any model file this project writes and predicts ages (years) for uint8 face crops (N, 3, S, S)."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", views: int = 1,
                 match_resolution: bool = True):
        path = Path(path)
        if not 1 <= views <= len(VIEW_MOVES):
            raise SystemExit(f"error: --tta_views={views}: give 1 (the crop alone) to {len(VIEW_MOVES)}")
        self.views = views  # each crop and views - 1 slightly moved copies, averaged (see jittered_views)
        if not path.is_file():
            raise SystemExit(f"error: model file {path} does not exist")
        self.device = torch.device(device)
        self.kind, self.session = "checkpoint", None
        if path.suffix == ".onnx":
            import onnxruntime

            self.kind = "onnx"
            options = onnxruntime.SessionOptions()
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # leave the CPU to the detector
            try:
                self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as error:  # noqa: BLE001 - onnxruntime raises its own types for a damaged file
                raise SystemExit(f"error: {path} is not a loadable ONNX model ({type(error).__name__}); export "
                                 "it again with python export_jit.py --format=onnx") from None
            metadata = self.session.get_modelmeta().custom_metadata_map
            config, geometry = _stored_json(path, metadata.get("config"), "config"), _stored_json(
                path, metadata.get("crop_geometry", "null"), "crop_geometry")
            resolution = _stored_json(path, metadata.get("face_resolution", "null"), "face_resolution")
        elif is_torchscript(path):
            self.kind = "torchscript"
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")  # deprecated, works
            extra_files = {"config.json": "", "crop_geometry.json": "", "face_resolution.json": ""}
            try:
                self.model = torch.jit.load(str(path), map_location=self.device, _extra_files=extra_files)
            except Exception as error:  # noqa: BLE001 - torch raises RuntimeError and others for a damaged archive
                raise SystemExit(f"error: {path} is not a loadable TorchScript file ({type(error).__name__}); "
                                 "export it again with python export_jit.py") from None
            config = _stored_json(path, extra_files["config.json"], "config.json")
            geometry = _stored_json(path, extra_files["crop_geometry.json"] or "null", "crop_geometry.json")
            resolution = _stored_json(path, extra_files["face_resolution.json"] or "null", "face_resolution.json")
        else:
            self.model, _, checkpoint = load_model(path, self.device)
            # batch norms folded into the convolutions: less time per call, the same ages up to float rounding;
            # channels_last: on the CPU the convolutions' fastest kernels (oneDNN) want it, and the gain grows with
            # the batch that folder inference gathers; its outputs are identical
            fold_batch_norms(self.model.backbone)
            self.model = self.model.to(memory_format=torch.channels_last)
            config, geometry = checkpoint["config"], checkpoint.get("crop_geometry")
            resolution = checkpoint.get("face_resolution")
        self.cfg = config_from_model_file(config, path)
        if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int)
                                       or not 4 <= resolution <= 10_000):
            raise SystemExit(f"error: {path}: its stored face_resolution {resolution!r} is not a side in pixels; "
                             "the file is damaged or was edited")
        # the side the training faces really had (None: a file from before it was recorded, used as it is)
        self.face_resolution: int | None = resolution
        self.match_resolution = match_resolution and resolution is not None and resolution < self.cfg.image_size
        self.path, self._announced = path, set()
        try:
            self.crop_geometries = geometries_from_dict(geometry)  # by detector name
        except (ValueError, TypeError, AttributeError) as error:
            raise SystemExit(f"error: {path}: its stored crop geometry is damaged ({error})") from None
        if not self.crop_geometries:
            warnings.warn(f"{path} carries no landmark crop geometry (an older file, or training faces the detector "
                          "did not find); aligning faces like UTKFace's crops (faces.DEFAULT_CROP_GEOMETRIES)",
                          stacklevel=2)
        self.transform = build_transforms(self.cfg, train=False)
        self.image_size = self.cfg.image_size
        if self.kind != "checkpoint":  # load_model refuses a .pt with NaN weights; an export is asked once
            gray = np.full((1, 3, self.image_size, self.image_size), 128, dtype=np.uint8)
            if not np.isfinite(self.predict(gray)).all():
                raise SystemExit(f"error: {path}: the model is broken, it answers NaN for a plain gray face (NaN "
                                 "weights from a diverged training?); export a good checkpoint again")

    def describe_resolution(self) -> str:
        """One phrase: the training faces' resolution and whether crops are brought down to it."""
        if self.face_resolution is None:
            return "training face resolution not recorded (crops used as they are)"
        action = "crops shrunk to it first" if self.match_resolution else "crops used as they are"
        return f"training faces {self.face_resolution}px ({action})"

    def geometry_for(self, detector_name: str) -> CropGeometry:
        """Where this model's training crops put the landmarks `detector_name` finds (its default if unmeasured)."""
        return self.crop_geometries.get(detector_name) or DEFAULT_CROP_GEOMETRIES[detector_name]

    def detector_name(self, wanted: str) -> str:
        """The detector to run: `wanted`, unless this file's crop geometry was measured with other detectors only (a
        file from before YuNet stores MTCNN's alone: it then runs with MTCNN, so it predicts exactly as before)."""
        if self.crop_geometries and wanted not in self.crop_geometries:
            chosen = next(iter(self.crop_geometries))
            if wanted not in self._announced:  # once per model file, not once per photo of the app
                self._announced.add(wanted)
                print(f"{self.path} stores no crop geometry for {wanted} (an older file); detecting faces with "
                      f"{chosen}")
            return chosen
        return wanted

    @torch.inference_mode()
    def predict_details(self, crops: np.ndarray, tta: bool = False) -> Predictions:
        """uint8 crops (N, 3, S, S) -> ages, spreads and P(age >= ADULT_AGE), each (N,). The spread (the standard
        deviation of the predicted age distribution) and the probability (calibrated by the head's temperature)
        exist for the heads that predict a distribution, in a .pt checkpoint; exported files return ages only.
        With tta, all three are averaged with the mirrored crops'; with views > 1, over the moved copies too."""
        if len(crops) == 0:
            return Predictions(np.zeros(0, dtype=np.float32))
        count = len(crops)
        images = self.transform(self.as_seen(crops))  # (N, 3, S, S) float
        images = jittered_views(images, self.views)  # (V N, 3, S, S)
        if tta:
            images = torch.cat([images, images.flip(-1)])  # (2 V N, 3, S, S)
        spreads = probabilities = None
        distribution = self.kind == "checkpoint" and self.model.head.has_spread

        def run(chunk: torch.Tensor) -> torch.Tensor:
            """A chunk's ages (n,), or its raw head outputs (n, K) for a distribution head."""
            if self.kind == "onnx":
                return torch.from_numpy(self.session.run(None, {"images": chunk.numpy()})[0])
            if distribution:
                return self.model.head_outputs(self._on_device(chunk))
            return self.model(self._on_device(chunk)).float().cpu()

        # the copies of a folder's faces can number hundreds: at most MODEL_BATCH_SIZE go through the model at once
        outputs = torch.cat([run(chunk) for chunk in images.split(MODEL_BATCH_SIZE)])
        if distribution:
            head = self.model.head
            ages, spreads = head.ages(outputs).cpu(), head.spread(outputs).cpu()
            if head.has_probabilities:
                probabilities = head.probability_at_least(outputs, ADULT_AGE).float().cpu()
        else:
            ages = outputs  # (copies N,)

        def merged(values: torch.Tensor | None) -> np.ndarray | None:
            if values is None:
                return None
            return values.view(-1, count).mean(0).numpy()  # (copies, N) -> (N,)

        return Predictions(merged(ages), merged(spreads), merged(probabilities))

    def as_seen(self, crops: np.ndarray) -> torch.Tensor:
        """uint8 crops (N, 3, S, S) -> the uint8 pixels (N, 3, S, S) the model is given: with match_resolution,
        shrunk to the training faces' side and enlarged back (a sharp photo's crop holds detail the training faces
        never had); otherwise the crops as they are."""
        pixels = torch.from_numpy(np.ascontiguousarray(crops))
        return change_resolution(pixels, self.face_resolution) if self.match_resolution else pixels

    def _on_device(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (N, 3, S, S) on the model's device, in the layout its weights are in (channels_last for
        a .pt checkpoint, see __init__; a TorchScript file keeps the layout it was traced in)."""
        layout = torch.channels_last if self.kind == "checkpoint" else torch.contiguous_format
        return images.to(self.device, memory_format=layout)

    def predict(self, crops: np.ndarray, tta: bool = False) -> np.ndarray:
        """uint8 crops (N, 3, S, S) -> ages (N,) float years."""
        return self.predict_details(crops, tta).ages


class AgeEnsemble:
    """Several model files as one predictor (`--checkpoint=a.pt,b.onnx`): every member sees the same detected and
    aligned face, each through its own preprocessing (its input size, resolution setting, normalisation, views
    and TTA), and their answers are averaged. Ages: the mean. Where every member predicts a distribution, the
    spread is the mixture's (the members' distributions averaged: sqrt(mean(spread^2 + age^2) - age^2)) and the
    P(age >= ADULT_AGE) the mean; otherwise those are None.

    The first member decides the alignment (its crop geometry and detector); the crop is cut at the largest
    member's input size and shrunk (antialiased) for the others. Members trained on the same alignment (UTKFace's
    chips, or align.py's template) therefore see exactly their own crop; a member whose stored geometry differs by
    more than GEOMETRY_TOLERANCE of the side is named at load."""

    GEOMETRY_TOLERANCE = 0.02

    def __init__(self, members: list[AgePredictor]):
        if len(members) < 2:
            raise ValueError("an ensemble needs two or more model files")
        self.members = members
        first = members[0]
        self.kind, self.cfg, self.device, self.path = "ensemble", first.cfg, first.device, first.path
        self.crop_geometries, self.face_resolution = first.crop_geometries, first.face_resolution
        self.image_size = max(member.image_size for member in members)
        self.views = first.views  # every member averages as many moved copies (load_predictor gives them one value)
        self.names = [f"{member.path} ({member.cfg.model_name}, {member.image_size}px)" for member in members]
        for member in members[1:]:
            for detector, geometry in first.crop_geometries.items():
                other = member.crop_geometries.get(detector)
                if other is not None and np.abs(np.subtract(other.landmarks, geometry.landmarks)).max() > (
                        self.GEOMETRY_TOLERANCE):
                    print(f"note: {member.path} was trained on faces aligned otherwise than {first.path} ({detector}); "
                          f"it is given {first.path}'s alignment")

    def describe_resolution(self) -> str:
        return "; ".join(f"{member.path.name}: {member.describe_resolution()}" for member in self.members)

    def geometry_for(self, detector_name: str) -> CropGeometry:
        return self.members[0].geometry_for(detector_name)

    def detector_name(self, wanted: str) -> str:
        return self.members[0].detector_name(wanted)

    def predict_details(self, crops: np.ndarray, tta: bool = False) -> Predictions:
        """uint8 crops (N, 3, S, S) at self.image_size -> the members' averaged predictions, each (N,)."""
        answers = []
        for member in self.members:
            member_crops = crops
            if crops.shape[-1] != member.image_size and len(crops):
                pixels = torch.from_numpy(np.ascontiguousarray(crops))  # (N, 3, S, S) uint8
                member_crops = F.interpolate(pixels, size=(member.image_size,) * 2, mode="bilinear",
                                             antialias=True, align_corners=False).numpy()
            answers.append(member.predict_details(member_crops, tta))
        ages = np.mean([answer.ages for answer in answers], axis=0)
        spreads = probabilities = None
        if all(answer.spreads is not None for answer in answers):
            second_moment = np.mean([answer.spreads ** 2 + answer.ages ** 2 for answer in answers], axis=0)
            spreads = np.sqrt(np.maximum(second_moment - ages ** 2, 0.0))
        if all(answer.adult_probabilities is not None for answer in answers):
            probabilities = np.mean([answer.adult_probabilities for answer in answers], axis=0)
        return Predictions(ages.astype(np.float32), spreads, probabilities)

    def predict(self, crops: np.ndarray, tta: bool = False) -> np.ndarray:
        """uint8 crops (N, 3, S, S) -> ages (N,) float years."""
        return self.predict_details(crops, tta).ages


def load_predictor(files: str | os.PathLike | list[Path] | tuple[Path, ...], device: str | torch.device = "cpu",
                   views: int = 1, match_resolution: bool = True) -> AgePredictor | AgeEnsemble:
    """One model file's AgePredictor, or for several (a list, or 'a.pt,b.pt') their AgeEnsemble."""
    paths = model_files(str(files)) if isinstance(files, str) else (
        list(files) if isinstance(files, list | tuple) else [Path(files)])
    members = [AgePredictor(path, device, views, match_resolution) for path in paths]
    if not members:
        raise SystemExit("error: --checkpoint names no model file")
    return members[0] if len(members) == 1 else AgeEnsemble(members)


@dataclass
class Face:
    box: tuple[float, float, float, float]  # x, y, w, h in pixels of the frame
    age: float
    spread: float | None = None
    track: int | None = None
    landmarks: np.ndarray | None = None  # (5, 2) x, y in pixels (faces.LANDMARK_NAMES), None without detection
    adult_probability: float | None = None  # calibrated P(age >= ADULT_AGE); distribution heads of .pt files only


@dataclass
class FoundFaces:
    """The faces of one frame before the model sees them: boxes, landmarks and aligned uint8 crops (N, 3, S, S)."""

    boxes: list[tuple[float, float, float, float]]
    landmarks: list[np.ndarray | None]
    crops: np.ndarray


def find_faces(image: np.ndarray, predictor: AgePredictor, detector: Detector | None) -> FoundFaces:
    """Detect and align every face of an RGB frame (H, W, 3); without a detector the frame is the face."""
    from PIL import Image

    size = predictor.image_size
    if detector is None:
        boxes, landmarks = [(0.0, 0.0, float(image.shape[1]), float(image.shape[0]))], [None]
        crops = [resize_square(Image.fromarray(image), size, predictor.cfg.interpolation)]
    else:
        detected = detector.detect_faces(image)
        boxes, landmarks = [face.box for face in detected], [face.landmarks for face in detected]
        geometry = predictor.geometry_for(detector.name)
        crops = [geometry.crop(image, face.landmarks, size, predictor.cfg.interpolation) for face in detected]
    return FoundFaces(boxes, landmarks, np.stack(crops) if crops else np.zeros((0, 3, size, size), np.uint8))


def faces_with_ages(found: FoundFaces, predictions: Predictions, start: int = 0) -> list[Face]:
    """Face records of `found`, whose predictions are rows start.. of `predictions` (several frames may share one
    model call)."""
    stop = start + len(found.boxes)

    def floats(values: np.ndarray | None) -> list[float | None]:
        return [None] * (stop - start) if values is None else [float(value) for value in values[start:stop]]

    return [Face(box, age, spread, landmarks=points, adult_probability=probability)
            for box, age, spread, probability, points in zip(
                found.boxes, floats(predictions.ages), floats(predictions.spreads),
                floats(predictions.adult_probabilities), found.landmarks, strict=True)]


def estimate_faces(
    image: np.ndarray, predictor: AgePredictor, detector: Detector | None, tta: bool = False
) -> list[Face]:
    """Every face in an RGB frame (H, W, 3), predicted in one batch; without a detector the frame is the face."""
    found = find_faces(image, predictor, detector)
    return faces_with_ages(found, predictor.predict_details(found.crops, tta))


def _age_text(value: float | None, digits: int = 0) -> str:
    """An age for a label or a message; '?' where the model gave no finite number."""
    return f"{value:.{digits}f}" if value is not None and np.isfinite(value) else "?"


def _finite(value: float | None, digits: int) -> float | None:
    """A rounded number for JSON, None (null) where it is missing or not finite: NaN is not valid JSON."""
    return round(float(value), digits) if value is not None and np.isfinite(value) else None


def draw_faces(image: np.ndarray, faces: list[Face], fps: float | None = None) -> np.ndarray:
    """A BGR copy of the RGB frame with a box and an age label per face (and the FPS when given)."""
    import cv2

    canvas = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    thickness = max(1, round(max(image.shape[:2]) / 400))
    for face in faces:
        x, y, width, height = (round(value) for value in face.box)
        label = _age_text(face.age) + ("" if face.spread is None else f" +/- {_age_text(face.spread)}")
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
               "landmarks": landmarks, "age": _finite(face.age, 2), "spread": _finite(face.spread, 2),
               "adult_probability": _finite(face.adult_probability, 3)}
        if face.track is not None:
            row["track"] = face.track
        rows.append(row)
    return rows


def write_image(path: Path, canvas: np.ndarray) -> None:
    """Write a BGR canvas as JPEG or PNG atomically, marked (OUTPUT_MARK) and recorded as ours."""
    from PIL import Image, PngImagePlugin

    image = Image.fromarray(np.ascontiguousarray(canvas[:, :, ::-1]))  # BGR (OpenCV's drawing) -> RGB
    with atomic_write_path(path, record=True) as temporary:
        if path.suffix.lower() == ".png":
            text = PngImagePlugin.PngInfo()
            text.add_text("Software", OUTPUT_MARK)
            image.save(temporary, format="PNG", pnginfo=text)
        else:
            image.save(temporary, format="JPEG", quality=92, comment=OUTPUT_MARK.encode())


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """The face rows as JSON lines (one dict per line), written atomically and recorded as ours. A write that fails
    (a full disk, a read-only folder) stops with the reason; the file that was there stays as it was."""
    try:
        with atomic_write_path(path, record=True) as temporary:
            temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))
    except OSError as error:
        raise SystemExit(f"error: the face rows could not be written to {path} ({type(error).__name__}: "
                         f"{error.strerror or error}); nothing there was replaced") from None


PHOTOS_PER_MODEL_CALL = 8  # folder inference: the faces of this many photos go through the model together
# folder inference: threads that decode photos and find their faces ahead of the model, which meanwhile runs on the
# cores left (at least one): with PyTorch's own threads beside them the workers and the model fought for the cores
# (RESULTS.md, "Folder throughput" under "Inference")
PHOTO_WORKERS = min(4, os.cpu_count() or 1)
PHOTOS_AHEAD = 8  # folder inference: photos decoded and analysed before the model asks for them


def analysed_photos(paths: list[Path], predictor: AgePredictor, detector: Detector | None,
                    workers: int = PHOTO_WORKERS, ahead: int = PHOTOS_AHEAD, max_pixels: int | None = None,
                    ) -> Iterator[tuple[Path, np.ndarray | Exception, FoundFaces | Exception | None]]:
    """(path, RGB array, its faces) in order; (path, the exception that stopped its decoding, None); or (path, RGB
    array, the OSError / ValueError that stopped finding its faces), as the per-photo loop skipped them. Worker
    threads decode each photo and detect and align its faces up to `ahead` photos before it is needed: PIL's
    decoder, OpenCV's YuNet and PyTorch's kernels release the GIL, so the photos of a folder keep both cores busy
    while the model predicts the faces found before them."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def analyse(path: Path) -> tuple[np.ndarray | Exception, FoundFaces | Exception | None]:
        try:
            image = np.asarray(open_rgb_image(path, max_pixels=max_pixels))
        except Exception as error:  # noqa: BLE001 - handed to the caller, who names the file
            return error, None
        try:
            return image, find_faces(image, predictor, detector)
        except Exception as error:  # noqa: BLE001 - an OpenCV assertion on an odd shape too: one photo never ends
            return image, error  # the others; the caller names it

    with ThreadPoolExecutor(workers, thread_name_prefix="analyse") as pool:
        pending: deque = deque()
        for path in paths:
            pending.append((path, pool.submit(analyse, path)))
            if len(pending) > ahead:
                done_path, future = pending.popleft()
                yield done_path, *future.result()
        while pending:
            done_path, future = pending.popleft()
            yield done_path, *future.result()


def run_on_images(cfg: Config, paths: list[Path], targets: dict[Path, Path], rows_path: Path,
                  predictor: AgePredictor, detector: Detector | None) -> tuple[list[dict[str, Any]], int]:
    """Annotate each photo into targets[photo]; returns (the face rows, the number of annotated photos written).
    Worker threads decode the photos and find their faces ahead (analysed_photos), the faces of
    PHOTOS_PER_MODEL_CALL photos share one model call, and a writer thread draws and encodes the annotated files;
    the rows come in the order of `paths`, as from one photo at a time. One photo that fails is a warning, never the
    end of the others. A complete run writes rows_path (when a photo was written at all: a single photo that failed
    leaves no empty rows file) and removes an earlier run's partial rows; a run stopped midway keeps the rows of
    every photo done in <rows_path>.partial.jsonl and leaves the earlier complete rows as they were."""
    from concurrent.futures import Future, ThreadPoolExecutor

    rows: list[dict[str, Any]] = []
    group: list[tuple[Path, np.ndarray, FoundFaces]] = []
    Done = list[tuple[Path, list[Face], Future]]

    def predict_group(writer: ThreadPoolExecutor) -> Done:
        """One model call for the group's faces; each annotated photo handed to the writer thread."""
        crops = np.concatenate([found.crops for _, _, found in group])  # (N faces of the group, 3, S, S)
        predictions = predictor.predict_details(crops, cfg.tta)
        results, start = [], 0
        for path, image, found in group:
            faces = faces_with_ages(found, predictions, start)
            start += len(faces)
            results.append((path, faces, writer.submit(
                lambda target, image, faces: write_image(target, draw_faces(image, faces)), targets[path], image,
                faces)))
        group.clear()
        return results

    def report(results: Done) -> None:
        """Once a group's files are written (called a group later, so writing overlaps the next group's work); each
        photo is taken out of `results` as it is reported, so a run stopped at any point reports it once."""
        while results:
            path, faces, write = results.pop(0)
            error = write.exception()
            if error is not None:  # a name too long for the file system, a full disk, ...
                warnings.warn(f"skipping {path}: its result could not be written to {targets[path]} "
                              f"({type(error).__name__}: {error})", stacklevel=3)
                continue
            written.append(path)
            if not faces:
                print(f"{path}: no face found")
            else:
                print(f"{path}: {len(faces)} face(s), age(s) " + ", ".join(_age_text(face.age, 1) for face in faces))
            rows.extend(face_rows(str(path), None, faces))

    previous: Done = []
    written: list[Path] = []
    completed = False
    try:
        with (folder_threads(predictor, cfg.tta, len(paths)),
              ThreadPoolExecutor(1, thread_name_prefix="write") as writer):
            photos = analysed_photos(paths, predictor, detector, max_pixels=cfg.max_image_pixels)
            for path, image, found in usable_photos(photos):
                group.append((path, image, found))
                if len(group) == PHOTOS_PER_MODEL_CALL:
                    report(previous)
                    previous = predict_group(writer)
            report(previous)
            previous = predict_group(writer) if group else []
            report(previous)
        completed = True
    finally:
        if completed and written:  # results are replaced only by a complete new set
            write_rows(rows_path, rows)
            remove_ours(partial_rows_path(rows_path))  # an earlier stopped run's rows are superseded
        elif not completed:
            # the photos already predicted were annotated (the writer finished them as the run stopped): their rows
            # belong with the partial results
            with contextlib.suppress(Exception):
                report(previous)
            if rows:
                _keep_partial_rows(rows_path, rows)
    return rows, len(written)


def usable_photos(photos: Iterator[tuple[Path, np.ndarray | Exception, FoundFaces | Exception | None]],
                  ) -> Iterator[tuple[Path, np.ndarray, FoundFaces]]:
    """analysed_photos' photos that decoded and whose faces could be searched; each other one is a warning."""
    for path, image, found in photos:
        if isinstance(image, Exception):
            warnings.warn(f"skipping {path}: not a readable image ({describe_read_error(image, path)})", stacklevel=3)
        elif isinstance(found, Exception):
            warnings.warn(f"skipping {path}: its faces could not be found ({type(found).__name__}: {found})",
                          stacklevel=3)
        else:
            yield path, image, found


@contextlib.contextmanager
def folder_threads(predictor: AgePredictor, tta: bool, photos: int) -> Iterator[None]:
    """The threads of a folder run, restored afterwards: the model's share of the cores while the photo workers
    detect, and one OpenCV thread per YuNet call."""
    import cv2

    threads, detector_threads = torch.get_num_threads(), cv2.getNumThreads()
    if photos > 1:
        if predictor.views * (2 if tta else 1) == 1:
            # with --tta / --tta_views the model does several times the work per face and is the slower half: on
            # one thread it slowed the folder down, so it keeps them all
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - PHOTO_WORKERS))
        # the workers already keep the cores busy: OpenCV's own thread pool inside each YuNet call only adds
        # switching
        cv2.setNumThreads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(detector_threads)


def partial_rows_path(rows_path: Path) -> Path:
    return rows_path.with_name(f"{rows_path.stem}.partial.jsonl")


def _keep_partial_rows(rows_path: Path, rows: list[dict[str, Any]]) -> None:
    """A run that stopped early: its rows go to <name>.partial.jsonl (if that is free or ours), and the complete
    results of an earlier run at rows_path stay as they were. Never raises: the error that stopped the run goes on."""
    partial = partial_rows_path(rows_path)
    if partial.exists() and not written_by_us(partial):
        print(f"stopped early; the {len(rows)} face rows done are not written ({partial} is not ours)")
        return
    with contextlib.suppress(SystemExit):
        write_rows(partial, rows)
        print(f"stopped early: the {len(rows)} face rows done are in {partial}; {rows_path} was left as it was")


def _display_available() -> bool:
    return sys.platform in ("win32", "darwin") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


class ClipTooLong(ValueError):
    """A video with more frames than the caller allows (app.py's clip limit)."""


def run_on_video(cfg: Config, source: str | int, output: Path | None, predictor: AgePredictor,
                 detector: Detector | None, max_frames: int | None = None) -> list[dict[str, Any]]:
    import cv2

    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise SystemExit(f"error: cannot open the video or camera {source!r}")
    fps_in = capture.get(cv2.CAP_PROP_FPS) or 25.0
    writer, rows, tracker = None, [], FaceTracker(cfg.smoothing)
    show = cfg.show and _display_available()
    frame_index, started, fps = 0, time.perf_counter(), None
    temporary = temporary_path(output) if output else None  # files.py's: renamed over output once complete
    keep = False  # the video is renamed into place only after the loop ends normally (or Ctrl-C stops a stream)
    read_any = False
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            read_any = True
            if max_frames is not None and frame_index >= max_frames:
                raise ClipTooLong(f"more than {max_frames} frames; send a shorter clip")
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
                    if not writer.isOpened():
                        raise SystemExit(f"error: OpenCV cannot write a video to {output}; try --output=<name>.mp4")
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
        if writer is not None and keep:
            commit(temporary, output, record=True)
        elif temporary is not None:  # a failure midway, or no frame: no half-written video under the output name
            discard(temporary)
        if show:
            cv2.destroyAllWindows()
    if not read_any:
        raise SystemExit(f"error: no frame could be read from {source!r} (an empty or damaged video, or a camera "
                         "that gives no picture); nothing was written")
    seconds = time.perf_counter() - started
    print(f"{frame_index} frames in {seconds:.1f}s ({frame_index / max(seconds, 1e-9):.1f} FPS), {len(rows)} face rows")
    if output is not None:
        write_rows(output.with_suffix(".jsonl"), rows)
    return rows


SETTINGS = (*PREDICTION_FIELDS, "input", "output", "no_detect", "smoothing", "show", "pics_dir",
            "max_image_pixels")  # its --help


def main(cfg: Config) -> list[dict[str, Any]]:
    """Run the model on --input; returns one dict per face (source, frame, box, age, spread)."""
    print_config(cfg, "inference.py", SETTINGS)
    if not cfg.input:
        raise SystemExit("error: pass --input=<image, folder, video or camera index>")
    predictor = load_predictor(choose_model_files(cfg), resolve_device(cfg.device),
                               cfg.tta_views, cfg.match_training_resolution)
    detector = None if cfg.no_detect else build_detector(predictor.detector_name(cfg.detector), cfg.min_face_size)
    faces = f"; {detector.name} faces, crop geometry {predictor.geometry_for(detector.name)}" if detector else ""
    if isinstance(predictor, AgeEnsemble):
        print(f"model: the mean of {len(predictor.members)} models: {'; '.join(predictor.names)}")
    print(f"model: {predictor.kind} {predictor.cfg.model_name} at {predictor.image_size}px, "
          f"{predictor.describe_resolution()}{faces}")
    try:
        return dispatch(cfg, predictor, detector)
    except KeyboardInterrupt:  # the rows of the photos done were kept and named above; no traceback after that
        raise SystemExit("stopped by Ctrl-C") from None


def dispatch(cfg: Config, predictor: AgePredictor | AgeEnsemble, detector: Detector | None) -> list[dict[str, Any]]:
    """--input as a camera index, a folder, a video or one photo, each with its outputs claimed and locked."""
    default_folder = Path(cfg.pics_dir) / "inference"
    source = Path(cfg.input)
    try:
        source.stat()
    except FileNotFoundError:
        pass  # said below, once the camera index is ruled out
    except OSError as error:  # a name too long for the file system, a loop of links...
        shown = cfg.input if len(cfg.input) <= 80 else cfg.input[:77] + "..."
        raise SystemExit(f"error: --input={shown} cannot be used ({type(error).__name__}: "
                         f"{error.strerror or error})") from None
    if cfg.input.isascii() and cfg.input.isdigit():  # a camera index ('²'.isdigit() is true, int('²') fails)
        output = Path(cfg.output) if cfg.output else None
        if output is not None:
            _check_video_output(output, [])
        with folder_lock(output.parent, "inference.py") if output else contextlib.nullcontext():
            return run_on_video(cfg, int(cfg.input), output, predictor, detector)
    if source.is_dir():
        paths = sorted(path for path in source.iterdir() if path.is_file() and not path.name.startswith(".")
                       and path.suffix.lower() in IMAGE_SUFFIXES)
        skipped = sorted(path.name for path in source.iterdir() if path.is_file()
                         and path.suffix.lower() not in IMAGE_SUFFIXES and not path.name.startswith("."))
        if skipped:
            warnings.warn(f"skipping {len(skipped)} non-image file(s) in {source}: {', '.join(skipped)}", stacklevel=2)
        ours = [path for path in paths if path.suffix.lower() in IMAGE_OUTPUT_SUFFIXES and written_by_us(path)]
        if ours:  # annotations of an earlier run into this folder are results, not photos
            print(f"leaving out {len(ours)} image(s) that inference.py annotated earlier (e.g. {ours[0].name})")
            paths = [path for path in paths if path not in ours]
        folder = Path(cfg.output) if cfg.output else default_folder
        if folder.exists() and not folder.is_dir():
            raise SystemExit(f"error: --output={folder} is a file, but a folder input needs an output folder")
        rows_path = folder / "predictions.jsonl"
        claim_outputs([rows_path], paths, "inference.py")
        with folder_lock(folder, "inference.py"):  # two runs into one folder would mix their images and rows
            targets = folder_targets(paths, folder)
            rows, written = run_on_images(cfg, paths, targets, rows_path, predictor, detector)
        skipped = f" ({len(paths) - written} photo(s) skipped, named above)" if written < len(paths) else ""
        if not written:
            raise SystemExit(f"error: none of the {len(paths)} photo(s) in {source} could be annotated (see the "
                             "warnings above); nothing was written")
        print(f"wrote {written} annotated image(s){skipped} and {rows_path} to {folder}")
        return rows
    if not source.is_file():
        raise SystemExit(f"error: --input={cfg.input} is neither a file, a folder nor a camera index")
    if source.suffix.lower() in VIDEO_SUFFIXES:
        output = Path(cfg.output) if cfg.output else default_folder / f"{source.stem}_age.mp4"
        _check_video_output(output, [source])
        with folder_lock(output.parent, "inference.py"):
            return run_on_video(cfg, str(source), output, predictor, detector)
    output = Path(cfg.output) if cfg.output else default_folder / f"{source.stem}_age.jpg"
    if output.suffix.lower() not in IMAGE_OUTPUT_SUFFIXES:
        raise SystemExit(f"error: --output={output}: an annotated photo is written as "
                         f"{' or '.join(IMAGE_OUTPUT_SUFFIXES)}; give one of those suffixes")
    claim_outputs([output, output.with_suffix(".jsonl")], [source], "inference.py")
    with folder_lock(output.parent, "inference.py"):
        rows, written = run_on_images(cfg, [source], {source: output}, output.with_suffix(".jsonl"), predictor,
                                      detector)
    if not written:  # the warning above says why
        raise SystemExit(f"error: no annotated photo was written for {source} (see the warning above)")
    print(f"wrote {output} and {output.with_suffix('.jsonl')}")
    return rows


def _check_video_output(output: Path, inputs: list[Path]) -> None:
    """Before the first frame: a video suffix OpenCV writes, a folder to write into, nothing of a user's replaced."""
    if output.suffix.lower() not in WRITABLE_VIDEO_SUFFIXES:
        raise SystemExit(f"error: --output={output}: an annotated video is written as "
                         f"{', '.join(WRITABLE_VIDEO_SUFFIXES)}; give one of those suffixes")
    claim_outputs([output, output.with_suffix(".jsonl")], inputs, "inference.py")
    output.parent.mkdir(parents=True, exist_ok=True)


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], reads=SETTINGS))
