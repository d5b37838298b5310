"""dlib_face_resnet, dlib's face-recognition ResNet: our reader of dlib's file gives a module whose descriptor is
dlib's own, a missing or damaged package is one sentence, too small an input is refused, and it trains, exports
with parity and infers. The weights come from the optional face-recognition-models package: tests that need it
skip without it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import export_jit
import inference
import model
from config import Config, UsageError, parse_config
from tests.helpers import REAL_DATA, with_backbone

needs_weights = pytest.mark.skipif(importlib.util.find_spec("face_recognition_models") is None,
                                   reason="needs the optional package face-recognition-models==0.3.0")


def _faces(count: int) -> np.ndarray:
    """(N, 150, 150, 3) uint8 RGB faces: UTKFace's 200 px chips when ../shared is there, else generated faces."""
    from PIL import Image

    paths = sorted((REAL_DATA / "utkface200").glob("*.jpg"))[:count]
    if paths:
        return np.stack([np.asarray(Image.open(path).convert("RGB").resize((150, 150), Image.BILINEAR))
                         for path in paths])
    from demo import draw_face

    generator = np.random.default_rng(0)
    return np.stack([np.asarray(draw_face(int(generator.integers(5, 80)), "female", "white", generator, 150))
                     for _ in range(count)])


def _our_descriptors(faces: np.ndarray) -> np.ndarray:
    from backbones.dlib_face import DlibFaceResNet, load_weights

    network = DlibFaceResNet(descriptor=True).eval()
    load_weights(network)
    preprocessing = model.backbone_preprocessing(model.DLIB_FACE_NAME)
    images = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 255  # (N, 3, 150, 150) in [0, 1]
    mean, std = (torch.tensor(preprocessing[key])[None, :, None, None] for key in ("mean", "std"))
    with torch.no_grad():
        return network((images - mean) / std).numpy()


@needs_weights
def test_the_descriptor_is_dlibs_own():
    dlib = pytest.importorskip("dlib")
    from backbones.dlib_face import weights_path

    faces = _faces(16)
    recognizer = dlib.face_recognition_model_v1(str(weights_path()))
    expected = np.stack([np.asarray(recognizer.compute_face_descriptor(face)) for face in faces])  # (N, 128)
    ours = _our_descriptors(faces)
    assert np.linalg.norm(expected, axis=1).min() > 0.1  # real descriptors, not zeros
    assert np.abs(ours - expected).max() <= 1e-4


@needs_weights
def test_every_tensor_of_the_file_is_read_and_placed():
    from backbones.dlib_face import DlibFaceResNet, read_dlib_network, weights_path

    layers, means = read_dlib_network(weights_path())
    names = [name for name, _ in layers]
    assert names.count("con_4") == 29 and names.count("affine_") == 29 and names[-1] == "fc_2"
    assert means == pytest.approx((122.782, 117.001, 104.298), abs=1e-3)
    network = DlibFaceResNet(descriptor=True)
    stored = sum(details[key].numel() for _, details in layers for key in ("weight", "bias") if key in details)
    assert stored == sum(tensor.numel() for tensor in network.state_dict().values())  # 5.6 M, every one used
    pooled, width = model.build_backbone(model.DLIB_FACE_NAME, True, 150)
    assert width == 256 and torch.equal(pooled.stem[0].weight, layers[0][1]["weight"])


@needs_weights
def test_a_damaged_file_is_one_sentence_naming_it(tmp_path):
    from backbones.dlib_face import DlibFaceResNet, load_weights, weights_path

    data = weights_path().read_bytes()
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(model.PretrainedWeightsError, match=r"truncated.dat.*ends early"):
        load_weights(DlibFaceResNet(), truncated)
    renamed = tmp_path / "renamed.dat"  # a layer that is not one of dlib's
    renamed.write_bytes(data.replace(b"\x01\x07affine_", b"\x01\x07affinx_", 1))
    with pytest.raises(model.PretrainedWeightsError, match=r"renamed.dat.*unknown layer 'affinx_'"):
        load_weights(DlibFaceResNet(), renamed)


def test_a_missing_package_is_one_sentence_and_scratch_needs_none(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "face_recognition_models" else real_find_spec(name, *args))
    with pytest.raises(model.PretrainedWeightsError, match=r"pip install face-recognition-models==0\.3\.0"):
        model.build_model(Config(model_name=model.DLIB_FACE_NAME, pretrained=True, image_size=112))
    scratch = model.build_model(Config(model_name=model.DLIB_FACE_NAME, pretrained=False, image_size=112))
    with torch.no_grad():
        assert scratch.eval()(torch.randn(2, 3, 112, 112)).shape == (2,)


def test_its_size_and_normalisation_come_with_the_name():
    cfg = model.resolve_preprocessing(parse_config(["--model_name=dlib_face_resnet"]))
    assert cfg.image_size == 150 and cfg.interpolation == "bilinear"
    ours = (200 / 255 - cfg.normalize_mean[0]) / cfg.normalize_std[0]
    assert ours == pytest.approx((200 - 122.782) / 256, abs=1e-6)  # dlib's input layer
    assert parse_config(["--model_name=dlib_face_resnet", "--image_size=112"]).image_size == 112
    with pytest.raises(UsageError, match=r"image_size=96 is too small for dlib_face_resnet.*103"):
        parse_config(["--model_name=dlib_face_resnet", "--image_size=96"])
    backbone, _ = model.build_backbone(model.DLIB_FACE_NAME, False, 103)
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, 103, 103)).shape == (1, 256)


@pytest.mark.slow
@needs_weights
def test_it_trains_with_early_layers_frozen_exports_with_parity_and_infers(split_config, tmp_path):
    import train

    cfg = with_backbone(split_config, model_name=model.DLIB_FACE_NAME, pretrained=True, image_size=104, head="dex",
                        epochs=2, lr=1e-3, backbone_lr_scale=0.3, frozen_share=0.5, run_name="dlib")
    start = model.build_backbone(model.DLIB_FACE_NAME, True, 104)[0].state_dict()
    result = train.main(cfg)
    losses = [row["train_loss"] for row in result["history"]]
    assert losses[-1] < losses[0]
    best = Path(cfg.checkpoint_dir) / "dlib" / "best.pt"
    trained = model.load_checkpoint(best)["model"]
    assert torch.equal(trained["backbone.stem.0.weight"], start["stem.0.weight"])  # frozen: the input side
    assert not torch.equal(trained["backbone.blocks.13.conv2.weight"], start["blocks.13.conv2.weight"])  # trained
    crops = np.random.default_rng(0).integers(0, 255, (3, 3, 104, 104), dtype=np.uint8)  # (N, 3, S, S)
    eager = inference.AgePredictor(best)
    for export_format in ("torchscript", "onnx"):
        output = tmp_path / f"dlib.{export_format}"
        exported = export_jit.main(Config(checkpoint=str(best), format=export_format, output=str(output)))
        assert exported["max_abs_difference"] <= export_jit.TOLERANCE[export_format]
        predictor = inference.AgePredictor(output)
        assert predictor.cfg.model_name == model.DLIB_FACE_NAME and predictor.image_size == 104
        assert np.allclose(predictor.predict(crops), eager.predict(crops), atol=1e-3)
