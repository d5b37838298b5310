"""The age regressor (torchvision backbone + regression head) and self-describing checkpoints.

model_name: resnet (ResNet-50), resnet18 (small, for quick CPU runs), efficientnet (EfficientNet-B0),
vit (ViT-B/16). With pretrained=true the backbone starts from torchvision's ImageNet weights; they are
downloaded once into torch's hub cache, and a failed download stops with a message saying what to do.

Heads (config `head`): l1 / mse / smooth_l1 regress a standardised age z (age = age_mean + age_std * z); dex and
mean_variance give a softmax over the ages 0..max_age (age = its expectation); coral is rank-consistent ordinal
regression. age_mean and age_std are buffers set from the training set (so they travel in the state dict), and
every head starts by predicting about the mean training age: the loss starts where a mean predictor is.

A checkpoint is a plain dict {"model": state dict of the unwrapped model, "config": Config as a dict, ...},
loadable with torch.load(weights_only=True); `load_model` rebuilds the exact model from the stored config.

Print a backbone's size and a forward pass:  python model.py --model_name=efficientnet --pretrained=false
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from config import (
    Config,
    UsageError,
    atomic_write_path,
    config_from_dict,
    config_to_dict,
    parse_config,
    print_config,
)


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


def build_backbone(model_name: str, pretrained: bool, image_size: int) -> tuple[nn.Module, int]:
    """A torchvision backbone with its classifier removed, and the width of the features it returns."""
    from torchvision import models

    if model_name in ("resnet", "resnet18"):
        builder, weights = (
            (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2)
            if model_name == "resnet"
            else (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1)
        )
        backbone = builder(weights=None)
        if pretrained:
            backbone.load_state_dict(_load_pretrained_state(weights))
        features = backbone.fc.in_features
        backbone.fc = nn.Identity()
    elif model_name == "efficientnet":
        backbone = models.efficientnet_b0(weights=None)
        if pretrained:
            backbone.load_state_dict(_load_pretrained_state(models.EfficientNet_B0_Weights.IMAGENET1K_V1))
        features = backbone.classifier[-1].in_features
        backbone.classifier = nn.Identity()
    elif model_name == "vit":
        from torchvision.models.vision_transformer import interpolate_embeddings

        backbone = models.vit_b_16(weights=None, image_size=image_size)
        if pretrained:
            state = _load_pretrained_state(models.ViT_B_16_Weights.IMAGENET1K_V1)
            if image_size != 224:  # resample the 14x14 position embeddings to the new patch grid
                state = interpolate_embeddings(image_size, 16, state)
            backbone.load_state_dict(state)
        features = backbone.hidden_dim
        backbone.heads = nn.Identity()
    else:
        raise ValueError(f"unknown model_name {model_name!r}; expected resnet, resnet18, efficientnet or vit")
    return backbone, features


REGRESSION_HEADS = ("l1", "mse", "smooth_l1")  # one output: a standardised age
DISTRIBUTION_HEADS = ("dex", "mean_variance")  # softmax over the integer ages 0..max_age, age = expectation
HEADS = (*REGRESSION_HEADS, *DISTRIBUTION_HEADS, "coral")  # coral: max_age rank-consistent binary tasks


class AgeEstimationModel(nn.Module):
    """Backbone -> dropout -> head -> age in years. Input (B, 3, H, W) normalised; output (B,) float32 years.

    Every head's `forward` returns an age in years, so evaluation, export and inference treat them alike;
    training uses `head_outputs` (the raw outputs its loss needs) and `ages_from_outputs`.
    - l1 / mse / smooth_l1: one unit predicting a standardised age z; age = age_mean + age_std * z.
    - dex / mean_variance: max_age + 1 logits over the ages 0..max_age; age = expectation of the softmax.
    - coral: one shared weight vector, max_age ordered biases; P(age > k) = sigmoid(w.x + b_k) for k < max_age,
      age = sum_k P(age > k). The biases are b_0 - cumsum(softplus(gaps)), strictly decreasing, so the
      probabilities are rank-consistent (non-increasing in k) by construction.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        dropout: float = 0.2,
        image_size: int = 224,
        head: str = "l1",
        max_age: int = 116,
    ):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; expected one of {', '.join(HEADS)}")
        self.head_name, self.max_age = head, max_age
        self.backbone, features = build_backbone(model_name, pretrained, image_size)
        outputs = max_age + 1 if head in DISTRIBUTION_HEADS else 1
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, outputs, bias=head != "coral"))
        nn.init.zeros_(self.head[1].weight)
        if head == "coral":
            self.coral_first_bias = nn.Parameter(torch.zeros(()))
            self.coral_gaps = nn.Parameter(torch.zeros(max_age - 1))
        else:
            nn.init.zeros_(self.head[1].bias)
        self.register_buffer("age_mean", torch.tensor(33.0))  # overwritten from the training set
        self.register_buffer("age_std", torch.tensor(20.0))
        self.register_buffer("age_grid", torch.arange(max_age + 1, dtype=torch.float32), persistent=False)
        # Divides the logits in probability_at_least and spread (fitted on the valid set by train.py); the age
        # itself is always the untempered prediction, so calibrating never changes the MAE.
        self.register_buffer("temperature", torch.tensor(1.0))
        self.set_age_statistics(33.0, 20.0)

    @torch.no_grad()
    def set_age_statistics(self, mean: float, std: float) -> None:
        """Set the training set's age mean and spread; every head then starts by predicting about the mean age."""
        self.age_mean.fill_(float(mean))
        self.age_std.fill_(max(float(std), 1.0))
        standardised = (self.age_grid - self.age_mean) / self.age_std  # (K,)
        if self.head_name in DISTRIBUTION_HEADS:  # start from a discretised normal(mean, std)
            self.head[1].bias.copy_(-0.5 * standardised.square())
        elif self.head_name == "coral":  # start from P(age > k) of that normal
            above = 0.5 * torch.erfc((standardised[:-1] + 0.5 / self.age_std) / 2**0.5)
            biases = torch.logit(above.clamp(1e-4, 1 - 1e-4))  # (K - 1,) non-increasing
            self.coral_first_bias.fill_(biases[0].item())
            gaps = (biases[:-1] - biases[1:]).clamp_min(1e-3)
            self.coral_gaps.copy_(gaps + torch.log(-torch.expm1(-gaps)))  # inverse softplus

    def coral_biases(self) -> torch.Tensor:
        return self.coral_first_bias - torch.cat([self.coral_gaps.new_zeros(1), F.softplus(self.coral_gaps).cumsum(0)])

    def head_outputs(self, images: torch.Tensor) -> torch.Tensor:
        """Raw head outputs: (B,) standardised ages, (B, K) logits, or (B, K - 1) coral logits."""
        outputs = self.head(self.backbone(images)).float()  # (B, 1) or (B, K)
        if self.head_name in REGRESSION_HEADS:
            return outputs.squeeze(1)
        if self.head_name == "coral":
            return outputs + self.coral_biases()  # (B, 1) + (K - 1,) -> (B, K - 1)
        return outputs

    def ages_from_outputs(self, outputs: torch.Tensor) -> torch.Tensor:
        """(B,) ages in years from `head_outputs`."""
        if self.head_name in REGRESSION_HEADS:
            return self.age_mean + self.age_std * outputs
        if self.head_name == "coral":
            return torch.sigmoid(outputs).sum(1)
        return outputs.softmax(1) @ self.age_grid

    def forward(self, images: torch.Tensor, raw_outputs: bool = False) -> torch.Tensor:
        """(B,) ages in years; raw_outputs=True returns `head_outputs` (training asks for them through forward,
        which DistributedDataParallel needs to synchronise gradients)."""
        outputs = self.head_outputs(images)
        return outputs if raw_outputs else self.ages_from_outputs(outputs)

    def probability_at_least(self, outputs: torch.Tensor, threshold: int) -> torch.Tensor:
        """(B,) P(age >= threshold) from `head_outputs` (distribution and coral heads), non-increasing in threshold,
        calibrated by the model's temperature."""
        outputs = outputs / self.temperature
        if self.head_name == "coral":
            if threshold <= 0:
                return outputs.new_ones(len(outputs))
            return torch.sigmoid(outputs[:, min(threshold, self.max_age) - 1]) * (threshold <= self.max_age)
        if self.head_name not in DISTRIBUTION_HEADS:
            raise ValueError(f"head {self.head_name!r} predicts no distribution; use dex, mean_variance or coral")
        return outputs.softmax(1)[:, max(threshold, 0):].sum(1)

    def spread(self, outputs: torch.Tensor) -> torch.Tensor:
        """(B,) standard deviation in years of the predicted age distribution (distribution heads)."""
        if self.head_name not in DISTRIBUTION_HEADS:
            raise ValueError(f"head {self.head_name!r} predicts no distribution; use dex or mean_variance")
        probabilities = (outputs / self.temperature).softmax(1)
        mean = probabilities @ self.age_grid
        return (probabilities @ self.age_grid.square() - mean.square()).clamp_min(0).sqrt()


def build_model(cfg: Config) -> AgeEstimationModel:
    return AgeEstimationModel(cfg.model_name, cfg.pretrained, cfg.dropout, cfg.image_size, cfg.head, cfg.max_age)


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


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel / torch.compile wrappers (one place strips prefixes)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, cfg: Config, **extra: Any) -> None:
    """Atomically write {"model": state dict, "config": cfg as dict, **extra} (extra: epoch, metrics, ...)."""
    checkpoint = {"model": unwrap(model).state_dict(), "config": config_to_dict(cfg), **extra}
    with atomic_write_path(path) as temporary:
        torch.save(checkpoint, temporary)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict safely (weights_only: tensors and plain containers, never arbitrary code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train one with `python train.py`.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - refuse anything that is not a plain checkpoint
        raise CheckpointError(
            f"{path} is not a loadable checkpoint of this project ({type(error).__name__}: {error}). "
            "Only plain-dict checkpoints written by train.py are accepted."
        ) from None
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= checkpoint.keys():
        raise CheckpointError(f"{path} lacks the 'model' and 'config' entries written by train.py")
    return checkpoint


def newest_checkpoint(cfg: Config) -> Path:
    """The most recently written checkpoint_dir/*/best.pt (used when no --checkpoint is given)."""
    candidates = sorted(Path(cfg.checkpoint_dir).glob("*/best.pt"), key=lambda path: path.stat().st_mtime)
    if not candidates:
        raise SystemExit(f"error: no checkpoint given and none in {cfg.checkpoint_dir}/*/best.pt; train one first "
                         "(python train.py, or python demo.py) or pass --checkpoint=...")
    return candidates[-1]


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[AgeEstimationModel, Config, dict[str, Any]]:
    """Rebuild the exact model a checkpoint was trained with; returns (model in eval mode, config, checkpoint)."""
    checkpoint = load_checkpoint(path)
    checkpoint["config"] = stored = dict(checkpoint["config"])
    stored.setdefault("head", "l1")  # checkpoints written before the heads existed were L1 regressions
    cfg = config_from_dict(stored)
    model = build_model(replace(cfg, pretrained=False))
    state = dict(checkpoint["model"])
    state.setdefault("temperature", torch.tensor(1.0))  # checkpoints written before calibration existed
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, checkpoint


def main(cfg: Config) -> AgeEstimationModel:
    print_config(cfg, "model.py")
    model = build_model(cfg).eval()
    parameters = sum(parameter.numel() for parameter in model.parameters())
    with torch.no_grad():
        ages = model(torch.randn(2, 3, cfg.image_size, cfg.image_size))  # (2,)
    print(f"{cfg.model_name}: {parameters / 1e6:.1f} M parameters; forward (2, 3, {cfg.image_size}, "
          f"{cfg.image_size}) -> {tuple(ages.shape)}, ages {ages.tolist()}")
    return model


if __name__ == "__main__":
    main(parse_config(sys.argv[1:]))
