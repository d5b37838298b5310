"""Heat-maps: which parts of the face drive a trained model's age estimate, and how that changes with age.

Reads:  --checkpoint (default: the newest checkpoints/*/best.pt) and --test_csv (default: its own test split).
Writes: pics/heatmaps_<run>__<csv>_examples.png: example faces of each age group with their maps;
        pics/heatmaps_<run>__<csv>_average.png: the mean map of each age group (up to --heatmap_images faces
        spread evenly over the groups), maps only with the face bands marked (no face pixels: shareable);
        runs/analysis/<run>__<csv>_heatmaps.csv: per age group, the share of the mean map falling in each
        horizontal band of the face (forehead, eyes, nose, mouth, chin), a number behind the figure.

Method: Grad-CAM (the maintained `grad-cam` package) with the predicted age as the target, so a map shows the
regions whose activation raises the estimate. CNNs use their last convolutional block (ResNet layer4, EfficientNet
features[-1]); the ViT uses Grad-CAM on the token grid of its last encoder block (class token dropped, the patch
tokens reshaped to their (H/16, W/16) grid). Each map is upsampled to the input size and scaled to [0, 1].

Run:  python -m analysis.heatmaps --checkpoint=checkpoints/<run>/best.pt
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from analysis import ANALYSIS_SETTINGS, analysis_dir, prepare_evaluation
from config import Config, parse_config, print_config
from custom_dataset_dataloader import build_dataset
from files import save_figure, write_csv
from model import AgeEstimationModel

AGE_GROUPS = ((0, 9), (10, 19), (20, 29), (30, 44), (45, 59), (60, 120))  # inclusive year ranges
FACE_BANDS = {"forehead": (0.0, 0.2), "eyes": (0.2, 0.38), "nose": (0.38, 0.58), "mouth": (0.58, 0.8),
              "chin": (0.8, 1.0)}  # shares of the height of an aligned crop (eyes ~0.27, mouth ~0.68)


class PredictedAge:
    """Grad-CAM target: the model's output for one image is already the age in years."""

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output


def _token_grid(tokens: torch.Tensor, prefix_tokens: int = 1) -> torch.Tensor:
    """ViT activations (B, P + N, D) -> (B, D, sqrt N, sqrt N), the P class (and register) tokens dropped."""
    patches = tokens[:, prefix_tokens:, :]
    side = round(patches.shape[1] ** 0.5)
    return patches.reshape(patches.shape[0], side, side, patches.shape[2]).permute(0, 3, 1, 2)


def cam_setup(model: AgeEstimationModel, model_name: str) -> tuple[list[nn.Module], Any]:
    """Target layers and reshape transform of Grad-CAM for each backbone."""
    backbone = model.backbone
    if model_name in ("resnet", "resnet18"):
        return [backbone.layer4[-1]], None
    if model_name == "efficientnet":
        return [backbone.features[-1]], None
    if model_name == "vit":
        return [backbone.encoder.layers[-1].ln_1], _token_grid
    if model_name == "dlib_face_resnet":  # the 128-channel stage's last block: 8 x 8 at 150 px, where the 256-channel
        return [backbone.blocks[9]], None  # stages leave 4 x 4 and 2 x 2 maps, too coarse to show a face's parts
    feature_info = getattr(backbone, "feature_info", None)  # timm models name their feature stages
    if feature_info:
        layer = backbone.get_submodule(feature_info[-1]["module"])  # the last stage: the deepest spatial map
        prefix_tokens = getattr(backbone, "num_prefix_tokens", None)  # ViT-like timm models: tokens, not maps
        if prefix_tokens is None:
            return [layer], None
        return [layer], lambda tokens: _token_grid(tokens, prefix_tokens)
    raise ValueError(f"no Grad-CAM set-up for model_name {model_name!r}")


def compute_heatmaps(model: AgeEstimationModel, model_name: str, images: torch.Tensor) -> np.ndarray:
    """Grad-CAM maps (B, H, W) in [0, 1] for normalised images (B, 3, H, W), target = predicted age."""
    from pytorch_grad_cam import GradCAM

    layers, reshape = cam_setup(model, model_name)
    model = model.float().eval()
    with GradCAM(model=model, target_layers=layers, reshape_transform=reshape) as cam:
        return cam(input_tensor=images, targets=[PredictedAge() for _ in range(len(images))])


def band_shares(heatmap: np.ndarray) -> dict[str, float]:
    """Share of a map's (H, W) total mass in each horizontal band of FACE_BANDS (all 0 for an empty map: Grad-CAM
    keeps only regions that raise the prediction, and there may be none)."""
    rows = heatmap.sum(1)  # (H,)
    total, height = max(rows.sum(), 1e-12), len(rows)
    return {name: float(rows[round(top * height):round(bottom * height)].sum() / total)
            for name, (top, bottom) in FACE_BANDS.items()}


def _group_name(low: int, high: int) -> str:
    return f"{low}+" if high >= 120 else f"{low}-{high}"


SETTINGS = (*ANALYSIS_SETTINGS, "heatmap_images")  # what this script reads (its --help)


def main(cfg: Config) -> dict[str, Any]:
    """Maps for up to heatmap_images test faces; examples and per-group averages; returns the band table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    print_config(cfg, "analysis.heatmaps", SETTINGS)
    setup = prepare_evaluation(cfg)
    model_cfg = setup.model_cfg
    dataset = build_dataset(model_cfg, "test", train=False, csv_path=str(setup.csv_path))
    generator = np.random.default_rng(cfg.seed)
    per_group = max(cfg.heatmap_images // len(AGE_GROUPS), 1)
    mean = torch.tensor(model_cfg.normalize_mean).view(3, 1, 1)
    std = torch.tensor(model_cfg.normalize_std).view(3, 1, 1)
    faces, maps, rows = {}, {}, []
    for low, high in AGE_GROUPS:
        members = np.flatnonzero((dataset.ages >= low) & (dataset.ages <= high))
        if len(members) == 0:
            continue
        chosen = np.sort(generator.choice(members, min(per_group, len(members)), replace=False))
        images = torch.stack([dataset[int(index)][0] for index in chosen])  # (n, 3, S, S) normalised
        heatmaps = np.concatenate([compute_heatmaps(setup.model, model_cfg.model_name, batch.to(setup.device))
                                   for batch in images.split(cfg.batch_size)])  # (n, S, S)
        name = _group_name(low, high)
        faces[name] = (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # (n, S, S, 3)
        maps[name] = heatmaps
        rows.append({"age_group": name, "images": len(chosen), **band_shares(heatmaps.mean(0))})
        print(f"age {name}: {len(chosen)} faces, map mass by band: "
              + ", ".join(f"{band} {share:.2f}" for band, share in list(rows[-1].items())[2:]), flush=True)
    table = pd.DataFrame(rows)

    examples = 4
    figure, axes = plt.subplots(len(maps), 2 * examples, figsize=(2.0 * 2 * examples, 2.1 * len(maps)), squeeze=False)
    for row, name in enumerate(maps):
        for column in range(examples):
            for offset, axis in enumerate(axes[row, 2 * column:2 * column + 2]):
                axis.axis("off")
                if column < len(maps[name]):
                    axis.imshow(faces[name][column])
                    if offset:
                        axis.imshow(maps[name][column], cmap="jet", alpha=0.5, vmin=0, vmax=1)
        axes[row, 0].set_title(f"age {name}", fontsize=10, loc="left")
    figure.suptitle(f"{setup.tag}: Grad-CAM of the predicted age (face, map) per age group")
    examples_path = Path(cfg.pics_dir) / f"heatmaps_{setup.tag}_examples.png"
    save_figure(figure, examples_path)

    figure, axes = plt.subplots(1, len(maps), figsize=(2.6 * len(maps), 3.2), squeeze=False)
    for axis, name in zip(axes[0], maps, strict=True):  # maps only: no face pixels, so the figure can be shared
        average = maps[name].mean(0)
        axis.imshow(average, cmap="jet", vmin=0, vmax=max(float(average.max()), 1e-6))
        side = average.shape[0]
        for band, (top, _) in FACE_BANDS.items():
            axis.axhline(top * side - 0.5, color="white", linewidth=0.6)
            if axis is axes[0, 0]:
                axis.text(-1, (top + 0.05) * side, band, ha="right", fontsize=8)
        axis.set_title(f"age {name} (n={len(maps[name])})", fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f"{setup.tag}: mean Grad-CAM map per age group (bands of an aligned face)")
    average_path = Path(cfg.pics_dir) / f"heatmaps_{setup.tag}_average.png"
    save_figure(figure, average_path)

    table_path = analysis_dir(cfg) / f"{setup.tag}_heatmaps.csv"
    write_csv(table, table_path, "%.4f")
    print(f"wrote {examples_path}, {average_path} and {table_path}")
    return {"table": table, "maps": maps, "examples_path": str(examples_path), "average_path": str(average_path),
            "table_path": str(table_path)}


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], reads=SETTINGS))
