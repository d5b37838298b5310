"""Data set, transforms, decoded-image cache and DataLoader builder, shared by training and evaluation.

Reads:  the split CSVs written by split_dataset.py (csv_dataset/{train,valid,test}_set.csv: image_name, age,
        gender, ethnicity; image_name is relative to data_dir) and the images under data_dir.
Writes: cache/<csv>_<size>px_<key>.npy, every image decoded and resized once into a uint8 array (N, 3, S, S),
        memory-mapped at training time. The key hashes the CSV rows, the folder, each file's size and
        modification time, and the image size, so a changed CSV, folder or size builds a new cache.

Preprocessing is the same with and without the cache (`load_image`): EXIF orientation applied, converted to
RGB (grayscale, CMYK, RGBA and palette images all work), centre-cropped to a square, resized to image_size.
Augmentation (train only, the seed's recipe plus crop jitter): optionally a worse camera (resolution_probability:
the face shrunk to a random side, blurred and JPEG re-encoded, ResolutionDegradation) and a grey print
(grey_probability), random horizontal flip,
small rotation with a small shift and zoom (a detector's box at inference is never exactly the training crop),
colour jitter; then
scaling to [0, 1] and the backbone's normalisation (model.resolve_preprocessing: the mean, std and resize filter
its pretrained weights were trained with); optionally random erasing (erase_probability). It runs on the
uint8 tensors, so the cache saves the decode.

Two loading paths give the same batches (tests/test_fast_path.py checks it):
- loading=batch (default, the fast path): `BatchLoader` indexes whole batches of the cached uint8 array (kept
  resident on the GPU when it fits, memory-mapped on the CPU) and `BatchAugmentation` augments the whole batch
  on the training device, each image with its own random draw. No worker processes, no per-image Python.
- loading=sample (the plain path, and the fallback without a cache): a DataLoader whose workers read and
  augment image by image with torchvision.transforms.v2 (`build_transforms`).
Both draw their order from a DistributedSampler, so a torchrun job shards each epoch across ranks and a
single process sees the same global batches.

Check it on the split CSVs:  python custom_dataset_dataloader.py [--data_dir=...] [--image_size=...]
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from config import RECIPE_FIELDS, RUN_FIELDS, Config, UsageError, parse_config, print_config
from files import atomic_write_path, describe_write_error, write_csv

GENDERS = ("male", "female")  # UTKFace gender codes 0, 1
ETHNICITIES = ("white", "black", "asian", "indian", "others")  # UTKFace race codes 0..4
CSV_COLUMNS = ("image_name", "age", "gender", "ethnicity")
# kept when a data set has them: subject (subject-exclusive split), apparent_age (APPA-REAL), age_bin (FairFace:
# the label is a range such as "30-39"; its rows have no exact age, and they are scored by age_bin_bounds),
# official_split (the release's own train/test lists: FairFace, All-Age-Faces; split_dataset.py keeps them),
# source (which data set a row of a mixed CSV comes from: align.py writes it, training reports each source)
OPTIONAL_COLUMNS = ("subject", "apparent_age", "age_bin", "official_split", "source")
SPLITS = ("train", "valid", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}  # what eda.py and inference.py read
ERASE_AREA = (0.02, 0.33)  # random erasing: share of the image one rectangle covers (torchvision's defaults)
ERASE_ASPECT = (0.3, 3.3)  # random erasing: height / width of the rectangle
CACHE_FORMAT_VERSION = 2  # bump when load_image changes, so old caches are rebuilt
DECODE_CHUNK = 64  # images per worker round trip when decoding for the cache or the image check


class DataError(UsageError):
    """Input data that cannot be used; the message names the file and the fix."""


def decade_start(ages: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """The first year of each age's decade (0, 10, 20, ...): the age groups of every per-decade figure."""
    return ages // 10 * 10


def dataset_csv_path(cfg: Config) -> Path:
    """The data set CSV eda.py writes and split_dataset.py reads: csv_dir/<dataset_format>_dataset.csv."""
    return Path(cfg.csv_dir) / f"{cfg.dataset_format}_dataset.csv"


def split_csv_path(cfg: Config, split: str) -> Path:
    return Path(cfg.csv_dir) / f"{split}_set.csv"


def read_csv_file(path: str | os.PathLike, **options: Any) -> pd.DataFrame:
    """pandas.read_csv with every way a CSV can be unreadable turned into one sentence naming the file: not UTF-8
    (a UTF-16 file with its byte-order mark is read as UTF-16), empty, malformed, or not a regular file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a regular file")
    with path.open("rb") as handle:
        start = handle.read(2)
    encoding = "utf-16" if start in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        return pd.read_csv(path, encoding=encoding, **options)
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {error.start} is {error.object[error.start:error.start + 1]!r}"
                        "); save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty") from None
    except pd.errors.ParserError as error:
        raise DataError(f"{path} is not a well-formed CSV ({str(error).strip()})") from None


def age_bin_bounds(label: str) -> tuple[float, float]:
    """An age bin's ages as [low, high): '30-39' -> (30, 40) (a 39.6-year-old is inside), '0-2' -> (0, 3),
    FairFace's open last bin 'more than 70' (or '70+') -> (70, inf). ValueError for anything else."""
    text = str(label).strip().lower()
    closed = re.fullmatch(r"(\d+)\s*-\s*(\d+)", text)
    if closed and int(closed[1]) <= int(closed[2]):
        return float(closed[1]), float(closed[2]) + 1
    open_ended = re.fullmatch(r"(?:more than\s*(\d+))|(?:(\d+)\s*\+)", text)
    if open_ended:
        return float(open_ended[1] or open_ended[2]), math.inf
    raise ValueError(f"{label!r} is not an age bin (expected e.g. '30-39' or 'more than 70')")


def distance_to_bins(predicted: np.ndarray, bins: pd.Series) -> np.ndarray:
    """Years from each predicted age (N,) to its bin (N labels): 0 inside, else to the nearer edge."""
    bounds = np.array([age_bin_bounds(label) for label in bins], dtype=np.float64).reshape(-1, 2)  # (N, 2)
    return np.maximum(np.maximum(bounds[:, 0] - predicted, predicted - bounds[:, 1]), 0.0)


def is_binned(frame: pd.DataFrame) -> bool:
    """Whether every label of a project CSV is an age bin (FairFace) rather than an exact age."""
    return "age_bin" in frame.columns and frame["age"].isna().all()


def binned_rows(frame: pd.DataFrame) -> np.ndarray:
    """(N,) bool: the rows labelled by an age bin, not an exact age (a mixed CSV has both kinds)."""
    if "age_bin" not in frame.columns:
        return np.zeros(len(frame), dtype=bool)
    return (frame["age"].isna() & frame["age_bin"].notna()).to_numpy()


def age_ranges(frame: pd.DataFrame) -> np.ndarray:
    """(N, 2) float32 [low, high) per row: an exact age a gives [a, a], a bin its bounds ('30-39' -> [30, 40),
    'more than 70' -> [70, inf)). What a model is trained and scored on when a data set mixes both kinds."""
    ranges = np.repeat(frame["age"].to_numpy(dtype=np.float32)[:, None], 2, axis=1)  # (N, 2)
    binned = binned_rows(frame)
    if binned.any():
        ranges[binned] = np.array([age_bin_bounds(label) for label in frame.loc[binned, "age_bin"]], np.float32)
    return ranges


def stratification_ages(frame: pd.DataFrame) -> np.ndarray:
    """(N,) the age a row is stratified by in a split: its exact age, or its bin's lower bound."""
    return age_ranges(frame)[:, 0]


def read_dataset_csv(path: str | os.PathLike, max_age: int | None = None) -> pd.DataFrame:
    """Read a project CSV, checking that it exists, has the four columns and at least one valid row. Rows with a
    missing age or name are skipped with a warning; an age outside 0..max_age (or not finite) stops with the file
    and rows named, since it would train silently on a wrong label."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist. Run eda.py and split_dataset.py first (or `python demo.py`).")
    try:
        frame = read_csv_file(path, dtype={"image_name": str, "gender": str, "ethnicity": str, "subject": str,
                                           "age_bin": str, "official_split": str, "source": str})
    except DataError as error:
        reason = str(error).removeprefix("error: ")
        raise DataError(f"{reason}. Re-run eda.py / split_dataset.py to rewrite it.") from None
    missing = [column for column in ("image_name", "age") if column not in frame.columns]
    if missing:
        raise DataError(f"{path} lacks the column(s) {missing}; expected {list(CSV_COLUMNS)}.")
    for column in ("gender", "ethnicity"):
        if column not in frame.columns:
            frame[column] = "unknown"
    frame["age"] = pd.to_numeric(frame["age"], errors="coerce")
    if "age_bin" in frame.columns:  # binned labels (FairFace), alone or mixed with exact ages (a mixed CSV)
        # a row with a bin is labelled by it (the exact age stays empty: a bin is never turned into an exact age);
        # a row without one needs an exact age
        labelled = frame["age_bin"].notna() & (frame["age_bin"].astype(str).str.strip() != "")
        readable = frame["age_bin"].map(_readable_bin)
        if labelled.all() and not readable.any():
            raise DataError(f"{path}: no readable age_bin (expected e.g. '30-39' or 'more than 70')")
        frame.loc[labelled & ~readable, "image_name"] = None  # skipped below, counted with the other bad rows
        frame.loc[labelled, "age"] = np.nan
        frame.loc[~labelled, "age_bin"] = np.nan
        bad_rows = frame["image_name"].isna() | (~labelled & frame["age"].isna())
    else:
        bad_rows = frame["age"].isna() | frame["image_name"].isna()
    if bad_rows.any():
        count = int(bad_rows.sum())
        warnings.warn(f"{path}: skipping {count} row(s) with a missing or invalid age or image name (line "
                      f"{csv_lines(frame.index[bad_rows])})", stacklevel=2)
        frame = frame[~bad_rows].reset_index(drop=True)
    highest = np.inf if max_age is None else max_age
    out_of_range = (~np.isfinite(frame["age"]) | (frame["age"] < 0) | (frame["age"] > highest)) & ~binned_rows(frame)
    if out_of_range.any():
        rows = ", ".join(f"line {index + 2} ({frame.at[index, 'image_name']}: {frame.at[index, 'age']})"
                         for index in frame.index[out_of_range][:5])
        limit = "" if max_age is None else f" (max_age={max_age})"
        raise DataError(f"{path}: {int(out_of_range.sum())} age(s) outside 0..{highest:g}{limit}, e.g. {rows}; fix "
                        "or remove those rows (or raise --max_age for a data set with older people)")
    if frame.empty:
        raise DataError(f"{path} has no usable rows. Re-run eda.py on a folder of UTKFace images.")
    return frame[[*CSV_COLUMNS, *(column for column in OPTIONAL_COLUMNS if column in frame.columns)]]


def _readable_bin(label: object) -> bool:
    try:
        age_bin_bounds(str(label))  # a missing bin reads as 'nan': not a bin
    except ValueError:
        return False
    return True


def first_of(items: list[str], separator: str = ", ", limit: int = 20) -> str:
    """The first `limit` items joined, and how many more: a warning about a million bad rows stays one short line."""
    shown = separator.join(items[:limit])
    return shown + (f"{separator}... ({len(items) - limit:,} more)" if len(items) > limit else "")


def csv_lines(index: pd.Index, limit: int = 10) -> str:
    """The CSV line numbers (header = line 1) of rows at `index` positions of a freshly read frame, the first
    `limit` of them."""
    return ", ".join(str(position + 2) for position in index[:limit]) + (", ..." if len(index) > limit else "")


def drop_repeated_rows(frame: pd.DataFrame, source: str | os.PathLike) -> pd.DataFrame:
    """`frame` with each image once (its first row), and a warning naming the repeats' lines: one image in two
    splits would be one face in training and test, a million copies would train and cache a million times."""
    repeated = frame["image_name"].duplicated()
    if not repeated.any():
        return frame
    warnings.warn(f"{source}: {int(repeated.sum())} row(s) repeat an image listed before and are dropped (e.g. "
                  f"{frame.loc[repeated, 'image_name'].iloc[0]}, lines {csv_lines(frame.index[repeated])}); each "
                  "image is used once", stacklevel=3)
    return frame[~repeated].reset_index(drop=True)


def check_disjoint_splits(splits: dict[str, pd.DataFrame], where: str) -> None:
    """Stop when one image is in two splits: it would be trained on and tested (or chosen on) at once."""
    seen: dict[str, str] = {}
    for name, rows in splits.items():
        for image_name in rows["image_name"]:
            if seen.setdefault(image_name, name) != name:
                raise DataError(f"{image_name} is in the {seen[image_name]} and the {name} split of {where}; "
                                "make the split files again with python split_dataset.py")


def write_dataset_csv(frame: pd.DataFrame, path: str | os.PathLike, record: bool = False) -> None:
    """Write atomically (temp file + rename), so equal frames give equal bytes; `record`: as ours (files.py)."""
    write_csv(frame, path, record=record)


class ImageFile(NamedTuple):
    """One accepted image: its resolved path (a str: a Path object per row costs about 0.5 KB more at 80k rows) and
    the size and modification time that key the decoded cache."""

    path: str
    size: int
    mtime_ns: int


def _resolve_in(root: str, image_name: str) -> ImageFile:
    """resolve_image_path with the data folder already resolved. os.path rather than pathlib (17 against 105 µs per
    image on utkface200, RESULTS.md, "Scale"): this runs serially for every row of every split. A plain name in the
    (resolved) folder itself that is a regular file, not a link, needs no more than one lstat."""
    if "\0" in image_name:  # the operating system refuses such a path with a ValueError, not an OSError
        raise DataError(f"image name {image_name!r} holds a NUL byte; fix or remove its CSV row")
    if "/" not in image_name and os.sep not in image_name and image_name not in ("", ".", ".."):
        path = os.path.join(root, image_name)
        try:
            status = os.lstat(path)
        except OSError:
            status = None  # missing or unreadable: the full check below names why
        if status is not None and stat.S_ISREG(status.st_mode):
            return ImageFile(path, status.st_size, status.st_mtime_ns)
    try:
        path = os.path.realpath(os.path.join(root, image_name), strict=True)
        status = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"image {image_name!r} does not exist in {root}; fix or remove its CSV row") from None
    except (OSError, RuntimeError) as error:  # a symlink loop, a permission error
        raise DataError(f"image path {image_name!r} cannot be resolved ({type(error).__name__}); fix its CSV row"
                        ) from None
    if not path.startswith(root.rstrip(os.sep) + os.sep):
        raise DataError(f"image path {image_name!r} points outside the data folder {root}; refused, never read")
    if not stat.S_ISREG(status.st_mode):
        raise DataError(f"image path {image_name!r} is not a regular file (a FIFO, device or folder); refused")
    return ImageFile(path, status.st_size, status.st_mtime_ns)


def resolve_image_path(data_dir: str | os.PathLike, image_name: str) -> Path:
    """The path of one CSV row's image, checked before anything opens it: a row that points outside data_dir
    (by .., an absolute path or a symlink), into a symlink loop, or at something that is not a regular file (a
    FIFO would block the reader forever) raises DataError naming the row."""
    return Path(_resolve_in(os.path.realpath(data_dir), image_name).path)


def check_image_names(data_dir: str | os.PathLike, names: list[str]) -> tuple[dict[int, ImageFile], dict[int, str]]:
    """resolve_image_path for every name: (position -> ImageFile) of the accepted ones and (position -> why) of the
    refused ones. eda.py and build_dataset screen their rows with it."""
    root = os.path.realpath(data_dir)
    accepted, refused = {}, {}
    for position, image_name in enumerate(names):
        try:
            accepted[position] = _resolve_in(root, image_name)
        except DataError as error:
            refused[position] = str(error).removeprefix("error: ")
    return accepted, refused


def screen_rows(
    frame: pd.DataFrame, data_dir: str | os.PathLike, source: str | os.PathLike
) -> tuple[pd.DataFrame, list[ImageFile]]:
    """The rows of `frame` whose image resolve_image_path accepts (the index is kept) and their files, in order; the
    others are named in one warning and left out, so one bad row never stops a run."""
    accepted, refused = check_image_names(data_dir, frame["image_name"].tolist())
    if refused:
        reasons = list(refused.values())
        listed = "\n  ".join(reasons[:20]) + ("\n  ..." if len(reasons) > 20 else "")
        warnings.warn(f"{source}: {len(refused)} row(s) refused and left out:\n  {listed}", stacklevel=2)
    return frame.iloc[list(accepted)], list(accepted.values())


def describe_read_error(error: Exception, path: str | os.PathLike) -> str:
    """Why an image could not be read, without repeating its path (the caller names the file once)."""
    message = str(error).replace(f"'{path}'", "").replace(str(path), "").strip(" :")
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def open_rgb_image(path: str | os.PathLike, draft_size: int | None = None, max_pixels: int | None = None,
                   ) -> Image.Image:
    """Decode an image as RGB: EXIF orientation applied; grayscale, 16-bit, CMYK, palette and RGBA converted
    (transparent areas become white). draft_size lets a JPEG decode at a reduced scale when much larger; an image
    of more than max_pixels (width x height, read from its header) is refused before anything is decoded."""
    with Image.open(path) as image:
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise ValueError(f"{image.width} x {image.height} pixels, more than --max_image_pixels={max_pixels:,}; "
                             "shrink the photo or raise the limit")
        if draft_size:
            image.draft("RGB", (draft_size, draft_size))
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        if image.mode in ("I", "I;16", "I;16B", "F"):  # 16-bit or float grayscale
            values = np.asarray(image, dtype=np.float32)
            if not np.isfinite(values).all():  # NaN would turn the whole image black, silently
                raise ValueError(f"{int((~np.isfinite(values)).sum())} pixel(s) are NaN or infinite; save the "
                                 "image again with finite values (e.g. as an 8-bit PNG)")
            scale = 255.0 / max(float(values.max()), 1.0)
            return Image.fromarray((values * scale).clip(0, 255).astype(np.uint8)).convert("RGB")
        return image.convert("RGB")


RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}  # config.INTERPOLATIONS


def resize_square(image: Image.Image, image_size: int, interpolation: str = "bilinear") -> np.ndarray:
    """Crop the centred square and resize it (antialiased, with the backbone's filter): uint8 (3, S, S). Training
    (via load_image) and inference with --no_detect share this function, so both see identical pixels (detected
    faces are aligned by faces.py)."""
    side = min(image.size)
    left, top = (image.width - side) / 2, (image.height - side) / 2
    region = (round(left), round(top), round(left + side), round(top + side))
    square = image.crop(region)
    square = square.resize((image_size, image_size), RESAMPLING[interpolation or "bilinear"], reducing_gap=3.0)
    return np.ascontiguousarray(np.asarray(square, dtype=np.uint8).transpose(2, 0, 1))  # (3, S, S)


def load_image(path: str | os.PathLike, image_size: int, interpolation: str = "bilinear") -> np.ndarray:
    """Decode one image into a uint8 array (3, S, S): RGB, centre-cropped square, resized."""
    return resize_square(open_rgb_image(path, draft_size=image_size), image_size, interpolation)


def change_resolution(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 faces (B, 3, S, S) -> uint8 (B, 3, S, S) holding only what `side` x `side` pixels hold: shrunk with an
    antialiasing filter (as PIL shrinks a photo), then enlarged back with the bilinear filter that turns a 64 px
    UTKFace copy into a 128 px training input. Training's resolution augmentation and inference's
    match_training_resolution share it, so both make the same kind of image."""
    size = pixels.shape[-1]
    if side >= size:
        return pixels
    if pixels.device.type != "cpu":  # uint8 resampling exists on the CPU only
        return change_resolution(pixels.cpu(), side).to(pixels.device)
    # on uint8 directly: torch has vectorised uint8 kernels for these filters (the cost per face is in RESULTS.md,
    # "Real photos"); antialias=True when enlarging is the plain bilinear filter
    small = F.interpolate(pixels, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(small, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def degrade_face(pixels: torch.Tensor, side: int, sigma: float, quality: int) -> torch.Tensor:
    """One uint8 face (3, S, S) as a worse camera gives it: `side` pixels across (change_resolution), a Gaussian
    blur of `sigma` input pixels, then a JPEG round trip at `quality`. Deterministic given its arguments."""
    import io

    from torchvision.transforms.v2 import functional as TF

    device = pixels.device
    face = change_resolution(pixels.cpu().unsqueeze(0), side)[0]
    if sigma > 0:
        kernel = 2 * math.ceil(3 * sigma) + 1
        face = TF.gaussian_blur(face, [kernel, kernel], [sigma, sigma])
    # Pillow's libjpeg, on the CPU whatever the training device (torchvision.io's JPEG codec is deprecated)
    encoded = io.BytesIO()
    Image.fromarray(face.permute(1, 2, 0).numpy()).save(encoded, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(encoded).convert("RGB"))  # (S, S, 3)
    return torch.from_numpy(decoded.transpose(2, 0, 1).copy()).to(device)


class ResolutionDegradation(torch.nn.Module):
    """Train augmentation: with probability `probability` a face is degraded (degrade_face) with a side drawn
    log-uniformly in [min_side, S], a blur sigma uniformly in [0, max_sigma] and a JPEG quality uniformly in
    [min_quality, 95]. Works on one uint8 face (3, S, S) (the plain path's transform) or a batch (B, 3, S, S) (the
    fast path's BatchAugmentation), drawing image by image from torch's global generator in the same order, so
    both paths give the same faces for the same seed (tests/test_fast_path.py). Real photos are sharper and
    differently compressed than a 64 px copy: the model must not read age from the sharpness."""

    def __init__(self, probability: float, min_side: int, max_sigma: float, min_quality: int):
        super().__init__()
        self.probability, self.min_side = probability, min_side
        self.max_sigma, self.min_quality = max_sigma, min_quality

    def draw(self, size: int) -> tuple[int, float, int] | None:
        """(side, sigma, quality) for one face of side `size`, or None when it stays as it is."""
        if float(torch.rand(())) >= self.probability:
            return None
        low, high = math.log(min(self.min_side, size)), math.log(size)
        side = round(math.exp(low + (high - low) * float(torch.rand(()))))
        sigma = self.max_sigma * float(torch.rand(()))
        quality = int(torch.randint(self.min_quality, 96, ()))
        return side, sigma, quality

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim == 3:
            drawn = self.draw(pixels.shape[-1])
            return pixels if drawn is None else degrade_face(pixels, *drawn)
        faces = list(pixels)
        for index, face in enumerate(faces):  # each face its own side: one small resize each, not one batch call
            drawn = self.draw(face.shape[-1])
            if drawn is not None:
                faces[index] = degrade_face(face, *drawn)
        return torch.stack(faces)


def resolution_degradation(cfg: Config, train: bool) -> ResolutionDegradation | None:
    """The configured ResolutionDegradation for a training loader; None when it is off or not training."""
    if not train or cfg.resolution_probability == 0:
        return None
    return ResolutionDegradation(cfg.resolution_probability, cfg.resolution_min_side, cfg.blur_max_sigma,
                                 cfg.jpeg_min_quality)


def face_resolution(frame: pd.DataFrame, data_dir: str, sample: int = 1000) -> int | None:
    """The median shorter side, in pixels, of (up to `sample` evenly spaced) images of `frame` as stored on disk,
    read from their headers: the resolution the faces really have (64 for UTKFace's 64 px copy, whatever
    image_size they are enlarged to). train.py stores it in every checkpoint as `face_resolution`; inference
    shrinks a sharper aligned crop to it (match_training_resolution). None when no header could be read."""
    names = frame["image_name"].to_numpy()
    chosen = names[np.linspace(0, len(names) - 1, min(sample, len(names))).round().astype(int)] if len(names) else []
    sides = []
    for name in chosen:
        try:
            with Image.open(resolve_image_path(data_dir, str(name))) as image:
                sides.append(min(image.size))
        except (OSError, UsageError, ValueError):  # unreadable or refused: the cache leaves it out as well
            continue
    return int(np.median(sides)) if sides else None


def require_resolved(cfg: Config) -> None:
    """The pipeline normalises and resizes as the backbone's weights ask, decided once by the caller with
    model.resolve_preprocessing (train.py does; every model file stores the result): here it is only checked."""
    if not (cfg.normalize_mean and cfg.normalize_std and cfg.interpolation):
        raise ValueError("the data pipeline needs a resolved config: pass model.resolve_preprocessing(cfg) (it fills "
                         "normalize_mean, normalize_std and interpolation from the backbone's weights)")


def build_transforms(cfg: Config, train: bool) -> torch.nn.Module:
    """uint8 (3, S, S) tensor -> normalised float (3, S, S); train adds resolution degradation (when on), flip,
    rotation and colour jitter."""
    from torchvision.transforms import v2

    require_resolved(cfg)

    steps = []
    degradation = resolution_degradation(cfg, train)
    if degradation is not None:
        steps.append(degradation)  # first, on the uint8 face, as in BatchAugmentation
    if train and cfg.grey_probability:
        steps.append(v2.RandomGrayscale(cfg.grey_probability))  # ITU-R 601 luminance in all three channels
    # a step set to nothing is left out, not run at strength 0: it would still draw random numbers, and the faces
    # of both loading paths must come from the same draws
    if train and cfg.flip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    if train and (cfg.rotation_degrees or cfg.translate_fraction or cfg.scale_jitter):
        steps.append(v2.RandomAffine(  # rotation + the shift and zoom a face detector's box jitters by at inference
            cfg.rotation_degrees,
            translate=(cfg.translate_fraction, cfg.translate_fraction),
            scale=(1 - cfg.scale_jitter, 1 + cfg.scale_jitter),
            interpolation=v2.InterpolationMode.BILINEAR,
        ))
    if train and cfg.color_jitter:
        steps.append(v2.ColorJitter(brightness=cfg.color_jitter, contrast=cfg.color_jitter,
                                    saturation=cfg.color_jitter))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.normalize_mean, cfg.normalize_std)]
    if train and cfg.erase_probability:
        steps.append(v2.RandomErasing(cfg.erase_probability, scale=ERASE_AREA, ratio=ERASE_ASPECT, value=0))
    return v2.Compose(steps)


class _DecodeDataset(Dataset):
    """Decodes images once, DECODE_CHUNK consecutive paths per item (used to fill the cache and to check images in
    parallel DataLoader workers): one round trip between a worker and the main process per chunk, not per image.

    With a destination (a (N, 3, S, S) uint8 .npy whose rows start at byte `data_offset`), each process writes its
    chunks' pixels into that file itself, one pwrite per chunk, and returns only why images failed: the pixels
    never cross a pipe to the main process, which would otherwise unpickle and copy every byte of the cache alone
    (RESULTS.md, "Scale"). With keep_pixels=False (the image check) they are dropped."""

    def __init__(self, paths: list[str | Path], image_size: int, interpolation: str, destination: Path | None = None,
                 keep_pixels: bool = True, data_offset: int = 0):
        self.paths, self.image_size, self.interpolation = paths, image_size, interpolation
        self.destination, self.keep_pixels = destination, keep_pixels and destination is None
        self.data_offset = data_offset

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / DECODE_CHUNK)

    def __getitem__(self, chunk: int) -> tuple[int, np.ndarray | None, list[str]]:
        """(first index, uint8 (n, 3, S, S) with zeros where decoding failed or None when not kept, why each failed
        ('' = it did not))."""
        first = chunk * DECODE_CHUNK
        paths = self.paths[first:first + DECODE_CHUNK]
        pixels = np.zeros((len(paths), 3, self.image_size, self.image_size), np.uint8)
        reasons = [""] * len(paths)
        for position, path in enumerate(paths):
            try:
                pixels[position] = load_image(path, self.image_size, self.interpolation)
            except Exception as error:  # noqa: BLE001 - any decoder failure: skip the file, say why
                reasons[position] = describe_read_error(error, path)
        if self.destination is not None:  # failed rows are written as zeros
            _write_at(self.destination, self.data_offset + first * pixels[0].nbytes, memoryview(pixels).cast("B"))
        return first, pixels if self.keep_pixels else None, reasons


def _write_at(path: Path, offset: int, data: memoryview) -> None:
    """Write `data` into the existing file at byte `offset`. One system call per chunk of rows rather than a page
    fault per 4 KiB of a memory map: two workers faulting into one shared map used 14 % more CPU than one worker,
    and the build with two got 11 % faster without it (RESULTS.md, "Scale")."""
    descriptor = os.open(path, os.O_WRONLY)
    try:
        while data:
            written = os.pwrite(descriptor, data, offset)
            data, offset = data[written:], offset + written
    finally:
        os.close(descriptor)


def _keep_as_is(item: tuple) -> tuple:
    return item


def decode_images(
    paths: list[str | Path], image_size: int, num_workers: int = 0, interpolation: str = "bilinear",
    description: str = "", destination: Path | None = None, keep_pixels: bool = True, data_offset: int = 0,
) -> Iterator[tuple[int, np.ndarray | None, str]]:
    """Decode every path at image_size in `num_workers` DataLoader worker processes (0 = here), in order:
    (index, uint8 (3, S, S), or None where it failed or pixels are not kept, why it failed ('' = it did not)). The
    image check (eda.py, keep_pixels=False) and the cache build (destination: the .npy each worker writes into)
    share it; decoding is the work that grows with the data set, and worker processes put it on every core."""
    from tqdm import tqdm

    loader = DataLoader(
        _DecodeDataset(paths, image_size, interpolation, destination, keep_pixels, data_offset),
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_keep_as_is,
        generator=torch.Generator(),  # leaves the global RNG alone: a cache hit or miss must not change a run
    )
    with tqdm(total=len(paths), desc=description, leave=False, disable=None if description else True) as progress:
        for start, pixels, reasons in loader:
            for position, reason in enumerate(reasons):
                yield start + position, None if reason or pixels is None else pixels[position], reason
            progress.update(len(reasons))


def _cache_key(frame: pd.DataFrame, data_dir: str, image_size: int, interpolation: str,
               files: list[ImageFile] | None = None) -> str:
    """Names, sizes and modification times of the rows' files (from `files` when the rows were screened, which
    stat the same files, so the key is the same either way), with the version, folder, size and interpolation."""
    resize = image_size if interpolation == "bilinear" else f"{image_size}|{interpolation}"  # bilinear: older keys
    digest = hashlib.sha256(f"v{CACHE_FORMAT_VERSION}|{Path(data_dir).resolve()}|{resize}".encode())
    for position, name in enumerate(frame["image_name"]):
        digest.update(name.encode())
        if files is not None:
            digest.update(f"|{files[position].size}|{files[position].mtime_ns}\n".encode())
            continue
        try:
            status = os.stat(os.path.join(data_dir, name))
            digest.update(f"|{status.st_size}|{status.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(b"|missing\n")
    return digest.hexdigest()[:16]


def build_image_cache(
    frame: pd.DataFrame, data_dir: str, image_size: int, cache_dir: str, name: str, num_workers: int = 0,
    interpolation: str = "bilinear", files: list[ImageFile] | None = None,
) -> tuple[Path, np.ndarray]:
    """Decode every row of `frame` once into cache_dir; return (path of the (N, 3, S, S) uint8 .npy, ok mask (N,)).

    `files` are the rows' files as screen_rows returned them (one per row, in order); without them each row is
    resolved here, and a row resolve_image_path refuses raises DataError. A cache whose key matches is reused as
    it is. Unreadable images are named in a warning and marked not-ok; the data set leaves them out.
    """
    key = _cache_key(frame, data_dir, image_size, interpolation, files)
    array_path = Path(cache_dir) / f"{name}_{image_size}px_{key}.npy"
    index_path = array_path.with_suffix(".json")
    if not (array_path.is_file() and index_path.is_file()):
        if files is None:
            root = os.path.realpath(data_dir)
            files = [_resolve_in(root, image_name) for image_name in frame["image_name"]]
        paths = [file.path for file in files]
        ok = np.ones(len(paths), dtype=bool)
        failures = {}
        try:
            with atomic_write_path(array_path) as temporary:
                array = np.lib.format.open_memmap(
                    temporary, mode="w+", dtype=np.uint8, shape=(len(paths), 3, image_size, image_size)
                )
                data_offset = array.offset  # the header's length: the rows follow it
                del array  # only the header is written here: the decoding processes fill the rows
                if hasattr(os, "posix_fallocate"):  # the blocks taken now: a full disk is an OSError here, not a
                    with open(temporary, "r+b") as handle:  # SIGBUS in a decoding process writing into a hole later
                        os.posix_fallocate(handle.fileno(), 0, data_offset + len(paths) * 3 * image_size ** 2)
                decoded = decode_images(paths, image_size, num_workers, interpolation,
                                        f"caching {name} at {image_size}px", destination=temporary,
                                        data_offset=data_offset)
                for index, _, reason in decoded:
                    if reason:
                        ok[index] = False
                        failures[str(paths[index])] = reason
            with atomic_write_path(index_path) as temporary:
                temporary.write_text(json.dumps({"ok": ok.tolist(), "failures": failures}))
        except OSError as error:
            raise DataError(describe_write_error(error, array_path)) from None
        if failures:
            listed = first_of([f"{path}: {reason}" for path, reason in failures.items()], "\n  ")
            warnings.warn(f"{len(failures)} image(s) could not be read and are left out:\n  {listed}", stacklevel=2)
    ok = np.asarray(json.loads(index_path.read_text())["ok"], dtype=bool)
    return array_path, ok


class AgeDataset(Dataset):
    """(image (3, S, S) float, age float32 in years, gender index, ethnicity index); unknown labels are -1. A data set
    with binned rows (FairFace) gives each label as a range [low, high) (2,) instead, an exact age a as [a, a].

    With a cache, `frame`'s index gives each row's position in the cache array. The array is memory-mapped
    lazily in each process (workers never receive a copy of it), so memory does not grow with the data set.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        data_dir: str,
        image_size: int,
        transform: torch.nn.Module,
        cache_path: Path | None = None,
        interpolation: str = "bilinear",
    ):
        self.cache_rows = frame.index.to_numpy()
        self.interpolation = interpolation
        self.frame = frame.reset_index(drop=True)
        self.data_dir, self.image_size, self.transform, self.cache_path = data_dir, image_size, transform, cache_path
        self._cache: np.ndarray | None = None
        self.ages = self.frame["age"].to_numpy(dtype=np.float32)  # (N,) NaN for a binned row
        # what a model is trained and scored on: the ages (N,), or with any binned row (N, 2) ranges [low, high)
        self.ranges = age_ranges(self.frame)
        self.targets = self.ranges if binned_rows(self.frame).any() else self.ages
        self.genders = _label_indices(self.frame["gender"], GENDERS)
        self.ethnicities = _label_indices(self.frame["ethnicity"], ETHNICITIES)

    def __len__(self) -> int:
        return len(self.frame)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": None}  # each worker maps the file itself

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        if self.cache_path is not None:
            if self._cache is None:
                self._cache = np.load(self.cache_path, mmap_mode="r")
            pixels = torch.from_numpy(np.array(self._cache[self.cache_rows[index]]))  # (3, S, S) uint8, copied
        else:
            path = resolve_image_path(self.data_dir, self.frame.at[index, "image_name"])
            try:
                pixels = torch.from_numpy(load_image(path, self.image_size, self.interpolation))
            except Exception as error:  # noqa: BLE001 - name the file whatever the decoder raised
                raise DataError(f"cannot read {path} ({error}); remove its row or run with use_cache=true") from None
        image = self.transform(pixels)  # (3, S, S) float32
        return image, torch.tensor(self.targets[index]), int(self.genders[index]), int(self.ethnicities[index])


def _label_indices(values: pd.Series, names: tuple[str, ...]) -> np.ndarray:
    lookup = {name: index for index, name in enumerate(names)}
    return np.array([lookup.get(str(value).strip().lower(), -1) for value in values], dtype=np.int64)


def build_dataset(cfg: Config, split: str, train: bool | None = None, csv_path: str | None = None) -> AgeDataset:
    """The data set of one split (train/valid/test) or of any project CSV given as csv_path."""
    require_resolved(cfg)
    path = Path(csv_path) if csv_path else split_csv_path(cfg, split)
    frame = read_dataset_csv(path, cfg.max_age)
    frame = drop_repeated_rows(frame, path)
    if not Path(cfg.data_dir).is_dir():
        raise DataError(
            f"data_dir={cfg.data_dir} is not a folder. Pass the folder given to eda.py, e.g. --data_dir=data/UTKFace."
        )
    frame, files = screen_rows(frame, cfg.data_dir, path)
    frame = frame.reset_index(drop=True)  # positions in the cache built below
    if frame.empty:
        raise DataError(f"none of the images listed in {path} can be used from data_dir={cfg.data_dir}; pass the "
                        "folder that eda.py scanned with --data_dir=...")
    train = split == "train" if train is None else train
    cache_path = None
    if cfg.use_cache:
        cache_path, ok = build_image_cache(
            frame, cfg.data_dir, cfg.image_size, cfg.cache_dir, path.stem, cfg.num_workers, cfg.interpolation, files
        )
        if not ok.any():
            raise DataError(
                f"none of the {len(frame)} images listed in {path} could be read from data_dir={cfg.data_dir}; "
                "pass the folder that eda.py scanned with --data_dir=..."
            )
        frame = frame[ok]  # keeps the original row numbers, which index the cache
    return AgeDataset(frame, cfg.data_dir, cfg.image_size, build_transforms(cfg, train), cache_path,
                      cfg.interpolation)


class BatchAugmentation:
    """uint8 batch (B, 3, S, S) on any device -> normalised float32 batch (B, 3, S, S) on that device.

    train=True draws, per image, the augmentations of `build_transforms`: a horizontal flip, rotation + shift +
    zoom (one bilinear `grid_sample` over the whole batch, zeros outside the image like RandomAffine) and
    brightness, contrast and saturation factors (torchvision's definitions, applied in that order), then, with
    probability erase_probability, one rectangle set to 0 after normalisation, i.e. the mean colour (random
    erasing, Zhong et al. 2020: area and aspect drawn as torchvision's RandomErasing draws them, the rectangle
    clipped to the image where torchvision would draw again). Random numbers come from the global torch generator
    of the batch's device.
    """

    def __init__(self, cfg: Config, train: bool):
        self.flip = train and cfg.flip
        self.rotation = math.radians(cfg.rotation_degrees) if train else 0.0
        self.translate = 2 * cfg.translate_fraction if train else 0.0  # grid coordinates span 2 per side
        self.scale = cfg.scale_jitter if train else 0.0
        self.color = cfg.color_jitter if train else 0.0
        self.erase = cfg.erase_probability if train else 0.0
        self.degradation = resolution_degradation(cfg, train)
        self.grey = cfg.grey_probability if train else 0.0
        require_resolved(cfg)
        self.mean, self.std = cfg.normalize_mean, cfg.normalize_std

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.degradation is not None:
            pixels = self.degradation(pixels)  # (B, 3, S, S) uint8, the same draws as the plain path
        images = pixels.float()  # (B, 3, S, S) in [0, 255]
        if self.grey:  # a scanned black-and-white print: the luminance (ITU-R 601, as RandomGrayscale) everywhere
            chosen = (torch.rand(len(images), device=images.device) < self.grey).view(-1, 1, 1, 1)
            luminance = (0.299 * images[:, 0:1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:3]).round()
            images = torch.where(chosen, luminance.expand_as(images), images)
        if self.rotation or self.translate or self.scale:
            images = self._affine(images)
        elif self.flip:
            mirrored = torch.rand(len(images), device=images.device) < 0.5
            images[mirrored] = images[mirrored].flip(-1)
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        scale = 1 / (255 * torch.tensor(self.std, device=images.device).view(1, 3, 1, 1))  # pixel value -> normalised
        shift = mean * 255 * scale  # normalised = pixel * scale - shift
        images = self._color(images, scale, shift) if self.color else images.mul_(scale).sub_(shift)
        if self.erase:
            images.masked_fill_(self._erase_mask(images), 0.0)
        return images

    def _uniform(self, images: torch.Tensor, half_width: float, centre: float = 0.0) -> torch.Tensor:
        return torch.empty(len(images), device=images.device).uniform_(centre - half_width, centre + half_width)

    def _erase_mask(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) bool: one random rectangle in each chosen image, nothing in the others."""
        count, _, height, width = images.shape
        area = self._uniform(images, (ERASE_AREA[1] - ERASE_AREA[0]) / 2, sum(ERASE_AREA) / 2) * height * width
        low, high = math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])
        aspect = self._uniform(images, (high - low) / 2, (high + low) / 2).exp()  # (B,) height / width
        box_height = (area * aspect).sqrt().round().clamp(1, height)  # (B,) pixels
        box_width = (area / aspect).sqrt().round().clamp(1, width)
        top = (torch.rand_like(area) * (height - box_height + 1)).floor()  # (B,) first row
        left = (torch.rand_like(area) * (width - box_width + 1)).floor()
        rows = torch.arange(height, device=images.device).view(1, height, 1)  # (1, S, 1)
        columns = torch.arange(width, device=images.device).view(1, 1, width)  # (1, 1, S)
        inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + box_height).view(-1, 1, 1))
                  & (columns >= left.view(-1, 1, 1)) & (columns < (left + box_width).view(-1, 1, 1)))  # (B, S, S)
        chosen = torch.rand(count, device=images.device) < self.erase  # (B,)
        return (inside & chosen.view(-1, 1, 1)).unsqueeze(1)

    def _affine(self, images: torch.Tensor) -> torch.Tensor:
        angle = self._uniform(images, self.rotation)  # (B,) radians
        zoom = self._uniform(images, self.scale, 1.0)  # (B,) > 1 enlarges the face
        shift_x, shift_y = self._uniform(images, self.translate), self._uniform(images, self.translate)
        mirror = torch.ones_like(angle)
        if self.flip:
            mirror = torch.where(torch.rand_like(angle) < 0.5, -1.0, 1.0)
        cosine, sine = angle.cos() / zoom, angle.sin() / zoom
        theta = torch.stack([  # (B, 2, 3): output grid position -> input position, mirrored first
            torch.stack([cosine * mirror, -sine, shift_x], 1),
            torch.stack([sine * mirror, cosine, shift_y], 1),
        ], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, S, S, 2)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _color(self, images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Brightness b, contrast c and saturation s as torchvision defines them, then normalisation (x * scale -
        shift), in closed form: x * b, blended with its mean gray m (contrast), then with each pixel's gray g
        (saturation), is A x + B g(x) + C with A = s c b, B = (1 - s) c b, C = (1 - c) b m(x), because gray is
        linear. Three passes over the batch instead of about ten; one clamp at the end (torchvision clamps after
        each step, which differs only where brightness pushed a pixel past white)."""
        def factor() -> torch.Tensor:
            return self._uniform(images, self.color, 1.0).clamp_(min=0).view(-1, 1, 1, 1)  # (B, 1, 1, 1)

        brightness, contrast, saturation = factor(), factor(), factor()
        gray = (0.299 * images[:, 0:1] + 0.587 * images[:, 1:2]).add_(images[:, 2:3], alpha=0.114)  # (B, 1, S, S)
        offset = (1 - contrast) * brightness * gray.mean((2, 3), keepdim=True)  # C, (B, 1, 1, 1)
        images.mul_(saturation * contrast * brightness * scale).add_(offset * scale - shift)  # (B, 3, 1, 1) factors
        images.addcmul_(gray, (1 - saturation) * contrast * brightness * scale)  # + B g, normalised
        return images.clamp_(min=-shift, max=255 * scale - shift)  # [0, 255] in normalised units


class BatchLoader:
    """The fast path (loading=batch): iterates like the DataLoader below, over the decoded cache.

    Each batch is one fancy-index of the uint8 array (rows sorted, so the memory map is read in order), then
    augmented and normalised on `device` by BatchAugmentation. On CUDA the array is copied to the GPU once when it
    takes less than a quarter of the free memory, so batches never cross the bus; otherwise (and on the CPU) it
    stays memory-mapped and only the batch is read: memory does not grow with the data set.
    Yields (images (B, 3, S, S) float on device, ages (B,) float32, genders (B,), ethnicities (B,)).
    """

    def __init__(
        self,
        dataset: AgeDataset,
        augmentation: BatchAugmentation,
        batch_size: int,
        sampler: DistributedSampler | list[int],
        device: torch.device,
        drop_last: bool,
    ):
        self.dataset, self.augmentation, self.batch_size = dataset, augmentation, batch_size
        self.sampler, self.device, self.drop_last = sampler, device, drop_last
        self.ages = torch.from_numpy(dataset.targets)  # (N,) ages or (N, 2) ranges
        self.genders, self.ethnicities = torch.from_numpy(dataset.genders), torch.from_numpy(dataset.ethnicities)
        self._array: np.ndarray | None = None
        self._resident: torch.Tensor | None = None

    def __len__(self) -> int:
        count = len(self.sampler)
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def _pixels(self, indices: np.ndarray) -> torch.Tensor:
        """uint8 (B, 3, S, S) on self.device for data-set positions `indices` (B,)."""
        if self._array is None:
            self._array = np.load(self.dataset.cache_path, mmap_mode="r")
            if self.device.type == "cuda":
                free_bytes, _ = torch.cuda.mem_get_info(self.device)
                if self._array.itemsize * len(self.dataset) * math.prod(self._array.shape[1:]) < free_bytes / 4:
                    rows = np.ascontiguousarray(self._array[self.dataset.cache_rows])
                    self._resident = torch.from_numpy(rows).to(self.device)  # (N, 3, S, S) uint8
        if self._resident is not None:
            return self._resident[torch.from_numpy(indices).to(self.device)]
        rows = self.dataset.cache_rows[indices]
        order = np.argsort(rows, kind="stable")
        pixels = np.empty((len(rows), *self._array.shape[1:]), dtype=np.uint8)
        pixels[order] = self._array[rows[order]]
        batch = torch.from_numpy(pixels)
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def __iter__(self):
        indices = np.fromiter(iter(self.sampler), dtype=np.int64)
        stop = len(self) * self.batch_size
        for start in range(0, min(stop, len(indices)), self.batch_size):
            batch = indices[start:start + self.batch_size]
            images = self.augmentation(self._pixels(batch))  # (B, 3, S, S) float
            chosen = torch.from_numpy(batch)
            yield images, self.ages[chosen], self.genders[chosen], self.ethnicities[chosen]


def shard(count: int, rank: int, world_size: int) -> list[int]:
    """The contiguous block of positions 0..count-1 that `rank` evaluates; blocks in rank order cover them all once."""
    size = math.ceil(count / world_size)
    return list(range(min(rank * size, count), min((rank + 1) * size, count)))


def build_dataloader(
    cfg: Config,
    split: str,
    csv_path: str | None = None,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader | BatchLoader:
    """Shuffled, last-partial-batch-dropped loader for train; ordered loaders for valid and test.

    Under torchrun (world_size > 1) each rank gets batch_size / world_size images of every global batch of the
    train split (a DistributedSampler reshuffled per epoch by `sampler.set_epoch`) and one contiguous block of
    the valid/test rows. loading=batch returns a BatchLoader whose batches are already on `device`.
    """
    train = split == "train"
    dataset = build_dataset(cfg, split, train, csv_path)
    if cfg.batch_size % world_size:
        raise UsageError(f"batch_size={cfg.batch_size} is the global batch: make it a multiple of the "
                         f"{world_size} processes")
    batch_size = cfg.batch_size // world_size
    if train:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed,
                                     drop_last=world_size > 1)
        drop_last = len(dataset) > cfg.batch_size
    else:
        sampler, drop_last = shard(len(dataset), rank, world_size), False
    if cfg.loading == "batch" and dataset.cache_path is not None:
        augmentation = BatchAugmentation(cfg, train)
        return BatchLoader(dataset, augmentation, batch_size, sampler, device or torch.device("cpu"), drop_last)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=cfg.num_workers,
        persistent_workers=False,  # fresh workers per epoch, seeded from `generator`: epochs are reproducible
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(cfg.seed),
    )


SETTINGS = (*RECIPE_FIELDS, *RUN_FIELDS)  # what this script reads (its --help)


def main(cfg: Config) -> dict[str, DataLoader]:
    """Build the three loaders, print their sizes and one batch's shapes and ranges."""
    from model import resolve_preprocessing

    cfg = resolve_preprocessing(cfg)  # as train.py does, once, at the start: the pipeline below only checks it
    print_config(cfg, "custom_dataset_dataloader.py", SETTINGS)
    loaders = {split: build_dataloader(cfg, split) for split in SPLITS}
    for split, loader in loaders.items():
        images, ages, _genders, _ethnicities = next(iter(loader))
        print(
            f"{split}: {len(loader.dataset)} images, batch {tuple(images.shape)} "
            f"pixels [{images.min():.2f}, {images.max():.2f}], ages [{ages.min():.0f}, {ages.max():.0f}]"
        )
    return loaders


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], reads=SETTINGS))
