"""Sensitivity analysis: how the MAE of a trained model grows as the test faces are degraded.

Reads:  --checkpoint (default: the newest checkpoints/*/best.pt) and --test_csv (default: its own test split).
Writes: runs/analysis/<run>__<csv>_sensitivity.csv (kind, level index, level, MAE, change from the clean MAE),
        pics/sensitivity_<run>__<csv>.png (one curve per kind; severity index on the x axis, levels in the legend);
        prints the horizontal-flip consistency: mean |age(x) - age(mirror of x)| in years.

Each kind is applied to the decoded uint8 face at the model's input size, before normalisation; level 0 of every
kind is the clean image (so its MAE is the clean MAE). Random parts (noise, the patch position) are seeded.
The eye and mouth bands sit where the mean aligned UTKFace face has its darkest rows (eyes 0.27, mouth 0.68 of
the height, measured on the utkface64 test split); on differently aligned data sets they are approximate.

Run:  python -m analysis.sensitivity --checkpoint=checkpoints/<run>/best.pt
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis import ANALYSIS_SETTINGS, analysis_dir, prepare_evaluation
from config import Config, parse_config, print_config
from custom_dataset_dataloader import build_dataset, build_transforms
from files import save_figure, write_csv
from train import Execution, evaluate

EYE_LINE, MOUTH_LINE = 0.27, 0.68  # share of the height (aligned UTKFace crops)
SEVERITIES: dict[str, tuple[float, ...]] = {  # kind -> levels; level 0 leaves the image unchanged
    "brightness": (1.0, 0.8, 0.6, 0.4, 0.25),  # pixel values multiplied by this
    "contrast": (1.0, 0.75, 0.5, 0.3, 0.15),  # blended towards the mean grey by this factor
    "blur": (0.0, 0.01, 0.02, 0.04, 0.06),  # Gaussian sigma, share of the side
    "noise": (0.0, 0.03, 0.06, 0.12, 0.2),  # Gaussian noise std on [0, 1] pixels
    "jpeg": (100, 50, 25, 10, 5),  # JPEG quality (100 = not compressed)
    "rotation": (0.0, 10.0, 20.0, 30.0, 45.0),  # degrees
    "resolution": (1.0, 0.5, 0.33, 0.25, 0.125),  # shrunk by this factor, then enlarged back
    "grayscale": (0.0, 0.25, 0.5, 0.75, 1.0),  # share of the colour removed
    "occlude_eyes": (0.0, 0.06, 0.12, 0.18, 0.24),  # black band over the eyes, height as share of the side
    "occlude_mouth": (0.0, 0.06, 0.12, 0.18, 0.24),  # black band over the mouth
    "occlude_patch": (0.0, 0.1, 0.2, 0.3, 0.4),  # black square at a random place, side as share of the side
}


def _band(pixels: torch.Tensor, centre: float, height: float) -> torch.Tensor:
    side = pixels.shape[-2]
    top, bottom = round((centre - height / 2) * side), round((centre + height / 2) * side)
    pixels = pixels.clone()
    pixels[:, max(top, 0):max(bottom, 0)] = 0
    return pixels


def perturb(pixels: torch.Tensor, kind: str, level: float, generator: torch.Generator) -> torch.Tensor:
    """One degraded copy of a uint8 face (3, S, S) -> uint8 (3, S, S)."""
    from torchvision.transforms.v2 import functional

    side = pixels.shape[-1]
    if kind == "brightness":
        return functional.adjust_brightness(pixels, level)
    if kind == "contrast":
        return functional.adjust_contrast(pixels, level)
    if kind == "blur":
        if level == 0:
            return pixels
        sigma = level * side
        kernel = 2 * int(np.ceil(3 * sigma)) + 1
        return functional.gaussian_blur(pixels, [kernel, kernel], [sigma, sigma])
    if kind == "noise":
        noisy = pixels.float() / 255 + level * torch.randn(pixels.shape, generator=generator)
        return (noisy.clamp(0, 1) * 255).round().to(torch.uint8)
    if kind == "jpeg":
        if level >= 100:
            return pixels
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=int(level))
        return torch.from_numpy(np.array(Image.open(buffer).convert("RGB"))).permute(2, 0, 1).contiguous()
    if kind == "rotation":
        return functional.rotate(pixels, level, interpolation=functional.InterpolationMode.BILINEAR)
    if kind == "resolution":
        if level >= 1:
            return pixels
        small = functional.resize(pixels, [max(round(side * level), 1)] * 2, antialias=True)
        return functional.resize(small, [side, side], antialias=False)
    if kind == "grayscale":
        gray = functional.rgb_to_grayscale(pixels, num_output_channels=3).float()
        return ((1 - level) * pixels.float() + level * gray).round().to(torch.uint8)
    if kind == "occlude_eyes":
        return _band(pixels, EYE_LINE, level)
    if kind == "occlude_mouth":
        return _band(pixels, MOUTH_LINE, level)
    if kind == "occlude_patch":
        patch = round(level * side)
        if patch == 0:
            return pixels
        top, left = (int(torch.randint(0, side - patch + 1, (1,), generator=generator)) for _ in range(2))
        pixels = pixels.clone()
        pixels[:, top:top + patch, left:left + patch] = 0
        return pixels
    if kind == "flip":
        return pixels.flip(-1)
    raise ValueError(f"unknown perturbation {kind!r}; expected one of {', '.join(SEVERITIES)} or flip")


class Perturbed(torch.nn.Module):
    """Transform: perturb the uint8 face, then the checkpoint's own scaling and normalisation."""

    def __init__(self, kind: str, level: float, normalise: torch.nn.Module, seed: int):
        super().__init__()
        self.kind, self.level, self.normalise = kind, level, normalise
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.normalise(perturb(pixels, self.kind, self.level, self.generator))


def plot_sensitivity(table: pd.DataFrame, clean_mae: float, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(11, 6))
    styles = ["-", "--", ":"]
    for index, (kind, rows) in enumerate(table.groupby("kind", sort=False)):
        levels = ", ".join(f"{level:g}" for level in rows["level"])
        axis.plot(rows["level_index"], rows["mae"], styles[index // 10], marker="o", label=f"{kind} ({levels})")
    axis.axhline(clean_mae, color="black", linewidth=0.8)
    axis.set(xlabel="severity (index into the levels in the legend)", ylabel="test MAE (years)", title=title,
             xticks=range(len(next(iter(SEVERITIES.values())))))
    axis.legend(fontsize=8, loc="upper left")
    save_figure(figure, path)


SETTINGS = ANALYSIS_SETTINGS  # what this script reads (its --help)


def main(cfg: Config) -> dict[str, Any]:
    """MAE at every (kind, level) of SEVERITIES and the flip consistency; returns the table and both numbers."""
    import matplotlib

    matplotlib.use("Agg")
    print_config(cfg, "analysis.sensitivity", SETTINGS)
    setup = prepare_evaluation(cfg)
    model_cfg = setup.model_cfg
    dataset = build_dataset(model_cfg, "test", train=False, csv_path=str(setup.csv_path))
    normalise = build_transforms(model_cfg, train=False)  # uint8 -> normalised float, as at training
    execution = Execution.for_config(model_cfg, setup.device)

    def predictions(kind: str, level: float) -> dict[str, Any]:
        dataset.transform = Perturbed(kind, level, normalise, cfg.seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, num_workers=0)  # seeded order
        return evaluate(setup.model, loader, execution)

    clean = predictions("brightness", 1.0)  # level 0: the clean image
    rows = []
    for kind, levels in SEVERITIES.items():
        for index, level in enumerate(levels):
            mae = clean["mae"] if index == 0 else predictions(kind, level)["mae"]
            rows.append({"kind": kind, "level_index": index, "level": level, "mae": mae,
                         "mae_change": mae - clean["mae"]})
            print(f"{kind:>14} level {level:<6g} MAE {mae:6.2f} ({mae - clean['mae']:+.2f})", flush=True)
    mirrored = predictions("flip", 1.0)
    flip_difference = float(np.mean(np.abs(np.array(clean["predictions"]) - np.array(mirrored["predictions"]))))
    table = pd.DataFrame(rows)

    table_path = analysis_dir(cfg) / f"{setup.tag}_sensitivity.csv"
    write_csv(table, table_path, "%.4f")
    figure_path = Path(cfg.pics_dir) / f"sensitivity_{setup.tag}.png"
    plot_sensitivity(table, clean["mae"], figure_path,
                     f"{setup.tag}: MAE under degradation (clean {clean['mae']:.2f}; flip consistency "
                     f"{flip_difference:.2f} y)")
    print(f"\nclean MAE {clean['mae']:.2f}; flip consistency: mean |age(x) - age(mirror x)| = {flip_difference:.2f} "
          f"years\nwrote {table_path} and {figure_path}")
    return {"table": table, "clean_mae": clean["mae"], "flip_difference": flip_difference,
            "table_path": str(table_path), "figure_path": str(figure_path)}


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], reads=SETTINGS))
