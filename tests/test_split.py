from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import split_dataset
from custom_dataset_dataloader import DataError, write_dataset_csv
from tests.helpers import make_config


def synthetic_frame(ages: list[int]) -> pd.DataFrame:
    return pd.DataFrame({
        "image_name": [f"{age}_0_0_{index:08d}.jpg" for index, age in enumerate(ages)],
        "age": ages,
        "gender": "male",
        "ethnicity": "white",
    })


def realistic_ages(count: int = 2000, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    ages = np.clip(rng.gamma(3.0, 11.0, count), 1, 116).astype(int).tolist()
    return [*ages, 101, 105, 110, 116, 99]  # rare ages with one image each


def test_age_bins_merge_rare_ages():
    ages = np.array([1] * 30 + [2] * 3 + [3] * 4 + [4] * 5 + [90] + [116])
    bins = split_dataset.age_bins(ages, min_count=10)
    counts = np.bincount(bins)
    assert (counts >= 10).all()
    assert (np.diff(bins[np.argsort(ages, kind="stable")]) >= 0).all()  # bins are contiguous age ranges


def test_split_proportions_and_stratification():
    frame = synthetic_frame(realistic_ages())
    splits = split_dataset.stratified_split(frame, 0.1, 0.1, seed=0, min_per_bin=10)
    sizes = {name: len(split) for name, split in splits.items()}
    assert sum(sizes.values()) == len(frame)
    assert abs(sizes["valid"] / len(frame) - 0.1) < 0.01 and abs(sizes["test"] / len(frame) - 0.1) < 0.01
    names = [set(split["image_name"]) for split in splits.values()]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    bins = split_dataset.age_bins(frame.sort_values("image_name")["age"].to_numpy(), 10)
    for bin_index in np.unique(bins):  # every age bin is in every split, near 80/10/10
        ages_in_bin = set(frame.sort_values("image_name")["age"].to_numpy()[bins == bin_index])
        counts = {name: split["age"].isin(ages_in_bin).sum() for name, split in splits.items()}
        total = sum(counts.values())
        assert counts["valid"] >= 1 and counts["test"] >= 1
        assert abs(counts["test"] - 0.1 * total) <= 1 and abs(counts["valid"] - 0.1 * total) <= 1
    for split in splits.values():  # same age distribution
        assert abs(split["age"].mean() - frame["age"].mean()) < 2.0


def test_split_never_fails_on_tiny_or_rare_data():
    for ages in ([5], [5, 80], [1, 2, 3], [3, 3, 3, 90, 100]):
        splits = split_dataset.stratified_split(synthetic_frame(ages), 0.1, 0.1, seed=1, min_per_bin=10)
        assert sum(len(split) for split in splits.values()) == len(ages)


def test_main_is_byte_identical_for_a_seed_and_differs_across_seeds(tmp_path):
    cfg = make_config(tmp_path, tmp_path)
    write_dataset_csv(synthetic_frame(realistic_ages(500)), Path(cfg.csv_dir) / "utkface_dataset.csv")

    def split_bytes(seed: int) -> list[bytes]:
        from dataclasses import replace

        split_dataset.main(replace(cfg, seed=seed))
        return [(Path(cfg.csv_dir) / f"{name}_set.csv").read_bytes() for name in ("train", "valid", "test")]

    first, second, other = split_bytes(42), split_bytes(42), split_bytes(7)
    assert first == second
    assert first != other
    assert (Path(cfg.pics_dir) / "split_age_histograms.png").is_file()


def test_missing_dataset_csv_names_the_fix(tmp_path):
    cfg = make_config(tmp_path, tmp_path)
    with pytest.raises(DataError, match=r"utkface_dataset.csv does not exist.*eda.py"):
        split_dataset.main(cfg)


def test_the_subject_split_keeps_people_apart_and_stratifies_on_age():
    rng = np.random.default_rng(0)
    rows = []
    for subject in range(300):  # 300 people, 1-8 photos each, a subject's photos spread over ten years
        base = int(rng.integers(1, 80))
        rows += [(f"{subject:03d}_{photo}.jpg", base + int(rng.integers(0, 10)), "male", "white", f"s{subject}")
                 for photo in range(int(rng.integers(1, 9)))]
    frame = pd.DataFrame(rows, columns=["image_name", "age", "gender", "ethnicity", "subject"])
    splits = split_dataset.subject_split(frame, 0.1, 0.1, seed=42)
    people = [set(split["subject"]) for split in splits.values()]
    assert not (people[0] & people[1] or people[0] & people[2] or people[1] & people[2])
    assert sum(map(len, splits.values())) == len(frame)
    for name in ("valid", "test"):
        assert abs(len(splits[name]) / len(frame) - 0.1) < 0.03
        for decade in range(0, 80, 20):  # each age band's share follows the whole set's
            band = lambda part, low=decade: ((part["age"] >= low) & (part["age"] < low + 20)).mean()  # noqa: E731
            assert abs(band(splits[name]) - band(frame)) < 0.06, (name, decade)
    again = split_dataset.subject_split(frame.sample(frac=1, random_state=1), 0.1, 0.1, seed=42)
    assert all(again[name].equals(splits[name]) for name in splits)  # seeded, whatever the input order
    assert not split_dataset.subject_split(frame, 0.1, 0.1, seed=7)["test"].equals(splits["test"])
