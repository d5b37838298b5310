"""Property tests (hypothesis) of the file-name parser, the stratified split and the crop geometry."""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eda
import split_dataset
from faces import DEFAULT_CROP_GEOMETRY


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


@given(st.floats(0.2, 5.0), st.floats(-3.1, 3.1), st.floats(-500, 2000), st.floats(-500, 2000), st.integers(16, 256))
def test_crop_transform_inverts_any_similarity(scale, angle, shift_x, shift_y, size):
    """Landmarks moved by any scale, rotation and shift are mapped back exactly onto the crop's landmark positions."""
    template = np.array(DEFAULT_CROP_GEOMETRY.landmarks) * size - 0.5  # (5, 2) crop pixel centres
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = template @ rotation.T + np.array([shift_x, shift_y]) + 0.5  # in a photo, continuous coordinates
    matrix = DEFAULT_CROP_GEOMETRY.transform(landmarks, size)  # (2, 3)
    mapped = (landmarks - 0.5) @ matrix[:, :2].T + matrix[:, 2]
    assert np.allclose(mapped, template, atol=1e-6 * max(1.0, size))
    assert np.hypot(*matrix[0, :2]) == pytest.approx(1 / scale, rel=1e-6)
