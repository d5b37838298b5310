"""Property tests (hypothesis) of the file-name parser, the stratified split and the crop geometry."""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eda
import split_dataset
from faces import CropGeometry


@given(st.integers(0, 120), st.integers(0, 1), st.integers(0, 4), st.text("0123456789", min_size=1, max_size=20),
       st.sampled_from([".jpg", ".jpg.chip.jpg", ".png", ".JPG"]))
def test_every_valid_name_parses_back(age, gender, race, stamp, suffix):
    parsed = eda.parse_utkface_name(f"{age}_{gender}_{race}_{stamp}{suffix}")
    assert parsed == (age, eda.GENDERS[gender], eda.ETHNICITIES[race])


@given(st.text(max_size=60))
def test_any_name_parses_or_is_rejected_never_crashes(name):
    parsed = eda.parse_utkface_name(name)
    assert parsed is None or (0 <= parsed[0] <= eda.MAX_AGE and parsed[1] in eda.GENDERS)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 116), min_size=1, max_size=400), st.integers(0, 10_000))
def test_split_partitions_and_stratifies(ages, seed):
    frame = pd.DataFrame({"image_name": [f"{index:05d}.jpg" for index in range(len(ages))], "age": ages,
                          "gender": "male", "ethnicity": "white"})
    splits = split_dataset.stratified_split(frame, 0.1, 0.1, seed=seed, min_per_bin=10)
    names = [set(split["image_name"]) for split in splits.values()]
    assert sum(map(len, names)) == len(frame) and set.union(*names) == set(frame["image_name"])
    ordered = frame.sort_values("image_name")
    bins = split_dataset.age_bins(ordered["age"].to_numpy(), 10)
    for bin_index in np.unique(bins):
        members = set(ordered["image_name"].to_numpy()[bins == bin_index])
        counts = {name: len(members & split_names) for name, split_names in zip(splits, names, strict=True)}
        total = len(members)
        if total >= 3:
            assert min(counts.values()) >= 1  # every bin is in every split
        if total >= 5:
            for name, share in (("train", 0.8), ("valid", 0.1), ("test", 0.1)):
                assert abs(counts[name] - share * total) <= 1, (name, counts, total)


@given(
    st.tuples(st.floats(-500, 2000), st.floats(-500, 2000), st.floats(5, 1000), st.floats(5, 1000)),
    st.floats(-0.5, 0.5), st.floats(-0.5, 0.5), st.floats(0.3, 3.0),
)
def test_crop_geometry_round_trips_through_any_box(box, center_dx, center_dy, scale):
    geometry = CropGeometry(center_dx, center_dy, scale)
    crop = geometry.crop_box(box)
    assert crop[2] == pytest.approx(scale * box[2])
    recovered = CropGeometry.relating(box, crop)
    assert recovered.center_dx == pytest.approx(center_dx, abs=1e-6)
    assert recovered.center_dy == pytest.approx(center_dy, abs=1e-6)
    assert recovered.scale == pytest.approx(scale, rel=1e-9)
