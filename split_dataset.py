"""Stratified, seeded train/valid/test split on age (or by subject).

Reads:  csv_dataset/<dataset_format>_dataset.csv (written by eda.py).
Writes: csv_dataset/train_set.csv, valid_set.csv, test_set.csv (same columns) and pics/split_age_histograms.png;
        prints the counts.

Stratification: neighbouring ages are merged into bins until each bin holds at least min_images_per_age_bin
images (so ages with one or two images never break the split), then every bin is shuffled with the seed and
cut 80/10/10 (valid_fraction / test_fraction). The same CSV and seed give byte-identical split files.
With --subject_split (data sets with identities: FG-NET, AgeDB, MORPH), scikit-learn's StratifiedGroupKFold
keeps each person in one split and stratifies on the same age bins at once. With --match_split_of=<csv_dir>, an
image whose file name appears in that folder's split files goes to the same split (a second copy of the same
faces, e.g. UTKFace at 200 px beside the 64 px copy; see matched_split); the others are split as above.
A data set that comes with its own split (official_split: FairFace's train/val, All-Age-Faces' train/val lists)
keeps it: the release's test part is the test split, never trained on, and valid is drawn from its train part.
Binned rows (FairFace) are stratified by their bin's lower bound.
With --combine=<csv_dir>,<csv_dir>,... the split files of several data sets (align.py's aligned ones, which share
one data_dir) are concatenated into csv_dir, each row keeping its `source`: one training on a mix of data sets.

Run:  python split_dataset.py [--seed=42] [--valid_fraction=0.1] [--test_fraction=0.1]
      python split_dataset.py --combine=csv_dataset/utk/aligned,csv_dataset/fairface/aligned --csv_dir=csv_dataset/mix
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from config import Config, parse_config, print_config
from custom_dataset_dataloader import (
    SPLITS,
    DataError,
    check_disjoint_splits,
    dataset_csv_path,
    drop_repeated_rows,
    read_dataset_csv,
    split_csv_path,
    stratification_ages,
)
from files import check_writable_folders, claim_outputs, folder_lock, save_figure, write_csvs


def age_bins(ages: np.ndarray, min_count: int) -> np.ndarray:
    """Bin index per image: consecutive ages merged until each bin has >= min_count images (the last
    bin absorbs a short remainder). Depends only on the age counts, so it is deterministic."""
    unique_ages, counts = np.unique(ages, return_counts=True)
    bin_of_age, current, filled = {}, 0, 0
    for age, count in zip(unique_ages, counts, strict=False):
        bin_of_age[age] = current
        filled += count
        if filled >= min_count:
            current, filled = current + 1, 0
    if 0 < filled < min_count and current > 0:  # a short last bin joins the previous one
        for age in unique_ages[::-1]:
            if bin_of_age[age] != current:
                break
            bin_of_age[age] = current - 1
    return np.array([bin_of_age[age] for age in ages])


def stratified_split(
    frame: pd.DataFrame, valid_fraction: float, test_fraction: float, seed: int, min_per_bin: int
) -> dict[str, pd.DataFrame]:
    """Split `frame` per age bin; each split keeps the input's row order (sorted by image name).

    Hand-written, not scikit-learn's train_test_split(stratify=bins): sklearn rounds the test and valid counts of
    the whole set and then shares them out over the bins, so a bin can get one image more in valid and test and two
    fewer in train than its own 80/10/10 (measured: 712 of 1,500 random age lists broke "every bin within one image
    of 80/10/10", tests/test_properties.py); rounding per bin keeps every bin, including the rare-age ones, exact."""
    frame = frame.sort_values("image_name", kind="stable").reset_index(drop=True)
    bins = age_bins(stratification_ages(frame), min_per_bin)
    generator = np.random.default_rng(seed)
    assignment = np.empty(len(frame), dtype=object)
    for bin_index in np.unique(bins):
        members = np.flatnonzero(bins == bin_index)
        generator.shuffle(members)
        count = len(members)
        test_count = round(count * test_fraction)
        valid_count = round(count * valid_fraction)
        if count >= 3:  # every split sees every bin that can be shared three ways
            test_count, valid_count = max(test_count, 1), max(valid_count, 1)
        assignment[members[:test_count]] = "test"
        assignment[members[test_count:test_count + valid_count]] = "valid"
        assignment[members[test_count + valid_count:]] = "train"
    return {split: frame[assignment == split].reset_index(drop=True) for split in SPLITS}


def subject_split(
    frame: pd.DataFrame, valid_fraction: float, test_fraction: float, seed: int, min_per_bin: int = 10
) -> dict[str, pd.DataFrame]:
    """Split by subject with scikit-learn's StratifiedGroupKFold: all images of one person land in one split
    (images of one person on both sides inflate the test score) while each split's ages follow the whole set's
    (stratified on the age bins of age_bins). The test split is the first of round(1 / test_fraction) folds, the
    valid split the first of round((1 - test_fraction) / valid_fraction) folds of the rest, so the shares are
    1/k approximations of the fractions (0.1 -> exactly 1/10)."""
    from sklearn.model_selection import StratifiedGroupKFold

    frame = frame.sort_values("image_name", kind="stable").reset_index(drop=True)
    subjects = frame["subject"].astype(str).to_numpy()
    bins = age_bins(stratification_ages(frame), min_per_bin)

    def first_fold(rows: np.ndarray, folds: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows kept, rows held out): the held-out part is one fold of `folds`."""
        if len(np.unique(subjects[rows])) < folds:
            raise DataError(f"--subject_split needs at least {folds} subjects for these fractions; the data set "
                            f"has {len(np.unique(subjects[rows]))} (lower --valid_fraction/--test_fraction)")
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        with warnings.catch_warnings():  # a rare-age bin smaller than the fold count is expected, not a problem
            warnings.filterwarnings("ignore", "The least populated class", UserWarning)
            kept, held_out = next(splitter.split(rows, bins[rows], subjects[rows]))
        return rows[kept], rows[held_out]

    rest, test = first_fold(np.arange(len(frame)), max(2, round(1 / test_fraction)))
    train, valid = first_fold(rest, max(2, round((1 - test_fraction) / valid_fraction)))
    return {name: frame.iloc[np.sort(rows)].reset_index(drop=True)
            for name, rows in (("train", train), ("valid", valid), ("test", test))}


def plot_split_histograms(splits: dict[str, pd.DataFrame], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    # binned rows are drawn at their bin's lower bound
    labelled = pd.concat([split.assign(split=f"{name} ({len(split)})", age=stratification_ages(split))
                          for name, split in splits.items()])
    max_age = int(labelled["age"].max())
    figure, axis = plt.subplots(figsize=(10, 4))
    sns.histplot(data=labelled, x="age", hue="split", bins=np.arange(0, max_age + 2), stat="density",
                 common_norm=False, element="step", fill=False, linewidth=1.5, ax=axis)
    axis.set(title="Age distribution per split (density)", xlabel="age (years)", ylabel="share of images")
    save_figure(figure, path, record=True)


def matched_split(frame: pd.DataFrame, reference: dict[str, pd.DataFrame], cfg: Config) -> dict[str, pd.DataFrame]:
    """Each row of `frame` in the split where `reference` (split name -> its rows) holds an image of the same file
    name, in any folder: another copy of the same face (UTKFace at 64 and at 200 px) stays in its copy's split, so
    no face is trained on and tested at two resolutions. Rows without a copy there are split as usual."""
    split_of = {}
    for name, rows in reference.items():
        for image_name in rows["image_name"]:
            split_of.setdefault(Path(str(image_name)).name, name)
    assigned = frame["image_name"].map(lambda image_name: split_of.get(Path(str(image_name)).name))
    splits = {name: frame[assigned == name] for name in SPLITS}
    rest = frame[assigned.isna()]
    if len(rest):
        fresh = stratified_split(rest, cfg.valid_fraction, cfg.test_fraction, cfg.seed, cfg.min_images_per_age_bin)
        splits = {name: pd.concat([splits[name], fresh[name]]).sort_values("image_name", kind="stable")
                  for name in SPLITS}
    return {name: split.reset_index(drop=True) for name, split in splits.items()}


def official_split(frame: pd.DataFrame, cfg: Config) -> dict[str, pd.DataFrame]:
    """The release's own split kept: its test rows (official_split "test": FairFace's val, AAF's val list) are the
    test split; valid_fraction of its train rows, stratified on age, are the valid split; the rest train."""
    is_test = frame["official_split"].astype(str).str.strip().str.lower().eq("test")
    parts = stratified_split(frame[~is_test], cfg.valid_fraction, 0.0, cfg.seed, cfg.min_images_per_age_bin)
    # with no test share asked, a bin's one image stratified_split still gives "test" stays in train
    train = pd.concat([parts["train"], parts["test"]]).sort_values("image_name", kind="stable")
    return {"train": train.reset_index(drop=True), "valid": parts["valid"],
            "test": frame[is_test].sort_values("image_name", kind="stable").reset_index(drop=True)}


def combined_splits(folders: list[str], max_age: int) -> dict[str, pd.DataFrame]:
    """The split files of several csv_dirs concatenated split by split, each row with its `source` (the row's own,
    else the folder's name). Their image names must be relative to one data_dir (align.py's aligned_dir)."""
    splits = {name: [] for name in SPLITS}
    for folder in folders:
        for name in SPLITS:
            rows = read_dataset_csv(Path(folder) / f"{name}_set.csv", max_age)
            if "source" not in rows:
                rows = rows.assign(source=Path(folder).name)
            splits[name].append(rows)
    combined = {name: pd.concat(parts, ignore_index=True) for name, parts in splits.items()}
    check_disjoint_splits(combined, f"--combine={','.join(folders)} (combine split folders of different data sets)")
    return combined


SETTINGS = ("data_dir", "dataset_format", "csv_dir", "pics_dir", "valid_fraction", "test_fraction",
            "min_images_per_age_bin", "match_split_of", "subject_split", "combine", "max_age", "seed")  # its --help


def main(cfg: Config) -> dict[str, pd.DataFrame]:
    """Write the three split CSVs and their histogram figure; return the splits."""
    print_config(cfg, "split_dataset.py", SETTINGS)
    check_writable_folders(cfg, ("csv_dir", "pics_dir"))
    outputs = [split_csv_path(cfg, name) for name in SPLITS]
    figure_path = Path(cfg.pics_dir) / "split_age_histograms.png"
    # a user's own train_set.csv or figure of the same name is never replaced (files.py)
    inputs = [dataset_csv_path(cfg), *(Path(folder) / f"{name}_set.csv" for folder in combine_folders(cfg)
                                       for name in SPLITS)]
    claim_outputs([*outputs, figure_path], inputs, "split_dataset.py")
    with folder_lock(cfg.csv_dir, "split_dataset.py"):
        splits = make_splits(cfg)
        check_disjoint_splits(splits, f"the splits made for {cfg.csv_dir}")
        write_csvs(list(splits.values()), outputs, record=True)  # the three files as one: all or none
    plot_split_histograms(splits, figure_path)
    total = sum(len(split) for split in splits.values())
    for name, split in splits.items():
        print(f"{name:>5}: {len(split):6d} images ({len(split) / total:5.1%}), mean age (a bin's lower bound for "
              f"bins) {stratification_ages(split).mean():.1f} -> {split_csv_path(cfg, name)}")
        if "source" in split:
            counts = split["source"].value_counts()
            print("       " + ", ".join(f"{source} {count}" for source, count in counts.items()))
    print(f"wrote {figure_path}")
    return splits


def combine_folders(cfg: Config) -> list[str]:
    """--combine's csv_dirs ([] without it)."""
    return [folder.strip() for folder in cfg.combine.split(",") if folder.strip()]


def make_splits(cfg: Config) -> dict[str, pd.DataFrame]:
    """The three splits of the data set CSV (or of --combine's split files), by the rule the settings choose."""
    if cfg.combine:
        splits = combined_splits(combine_folders(cfg), cfg.max_age)
        frame = pd.concat(splits.values(), ignore_index=True)
    else:
        frame = read_dataset_csv(dataset_csv_path(cfg), cfg.max_age)
        frame = drop_repeated_rows(frame, dataset_csv_path(cfg))
    if cfg.combine:
        pass  # each data set's own split, as its split files have it
    elif "official_split" in frame and frame["official_split"].notna().any():
        splits = official_split(frame, cfg)
    elif cfg.match_split_of:
        reference = {name: read_dataset_csv(Path(cfg.match_split_of) / f"{name}_set.csv") for name in SPLITS}
        splits = matched_split(frame, reference, cfg)
    elif cfg.subject_split:
        if "subject" not in frame:
            raise DataError(f"--subject_split needs a subject column, which {dataset_csv_path(cfg)} lacks "
                            "(FG-NET, AgeDB and --labels_csv with a subject column have one)")
        splits = subject_split(frame, cfg.valid_fraction, cfg.test_fraction, cfg.seed, cfg.min_images_per_age_bin)
    else:
        splits = stratified_split(frame, cfg.valid_fraction, cfg.test_fraction, cfg.seed,
                                  cfg.min_images_per_age_bin)
    empty = [name for name, split in splits.items() if split.empty]
    if empty:
        raise DataError(f"{dataset_csv_path(cfg)} has {len(frame)} usable image(s), too few for a non-empty "
                        f"{' and '.join(empty)} split; add images or raise --valid_fraction/--test_fraction")
    return splits


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], reads=SETTINGS))
