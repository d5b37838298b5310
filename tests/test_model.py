import pickle
import urllib.error

import pytest
import torch

from config import Config, config_to_dict
from model import (
    AgeEstimationModel,
    CheckpointError,
    PretrainedWeightsError,
    build_model,
    load_checkpoint,
    load_model,
    resolve_preprocessing,
    save_checkpoint,
)


@pytest.mark.parametrize("model_name", ["resnet18", "resnet", "efficientnet", "vit"])
def test_every_backbone_runs_forward_on_cpu(model_name):
    torch.manual_seed(0)
    model = AgeEstimationModel(model_name, pretrained=False, image_size=32).eval()
    model.set_age_statistics(30.0, 15.0)
    with torch.no_grad():
        ages = model(torch.randn(2, 3, 32, 32))  # (2,)
    assert ages.shape == (2,) and ages.dtype == torch.float32
    assert torch.allclose(ages, torch.full((2,), 30.0))  # zero-initialised head: the mean age


def test_head_learns_a_scale_in_years():
    model = AgeEstimationModel("resnet18", image_size=32)
    model.set_age_statistics(40.0, 10.0)
    torch.nn.init.constant_(model.head[1].bias, 1.0)
    with torch.no_grad():
        assert torch.allclose(model.eval()(torch.zeros(1, 3, 32, 32)), torch.tensor([50.0]))


def test_checkpoint_round_trip_rebuilds_the_exact_model(tmp_path):
    cfg = Config(model_name="efficientnet", pretrained=False, image_size=48, dropout=0.3)
    torch.manual_seed(1)
    original = build_model(cfg).eval()
    original.set_age_statistics(25.0, 12.0)
    torch.nn.init.normal_(original.head[1].weight, std=0.1)
    path = tmp_path / "best.pt"
    save_checkpoint(path, original, cfg, epoch=3, valid_mae=5.5)

    raw = torch.load(path, weights_only=True)  # plain dict, safe loader
    assert raw["epoch"] == 3 and raw["config"]["model_name"] == "efficientnet"
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in raw["model"])
    rebuilt, rebuilt_cfg, _ = load_model(path)
    assert rebuilt_cfg == resolve_preprocessing(cfg) and isinstance(rebuilt, AgeEstimationModel)
    images = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(original(images), rebuilt(images), atol=1e-5)
    assert rebuilt.head.age_mean.item() == 25.0


def test_a_checkpoint_from_before_the_heads_loads_as_l1_regression(tmp_path):
    cfg = Config(model_name="resnet18", pretrained=False, image_size=32, head="l1")
    path = tmp_path / "old.pt"
    save_checkpoint(path, build_model(cfg), cfg)
    raw = torch.load(path, weights_only=True)
    del raw["config"]["head"]  # as written before config.head existed (the model was an L1 regressor)
    torch.save(raw, path)
    model, loaded_cfg, checkpoint = load_model(path)
    assert loaded_cfg.head == "l1" and checkpoint["config"]["head"] == "l1"
    assert model(torch.randn(2, 3, 32, 32)).shape == (2,)


def test_checkpoint_of_a_wrapped_model_has_no_prefixes(tmp_path):
    cfg = Config(model_name="resnet18", pretrained=False, image_size=32)
    wrapped = torch.nn.Module()
    wrapped.module = build_model(cfg)  # what DistributedDataParallel looks like
    save_checkpoint(tmp_path / "wrapped.pt", wrapped, cfg)
    load_model(tmp_path / "wrapped.pt")


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_checkpoint_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"model": _RunsCode(), "config": {}}, handle, protocol=2)
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(path)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"train\.py"):
        load_model(tmp_path / "none.pt")


def test_failed_weight_download_says_what_to_do(monkeypatch, tmp_path):
    import torchvision.models._api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights, and nothing is downloaded
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(PretrainedWeightsError) as error:
        AgeEstimationModel("resnet18", pretrained=True)
    message = str(error.value)
    assert "--pretrained=false" in message and "resnet18-" in message and "checkpoints" in message


@pytest.mark.parametrize("head", ["coral", "dex"])
def test_a_checkpoint_with_the_older_state_dict_keys_predicts_exactly_as_before(tmp_path, head):
    """Files written before the heads owned their buffers (age_mean, age_std, temperature and CORAL's biases at
    the top level of the state dict) load into today's model and give the same ages."""
    from model import LEGACY_KEYS

    cfg = Config(model_name="resnet18", pretrained=False, image_size=32, head=head, max_age=60)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model.set_age_statistics(28.0, 11.0)
    torch.nn.init.normal_(model.head[1].weight, std=0.05)
    renamed = {new: old for old, new in LEGACY_KEYS.items()}
    state = {renamed.get(key, key): value for key, value in model.state_dict().items()}
    assert "age_mean" in state and "head.age_mean" not in state
    if head == "dex":
        del state["temperature"]  # as written before calibration existed
    torch.save({"model": state, "config": config_to_dict(cfg)}, tmp_path / "old.pt")
    rebuilt, _, _ = load_model(tmp_path / "old.pt")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), model(images))


def _with_random_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Batch norms whose statistics and affine terms are far from the identity, and a head that reads the
    features (a new head is zero-initialised and would predict the mean age whatever the backbone does)."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    for parameter in model.head.parameters():
        if parameter.dim() > 1:
            parameter.data.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("model_name", ["efficientnet_lite0", "resnet18", "timm/mobilenetv3_small_100"])
def test_folded_batch_norms_leave_the_ages_unchanged(model_name):
    import copy

    from model import fold_batch_norms

    torch.manual_seed(0)
    model = _with_random_statistics(build_model(Config(model_name=model_name, pretrained=False, image_size=64)))
    model.set_age_statistics(30.0, 15.0)
    model.eval()
    folded = copy.deepcopy(model)
    count = fold_batch_norms(folded.backbone)
    norms = sum(isinstance(module, torch.nn.BatchNorm2d) for module in model.backbone.modules())
    assert count == norms > 0  # every one of these backbones' norms follows a convolution of its own
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in folded.backbone.modules())
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        before, after = model(images), folded(images)  # (3,)
    assert before.std() > 0.01  # the ages depend on the image, so the comparison says something
    torch.testing.assert_close(after, before, atol=1e-3, rtol=0)  # years


def test_folding_refuses_training_mode_and_skips_a_convolution_used_twice():
    from model import fold_batch_norms

    class Residual(torch.nn.Module):  # the convolution's output feeds the norm and the sum: it cannot be folded
        def __init__(self):
            super().__init__()
            self.convolution = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.norm = torch.nn.BatchNorm2d(3)
            self.second = torch.nn.Conv2d(3, 3, 1)
            self.second_norm = torch.nn.BatchNorm2d(3)

        def forward(self, images):
            features = self.convolution(images)
            return self.second_norm(self.second(self.norm(features) + features))

    module = Residual()
    with pytest.raises(ValueError, match="eval"):
        fold_batch_norms(module)
    module.eval()
    module.norm.running_var.fill_(3.0)
    module.second_norm.running_mean.fill_(0.5)
    images = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = module(images)
        assert fold_batch_norms(module) == 1
        torch.testing.assert_close(module(images), before, atol=1e-5, rtol=0)
    assert isinstance(module.norm, torch.nn.BatchNorm2d) and isinstance(module.second_norm, torch.nn.Identity)
