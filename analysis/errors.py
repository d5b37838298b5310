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

Real photos, as a user's arrive (--detect=true): every photo goes through inference.py's own path (YuNet or
MTCNN, alignment to the model's crop geometry, its match_training_resolution setting, --tta), the largest face of
each photo is kept, and the photos without a usable face are counted and listed in
runs/analysis/<tag>__detected_no_face.csv. Exact ages are scored as above (MAE, CS@5, groups, age gate); age bins
(a FairFace CSV from eda.py --dataset_format=fairface) as the share of faces inside their bin and the mean distance
to the bin in years (0 inside), overall, per bin, per gender and per ethnicity, with bootstrap intervals
(<tag>_bins.csv) and a figure of the predicted age per bin over the bin's range (pics/errors_<tag>_bins.png). A
bin is never turned into an exact age.

Ensembles (--checkpoint=a.pt,b.pt): the mean of the files' ages (inference.AgeEnsemble), each image through
inference.py's path (whole, or with --detect through the detector); the first file decides the default test split.

Run:  python -m analysis.errors --checkpoint=checkpoints/<run>/best.pt
      python -m analysis.errors --checkpoint=models/age_lite0_mix.pt,checkpoints/<run>/best.pt
      python -m analysis.errors --checkpoint=... --data_dir=../shared/data/utkface200 \\
          --test_csv=csv_dataset/utk200/utkface_dataset.csv --exclude_csv=csv_dataset/train_set.csv
      python -m analysis.errors --detect=true --dataset_format=fairface --data_dir=../shared/data/fairface540
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from analysis import ANALYSIS_SETTINGS, Evaluation, analysis_dir, prepare_evaluation
from config import Config, parse_config, print_config
from custom_dataset_dataloader import (
    ETHNICITIES,
    GENDERS,
    DataError,
    age_bin_bounds,
    binned_rows,
    build_dataloader,
    decade_start,
    describe_read_error,
    distance_to_bins,
    is_binned,
    read_dataset_csv,
    screen_rows,
)
from faces import build_detector
from files import save_figure, write_csv
from metrics import adult_probability, age_gate_errors, expected_calibration_error, reliability
from model import ADULT_AGE
from train import Execution, evaluate

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


PHOTOS_PER_CALL = 256  # --detect: photos whose largest faces go through the model together (memory stays bounded)


def predict_photos(cfg: Config, setup: Evaluation) -> tuple[pd.DataFrame, pd.DataFrame]:
    """--detect: every photo of the CSV through inference.py's own path (decoding, the detector, alignment to the
    model's crop geometry, its resolution setting, TTA), keeping the largest face of each photo; without --detect
    (an ensemble on a split of face crops) each image whole is the face. The model is inference.load_predictor's:
    one file, or an ensemble's mean. Returns (the rows with a face, with `predicted` and the face's box; the rows
    without one, with the reason)."""
    from inference import analysed_photos, load_predictor

    frame = read_dataset_csv(setup.csv_path, setup.model_cfg.max_age)
    frame, files = screen_rows(frame, setup.model_cfg.data_dir, setup.csv_path)
    frame = frame.reset_index(drop=True)
    predictor = load_predictor(list(setup.members) or [setup.checkpoint], setup.device, cfg.tta_views,
                               cfg.match_training_resolution)
    detector = build_detector(predictor.detector_name(cfg.detector), cfg.min_face_size) if cfg.detect else None
    print(f"{f'detecting faces with {detector.name}' if detector else 'each image whole'}, "
          f"{predictor.describe_resolution()}"
          f"{', flip TTA' if cfg.tta else ''}{f', {cfg.tta_views} views' if cfg.tta_views > 1 else ''}")
    paths = [Path(file.path) for file in files]
    predicted, boxes, missing, pending = np.full(len(frame), np.nan), [None] * len(frame), {}, []

    def predict_pending() -> None:
        if pending:
            ages = predictor.predict(np.stack([crop for _, crop in pending]), cfg.tta)
            predicted[[index for index, _ in pending]] = ages
            pending.clear()

    photos = analysed_photos(paths, predictor, detector)
    for index, (path, image, found) in enumerate(tqdm(photos, total=len(paths), desc="photos", leave=False)):
        if isinstance(image, Exception):
            missing[index] = f"not a readable image ({describe_read_error(image, path)})"
        elif isinstance(found, Exception):
            missing[index] = f"its faces could not be found ({type(found).__name__}: {found})"
        elif not found.boxes:
            missing[index] = "no face found"
        else:
            largest = int(np.argmax([width * height for _, _, width, height in found.boxes]))
            boxes[index] = [round(float(value), 1) for value in found.boxes[largest]]
            pending.append((index, found.crops[largest]))
            if len(pending) == PHOTOS_PER_CALL:
                predict_pending()
    predict_pending()
    frame["predicted"], frame["box"] = predicted, boxes
    no_face = frame.loc[list(missing)].drop(columns=["predicted", "box"]).assign(reason=list(missing.values()))
    return frame.drop(index=list(missing)).reset_index(drop=True), no_face.reset_index(drop=True)


def bin_table(frame: pd.DataFrame, samples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Binned labels (FairFace): per group (all, each bin, gender, ethnicity) the faces, the share whose predicted
    age falls inside its bin and the mean distance to the bin in years (0 inside), each with a bootstrap 95 %
    interval, and the median prediction. `frame` has age_bin, predicted, gender, ethnicity."""
    generator = np.random.default_rng(seed)
    distance = distance_to_bins(frame["predicted"].to_numpy(float), frame["age_bin"])
    inside = (distance == 0).astype(float)
    groupings = {"all": pd.Series("all", index=frame.index), "bin": frame["age_bin"],
                 "gender": frame["gender"].where(frame["gender"].isin(GENDERS)),
                 "ethnicity": frame["ethnicity"].where(frame["ethnicity"].isin(ETHNICITIES))}
    rows = []
    for grouping, labels in groupings.items():
        order = sorted(labels.dropna().unique(), key=age_bin_bounds if grouping == "bin" else str)
        for group in order:
            chosen = (labels == group).to_numpy()
            in_low, in_high = bootstrap_interval(inside[chosen], samples, generator)
            distance_low, distance_high = bootstrap_interval(distance[chosen], samples, generator)
            rows.append({"grouping": grouping, "group": group, "images": int(chosen.sum()),
                         "inside_bin": inside[chosen].mean(), "inside_low": in_low, "inside_high": in_high,
                         "distance": distance[chosen].mean(), "distance_low": distance_low,
                         "distance_high": distance_high,
                         "median_predicted": float(np.median(frame["predicted"].to_numpy(float)[chosen]))})
    return pd.DataFrame(rows)


def plot_bins(frame: pd.DataFrame, path: Path, title: str) -> None:
    """Predicted age per labelled bin: each bin's range as a shaded box, the predictions as a box plot over it."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.patches import Rectangle

    order = sorted(frame["age_bin"].unique(), key=age_bin_bounds)
    top = max(100.0, float(frame["predicted"].max()) + 5)
    figure, axis = plt.subplots(figsize=(1.1 * len(order) + 3, 5.5))
    for position, label in enumerate(order):
        low, high = age_bin_bounds(label)
        axis.add_patch(Rectangle((position - 0.45, low), 0.9, min(high, top) - low, color="tab:green", alpha=0.18,
                                 linewidth=0, label="the labelled bin" if position == 0 else None))
    sns.boxplot(data=frame, x="age_bin", y="predicted", order=order, color="tab:blue", fliersize=0, width=0.5,
                ax=axis)
    sns.stripplot(data=frame, x="age_bin", y="predicted", order=order, color="black", size=2, alpha=0.35, ax=axis)
    axis.set(xlabel="labelled age bin", ylabel="predicted age (years)", ylim=(0, top), title=title)
    axis.legend(loc="upper left")
    save_figure(figure, path)


def binned_report(cfg: Config, frame: pd.DataFrame, tag: str) -> dict[str, Any]:
    """Score binned labels (bin_table), write the table, the per-face rows and the figure; returns the figures."""
    table = bin_table(frame, cfg.bootstrap_samples, cfg.seed)
    output = analysis_dir(cfg)
    table_path, predictions_path = output / f"{tag}_bins.csv", output / f"{tag}_predictions.csv"
    write_csv(table, table_path, "%.4f")
    write_csv(frame, predictions_path, "%.4f")
    overall = table[table["grouping"] == "all"].iloc[0]
    plot_bins(frame, Path(cfg.pics_dir) / f"errors_{tag}_bins.png",
              f"{tag}: {len(frame)} faces, {overall['inside_bin']:.1%} inside their bin, "
              f"{overall['distance']:.2f} y from it on average")
    print(f"\n{len(frame)} faces: {overall['inside_bin']:.1%} inside their bin "
          f"({overall['inside_low']:.1%}-{overall['inside_high']:.1%}), mean distance to the bin "
          f"{overall['distance']:.2f} y ({overall['distance_low']:.2f}-{overall['distance_high']:.2f})")
    print(table[["grouping", "group", "images", "inside_bin", "distance", "median_predicted"]].to_string(
        index=False, float_format="%.3f"))
    print(f"wrote {table_path}, {predictions_path} and {Path(cfg.pics_dir)}/errors_{tag}_bins.png")
    return {"table": table, "inside_bin": float(overall["inside_bin"]), "distance": float(overall["distance"]),
            "images": len(frame), "table_path": str(table_path), "predictions_path": str(predictions_path)}


SETTINGS = (*ANALYSIS_SETTINGS, "detect", "bootstrap_samples")  # what this script reads (its --help)


def main(cfg: Config) -> dict[str, Any]:
    """Predict every face of the CSV, tabulate the errors per group, draw the figures; returns the table,
    the overall metrics and the output paths."""
    import matplotlib

    matplotlib.use("Agg")
    print_config(cfg, "analysis.errors", SETTINGS)
    setup = prepare_evaluation(cfg, ensemble=True)
    labels = read_dataset_csv(setup.csv_path)
    if binned_rows(labels).any() and not is_binned(labels):
        raise DataError(f"{setup.csv_path} mixes exact ages and age bins (a mix of data sets): analyse one source at "
                        "a time (--test_csv=<its aligned split>/test_set.csv), or score every source with python -m "
                        "experiments.matrix")
    if cfg.detect or is_binned(labels) or len(setup.members) > 1:
        return main_on_photos(cfg, setup)
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


def main_on_photos(cfg: Config, setup: Evaluation) -> dict[str, Any]:
    """--detect (or a CSV of age bins, or an ensemble): photos through inference.py's path (with --detect, the
    detector), scored by bin or by exact age."""
    if cfg.detect or len(setup.members) > 1:
        frame, no_face = predict_photos(cfg, setup)
        tag = f"{setup.tag}__detected" if cfg.detect else setup.tag
        no_face_path = analysis_dir(cfg) / f"{tag}_no_face.csv"
        write_csv(no_face, no_face_path)
        print(f"\n{len(no_face)} of {len(frame) + len(no_face)} photos without a usable face (listed in "
              f"{no_face_path})")
        for row in no_face.head(10).itertuples():
            print(f"  {row.image_name}: {row.reason}")
    else:  # binned labels without --detect: the photos as they are, each resized whole
        loader = build_dataloader(setup.model_cfg, "test", csv_path=str(setup.csv_path))
        metrics = evaluate(setup.model, loader, Execution.for_config(setup.model_cfg, setup.device))
        frame = loader.dataset.frame.copy()
        frame["predicted"], no_face, tag = metrics["predictions"], frame.iloc[:0], setup.tag
    if frame.empty:
        raise SystemExit(f"error: no face was found in any photo of {setup.csv_path}")
    if is_binned(frame):
        result = binned_report(cfg, frame, tag)
    else:
        result = exact_report(cfg, frame, tag)
    return {**result, "no_face": len(no_face), "tag": tag}


def exact_report(cfg: Config, frame: pd.DataFrame, tag: str) -> dict[str, Any]:
    """Exact ages through the detector: MAE, CS@5 and the age gate overall, the group table and the figures."""
    frame = frame.assign(error=frame["predicted"] - frame["age"])
    errors = frame["error"].abs().to_numpy()
    table = group_table(frame, cfg.bootstrap_samples, cfg.seed)
    gate = age_gate_errors(torch.tensor(frame["age"].to_numpy()), torch.tensor(frame["predicted"].to_numpy()))
    output = analysis_dir(cfg)
    table_path, predictions_path = output / f"{tag}_errors.csv", output / f"{tag}_predictions.csv"
    write_csv(table, table_path, "%.4f")
    write_csv(frame, predictions_path, "%.4f")
    title = f"{tag} ({len(frame)} faces, MAE {errors.mean():.2f})"
    plot_groups(table, Path(cfg.pics_dir) / f"errors_{tag}_groups.png", title)
    plot_scatter(frame, Path(cfg.pics_dir) / f"errors_{tag}_scatter.png", title)
    mae, cs5 = float(errors.mean()), float((errors <= 5).mean())
    print(f"\n{len(frame)} faces: MAE {mae:.2f}, bias {frame['error'].mean():+.2f}, CS@5 {cs5:.3f}")
    print(table[["grouping", "group", "images", "mae", "bias"]].to_string(index=False, float_format="%.2f"))
    shares = ", ".join(f"{key.replace('_', ' ')} {value:.1%}" for key, value in gate.items())
    print(f"age gate at {ADULT_AGE}: {shares}")
    print(f"wrote {table_path}, {predictions_path} and {Path(cfg.pics_dir)}/errors_{tag}_*.png")
    return {"table": table, "mae": mae, "cs5": cs5, "images": len(frame), "age_gate": gate,
            "table_path": str(table_path), "predictions_path": str(predictions_path)}


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], reads=SETTINGS))
