"""Ensembles (--checkpoint=a.pt,b.pt): every member sees the same aligned face through its own preprocessing, the
ages are the members' mean, distributions are mixed, and inference.py, app.py and analysis.errors run them and
name their members; export refuses them with a sentence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import app
import export_jit
import inference
from config import Config, parse_config
from faces import DEFAULT_CROP_GEOMETRY
from files import write_csv
from model import AgeEstimationModel, save_checkpoint


def _checkpoint(folder: Path, head: str, size: int, mean: float, seed: int) -> Path:
    cfg = Config(model_name="resnet18", pretrained=False, image_size=size, head=head)
    torch.manual_seed(seed)
    network = AgeEstimationModel("resnet18", image_size=size, head=head)
    network.set_age_statistics(mean, 15.0)
    torch.nn.init.normal_(network.head[1].weight, std=0.05)
    path = folder / f"{head}_{size}" / "best.pt"
    path.parent.mkdir(parents=True)
    save_checkpoint(path, network, cfg, crop_geometry=DEFAULT_CROP_GEOMETRY.to_dict())
    return path


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    """Two distribution heads (32 and 48 px) and a regression head (40 px), about different ages."""
    folder = tmp_path_factory.mktemp("members")
    return [_checkpoint(folder, "dex", 32, 25.0, 0), _checkpoint(folder, "dex", 48, 55.0, 1),
            _checkpoint(folder, "l1", 40, 40.0, 2)]


def test_the_mean_of_members_each_on_its_own_input_size(members):
    ensemble = inference.load_predictor(",".join(str(path) for path in members))
    assert isinstance(ensemble, inference.AgeEnsemble) and ensemble.image_size == 48
    crops = np.random.default_rng(0).integers(0, 255, (5, 3, 48, 48), dtype=np.uint8)  # (N, 3, S, S)
    answer = ensemble.predict_details(crops)
    alone = []
    for member in ensemble.members:
        pixels = torch.nn.functional.interpolate(torch.from_numpy(crops), size=(member.image_size,) * 2,
                                                 mode="bilinear", antialias=True, align_corners=False).numpy()
        alone.append(member.predict_details(pixels if member.image_size != 48 else crops))
    np.testing.assert_allclose(answer.ages, np.mean([one.ages for one in alone], axis=0), atol=1e-4)
    assert answer.spreads is None and answer.adult_probabilities is None  # the l1 member gives no distribution
    assert 25 < answer.ages.mean() < 55


def test_distributions_mix(members):
    ensemble = inference.load_predictor(members[:2])
    crops = np.random.default_rng(1).integers(0, 255, (4, 3, 48, 48), dtype=np.uint8)
    answer = ensemble.predict_details(crops)
    small = torch.nn.functional.interpolate(torch.from_numpy(crops), size=(32, 32), mode="bilinear", antialias=True)
    first, second = (member.predict_details(crops if member.image_size == 48 else small.numpy())
                     for member in ensemble.members)
    # the mixture of two distributions about 25 and 55 years is wider than either
    assert (answer.spreads > np.maximum(first.spreads, second.spreads)).all()
    expected = np.sqrt((first.spreads ** 2 + first.ages ** 2 + second.spreads ** 2 + second.ages ** 2) / 2
                       - answer.ages ** 2)
    np.testing.assert_allclose(answer.spreads, expected, rtol=1e-4)
    np.testing.assert_allclose(answer.adult_probabilities,
                               (first.adult_probabilities + second.adult_probabilities) / 2, atol=1e-6)


def test_inference_names_the_members_and_writes_their_mean(members, tmp_path, capsys):
    from PIL import Image

    photo = tmp_path / "face.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (60, 60, 3), dtype=np.uint8)).save(photo)
    both = ",".join(str(path) for path in members[:2])
    rows = inference.main(Config(checkpoint=both, input=str(photo), no_detect=True,
                                 output=str(tmp_path / "out.png")))
    shown = capsys.readouterr().out
    assert "the mean of 2 models" in shown and all(str(path) in shown for path in members[:2])
    singles = [inference.main(Config(checkpoint=str(path), input=str(photo), no_detect=True,
                                     output=str(tmp_path / f"out{index}.png")))[0]["age"]
               for index, path in enumerate(members[:2])]
    # each member alone resizes the whole photo to its size; in the ensemble the 32 px member gets the 48 px crop
    # shrunk: the same face, up to resampling
    assert rows[0]["age"] == pytest.approx(np.mean(singles), abs=0.5)
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert written[0]["age"] == pytest.approx(rows[0]["age"], abs=0.01)


def test_an_ensemble_annotates_a_folder(members, tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (60, 60, 3), dtype=np.uint8)).save(
            photos / f"face_{index}.png")
    both = ",".join(str(path) for path in members[:2])
    rows = inference.main(Config(checkpoint=both, input=str(photos), no_detect=True, output=str(tmp_path / "out"),
                                 tta=True))
    assert len(rows) == 3 and sorted(path.name for path in (tmp_path / "out").glob("*_age.jpg")) == [
        "face_0_age.jpg", "face_1_age.jpg", "face_2_age.jpg"]


def test_a_missing_member_or_an_export_is_one_sentence(members, tmp_path):
    with pytest.raises(SystemExit, match=r"missing.pt does not exist"):
        inference.load_predictor(f"{members[0]},{tmp_path / 'missing.pt'}")
    with pytest.raises(SystemExit, match=r"names several model files.*member by member"):
        export_jit.main(Config(checkpoint=f"{members[0]},{members[1]}", output=str(tmp_path / "x.onnx"),
                               format="onnx"))


def test_the_app_offers_the_ensemble_first_then_each_member(members, tmp_path):
    both = f"{members[0]},{members[1]}"
    files = app.find_model_files(Config(checkpoint=both, checkpoint_dir=str(tmp_path / "none")))
    labels = list(files)
    assert labels[0] == f"{members[0]} + {members[1]}" and labels[1:3] == [str(members[0]), str(members[1])]
    shelf = app.ModelShelf(files)
    assert isinstance(shelf.predictor(labels[0]), inference.AgeEnsemble)
    assert isinstance(shelf.predictor(labels[1]), inference.AgePredictor)


def test_error_analysis_scores_an_ensemble_on_a_split(members, tmp_path, face_folder):
    import analysis.errors
    import eda

    frame, _, _ = eda.scan_folder(str(face_folder), check_images=False)
    csv_path = tmp_path / "faces.csv"
    write_csv(frame.head(12), csv_path)
    cfg = parse_config([f"--checkpoint={members[0]},{members[2]}", f"--data_dir={face_folder}",
                        f"--test_csv={csv_path}", f"--runs_dir={tmp_path / 'runs'}", f"--pics_dir={tmp_path / 'pics'}",
                        "--bootstrap_samples=50", "--device=cpu", "--num_workers=0"],
                       reads=analysis.errors.SETTINGS)
    result = analysis.errors.main(cfg)
    predictions = __import__("pandas").read_csv(result["predictions_path"])
    assert len(predictions) == 12 and "dex_32+l1_40" in Path(result["predictions_path"]).name
    assert result["mae"] == pytest.approx((predictions["predicted"] - predictions["age"]).abs().mean(), abs=1e-3)
