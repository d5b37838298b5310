"""A web page, and its API, to try a trained model on your own photos and clips (Gradio, over inference.py).

Reads:  --checkpoint's model files if given, else the shipped model (models/age_lite0_mix.pt): the page's
        default, by the rule every script follows (model.choose_model_files; --checkpoint=latest is your newest
        finished run); then, to pick from, the model files under --checkpoint_dir (<run>/best.pt,
        <run>/model.torchscript, <run>/model.onnx), newest first, and demo.py's last; photos and clips sent to
        the page.
Writes: nothing in the repository: annotated images, clips and JSON lines go to a temporary folder the page serves
        (files older than an hour are removed, the folder itself when the app stops).

The page shows, for every face found: the annotated photo (box, landmarks, "age +/- spread"), a table (box, age,
spread, the calibrated P(age >= 18), the model) and, for .pt checkpoints, each face's aligned crop beside its
Grad-CAM map (what the age was read from). Detection, alignment, prediction and drawing are inference.py's and
faces.py's own functions, so the page and `python inference.py` give the same numbers.

Safe by default: it listens on 127.0.0.1 (--host=0.0.0.0 to serve a network), opens no public link unless
--share=true, refuses uploads over --max_upload_megabytes, photos over --max_image_pixels and clips over
--max_video_seconds, and answers a bad file with a message on the page. The model picker offers only the files
found at start, and a request can name nothing else, so no request makes the server load an arbitrary path.

Run:  python app.py                       (then open http://127.0.0.1:7860)
      python app.py --checkpoint=checkpoints/<run>/model.onnx --port=8080
      python app.py --checkpoint=models/age_lite0_mix.pt,checkpoints/<run>/best.pt   (their mean, and each alone)
API:  from gradio_client import Client, handle_file
      faces = Client("http://127.0.0.1:7860/").predict(handle_file("photo.jpg"), api_name="/estimate")
      # a list with one dict per face: box, landmarks, age, spread, adult_probability, model
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from config import PREDICTION_FIELDS, Config, parse_config, print_config, resolve_device
from custom_dataset_dataloader import describe_read_error, open_rgb_image
from demo import DEMO_DEFAULTS
from faces import Detector, build_detector
from files import remove_older_than
from inference import (
    AgeEnsemble,
    AgePredictor,
    ClipTooLong,
    Face,
    draw_faces,
    estimate_faces,
    face_rows,
    load_predictor,
    run_on_video,
    write_rows,
)
from model import ADULT_AGE, SHIPPED_MODEL, choose_model_files

DEMO_CHECKPOINTS = Path(DEMO_DEFAULTS.checkpoint_dir)  # where demo.py leaves its model
MODEL_FILE_PATTERNS = ("*/best.pt", "*/*.torchscript", "*/*.onnx")
MAX_CLIP_FPS = 60.0  # a clip's length is counted at this frame rate at most, whatever its header declares
KEEP_OUTPUTS_SECONDS = 3600  # annotated files older than this are removed from the app's folder
GALLERY_SIZE = 192  # pixels: the side each crop and its map are shown at in the gallery
TABLE_HEADERS = ["face", "box (x, y, w, h)", "age", "spread", f"P(age >= {ADULT_AGE})", "model"]


class InputError(ValueError):
    """A photo or clip the app cannot use; its message is shown on the page as it is."""


def find_model_files(cfg: Config) -> dict[str, Path | tuple[Path, ...]]:
    """Label -> model file (or an ensemble's files, --checkpoint=a.pt,b.pt, then each of them), the first being the
    page's default by the rule every script follows (model.choose_model_files): --checkpoint's files if given, else
    the shipped model. Then, to pick from: checkpoint_dir's model files, newest first, and demo.py's last (a model
    of drawn faces, never the default). Stops with one sentence when there is none."""
    found: dict[str, Path | tuple[Path, ...]] = {}
    paths = choose_model_files(cfg)
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"error: --checkpoint={cfg.checkpoint}: {path} does not exist")
    if len(paths) > 1:  # an ensemble, offered first, and each of its members after it
        found[" + ".join(str(path) for path in paths)] = tuple(path.resolve() for path in paths)
    root = Path(__file__).resolve().parent
    for path in paths:
        found[str(path.relative_to(root)) if path == SHIPPED_MODEL else str(path)] = path.resolve()
    for folder in (Path(cfg.checkpoint_dir), DEMO_CHECKPOINTS):
        candidates = {path.resolve(): path for pattern in MODEL_FILE_PATTERNS for path in folder.glob(pattern)
                      if path.is_file()}
        for resolved, path in sorted(candidates.items(), key=lambda item: -item[0].stat().st_mtime):
            if resolved not in found.values():
                found[str(path)] = resolved
    return found


class ModelShelf:
    """The model files on offer, each loaded on first use and then kept, and one face detector per detector and
    smallest-face size. A label that was not found at start is refused: requests choose among these files, never a
    path. detector: the detector asked for (cfg.detector); a model file from before YuNet gets MTCNN. views: the
    crops averaged per face (cfg.tta_views, see inference.jittered_views)."""

    def __init__(self, files: dict[str, Path | tuple[Path, ...]], device: str | torch.device = "cpu",
                 detector: str = "yunet", views: int = 1, match_resolution: bool = True):
        self.files, self.device, self.detector_name, self.views = files, device, detector, views
        self.match_resolution = match_resolution  # cfg.match_training_resolution (see AgePredictor)
        self.predictors: dict[str, AgePredictor | AgeEnsemble] = {}
        self.detectors: dict[tuple[str, int], Detector] = {}

    @property
    def labels(self) -> list[str]:
        return list(self.files)

    def predictor(self, label: str) -> AgePredictor | AgeEnsemble:
        if label not in self.files:
            raise InputError(f"unknown model {label!r}; choose one of: {', '.join(self.files)}")
        if label not in self.predictors:
            self.predictors[label] = load_predictor(self.files[label], self.device, self.views, self.match_resolution)
        return self.predictors[label]

    def detector(self, label: str, min_face_size: int) -> Detector:
        """The face detector for the model called label (see AgePredictor.detector_name)."""
        key = self.predictor(label).detector_name(self.detector_name), int(min_face_size)
        if key not in self.detectors:
            self.detectors[key] = build_detector(*key)
        return self.detectors[key]


def read_photo(path: str | os.PathLike, max_pixels: int) -> np.ndarray:
    """An uploaded photo as RGB (H, W, 3) uint8; InputError naming the file for anything else. The pixel count is
    checked from the header, before the image is decoded."""
    from PIL import Image, UnidentifiedImageError

    name = Path(path).name
    try:
        with Image.open(path) as header:
            width, height = header.size
    except Image.DecompressionBombError:  # PIL refuses to even open one over twice its own limit
        raise InputError(f"{name} has more pixels than the app's limit of {max_pixels:,} (over PIL's "
                         f"{2 * (Image.MAX_IMAGE_PIXELS or 0):,}); send a smaller photo") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise InputError(f"{name} is not an image this app can read ({describe_read_error(error, path)}); send a "
                         "JPEG, PNG, WebP or BMP photo") from None
    if width * height > max_pixels:
        raise InputError(f"{name} has {width} x {height} pixels, more than the app's limit of {max_pixels:,}; "
                         "send a smaller photo (or start the app with a larger --max_image_pixels)")
    try:
        return np.asarray(open_rgb_image(path))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise InputError(f"{name} could not be decoded ({describe_read_error(error, path)})") from None


def uploaded_photo(payload: Any, folder: Path, max_megabytes: float = 20.0) -> Path | None:
    """The file behind the page's photo input as it arrives, undecoded (its event runs with preprocess=False, so
    gradio never opens the upload and read_photo's header check is the first to see it): the uploaded file's path,
    or a data: URL (a paste or webcam snapshot sent inline) written to a file in `folder`, held to the same
    --max_upload_megabytes as an upload (its size is known from the text before anything is decoded). None without
    a photo."""
    import base64
    import binascii

    if not payload:
        return None
    if isinstance(payload, str | os.PathLike):
        return Path(payload)
    if not isinstance(payload, dict):
        raise InputError("the photo did not arrive as a file; upload it again")
    if payload.get("path"):
        return Path(payload["path"])
    url = str(payload.get("url") or "")
    if not url.startswith("data:"):
        raise InputError("the photo did not arrive as a file; upload it again")
    encoded = url.partition(",")[2]
    if len(encoded) * 3 / 4 > max_megabytes * 1e6:
        raise InputError(f"the pasted photo holds about {len(encoded) * 3 / 4e6:.0f} MB, more than the app's limit of "
                         f"{max_megabytes:g} MB; send a smaller photo")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("the pasted photo is not valid base64 data; upload the file instead") from None
    path = folder / f"pasted_{uuid.uuid4().hex[:8]}.image"
    path.write_bytes(data)
    return path


def table_rows(faces: list[Face], label: str) -> list[list[Any]]:
    """The page's table: one row per face, in TABLE_HEADERS' order."""
    def rounded(value: float | None, digits: int) -> float | None:
        return None if value is None else round(value, digits)

    return [[index + 1, ", ".join(f"{value:.0f}" for value in face.box), round(face.age, 1),
             rounded(face.spread, 1), rounded(face.adult_probability, 3), label]
            for index, face in enumerate(faces)]


def heatmap_gallery(predictor: AgePredictor | AgeEnsemble, image: np.ndarray, faces: list[Face],
                    detector_name: str) -> list[tuple[np.ndarray, str]]:
    """Each face's aligned crop beside its Grad-CAM map, (crop | overlay) uint8 RGB, with a caption; empty for an
    exported model (no gradients) or a backbone without a Grad-CAM set-up."""
    from analysis.heatmaps import cam_setup, compute_heatmaps

    if isinstance(predictor, AgeEnsemble):  # the map of the member whose alignment the ensemble uses
        predictor = predictor.members[0]
    if predictor.kind != "checkpoint" or not faces:
        return []
    try:
        cam_setup(predictor.model, predictor.cfg.model_name)
    except ValueError:
        return []
    import cv2
    from pytorch_grad_cam.utils.image import show_cam_on_image

    size, interpolation = predictor.image_size, predictor.cfg.interpolation
    geometry = predictor.geometry_for(detector_name)
    crops = np.stack([geometry.crop(image, face.landmarks, size, interpolation) for face in faces])  # (N, 3, S, S)
    pixels = predictor.as_seen(crops)  # what the model is given (shrunk to its training resolution when it asks)
    maps = compute_heatmaps(predictor.model, predictor.cfg.model_name,
                            predictor.transform(pixels).to(predictor.device))  # (N, S, S)
    crops = pixels.numpy()
    gallery = []
    for index, (crop, heatmap, face) in enumerate(zip(crops, maps, faces, strict=True)):
        rgb = crop.transpose(1, 2, 0)  # (S, S, 3)
        overlay = show_cam_on_image(rgb.astype(np.float32) / 255, heatmap, use_rgb=True)
        pair = np.hstack([rgb, overlay])  # (S, 2S, 3)
        pair = cv2.resize(pair, (2 * GALLERY_SIZE, GALLERY_SIZE), interpolation=cv2.INTER_CUBIC)  # viewable
        gallery.append((pair, f"face {index + 1}: {face.age:.0f} years"))
    return gallery


@dataclass
class PhotoResult:
    canvas: np.ndarray  # (H, W, 3) uint8 RGB, annotated
    faces: list[Face]
    rows: list[dict[str, Any]]  # inference.face_rows plus the model's label
    gallery: list[tuple[np.ndarray, str]]


def estimate_photo(shelf: ModelShelf, path: str | os.PathLike, label: str, tta: bool, min_face_size: int,
                   max_pixels: int, heatmaps: bool = True) -> PhotoResult:
    """Detect, align and predict every face of one photo with the chosen model (InputError for a bad file)."""
    predictor = shelf.predictor(label)
    image = read_photo(path, max_pixels)
    detector = shelf.detector(label, min_face_size)
    try:
        faces = estimate_faces(image, predictor, detector, tta)
    except Exception as error:  # noqa: BLE001 - e.g. an OpenCV assertion on an odd shape: this photo's message
        raise InputError(f"{Path(path).name}: its faces could not be found ({type(error).__name__}: "
                         f"{str(error).strip()[:200]})") from None
    rows = [{**row, "model": label} for row in face_rows(Path(path).name, None, faces)]
    canvas = draw_faces(image, faces)[:, :, ::-1]  # draw_faces gives BGR (OpenCV's order) -> RGB
    gallery = heatmap_gallery(predictor, image, faces, detector.name) if heatmaps else []
    return PhotoResult(canvas, faces, rows, gallery)


def estimate_clip(cfg: Config, shelf: ModelShelf, path: str | os.PathLike, label: str, tta: bool,
                  min_face_size: int, folder: Path) -> tuple[Path, list[dict[str, Any]]]:
    """Annotate a short clip (WebM, which browsers play) with inference.run_on_video: (video path, face rows per
    frame). InputError for a file OpenCV cannot decode or a clip over cfg.max_video_seconds."""
    import cv2

    name = Path(path).name
    capture = cv2.VideoCapture(str(path))
    frames, fps = capture.get(cv2.CAP_PROP_FRAME_COUNT), capture.get(cv2.CAP_PROP_FPS) or 25.0
    readable = capture.isOpened() and capture.read()[0]
    capture.release()
    if not readable:
        raise InputError(f"{name} is not a video this app can decode; send an MP4, WebM, AVI or MOV clip")
    # the declared frame rate is the file's word: frames are also counted at MAX_CLIP_FPS at most, so 4,000
    # frames declared at 1,000 fps are 67 s here, not 4
    seconds = max(frames / fps, frames / MAX_CLIP_FPS)
    if seconds > cfg.max_video_seconds:
        raise InputError(f"{name} holds {frames:.0f} frames ({seconds:.0f} s at {min(fps, MAX_CLIP_FPS):.0f} "
                         f"frames/s), longer than the app's limit of {cfg.max_video_seconds:.0f} s; send a shorter "
                         "clip")
    output = folder / f"{Path(path).stem}_{uuid.uuid4().hex[:8]}_age.webm"
    video_cfg = replace(cfg, tta=tta, show=False)
    try:  # a header that undercounts its frames is stopped while reading, at the same limit
        rows = run_on_video(video_cfg, str(path), output, shelf.predictor(label),
                            shelf.detector(label, min_face_size),
                            max_frames=int(cfg.max_video_seconds * MAX_CLIP_FPS))
    except ClipTooLong as error:
        raise InputError(f"{name}: {error}") from None
    if not output.is_file():
        raise InputError(f"{name}: no frame could be decoded")
    return output, [{**row, "source": name, "model": label} for row in rows]


def write_download(folder: Path, stem: str, rows: list[dict[str, Any]]) -> Path:
    """The JSON lines inference.py writes, as a download; files older than KEEP_OUTPUTS_SECONDS are removed."""
    remove_older_than(folder, KEEP_OUTPUTS_SECONDS)  # gradio's upload copies too (GRADIO_TEMP_DIR is in it)
    path = folder / f"{stem}_{uuid.uuid4().hex[:8]}.jsonl"
    write_rows(path, rows)
    return path


class PageHandlers:
    """What the page's two buttons and the /estimate API do; an InputError becomes the page's message (gr.Error)."""

    def __init__(self, cfg: Config, shelf: ModelShelf, folder: Path):
        self.cfg, self.shelf, self.folder = cfg, shelf, folder

    @staticmethod
    def page_error(error: Exception) -> Exception:
        import gradio as gr

        return gr.Error(str(error)) if isinstance(error, InputError) else error

    def photo(self, payload: Any, label: str, tta: bool, min_face_size: float) -> tuple:
        """The Photo tab: annotated image, table, gallery, download, message."""
        import gradio as gr

        try:
            path = uploaded_photo(payload, self.folder, self.cfg.max_upload_megabytes)
            if path is None:
                raise InputError("add a photo first: upload one, paste one or take a webcam snapshot")
            result = estimate_photo(self.shelf, path, label, tta, int(min_face_size), self.cfg.max_image_pixels)
        except InputError as error:
            raise self.page_error(error) from None
        message = (f"{len(result.faces)} face(s) found with {label}." if result.faces else
                   f"No face found (smallest face searched: {int(min_face_size)} px). Try a lower smallest-face "
                   "setting or a photo where the face is larger.")
        if result.faces and not result.gallery:
            message += " (Grad-CAM maps need a .pt checkpoint of a backbone with a Grad-CAM set-up.)"
        download = write_download(self.folder, Path(path).stem, result.rows)
        return (result.canvas, table_rows(result.faces, label), gr.update(value=result.gallery,
                visible=bool(result.gallery)), str(download), message)

    def clip(self, path: str | None, label: str, tta: bool, min_face_size: float) -> tuple[str, str, str]:
        """The Clip tab: annotated video, download, message."""
        try:
            if not path:
                raise InputError("add a clip first")
            video, rows = estimate_clip(self.cfg, self.shelf, path, label, tta, int(min_face_size), self.folder)
        except InputError as error:
            raise self.page_error(error) from None
        frames = len({row["frame"] for row in rows})
        message = f"{len(rows)} face detections over {frames} frame(s) with faces, by {label}."
        return str(video), str(write_download(self.folder, Path(path).stem, rows)), message

    def estimate(self, photo: str | None, label: str, tta: bool, min_face_size: float) -> list[dict[str, Any]]:
        """The API: one dict per face (box, landmarks, age, spread, adult_probability, model)."""
        try:
            if not photo:
                raise InputError("send a photo: Client(url).predict(handle_file('photo.jpg'), api_name='/estimate')")
            return estimate_photo(self.shelf, photo, label, tta, int(min_face_size), self.cfg.max_image_pixels,
                                  heatmaps=False).rows
        except InputError as error:
            raise self.page_error(error) from None


def build_app(cfg: Config, shelf: ModelShelf, folder: Path) -> Any:
    """The gr.Blocks page: photo and clip tabs, the model picker, and the /estimate API endpoint."""
    import gradio as gr

    handlers = PageHandlers(cfg, shelf, folder)
    with gr.Blocks(title="Facial age estimation") as page:
        gr.Markdown(f"# Facial age estimation\nEvery face in the photo is found ({cfg.detector}), aligned like the "
                    "training crops and given an age, a spread (the standard deviation of the predicted age "
                    f"distribution) and the calibrated probability of being {ADULT_AGE} or older.")
        with gr.Row():
            model_picker = gr.Dropdown(shelf.labels, value=shelf.labels[0], label="model")
            tta = gr.Checkbox(value=cfg.tta, label="flip test-time augmentation")
            min_face = gr.Slider(12, 400, value=cfg.min_face_size, step=1, label="smallest face (px)")
        with gr.Tab("Photo"):
            with gr.Row():
                # its event runs with preprocess=False: gradio would open (and, for a mode other than RGB, decode)
                # the upload before read_photo's header check; uploaded_photo hands the file over untouched
                photo = gr.Image(type="filepath", sources=["upload", "clipboard", "webcam"], label="photo")
                annotated = gr.Image(label="faces", interactive=False, format="png")
            run_photo = gr.Button("Estimate ages", variant="primary")
            photo_status = gr.Markdown()
            table = gr.Dataframe(headers=TABLE_HEADERS, label="one row per face", interactive=False)
            gallery = gr.Gallery(label="aligned crop | Grad-CAM", columns=3, fit_columns=False, object_fit="contain",
                                 preview=False, visible=False)
            photo_rows = gr.File(label="face rows (JSON lines, as inference.py writes)")
        with gr.Tab("Clip"):
            with gr.Row():
                clip = gr.Video(label=f"clip (up to {cfg.max_video_seconds:.0f} s)", sources=["upload"])
                annotated_clip = gr.Video(label="faces", interactive=False)
            run_clip = gr.Button("Estimate ages", variant="primary")
            clip_status = gr.Markdown()
            clip_rows = gr.File(label="face rows per frame (JSON lines)")
        api_photo = gr.File(visible=False, label="photo")  # the API's input: a file, decoded by read_photo
        api_faces = gr.JSON(visible=False)
        api_button = gr.Button(visible=False)

        # one model call at a time, shared by the three events: Grad-CAM hooks the model, and on a CPU parallel
        # requests would only split the same cores
        shared = {"concurrency_limit": 1, "concurrency_id": "model"}
        settings = [model_picker, tta, min_face]
        run_photo.click(handlers.photo, [photo, *settings], [annotated, table, gallery, photo_rows, photo_status],
                        api_name="photo", preprocess=False, **shared)
        run_clip.click(handlers.clip, [clip, *settings], [annotated_clip, clip_rows, clip_status], api_name="clip",
                       **shared)
        api_button.click(handlers.estimate, [api_photo, *settings], api_faces, api_name="estimate", **shared)
    return page


SETTINGS = (*PREDICTION_FIELDS, "host", "port", "share", "max_upload_megabytes", "max_image_pixels",
            "max_video_seconds", "smoothing")  # what this script reads (its --help)


def check_port_free(host: str, port: int) -> None:
    """Stop with one sentence naming --port when another program already listens on host:port."""
    import socket

    try:
        with socket.create_server((host, port), reuse_port=False):
            pass
    except OSError as error:
        raise SystemExit(f"error: {host}:{port} cannot be served ({error.strerror or error}: another program, or "
                         f"another app.py, listens there); choose another with --port={port + 1}") from None


def main(cfg: Config) -> Any:
    """Serve the page until interrupted; returns the gr.Blocks (closed)."""
    print_config(cfg, "app.py", SETTINGS)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports leave the machine
    check_port_free(cfg.host, cfg.port)  # before the models load: a busy port is one sentence, not gradio's traceback
    shelf = ModelShelf(find_model_files(cfg), resolve_device(cfg.device), cfg.detector, cfg.tta_views,
                       cfg.match_training_resolution)
    print(f"models on offer: {', '.join(shelf.labels)} (the first is the page's default)")
    shelf.predictor(shelf.labels[0])  # load the default model now: a broken file stops here, not on a request
    # SIGTERM (a service stop, `kill`) ends the page as Ctrl-C does, so the folder of users' photos is removed
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(0))
    with tempfile.TemporaryDirectory(prefix="age_app_") as folder:
        # gradio's own copies of every upload go inside it too (by default they stay in /tmp/gradio for ever)
        os.environ["GRADIO_TEMP_DIR"] = str(Path(folder) / "uploads")
        page = build_app(cfg, shelf, Path(folder))
        page.queue(default_concurrency_limit=1)
        page.launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share, show_error=True,
                    max_file_size=f"{cfg.max_upload_megabytes}mb", allowed_paths=[folder])
        page.close()
    return page


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], reads=SETTINGS))
