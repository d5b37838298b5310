"""Error analysis by age, gender and ethnicity: where does a trained model fail, and for whom?

Reads:  --checkpoint (default: the newest checkpoints/*/best.pt) and --test_csv (default: its own test split),
        images under --data_dir (default: the checkpoint's); --exclude_csv drops faces seen in other CSVs.
Writes: runs/analysis/<run>__<csv>_errors.csv: one row per group (grouping, group, images, MAE and mean signed
        error = bias, each with a bootstrap 95 % interval) plus one "largest_gap" row per grouping;
        runs/analysis/<run>__<csv>_predictions.csv: one row per face (image_name, age, predicted, error);
        pics/errors_<run>__<csv>_groups.png (bars with intervals) and _scatter.png (error vs true age with a
        running mean; predicted vs true age).

Groupings: age decade, gender, ethnicity, gender x ethnicity. Unknown labels form no group. The largest gap is
between the best and the worst group of a grouping among groups of at least MIN_GROUP_SIZE faces.

Run:  python -m analysis.errors --checkpoint=checkpoints/<run>/best.pt
      python -m analysis.errors --checkpoint=... --data_dir=../shared/data/utkface200 \\
          --test_csv=csv_dataset/utk200/utkface_dataset.csv --exclude_csv=csv_dataset/train_set.csv
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis import analysis_dir, prepare_evaluation
from config import Config, parse_config, print_config, save_figure, write_csv
from custom_dataset_dataloader import ETHNICITIES, GENDERS, build_dataloader, decade_start
from train import (
    ADULT_AGE,
    Execution,
    adult_probability,
    age_gate_errors,
    evaluate,
    expected_calibration_error,
    reliability,
)

GROUPINGS = ("decade", "gender", "ethnicity", "gender_ethnicity")
MIN_GROUP_SIZE = 20  # groups smaller than this get a row and an interval, but no say in the largest gap


def bootstrap_interval(values: np.ndarray, samples: int, generator: np.random.Generator) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the mean of `values` (N,)."""
    if len(values) < 2 or samples < 1:
        return float("nan"), float("nan")
    means = values[generator.integers(0, len(values), size=(samples, len(values)))].mean(1)  # (samples,)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def group_labels(frame: pd.DataFrame) -> dict[str, pd.Series]:
    """Each grouping's label per face; faces with an unknown gender or ethnicity get no label (NaN)."""
    decade = decade_start(frame["age"]).astype(int)
    gender = frame["gender"].where(frame["gender"].isin(GENDERS))
    ethnicity = frame["ethnicity"].where(frame["ethnicity"].isin(ETHNICITIES))
    return {
        "decade": decade.map(lambda start: f"{start}-{start + 9}"),
        "gender": gender,
        "ethnicity": ethnicity,
        "gender_ethnicity": gender + " " + ethnicity,
    }


def _group_order(group: str) -> tuple[int, str]:
    """Decades by their first year ('100-109' after '90-99'), other groups alphabetically."""
    head = group.split("-")[0]
    return (int(head), group) if head.isdigit() else (0, group)


def group_table(frame: pd.DataFrame, samples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per group: images, MAE and bias (predicted - true) with bootstrap 95 % intervals; then per grouping the
    largest MAE gap between groups of >= MIN_GROUP_SIZE faces. `frame` has age, predicted, gender, ethnicity."""
    generator = np.random.default_rng(seed)
    errors = (frame["predicted"] - frame["age"]).to_numpy()
    rows: list[dict[str, Any]] = []
    for grouping, labels in group_labels(frame).items():
        grouping_rows = []
        for group in sorted(labels.dropna().unique(), key=_group_order):
            signed = errors[(labels == group).to_numpy()]
            mae_low, mae_high = bootstrap_interval(np.abs(signed), samples, generator)
            bias_low, bias_high = bootstrap_interval(signed, samples, generator)
            grouping_rows.append({
                "grouping": grouping, "group": group, "images": len(signed),
                "mae": float(np.abs(signed).mean()), "mae_low": mae_low, "mae_high": mae_high,
                "bias": float(signed.mean()), "bias_low": bias_low, "bias_high": bias_high,
            })
        rows += grouping_rows
        eligible = [row for row in grouping_rows if row["images"] >= MIN_GROUP_SIZE]
        if len(eligible) >= 2:
            best, worst = min(eligible, key=lambda row: row["mae"]), max(eligible, key=lambda row: row["mae"])
            rows.append({"grouping": grouping, "group": f"largest_gap: {worst['group']} vs {best['group']}",
                         "images": worst["images"] + best["images"], "mae": worst["mae"] - best["mae"]})
    return pd.DataFrame(rows)


def plot_groups(table: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    groups = table[~table["group"].str.startswith("largest_gap")]
    figure, axes = plt.subplots(1, len(GROUPINGS), figsize=(22, 4.8),
                                gridspec_kw={"width_ratios": [4, 1.2, 2.5, 4.5]})
    for axis, grouping in zip(axes, GROUPINGS, strict=True):
        rows = groups[groups["grouping"] == grouping]
        positions = np.arange(len(rows))
        for offset, metric, color in ((-0.2, "mae", "tab:blue"), (0.2, "bias", "tab:orange")):
            values = rows[metric].to_numpy()
            below, above = values - rows[f"{metric}_low"].to_numpy(), rows[f"{metric}_high"].to_numpy() - values
            axis.bar(positions + offset, values, width=0.4, color=color, yerr=[below, above], capsize=3,
                     label="MAE" if metric == "mae" else "bias (pred - true)")
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_xticks(positions, [f"{group}\n(n={count})" for group, count in zip(rows["group"], rows["images"],
                                                                                     strict=True)],
                        rotation={"gender_ethnicity": 60, "decade": 45}.get(grouping, 0), fontsize=8)
        axis.set(title=grouping.replace("_", " x "), ylabel="years")
    axes[0].legend()
    figure.suptitle(f"{title}: MAE and bias per group, bootstrap 95 % intervals")
    save_figure(figure, path)


def running_mean(x: np.ndarray, y: np.ndarray, window: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """Mean of y over x in [t - window/2, t + window/2] at every integer t that has data."""
    centres = np.arange(np.floor(x.min()), np.ceil(x.max()) + 1)
    means = np.array([y[np.abs(x - centre) <= window / 2].mean() if (np.abs(x - centre) <= window / 2).any()
                      else np.nan for centre in centres])
    return centres, means


def plot_scatter(frame: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    ages, predicted = frame["age"].to_numpy(float), frame["predicted"].to_numpy(float)
    figure, axes = plt.subplots(1, 2, figsize=(14, 5))
    axes[0].scatter(ages, predicted - ages, s=4, alpha=0.25)
    centres, means = running_mean(ages, predicted - ages)
    axes[0].plot(centres, means, color="tab:red", linewidth=2, label="running mean (5-year window)")
    axes[0].axhline(0, color="black", linewidth=0.8)
    axes[0].set(xlabel="true age", ylabel="predicted - true (years)", title="signed error vs true age")
    axes[0].legend()
    limit = max(ages.max(), predicted.max()) + 2
    axes[1].scatter(ages, predicted, s=4, alpha=0.25)
    axes[1].plot([0, limit], [0, limit], color="black", linewidth=0.8, label="perfect")
    axes[1].set(xlabel="true age", ylabel="predicted age", title="predicted vs true", xlim=(0, limit), ylim=(0, limit))
    axes[1].legend()
    figure.suptitle(title)
    save_figure(figure, path)


def plot_reliability(probability: torch.Tensor, targets: torch.Tensor, path: Path, title: str) -> None:
    """The reliability diagram of P(age >= ADULT_AGE): mean predicted probability against the observed share of
    adults per probability bin (train.reliability), each bin's share of the faces as the marker size."""
    import matplotlib.pyplot as plt

    curve = reliability(probability, (targets >= ADULT_AGE).double())
    ece = expected_calibration_error(probability, (targets >= ADULT_AGE).double())
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfectly calibrated")
    axis.plot(curve["predicted"], curve["observed"], "-", color="tab:blue")
    axis.scatter(curve["predicted"], curve["observed"], s=20 + 600 * curve["share"], color="tab:blue",
                 label=f"bins (size = share of faces); ECE {ece:.3f}")
    axis.set(xlim=(0, 1), ylim=(0, 1), xlabel=f"predicted P(age >= {ADULT_AGE})",
             ylabel=f"observed share aged {ADULT_AGE} or more", title=title)
    axis.legend(loc="upper left", fontsize=8)
    save_figure(figure, path)


def main(cfg: Config) -> dict[str, Any]:
    """Predict every face of the CSV, tabulate the errors per group, draw the figures; returns the table,
    the overall metrics and the output paths."""
    import matplotlib

    matplotlib.use("Agg")
    print_config(cfg, "analysis.errors")
    setup = prepare_evaluation(cfg)
    loader = build_dataloader(setup.model_cfg, "test", csv_path=str(setup.csv_path))
    probabilistic = setup.model.head.has_probabilities
    metrics = evaluate(setup.model, loader, Execution.for_config(setup.model_cfg, setup.device),
                       keep_outputs=probabilistic)
    probability = adult_probability(setup.model, metrics)  # None without probabilities; the file's temperature
    gate = age_gate_errors(torch.tensor(metrics["targets"]), torch.tensor(metrics["predictions"]), probability)
    frame = loader.dataset.frame[["image_name", "age", "gender", "ethnicity"]].copy()
    frame["predicted"] = metrics["predictions"]
    frame["error"] = frame["predicted"] - frame["age"]
    table = group_table(frame, cfg.bootstrap_samples, cfg.seed)

    output = analysis_dir(cfg)
    table_path, predictions_path = output / f"{setup.tag}_errors.csv", output / f"{setup.tag}_predictions.csv"
    for data, path in ((table, table_path), (frame, predictions_path)):
        write_csv(data, path, "%.4f")
    pics = Path(cfg.pics_dir)
    title = f"{setup.tag} ({len(frame)} faces, MAE {metrics['mae']:.2f})"
    plot_groups(table, pics / f"errors_{setup.tag}_groups.png", title)
    plot_scatter(frame, pics / f"errors_{setup.tag}_scatter.png", title)
    if probability is not None:
        plot_reliability(probability, torch.tensor(metrics["targets"]), pics / f"errors_{setup.tag}_reliability.png",
                         f"{setup.tag}: calibration of P(age >= {ADULT_AGE})")

    print(f"\n{len(frame)} faces: MAE {metrics['mae']:.2f}, bias {frame['error'].mean():+.2f}, "
          f"CS@5 {metrics['cs5']:.3f}, RMSE {metrics['rmse']:.2f}")
    shown = table.assign(interval=table["mae_low"].map("{:.2f}".format) + "-" + table["mae_high"].map("{:.2f}".format))
    print(shown[["grouping", "group", "images", "mae", "interval", "bias"]].to_string(index=False, float_format="%.2f"))
    shares = ", ".join(f"{key.replace('_', ' ')} {value:.1%}" for key, value in gate.items())
    print(f"age gate at {ADULT_AGE}: {shares}")
    print(f"wrote {table_path}, {predictions_path} and pics/errors_{setup.tag}_*.png")
    return {"table": table, "mae": metrics["mae"], "cs5": metrics["cs5"], "images": len(frame), "age_gate": gate,
            "table_path": str(table_path), "predictions_path": str(predictions_path)}


if __name__ == "__main__":
    main(parse_config(sys.argv[1:]))
