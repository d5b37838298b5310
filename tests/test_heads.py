"""Every head predicts years, learns, and the ordinal/distribution heads keep their guarantees."""

from dataclasses import replace

import pytest
import torch

import export_jit
import metrics
import train
from config import Config
from custom_dataset_dataloader import build_dataloader
from model import HEADS, AgeEstimationModel, DistributionHead, build_model, load_model, save_checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("head", HEADS)
def test_each_head_starts_near_the_mean_age_and_its_loss_falls(split_config, head):
    torch.manual_seed(0)
    cfg = replace(split_config, head=head, lr=3e-3, rotation_degrees=0.0, color_jitter=0.0, translate_fraction=0.0,
                  scale_jitter=0.0)
    loader = build_dataloader(cfg, "train")
    model = build_model(cfg)
    ages = torch.tensor(loader.dataset.ages)
    model.set_age_statistics(ages.mean().item(), ages.std().item())
    with torch.no_grad():
        start = model.eval()(torch.zeros(2, 3, 32, 32))  # (2,) years
    assert start.shape == (2,) and (start - ages.mean()).abs().max() < 0.25 * ages.std()  # truncated at age 0
    optimizer = train.build_optimizer(cfg, model)
    losses = [train.train_one_epoch(model, loader, train.Optimisation(optimizer))["loss"] for _ in range(5)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_dex_label_smoothing_is_cross_entropy_to_a_gaussian_over_the_ages():
    narrow, gaussian = (DistributionHead(8, 0.0, 100, "dex", label_sigma) for label_sigma in (0.05, 2.0))
    ages = torch.tensor([3.0, 27.0, 64.0])
    outputs = torch.randn(3, 101)  # (B, K) logits
    one_hot = torch.nn.functional.cross_entropy(outputs, ages.long())
    assert narrow.loss(outputs, ages) == pytest.approx(one_hot.item(), rel=1e-4)
    targets = torch.exp(-0.5 * ((torch.arange(101.0)[None] - ages[:, None]) / 2.0) ** 2)
    targets = targets / targets.sum(1, keepdim=True)  # (B, K)
    logits = targets.clamp_min(1e-30).log()  # a prediction equal to the target
    best = gaussian.loss(logits, ages)
    entropy = -(targets * logits).sum(1).mean()
    assert best == pytest.approx(entropy.item(), rel=1e-4)
    assert gaussian.loss(logits + 0.3 * torch.randn(3, 101), ages) > best


def test_coral_probabilities_are_rank_consistent():
    model = AgeEstimationModel("resnet18", image_size=32, head="coral", max_age=90)
    torch.nn.init.normal_(model.head[1].weight, std=0.5)
    torch.nn.init.normal_(model.head.gaps, std=3.0)  # any parameters at all
    with torch.no_grad():
        outputs = model.eval().head_outputs(torch.randn(4, 3, 32, 32))  # (4, 90)
    probabilities = torch.sigmoid(outputs)
    assert outputs.shape == (4, 90) and (probabilities[:, 1:] <= probabilities[:, :-1]).all()


@pytest.mark.parametrize("head", ["dex", "mean_variance", "coral"])
def test_probability_of_being_at_least_t_is_monotone(head):
    model = AgeEstimationModel("resnet18", image_size=32, head=head, max_age=80)
    torch.nn.init.normal_(model.head[1].weight, std=0.5)
    with torch.no_grad():
        outputs = model.eval().head_outputs(torch.randn(3, 3, 32, 32))
        curve = torch.stack([model.head.probability_at_least(outputs, threshold) for threshold in range(-2, 90)], 1)
    assert torch.allclose(curve[:, 0], torch.ones(3)) and (curve[:, -1] <= 1e-6).all()
    assert (curve[:, 1:] <= curve[:, :-1] + 1e-6).all()
    if head != "coral":
        assert (model.head.spread(outputs) > 0).all()


@pytest.mark.parametrize("head", ["dex", "coral"])
def test_distribution_heads_export_with_parity(tmp_path, head):
    cfg = Config(model_name="resnet18", pretrained=False, image_size=32, head=head, max_age=60)
    model = build_model(cfg)
    model.set_age_statistics(30.0, 12.0)
    torch.nn.init.normal_(model.head[1].weight, std=0.05)
    save_checkpoint(tmp_path / "best.pt", model, cfg)
    for export_format in ("torchscript", "onnx"):
        result = export_jit.main(Config(checkpoint=str(tmp_path / "best.pt"), format=export_format,
                                        output=str(tmp_path / f"model.{export_format}")))
        assert result["max_abs_difference"] <= export_jit.TOLERANCE[export_format]


@pytest.mark.slow
def test_tta_and_calibration_are_reported(split_config):
    results = train.main(replace(split_config, epochs=1, tta=True, head="dex", run_name="tta"))
    assert {"test_mae", "test_mae_tta", "test_cs5_tta", "test_mae_by_decade"} <= results.keys()
    assert 0.25 <= results["temperature"] <= 4.0
    assert 0 <= results["test_ece_adult_calibrated"] <= 1 and 0 <= results["test_ece_adult_uncalibrated"] <= 1
    model, _, _ = load_model(results["best_checkpoint"])
    assert model.head.temperature.item() == pytest.approx(results["temperature"])  # stored with the checkpoint


def test_temperature_fit_recovers_the_true_temperature():
    """Ages drawn from softmax(logits / 2) are best explained by temperature 2; ECE falls once it is applied."""
    torch.manual_seed(0)
    model = AgeEstimationModel("resnet18", image_size=32, head="dex", max_age=60)
    logits = 4.0 * torch.randn(4000, 61)  # (N, K)
    ages = torch.multinomial((logits / 2.0).softmax(1), 1).squeeze(1).float()  # (N,)
    temperature = metrics.fit_temperature(model, logits, ages)
    assert temperature == pytest.approx(2.0, rel=0.1)
    outcomes = (ages >= 30).float()
    before = metrics.expected_calibration_error(model.head.probability_at_least(logits, 30), outcomes)
    model.head.temperature.fill_(temperature)
    after = metrics.expected_calibration_error(model.head.probability_at_least(logits, 30), outcomes)
    assert after < 0.03 < before


def test_expected_calibration_error_of_known_cases():
    outcomes = torch.tensor([1.0, 0.0] * 50)
    assert metrics.expected_calibration_error(torch.full((100,), 0.5), outcomes) == pytest.approx(0.0)
    assert metrics.expected_calibration_error(outcomes, outcomes) == pytest.approx(0.0)  # certain and right
    assert metrics.expected_calibration_error(1 - outcomes, outcomes) == pytest.approx(1.0)  # certain and wrong


def test_inference_labels_distribution_heads_with_a_spread(tmp_path, face_folder):
    import inference

    cfg = Config(model_name="resnet18", pretrained=False, image_size=32, head="mean_variance")
    model = build_model(cfg)
    model.set_age_statistics(30.0, 12.0)
    save_checkpoint(tmp_path / "best.pt", model, cfg)
    image = sorted(face_folder.iterdir())[0]
    rows = inference.main(Config(checkpoint=str(tmp_path / "best.pt"), input=str(image),
                                 output=str(tmp_path / "out.jpg"), no_detect=True))
    assert len(rows) == 1 and 5 < rows[0]["spread"] < 20 and 20 < rows[0]["age"] < 40


@pytest.mark.parametrize("head", HEADS)
def test_train_and_valid_loss_of_one_batch_are_the_same_loss(split_config, head):
    """evaluate() reports the head's training loss (label_sigma included), so the two curves are comparable: on
    one batch in eval mode, the loss train_one_epoch computes equals the loss evaluate reports."""
    cfg = replace(split_config, head=head, label_sigma=2.0, dropout=0.0, ema_decay=0.0)
    model = build_model(cfg)
    model.set_age_statistics(30.0, 10.0)
    torch.nn.init.normal_(model.head[1].weight, std=0.05)
    model.eval()
    images, ages = torch.randn(6, 3, 32, 32), torch.tensor([3.0, 18.0, 25.0, 40.0, 61.0, 90.0])
    with torch.no_grad():
        training_loss = model.head.loss(model(images, raw_outputs=True), ages)  # what train_one_epoch minimises
    validation = train.evaluate(model, [(images, ages, None, None)])
    assert validation["loss"] == pytest.approx(training_loss.item(), rel=1e-5)


def test_age_gate_errors_count_minors_passed_and_adults_refused():
    targets = torch.tensor([10.0, 16.0, 17.0, 18.0, 30.0, 60.0])
    predicted = torch.tensor([12.0, 19.0, 18.0, 17.0, 31.0, 55.0])  # two of three minors passed, one adult refused
    probability = torch.tensor([0.1, 0.6, 0.4, 0.5, 0.9, 1.0])
    gate = metrics.age_gate_errors(targets, predicted, probability)
    assert gate["minors_passed_age"] == pytest.approx(2 / 3) and gate["adults_refused_age"] == pytest.approx(1 / 3)
    assert gate["minors_passed_probability"] == pytest.approx(1 / 3) and gate["adults_refused_probability"] == 0.0
    assert set(metrics.age_gate_errors(targets, predicted)) == {"minors_passed_age", "adults_refused_age"}
