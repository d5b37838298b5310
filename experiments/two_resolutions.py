"""Build the split files of UTKFace's 64 px copy and its 200 px originals trained together.

Reads:  csv_dataset/utkface_dataset.csv and its split files (eda.py + split_dataset.py on ../shared/data/utkface64)
        and csv_dataset/utk200/utkface_dataset.csv (eda.py on ../shared/data/utkface200).
Writes: csv_dataset/utk64_200/utkface_dataset.csv (both sets, file names relative to their common parent
        ../shared/data) and its split files, where each 200 px face sits in the split of its 64 px copy (matched by
        UTKFace file name: split_dataset.matched_split), so no face is trained at one resolution and tested at
        the other; the 64 px test split is exactly the one every other run reports.

Run:  python -m experiments.two_resolutions [--data_dir=../shared/data] [--csv_dir=csv_dataset/utk64_200]
then  python train.py --data_dir=../shared/data --csv_dir=csv_dataset/utk64_200 ...
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd

import split_dataset
from config import Config, parse_config
from custom_dataset_dataloader import dataset_csv_path, read_dataset_csv, write_dataset_csv

# folder under data_dir -> the csv_dir eda.py wrote its data set CSV into (the first one's splits are the reference)
SOURCES = {"utkface64": "csv_dataset", "utkface200": "csv_dataset/utk200"}
DEFAULTS = {"data_dir": "../shared/data", "csv_dir": "csv_dataset/utk64_200", "pics_dir": "runs/utk64_200_pics"}


def main(cfg: Config) -> dict[str, pd.DataFrame]:
    """Write the combined data set CSV and its matched split files; return the splits."""
    frames = []
    for folder, csv_dir in SOURCES.items():
        if not (Path(cfg.data_dir) / folder).is_dir():
            raise SystemExit(f"error: {Path(cfg.data_dir) / folder} is not a folder; pass --data_dir=<the folder "
                             f"holding {' and '.join(SOURCES)}>")
        frame = read_dataset_csv(dataset_csv_path(replace(cfg, csv_dir=csv_dir)), cfg.max_age)
        frames.append(frame.assign(image_name=folder + "/" + frame["image_name"].astype(str)))
    combined = pd.concat(frames, ignore_index=True)
    write_dataset_csv(combined, dataset_csv_path(cfg))
    print(f"wrote {dataset_csv_path(cfg)}: {len(combined)} images from {', '.join(SOURCES)}")
    return split_dataset.main(replace(cfg, match_split_of=next(iter(SOURCES.values()))))


def parse_arguments(arguments: list[str]) -> Config:
    """parse_config with DEFAULTS for the keys the command line leaves out."""
    given = {argument.split("=", 1)[0] for argument in arguments}
    return parse_config([f"--{key}={value}" for key, value in DEFAULTS.items() if f"--{key}" not in given] + arguments,
                        reads=split_dataset.SETTINGS)


if __name__ == "__main__":
    main(parse_arguments(sys.argv[1:]))
