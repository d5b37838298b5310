"""Exploratory data analysis of a face data set, and the data set CSV every later stage reads.

Reads:  data_dir in one of these layouts (--dataset_format), searched recursively:
        utkface    [age]_[gender]_[race]_[date&time].jpg, often with a trailing .chip.jpg (gender 0 male,
                   1 female; race 0 white, 1 black, 2 asian, 3 indian, 4 others)
        fgnet      FG-NET's images/001A02.JPG: subject 001 at age 2 (a trailing letter marks a second photo)
        agedb      AgeDB's 0_MariaCallas_35_f.jpg: id, name (the subject), age, gender
        appa_real  APPA-REAL's release folder: gt_avg_{train,valid,test}.csv (real and apparent age) with the
                   images in {train,valid,test}/, the aligned *_face.jpg crop preferred; gender and race from
                   allcategories_*.csv when present
        fairface   FairFace's release: fairface_label_{train,val}.csv (file, age, gender, race, service_test)
                   beside the train/ and val/ folders, or one labels.csv of the same columns (race optional);
                   the age is a bin ("0-2" ... "more than 70"), kept as the age_bin column, never made exact
        aaf        All-Age-Faces: "original images/NNNNNAaa.jpg" (person NNNNN, age aa: head crops) with the
                   release's own lists "image sets/{train,val}.txt" (name gender, 0 female), kept as official_split
        csv        any other set (MORPH II, a plain folder): --labels_csv names a CSV with an image path
                   column (image_name, path or file; relative to data_dir) and age, optionally gender,
                   ethnicity and subject
Writes: csv_dataset/<dataset_format>_dataset.csv (image_name relative to data_dir, age, gender, ethnicity,
        and subject / apparent_age where the set has them), pics/eda_samples.png, pics/eda_histograms.png,
        pics/eda_gender_ethnicity.png, pics/eda_age_by_group.png; prints the gender x ethnicity table.

Malformed names (UTKFace has a few with a missing field) and unreadable images are counted and listed in
a warning, never fatal. Every age is kept (no silent dropping of the 85+ tail). Labels a set lacks are
written as "unknown".

Run:  python eda.py --data_dir=data/UTKFace
      python eda.py --dataset_format=fgnet --data_dir=data/FGNET --csv_dir=csv_dataset/fgnet
      python eda.py --dataset_format=csv --data_dir=data/MORPH --labels_csv=data/MORPH/labels.csv
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from config import Config, parse_config, print_config
from custom_dataset_dataloader import (
    CSV_COLUMNS,
    ETHNICITIES,
    GENDERS,
    IMAGE_SUFFIXES,
    DataError,
    age_bin_bounds,
    check_image_names,
    dataset_csv_path,
    decode_images,
    first_of,
    is_binned,
    load_image,
    read_csv_file,
    write_dataset_csv,
)
from files import atomic_write_path, check_writable_folders, claim_outputs, folder_lock, save_figure

MAX_AGE = 120  # ages above this are treated as a malformed name, not a person (above cfg.max_age: left out, named)
_UTKFACE_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_[^_]+$")
_FGNET_NAME = re.compile(r"^(\d{3})A(\d{2})[a-z]?$", re.IGNORECASE)
_GENDER_WORDS = {"m": "male", "male": "male", "0": "male", "f": "female", "female": "female", "1": "female"}
_APPA_RACES = {"caucasian": "white", "afroamerican": "black", "asian": "asian"}


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


def parse_fgnet_name(file_name: str) -> tuple[int, str, str, str] | None:
    """'001A02.JPG' -> (2, 'unknown', 'unknown', '001'): age, gender, ethnicity, subject; None if malformed."""
    match = _FGNET_NAME.match(Path(file_name).stem)
    if match is None:
        return None
    return int(match.group(2)), "unknown", "unknown", match.group(1)


def parse_agedb_name(file_name: str) -> tuple[int, str, str, str] | None:
    """'0_MariaCallas_35_f.jpg' -> (35, 'female', 'unknown', 'MariaCallas'); None if malformed."""
    parts = Path(file_name).stem.split("_")
    if len(parts) < 4 or not parts[0].isdigit() or not parts[-2].isdigit():
        return None
    age, gender = int(parts[-2]), _GENDER_WORDS.get(parts[-1].lower())
    if gender is None or not 0 <= age <= MAX_AGE:
        return None
    return age, gender, "unknown", "_".join(parts[1:-2])


DATASET_NAMES = {"utkface": "UTKFace", "fgnet": "FG-NET", "agedb": "AgeDB", "appa_real": "APPA-REAL",
                 "fairface": "FairFace", "aaf": "All-Age-Faces", "csv": "labelled"}
# FairFace's seven race labels onto UTKFace's five ethnicities (Latino/Hispanic and Middle Eastern are UTKFace's
# "others"; East and Southeast Asian its "asian")
FAIRFACE_RACES = {"white": "white", "black": "black", "indian": "indian", "east asian": "asian",
                  "southeast asian": "asian", "latino_hispanic": "others", "middle eastern": "others"}
NAME_PARSERS = {"utkface": parse_utkface_name, "fgnet": parse_fgnet_name, "agedb": parse_agedb_name}


def list_images(root: Path) -> list[str]:
    """Every image file under root, recursively, as '/'-separated paths relative to root, sorted part by part like
    pathlib's paths, hidden files and folders left out, symlinked folders not followed (as Path.rglob). os.scandir
    rather than rglob: its directory entries already know which are files, where rglob built and stat-ed a Path
    per file (RESULTS.md, "Scale"). A sub-folder that cannot be read is named in one warning and left out."""
    names, folders, unreadable = [], [("", str(root))], []
    while folders:
        prefix, folder = folders.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        folders.append((f"{prefix}{entry.name}/", entry.path))
                    elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and entry.is_file():
                        names.append(prefix + entry.name)
        except OSError as error:
            if not prefix:  # the data folder itself: nothing to list
                raise DataError(f"--data_dir={root} cannot be read ({type(error).__name__}: "
                                f"{error.strerror or error})") from None
            unreadable.append(f"{prefix} ({error.strerror or type(error).__name__})")
    if unreadable:
        warnings.warn(f"{len(unreadable)} folder(s) under {root} cannot be read and are left out: "
                      f"{first_of(sorted(unreadable), limit=10)}", stacklevel=2)
    return sorted(names, key=lambda name: name.split("/"))


def _gender(value: object) -> str:
    return _GENDER_WORDS.get(str(value).strip().lower(), "unknown")


def _ethnicity(value: object) -> str:
    text = str(value).strip().lower()
    text = _APPA_RACES.get(text, text)
    if text.isdigit() and int(text) < len(ETHNICITIES):
        return ETHNICITIES[int(text)]
    return text if text in ETHNICITIES else "unknown"


def read_appa_real(root: Path) -> tuple[list[tuple], list[str]]:
    """Rows (image_name, real age, gender, ethnicity, apparent age) of an APPA-REAL release folder, and the
    label rows whose image is missing."""
    rows, missing = [], []
    label_files = sorted(root.glob("gt_avg_*.csv"))
    if not label_files:
        raise DataError(f"no gt_avg_*.csv in {root}; pass the APPA-REAL release folder (appa-real-release/)")
    for label_file in label_files:
        split = label_file.stem.removeprefix("gt_avg_")
        labels = read_csv_file(label_file, dtype={"file_name": str})
        needed = [column for column in ("file_name", "real_age", "apparent_age_avg") if column not in labels]
        if needed:
            raise DataError(f"{label_file} lacks the column(s) {needed} of an APPA-REAL gt_avg file; it has "
                            f"{list(labels.columns)}")
        categories_file = root / f"allcategories_{split}.csv"
        categories = read_csv_file(categories_file).set_index("file") if categories_file.is_file() else None
        for line, row in enumerate(labels.itertuples(index=False), start=2):
            ages = pd.to_numeric(pd.Series([row.real_age, row.apparent_age_avg]), errors="coerce")
            if pd.isna(row.file_name) or ages.isna().any() or not 0 <= ages[0] <= MAX_AGE:
                missing.append(f"{label_file.name} line {line} (no image name or no valid age)")
                continue
            face = root / split / f"{row.file_name}_face.jpg"
            path = face if face.is_file() else root / split / row.file_name
            if not path.is_file():
                missing.append(f"{split}/{row.file_name}")
                continue
            gender = ethnicity = "unknown"
            if categories is not None and row.file_name in categories.index:
                gender = _gender(categories.at[row.file_name, "gender"])
                ethnicity = _ethnicity(categories.at[row.file_name, "race"])
            rows.append((path.relative_to(root).as_posix(), round(float(ages[0])), gender, ethnicity,
                         float(ages[1])))
    return rows, missing


def read_fairface(root: Path, labels_csv: str = "") -> tuple[list[tuple], list[str]]:
    """Rows (image_name, age NaN, gender, ethnicity, age bin) of FairFace's label files (--labels_csv, else
    root/fairface_label_*.csv, else root/labels.csv), and the label rows without an image or a readable bin."""
    label_files = ([Path(labels_csv)] if labels_csv else sorted(root.glob("fairface_label_*.csv"))
                   or [root / "labels.csv"])
    rows, bad = [], []
    for label_file in label_files:
        if not label_file.is_file():
            raise DataError(f"no FairFace labels in {root}: expected fairface_label_train.csv / "
                            "fairface_label_val.csv or labels.csv (file,age,gender[,race]); pass --labels_csv=...")
        labels = read_csv_file(label_file, dtype=str)
        labels.columns = [column.strip().lower() for column in labels.columns]
        needed = [column for column in ("file", "age") if column not in labels]
        if needed:
            raise DataError(f"{label_file} lacks the column(s) {needed} of FairFace's labels "
                            f"(file,age,gender,race,service_test); it has {list(labels.columns)}")
        for line, row in enumerate(labels.to_dict("records"), start=2):
            name, label = str(row["file"]).strip(), str(row["age"]).strip()
            try:
                age_bin_bounds(label)
            except ValueError:
                bad.append(f"{label_file.name} line {line} ({name}: age {label!r} is not a bin)")
                continue
            if not (root / name).exists():  # where it leads is checked by scan_folder
                bad.append(f"{label_file.name} line {line} ({name}: no such image)")
                continue
            race = FAIRFACE_RACES.get(str(row.get("race", "")).strip().lower(), "unknown")
            # the release's own split (train / val, where val is never trained on), kept for split_dataset.py
            official = {"fairface_label_train": "train", "fairface_label_val": "test"}.get(label_file.stem, "")
            rows.append((name, np.nan, _gender(row.get("gender", "")), race, label, official))
    return rows, bad


_AAF_NAME = re.compile(r"^(\d{5})A(\d{2})\.jpg$", re.IGNORECASE)
AAF_IMAGES = "original images"  # the head crops (the release's "aglined faces" are aligned to a template of its own)


def read_aaf(root: Path) -> tuple[list[tuple], list[str]]:
    """Rows (image_name, age, gender, ethnicity, subject, official split) of an All-Age-Faces release folder from
    its lists "image sets/train.txt" and "val.txt" (`name gender`; the release's rule: 0 female, 1 male), and the
    list lines without an image or a readable name. The age is in the name (00123A45.jpg: person 00123, 45 years).
    AAF states no ethnicity (its faces are mostly East Asian), so it is "unknown"."""
    rows, bad = [], []
    lists = {"train": root / "image sets" / "train.txt", "test": root / "image sets" / "val.txt"}
    if not all(path.is_file() for path in lists.values()):
        raise DataError(f"no All-Age-Faces lists in {root}: expected 'image sets/train.txt' and 'image sets/val.txt' "
                        f"beside '{AAF_IMAGES}/'; pass the release folder (the one extract.sh aaf wrote)")
    for split, path in lists.items():
        for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            match = _AAF_NAME.match(parts[0])
            gender = {"0": "female", "1": "male"}.get(parts[1] if len(parts) > 1 else "", "unknown")
            image_name = f"{AAF_IMAGES}/{parts[0]}"
            if match is None or not (root / image_name).exists():
                bad.append(f"{path.name} line {line_number} ({parts[0]}: no such image or not NNNNNAaa.jpg)")
                continue
            rows.append((image_name, int(match[2]), gender, "unknown", match[1], split))
    return rows, bad


def read_labels_csv(root: Path, labels_csv: str) -> tuple[list[tuple], list[str]]:
    """Rows (image_name, age, gender, ethnicity, subject) from a CSV of image paths and ages, and the rows
    whose image is missing or whose age is not a number."""
    path = Path(labels_csv)
    if not path.is_file():
        raise DataError(f"--labels_csv={labels_csv} is not a file; give a CSV with an image path and an age column")
    table = read_csv_file(path, dtype=str)
    table.columns = [column.strip().lower() for column in table.columns]
    path_column = next((column for column in ("image_name", "path", "file", "filename") if column in table), None)
    if path_column is None or "age" not in table:
        raise DataError(f"{path} needs an image path column (image_name, path or file) and an age column; "
                        f"it has {list(table.columns)}")
    rows, bad = [], []
    for row in table.itertuples(index=False):
        row = row._asdict()
        name, age = str(row[path_column]).strip(), pd.to_numeric(row["age"], errors="coerce")
        if pd.isna(age) or not 0 <= age <= MAX_AGE or not (root / name).exists():  # where it leads: scan_folder
            bad.append(name)
            continue
        subject = row.get("subject")
        rows.append((name, round(float(age)), _gender(row.get("gender", "")), _ethnicity(row.get("ethnicity", "")),
                     "" if subject is None or pd.isna(subject) else str(subject).strip()))
    return rows, bad


def _screen_paths(root: Path, labelled: list[tuple]) -> tuple[list[tuple], dict[str, str]]:
    """The labelled rows whose image is a regular file inside root (resolved, so a symlink or .. that leads out is
    refused before anything is opened), each file once; and refused name -> reason. A file listed twice (by any
    spelling of its path) keeps its first row: the same face must never reach two splits."""
    accepted, refusals = check_image_names(root, [row[0] for row in labelled])
    kept, refused, seen = [], {labelled[position][0]: f"refused: {why}" for position, why in refusals.items()}, {}
    for position, file in accepted.items():
        name, resolved = labelled[position][0], file.path
        if resolved in seen:
            refused[name] = f"the same file as {seen[resolved]!r}, listed again; its first row is kept"
            continue
        seen[resolved] = name
        kept.append(labelled[position])
    return kept, refused


def scan_folder(
    data_dir: str, check_images: bool = True, dataset_format: str = "utkface", labels_csv: str = "",
    num_workers: int = 0,
) -> tuple[pd.DataFrame, list[str], dict[str, str]]:
    """Read data_dir in its layout; return (frame sorted by name, malformed names or label rows, unreadable ->
    reason). Subject and apparent-age columns are added where the layout has them. The image check decodes in
    num_workers processes (0 = in this one)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(
            f"data folder {root} does not exist. Download UTKFace (see README: 'Get the data') into "
            f"{root}, pass --data_dir=<your folder>, or run `python demo.py` for a generated data set."
        )
    columns = list(CSV_COLUMNS)
    if dataset_format in NAME_PARSERS:
        parser, labelled, malformed = NAME_PARSERS[dataset_format], [], []
        for name in list_images(root):
            labels = parser(name.rsplit("/", 1)[-1])
            if labels is None:
                malformed.append(name)
            else:
                labelled.append((name, *labels))
        if dataset_format != "utkface":
            columns.append("subject")
    elif dataset_format == "appa_real":
        labelled, malformed = read_appa_real(root)
        columns.append("apparent_age")
    elif dataset_format == "fairface":
        labelled, malformed = read_fairface(root, labels_csv)
        columns += ["age_bin", "official_split"]
    elif dataset_format == "aaf":
        labelled, malformed = read_aaf(root)
        columns += ["subject", "official_split"]
    elif dataset_format == "csv":
        labelled, malformed = read_labels_csv(root, labels_csv)
        columns.append("subject")
    else:
        raise DataError(f"unknown dataset_format {dataset_format!r}")
    labelled, unreadable = _screen_paths(root, labelled)
    rows = labelled
    if check_images:  # decode each image (small: the decoder's draft mode) in worker processes; keep the good ones
        rows = []
        for index, _, reason in decode_images([root / row[0] for row in labelled], 32, num_workers,
                                              description="checking images", keep_pixels=False):
            if reason:
                unreadable[labelled[index][0]] = reason
            else:
                rows.append(labelled[index])
    frame = pd.DataFrame(rows, columns=columns).sort_values("image_name", kind="stable").reset_index(drop=True)
    if "subject" in frame and (frame["subject"] == "").all():
        frame = frame.drop(columns="subject")
    if "official_split" in frame and (frame["official_split"] == "").all():
        frame = frame.drop(columns="official_split")
    if malformed:
        expected = {"utkface": "do not follow [age]_[gender]_[race]_[date].jpg", "fgnet": "do not follow 001A02.JPG",
                    "agedb": "do not follow id_name_age_gender.jpg"}.get(
            dataset_format, "have no image file or no valid age")
        warnings.warn(f"{len(malformed)} file name(s) or label row(s) {expected} and are skipped: "
                      f"{first_of(malformed)}", stacklevel=2)
    if unreadable:
        listed = first_of([f"{name}: {reason}" for name, reason in unreadable.items()], "\n  ")
        warnings.warn(f"{len(unreadable)} image(s) refused or not decodable, skipped:\n  {listed}", stacklevel=2)
    if frame.empty:
        raise DataError(
            f"no usable {DATASET_NAMES.get(dataset_format, dataset_format)} images in {root} ({len(labelled)} "
            f"labelled, {len(malformed)} malformed, {len(unreadable)} unreadable). Point --data_dir at the data "
            "set's folder and check --dataset_format (utkface expects [age]_[gender]_[race]_*.jpg files)."
        )
    return frame, malformed, unreadable


def write_text(path: Path, text: str) -> None:
    with atomic_write_path(path) as temporary:
        temporary.write_text(text)


def source_record(csv_path: Path) -> Path:
    """The file beside a data set CSV that names the data folder eda.py made it from."""
    return csv_path.with_name(f".{csv_path.name}.source.json")


def claim_dataset_csv(csv_path: Path, data_dir: str) -> None:
    """Stop before any work when csv_path holds another data folder's CSV: its split files beside it would no longer
    match. The folder comes from source_record; for a CSV without one (written before it existed, or by hand), from
    whether its first rows' images exist under data_dir."""
    if not csv_path.is_file():
        return
    wanted = Path(data_dir).resolve()
    record = source_record(csv_path)
    try:
        made_from = Path(json.loads(record.read_text())["data_dir"]) if record.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        made_from = None
    if made_from is None:
        try:
            names = read_csv_file(csv_path, dtype=str).get("image_name", pd.Series(dtype=str)).dropna().head(20)
        except DataError:
            names = pd.Series(dtype=str)
        if names.empty or any((wanted / name).exists() for name in names):
            return
        made_from = Path("another folder")
    if made_from != wanted:
        raise DataError(f"{csv_path} holds the data set CSV of {made_from}, and its split files may sit beside it; "
                        f"give {data_dir} its own --csv_dir (e.g. --csv_dir=csv_dataset/{wanted.name}), or remove "
                        "that CSV to replace it")


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
        age = f"{row.age_bin} y" if pd.isna(row.age) else f"{row.age} y"
        axis.set_title(f"{age}, {row.gender}\n{row.ethnicity}", fontsize=9)
    figure.suptitle("Random samples with their labels")
    save_figure(figure, path, record=True)


def plot_histograms(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4), gridspec_kw={"width_ratios": [3, 1, 2]})
    if is_binned(frame):  # one bar per bin, in age order
        counts = frame["age_bin"].value_counts()
        counts = counts.reindex(sorted(counts.index, key=age_bin_bounds))
        axes[0].bar(counts.index, counts.values, color="tab:blue")
        axes[0].set(title=f"Age bin (n={len(frame)})", xlabel="age bin (years)", ylabel="images")
    else:
        axes[0].hist(frame["age"], bins=np.arange(0, frame["age"].max() + 2), color="tab:blue")
        axes[0].set(title=f"Age (n={len(frame)}, mean {frame['age'].mean():.1f}, max {frame['age'].max()})",
                    xlabel="age (years)", ylabel="images")
    for axis, column, names in ((axes[1], "gender", GENDERS), (axes[2], "ethnicity", ETHNICITIES)):
        counts = frame[column].value_counts().reindex(names, fill_value=0)
        axis.bar(counts.index, counts.values, color="tab:orange")
        axis.set(title=column.capitalize(), ylabel="images")
    save_figure(figure, path, record=True)


def gender_ethnicity_table(frame: pd.DataFrame) -> pd.DataFrame:
    table = pd.crosstab(frame["gender"], frame["ethnicity"], margins=True, margins_name="total")
    order = [name for name in ETHNICITIES if name in table.columns] + ["total"]
    rows = [name for name in GENDERS if name in table.index] + ["total"]
    return table.loc[rows, order]


def plot_crosstab(table: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns

    values = table.drop(index="total", columns="total")
    figure, axis = plt.subplots(figsize=(1.6 * values.shape[1] + 2, 1.2 * values.shape[0] + 1.5))
    sns.heatmap(values, annot=True, fmt="d", cmap="viridis", cbar_kws={"label": "images"}, ax=axis)
    axis.set(title="Gender x ethnicity", xlabel="", ylabel="")
    save_figure(figure, path, record=True)


def plot_age_by_group(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns

    figure, axes = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [2, 5]})
    for axis, column, names in ((axes[0], "gender", GENDERS), (axes[1], "ethnicity", ETHNICITIES)):
        present = [name for name in names if (frame[column] == name).any()]
        if not present:  # the data set has no such label (AgeDB: no ethnicity)
            axis.set_visible(False)
            continue
        sns.violinplot(data=frame[frame[column].isin(present)], x=column, y="age", order=present, inner="box",
                       cut=0, color="tab:blue", ax=axis)
        axis.set(title=f"Age by {column} (violin + box)", xlabel="", ylabel="age (years)")
    save_figure(figure, path, record=True)


def without_older_than(frame: pd.DataFrame, max_age: int) -> pd.DataFrame:
    """`frame` without the images labelled older than max_age, which split_dataset.py and training would refuse:
    they are named in one warning, with the setting that keeps them."""
    older = frame["age"] > max_age
    if older.any():
        names = frame.loc[older, "image_name"].astype(str).tolist()
        warnings.warn(f"{len(names)} image(s) labelled older than max_age={max_age} left out ({', '.join(names[:5])}"
                      f"{', ...' if len(names) > 5 else ''}); pass --max_age={int(frame['age'].max())} to eda.py, "
                      "split_dataset.py and train.py to keep them", stacklevel=2)
    return frame.loc[~older].reset_index(drop=True)


SETTINGS = ("data_dir", "dataset_format", "labels_csv", "csv_dir", "pics_dir", "check_images", "num_workers",
            "max_age", "seed")  # what this script reads (its --help)


FIGURES = ("eda_samples.png", "eda_histograms.png", "eda_gender_ethnicity.png", "eda_age_by_group.png")  # in pics_dir


def main(cfg: Config) -> pd.DataFrame:
    """Scan data_dir, write the data set CSV and the EDA figures; return the data set frame."""
    import matplotlib

    matplotlib.use("Agg")
    print_config(cfg, "eda.py", SETTINGS)
    check_writable_folders(cfg, ("csv_dir", "pics_dir"))  # before every image is decoded, not after
    csv_path = dataset_csv_path(cfg)
    claim_dataset_csv(csv_path, cfg.data_dir)
    pics = Path(cfg.pics_dir)
    # a user's own CSV or figure of the same name is never replaced (files.py)
    claim_outputs([csv_path, *(pics / name for name in FIGURES)], [], "eda.py")
    with folder_lock(cfg.csv_dir, "eda.py"):
        frame, malformed, unreadable = scan_folder(cfg.data_dir, cfg.check_images, cfg.dataset_format,
                                                   cfg.labels_csv, cfg.num_workers)
        frame = without_older_than(frame, cfg.max_age)
        write_dataset_csv(frame, csv_path, record=True)
        write_text(source_record(csv_path), json.dumps({"data_dir": str(Path(cfg.data_dir).resolve())}) + "\n")
    table = gender_ethnicity_table(frame)
    plot_samples(frame, cfg.data_dir, pics / "eda_samples.png", cfg.seed)
    plot_histograms(frame, pics / "eda_histograms.png")
    if frame["gender"].isin(GENDERS).any() and frame["ethnicity"].isin(ETHNICITIES).any():
        plot_crosstab(table, pics / "eda_gender_ethnicity.png")
    binned = is_binned(frame)
    if not binned and (frame["gender"].isin(GENDERS).any() or frame["ethnicity"].isin(ETHNICITIES).any()):
        plot_age_by_group(frame, pics / "eda_age_by_group.png")
    ages = frame["age"]
    print(f"\n{len(frame)} images kept, {len(malformed)} malformed names, {len(unreadable)} unreadable images")
    if binned:
        counts = frame["age_bin"].value_counts()
        order = sorted(counts.index, key=age_bin_bounds)
        print("age bins: " + ", ".join(f"{label} {counts[label]}" for label in order))
    else:
        print(f"age: min {ages.min()}, max {ages.max()}, mean {ages.mean():.1f}, median {ages.median():.0f}, "
              f"85+: {(ages >= 85).sum()} images")
    print(f"\nGender x ethnicity:\n{table.to_string()}\n")
    print(f"wrote {csv_path}\nwrote figures eda_*.png in {pics}/")
    return frame


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], reads=SETTINGS))
