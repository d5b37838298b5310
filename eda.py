"""Exploratory data analysis of a UTKFace folder, and the data set CSV every later stage reads.

Reads:  data_dir, a folder (searched recursively) of images named [age]_[gender]_[race]_[date&time].jpg,
        often with a trailing .chip.jpg (gender 0 male, 1 female; race 0 white, 1 black, 2 asian,
        3 indian, 4 others).
Writes: csv_dataset/utkface_dataset.csv (image_name relative to data_dir, age, gender, ethnicity),
        pics/eda_samples.png, pics/eda_histograms.png, pics/eda_gender_ethnicity.png,
        pics/eda_age_by_group.png; prints the gender x ethnicity table.

Malformed names (UTKFace has a few with a missing field) and unreadable images are counted and listed in
a warning, never fatal. Every age is kept (no silent dropping of the 85+ tail).

Run:  python eda.py --data_dir=data/UTKFace
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from config import Config, parse_config, print_config, save_figure
from custom_dataset_dataloader import (
    CSV_COLUMNS,
    ETHNICITIES,
    GENDERS,
    DataError,
    describe_read_error,
    load_image,
    write_dataset_csv,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MAX_AGE = 120  # ages above this are treated as a malformed name, not a person
_UTKFACE_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_[^_]+$")


def parse_utkface_name(file_name: str) -> tuple[int, str, str] | None:
    """'26_1_2_20170116174525125.jpg.chip.jpg' -> (26, 'female', 'asian'); None if the name is malformed."""
    stem = file_name.split(".", 1)[0]
    match = _UTKFACE_NAME.match(stem)
    if match is None:
        return None
    age, gender, race = (int(group) for group in match.groups())
    if not 0 <= age <= MAX_AGE or gender >= len(GENDERS) or race >= len(ETHNICITIES):
        return None
    return age, GENDERS[gender], ETHNICITIES[race]


def scan_folder(data_dir: str, check_images: bool = True) -> tuple[pd.DataFrame, list[str], dict[str, str]]:
    """Parse every image name under data_dir; return (frame sorted by name, malformed names, unreadable -> reason)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(
            f"data folder {root} does not exist. Download UTKFace (see README: 'Get the data') into "
            f"{root}, pass --data_dir=<your folder>, or run `python demo.py` for a generated data set."
        )
    files = sorted(
        path for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )
    rows, malformed, unreadable = [], [], {}
    iterator = files
    if check_images:
        from tqdm import tqdm

        iterator = tqdm(files, desc="checking images", leave=False, disable=None)
    for path in iterator:
        name = path.relative_to(root).as_posix()
        labels = parse_utkface_name(path.name)
        if labels is None:
            malformed.append(name)
            continue
        if check_images:
            try:
                load_image(path, 32)
            except Exception as error:  # noqa: BLE001 - any decoder failure: list the file, go on
                unreadable[name] = describe_read_error(error, path)
                continue
        rows.append((name, *labels))
    frame = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    if malformed:
        warnings.warn(f"{len(malformed)} file name(s) do not follow [age]_[gender]_[race]_[date].jpg and are "
                      f"skipped: {', '.join(malformed)}", stacklevel=2)
    if unreadable:
        listed = "\n  ".join(f"{name}: {reason}" for name, reason in unreadable.items())
        warnings.warn(f"{len(unreadable)} image(s) could not be decoded and are skipped:\n  {listed}", stacklevel=2)
    if frame.empty:
        raise DataError(
            f"no usable UTKFace images in {root} ({len(files)} image files, {len(malformed)} malformed names, "
            f"{len(unreadable)} unreadable). Point --data_dir at the folder of [age]_[gender]_[race]_*.jpg files."
        )
    return frame, malformed, unreadable


def plot_samples(frame: pd.DataFrame, data_dir: str, path: Path, seed: int, count: int = 25) -> None:
    import matplotlib.pyplot as plt

    picks = frame.sample(min(count, len(frame)), random_state=seed)
    columns = 5
    rows = int(np.ceil(len(picks) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (_, row) in zip(axes.flat, picks.iterrows(), strict=False):
        axis.imshow(load_image(Path(data_dir) / row.image_name, 128).transpose(1, 2, 0))
        axis.set_title(f"{row.age} y, {row.gender}\n{row.ethnicity}", fontsize=9)
    figure.suptitle("Random samples with their labels")
    save_figure(figure, path)


def plot_histograms(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4), gridspec_kw={"width_ratios": [3, 1, 2]})
    axes[0].hist(frame["age"], bins=np.arange(0, frame["age"].max() + 2), color="tab:blue")
    axes[0].set(title=f"Age (n={len(frame)}, mean {frame['age'].mean():.1f}, max {frame['age'].max()})",
                xlabel="age (years)", ylabel="images")
    for axis, column, names in ((axes[1], "gender", GENDERS), (axes[2], "ethnicity", ETHNICITIES)):
        counts = frame[column].value_counts().reindex(names, fill_value=0)
        axis.bar(counts.index, counts.values, color="tab:orange")
        axis.set(title=column.capitalize(), ylabel="images")
    save_figure(figure, path)


def gender_ethnicity_table(frame: pd.DataFrame) -> pd.DataFrame:
    table = pd.crosstab(frame["gender"], frame["ethnicity"], margins=True, margins_name="total")
    order = [name for name in ETHNICITIES if name in table.columns] + ["total"]
    rows = [name for name in GENDERS if name in table.index] + ["total"]
    return table.loc[rows, order]


def plot_crosstab(table: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    values = table.drop(index="total", columns="total")
    figure, axis = plt.subplots(figsize=(1.6 * values.shape[1] + 2, 1.2 * values.shape[0] + 1.5))
    image = axis.imshow(values.values, cmap="viridis")
    axis.set_xticks(range(values.shape[1]), values.columns)
    axis.set_yticks(range(values.shape[0]), values.index)
    for (row, column), count in np.ndenumerate(values.values):
        axis.text(column, row, str(count), ha="center", va="center", color="white", fontsize=10)
    figure.colorbar(image, ax=axis, label="images")
    axis.set_title("Gender x ethnicity")
    save_figure(figure, path)


def plot_age_by_group(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [2, 5]})
    for axis, column, names in ((axes[0], "gender", GENDERS), (axes[1], "ethnicity", ETHNICITIES)):
        present = [name for name in names if (frame[column] == name).any()]
        groups = [frame.loc[frame[column] == name, "age"].to_numpy() for name in present]
        axis.violinplot(groups, showextrema=False)
        axis.boxplot(groups, widths=0.15, showfliers=False)
        axis.set_xticks(range(1, len(present) + 1), present)
        axis.set(title=f"Age by {column} (violin + box)", ylabel="age (years)")
    save_figure(figure, path)


def main(cfg: Config) -> pd.DataFrame:
    """Scan data_dir, write the data set CSV and the EDA figures; return the data set frame."""
    import matplotlib

    matplotlib.use("Agg")
    print_config(cfg, "eda.py")
    frame, malformed, unreadable = scan_folder(cfg.data_dir, cfg.check_images)
    csv_path = Path(cfg.csv_dir) / "utkface_dataset.csv"
    write_dataset_csv(frame, csv_path)
    pics = Path(cfg.pics_dir)
    table = gender_ethnicity_table(frame)
    plot_samples(frame, cfg.data_dir, pics / "eda_samples.png", cfg.seed)
    plot_histograms(frame, pics / "eda_histograms.png")
    plot_crosstab(table, pics / "eda_gender_ethnicity.png")
    plot_age_by_group(frame, pics / "eda_age_by_group.png")
    ages = frame["age"]
    print(f"\n{len(frame)} images kept, {len(malformed)} malformed names, {len(unreadable)} unreadable images")
    print(f"age: min {ages.min()}, max {ages.max()}, mean {ages.mean():.1f}, median {ages.median():.0f}, "
          f"85+: {(ages >= 85).sum()} images")
    print(f"\nGender x ethnicity:\n{table.to_string()}\n")
    print(f"wrote {csv_path}\nwrote figures eda_*.png in {pics}/")
    return frame


if __name__ == "__main__":
    main(parse_config(sys.argv[1:]))
