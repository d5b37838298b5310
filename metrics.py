"""The metrics of age predictions that train.py reports and analysis/ reuses: MAE, RMSE, CS@5 and MAE per decade
for exact ages, the share inside the bin and the distance to it for binned labels (FairFace), each source of a
mixed split, the calibration of P(age >= 18) (a temperature fitted on the valid set, the expected calibration
error, the reliability diagram) and the errors of an age gate.

Reads and writes nothing; train.py and analysis.errors import it.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch
from torch import nn

from custom_dataset_dataloader import decade_start
from model import ADULT_AGE, label_error, unwrap

CS_THRESHOLD = 5.0  # years, for CS@5


def label_metrics(predicted: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
    """Metrics of predicted ages (N,) against labels: exact ages (N,), or (N, 2) ranges where binned rows are
    [low, high). Exact rows: MAE, RMSE, CS@5, MAE per decade; binned rows: the share inside the bin and the mean
    distance to it; all rows: `error`, the mean of both kinds of error, which picks the best epoch (the MAE when
    every label is exact). `targets` are the exact ages, NaN for a binned row; `ranges` each label's [low, high)."""
    ranges = target if target.ndim == 2 else target[:, None].expand(-1, 2)  # (N, 2)
    exact = ranges[:, 0] == ranges[:, 1]
    errors = label_error(predicted, ranges)  # (N,)
    exact_error, exact_age = errors[exact], ranges[exact, 0]
    decades = decade_start(exact_age).long()

    def mean(values: torch.Tensor) -> float:  # NaN where no row has that kind of label
        return values.mean().item() if len(values) else math.nan

    metrics = {
        "mae": mean(exact_error),
        "rmse": math.sqrt(mean(exact_error.square())) if len(exact_error) else math.nan,
        "cs5": mean((exact_error <= CS_THRESHOLD).float()),
        "mae_by_decade": {f"{decade}-{decade + 9}": exact_error[decades == decade].mean().item()
                          for decade in decades.unique().tolist()},
        "error": mean(errors),
        "predictions": predicted.tolist(),
        "targets": torch.where(exact, ranges[:, 0], math.nan).tolist(),
    }
    if not exact.all():
        metrics.update({"in_bin": mean((errors[~exact] == 0).float()), "bin_distance": mean(errors[~exact]),
                        "ranges": ranges.tolist()})
    return metrics


def source_metrics(frame: pd.DataFrame, evaluation: dict[str, Any]) -> dict[str, dict[str, float]]:
    """label_metrics of each data set of a mixed split (its `source` column; {} without one): MAE and CS@5 where
    the labels are exact ages, share inside the bin and distance where they are bins."""
    if "source" not in frame or frame["source"].nunique() < 2:
        return {}
    predicted = torch.tensor(evaluation["predictions"])
    ranges = torch.tensor(evaluation.get("ranges") or [[age, age] for age in evaluation["targets"]])
    report = {}
    for source in sorted(frame["source"].unique()):
        rows = torch.from_numpy((frame["source"] == source).to_numpy().copy())
        metrics = label_metrics(predicted[rows], ranges[rows])
        report[source] = {key: metrics[key] for key in ("mae", "cs5", "in_bin", "bin_distance") if key in metrics
                          and not (isinstance(metrics[key], float) and math.isnan(metrics[key]))}
        report[source]["faces"] = int(rows.sum())
    return report


def format_sources(report: dict[str, dict[str, float]]) -> str:
    """One line: each source's MAE, or share inside its bins and distance."""
    parts = []
    for source, metrics in report.items():
        if "mae" in metrics:
            parts.append(f"{source} MAE {metrics['mae']:.2f}")
        else:
            parts.append(f"{source} {metrics['in_bin']:.1%} in bin, {metrics['bin_distance']:.2f} y off")
    return "; ".join(parts)


def reliability(probabilities: torch.Tensor, outcomes: torch.Tensor, bins: int = 10) -> dict[str, Any]:
    """The reliability diagram of binary probabilities (N,) against 0/1 outcomes (N,), by scikit-learn's
    calibration_curve over equal-width bins: per non-empty bin the mean predicted probability, the observed
    frequency and the share of the N predictions it holds."""
    import numpy as np
    from sklearn.calibration import calibration_curve

    predicted = probabilities.double().clamp(0, 1).numpy()
    observed = outcomes.double().numpy()
    frequency, mean_predicted = calibration_curve(observed, predicted, n_bins=bins, strategy="uniform")
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], predicted), minlength=bins)  # calibration_curve's binning
    return {"predicted": mean_predicted, "observed": frequency, "share": counts[counts > 0] / len(predicted)}


def expected_calibration_error(probabilities: torch.Tensor, outcomes: torch.Tensor, bins: int = 10) -> float:
    """ECE of binary probabilities (N,) against 0/1 outcomes (N,): the size-weighted mean over equal-width
    probability bins of |mean predicted probability - observed frequency| (the reliability diagram's gaps)."""
    curve = reliability(probabilities, outcomes, bins)
    return float((curve["share"] * abs(curve["predicted"] - curve["observed"])).sum())


def fit_temperature(model: nn.Module, outputs: torch.Tensor, ages: torch.Tensor) -> float:
    """The temperature T that minimises the head's negative log-likelihood of the true ages given outputs / T
    (valid-set outputs (N, K) and ages (N,)); a grid over T in [0.25, 4], which cannot diverge."""
    head = unwrap(model).head
    temperatures = torch.logspace(-2, 2, 161, base=2.0)  # 0.25 .. 4
    losses = [head.likelihood_loss(outputs / temperature, ages).item() for temperature in temperatures]
    return temperatures[int(torch.tensor(losses).argmin())].item()


def adult_probability(model: nn.Module, evaluation: dict[str, Any]) -> torch.Tensor | None:
    """P(age >= ADULT_AGE) (N,) on the CPU from evaluate(keep_outputs=True)'s raw outputs, calibrated by the head's
    temperature; None for a head without probabilities."""
    head = unwrap(model).head
    if not head.has_probabilities:
        return None
    return head.probability_at_least(evaluation["outputs"].to(head.temperature.device), ADULT_AGE).cpu()


def calibrate(model: nn.Module, valid: dict[str, Any], test: dict[str, Any]) -> dict[str, float]:
    """Fit the model's temperature on the valid set's outputs, set it, and report on the test set the expected
    calibration error of P(age >= ADULT_AGE) before and after (dicts from evaluate(keep_outputs=True))."""
    head = unwrap(model).head
    valid_ages, test_ages = torch.tensor(valid["targets"]), torch.tensor(test["targets"])
    valid_exact, test_exact = valid_ages.isfinite(), test_ages.isfinite()  # binned rows have no exact age
    if not valid_exact.any() or not test_exact.any():
        return {}
    temperature = fit_temperature(model, valid["outputs"][valid_exact], valid_ages[valid_exact])
    outcomes = (test_ages[test_exact] >= ADULT_AGE).double()
    results = {"temperature": temperature}
    for name, value in (("uncalibrated", 1.0), ("calibrated", temperature)):
        head.temperature.fill_(value)
        probability = adult_probability(model, test)[test_exact]
        results[f"test_ece_adult_{name}"] = expected_calibration_error(probability, outcomes)
    return results


def age_gate_errors(targets: torch.Tensor, predicted: torch.Tensor, probability: torch.Tensor | None = None,
                    threshold: int = ADULT_AGE) -> dict[str, float]:
    """What an age gate at `threshold` gets wrong: the share of minors (true age < threshold) let through and of
    adults refused, deciding by the predicted age (>= threshold) and, when given, by P(age >= threshold) >= 0.5
    from the calibrated distribution (N,) each."""
    minors, adults = targets < threshold, targets >= threshold
    results = {}
    decisions = {"age": predicted >= threshold}
    if probability is not None:
        decisions["probability"] = probability >= 0.5
    for name, passed in decisions.items():
        results[f"minors_passed_{name}"] = passed[minors].double().mean().item() if minors.any() else math.nan
        results[f"adults_refused_{name}"] = (~passed[adults]).double().mean().item() if adults.any() else math.nan
    return results
