"""Train the age estimator (DEX head by default), keep the best checkpoint by valid MAE, report the test set.

Reads:  csv_dataset/{train,valid,test}_set.csv (split_dataset.py) and the images under data_dir.
Writes: checkpoints/<run_name>/best.pt (best valid MAE) and last.pt (every epoch, for --resume);
        runs/<run_name>/ TensorBoard scalars, config.json (the resolved config) and results.json (final metrics);
        pics/learning_curves_<run_name>.png.

Metrics: MAE in years, RMSE, CS@5 (the share of faces whose predicted age is within 5 years of the truth) and MAE
per age decade; with --tta the test set is also evaluated with flip test-time augmentation.
Speed: channels_last memory layout, bf16 autocast on CPUs with bf16 support (the backbones in CPU_BF16_BACKBONES,
where it was measured to pay; evaluation computes ages and metrics in fp32 after the forward pass), bf16 (or
fp16 with loss scaling) autocast on CUDA, fused optimiser steps, and on the CPU the ResNets' convolutions on tiny
maps computed as matrix products (model.MatmulConv2d). `python -m benchmarks.pipeline` measures them against the seed.

Resume: `--resume` continues run_name (or the newest run in checkpoint_dir) from its last.pt with the stored
config; a setting of RESUME_FROM_COMMAND_LINE (data and output folders, epochs, device, workers) replaces the stored
one only when typed on the resume command line, with a warning naming it, so a run can be extended or moved.

Several GPUs (or processes): `torchrun --nproc_per_node=N train.py ...` runs DistributedDataParallel. batch_size
stays the global batch (each rank takes batch_size / N images of it, drawn by a DistributedSampler reshuffled
every epoch), the valid and test sets are split into N blocks whose predictions are gathered, so every rank
computes the same metrics; rank 0 alone prints, writes TensorBoard, checkpoints and results. On GPUs the batch
norms become SyncBatchNorm (sync_batchnorm=true); on CPUs (gloo) each rank normalises its own share, which is
what a single process does with accumulation_steps=N (tests/test_distributed.py checks the two give the same
weights).

Run:  python train.py --model_name=resnet --epochs=30      then: tensorboard --logdir runs
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from config import (
    RECIPE_FIELDS,
    RUN_FIELDS,
    Config,
    UsageError,
    config_from_dict,
    parse_config,
    print_config,
    recipe_dict,
    recipe_hash,
    resolve_device,
    seed_everything,
)
from custom_dataset_dataloader import (
    SPLITS,
    build_dataloader,
    check_disjoint_splits,
    face_resolution,
    read_dataset_csv,
    split_csv_path,
)
from faces import DETECTORS, CropGeometry, measure_crop_geometry
from files import (
    atomic_write_path,
    check_free_space,
    check_writable_folders,
    remove_empty_folder,
    save_figure,
    sweep_temporaries,
)
from metrics import adult_probability, age_gate_errors, calibrate, format_sources, label_metrics, source_metrics
from model import (
    ADULT_AGE,
    build_model,
    config_from_model_file,
    label_error,
    label_loss,
    load_checkpoint,
    load_model,
    non_finite_tensors,
    resolve_preprocessing,
    save_checkpoint,
    unwrap,
    use_matmul_convolutions,
)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimisation: Optimisation,
    execution: Execution | None = None,
    description: str = "train",
    show_progress: bool = True,
) -> dict[str, float]:
    """One pass over `loader` with the head's loss; returns the mean loss and the MAE over the epoch (years).

    optimisation.mixup_alpha > 0 (mixup, Zhang et al. 2018): each batch is blended with a shuffled copy of itself,
    lam * x + (1 - lam) * x[perm] with one lam ~ Beta(alpha, alpha) per batch, and the loss is the same blend of the
    head's losses against both ages; for the soft-label heads that is the cross-entropy with the blended target
    distribution. The epoch's MAE is then measured against the blended age lam * a + (1 - lam) * a[perm].

    optimisation.accumulation_steps=n splits every batch into n strided micro-batches (images 0, n, 2n, ... first) and
    accumulates their gradients before one optimiser step: the same step as n torchrun ranks sharing the batch.

    optimisation.consistency_weight = w > 0: every face also goes through the model moved a few pixels
    (moved_views), in the same forward pass, and w times the mean |age difference| between the two views is added to
    the loss, so the model learns to give a face the same age however a detector frames it (RESULTS.md,
    "Inference: detectors, crop consistency, latency"); the step costs about twice as much.
    """
    from tqdm import tqdm

    model.train()
    head = unwrap(model).head  # owns the loss (with its settings, e.g. label_sigma) and outputs -> ages
    parallel = getattr(model, "_orig_mod", model)  # under torch.compile
    distributed = isinstance(parallel, nn.parallel.DistributedDataParallel)
    total_loss, total_error, total_images = 0.0, 0.0, 0
    progress = tqdm(loader, desc=description, leave=False, dynamic_ncols=True,
                    disable=None if show_progress else True)  # off when not a terminal
    execution = execution or Execution()
    optimizer, scaler, accumulation_steps = optimisation.optimizer, optimisation.scaler, optimisation.accumulation_steps
    mixup_alpha, consistency_weight = optimisation.mixup_alpha, optimisation.consistency_weight
    batch_format = torch.channels_last if execution.channels_last else torch.contiguous_format
    for step, (images, ages, _, _) in enumerate(progress, start=1):
        images, ages = execution.to_device(images, ages)
        images, partner_ages, blended_ages, mix = mixup_batch(images, ages, mixup_alpha)
        optimizer.zero_grad(set_to_none=True)
        for micro in range(accumulation_steps):
            part = slice(micro, None, accumulation_steps)
            last = micro == accumulation_steps - 1
            with contextlib.nullcontext() if last or not distributed else parallel.no_sync():  # reduce once a step
                batch = images[part]
                if consistency_weight > 0:
                    batch = torch.cat([batch, moved_views(batch)]).contiguous(memory_format=batch_format)  # (2b, ...)
                with execution.autocast():
                    outputs = model(batch, raw_outputs=True)  # float32: (b,), (b, K) or (b, K - 1); twice b
                loss, outputs = batch_loss(head, outputs, ages[part], partner_ages[part], mix, consistency_weight)
                if not torch.isfinite(loss):  # stop before the optimiser spreads it into the weights
                    raise DivergedError(
                        f"{description}: the loss became {loss.item()} at step {step} of {len(loader)}; the "
                        "checkpoints of earlier epochs are kept. Lower --lr or set --grad_clip_norm=1.0")
                scaled = loss / accumulation_steps
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            with torch.no_grad():
                predicted = head.ages(outputs.detach())  # (b,) years
                total_error += label_error(predicted, blended_ages[part]).sum().item()
            total_loss += loss.item() * len(outputs)
            total_images += len(outputs)
        optimiser_step(model, optimisation)
        progress.set_postfix(mae=f"{total_error / total_images:.2f}")
    if distributed:  # sums over every rank's share of the epoch
        totals = torch.tensor([total_loss, total_error, total_images], dtype=torch.float64, device=execution.device)
        torch.distributed.all_reduce(totals)
        total_loss, total_error, total_images = totals.tolist()
    return {"loss": total_loss / max(total_images, 1), "mae": total_error / max(total_images, 1)}


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    execution: Execution | None = None,
    tta: bool = False,
    keep_outputs: bool = False,
) -> dict[str, Any]:
    """The head's loss, MAE, RMSE, CS@5 and MAE per age decade over `loader`, plus the predictions and targets
    (lists, years). tta: the age is the mean of the predictions for the image and its mirror image.
    keep_outputs: also return the raw head outputs (N, ...) as "outputs" (for calibration)."""
    execution = execution or Execution()
    model.eval()
    plain = unwrap(model)
    total_loss, predictions, targets, kept = 0.0, [], [], []
    for images, ages, _, _ in loader:
        images, ages = execution.to_device(images, ages)
        with execution.autocast():  # the forward pass only: ages, loss and metrics below are computed in fp32
            outputs = plain.head_outputs(images)  # (B, ...) in the autocast dtype
            mirrored = plain.head_outputs(images.flip(-1)) if tta else None
        # a DEX age (softmax times the age grid) summed in bf16 falls on quarter-year steps; in fp32 it does not
        outputs = outputs.float()
        predicted = plain.head.ages(outputs)  # (B,)
        if mirrored is not None:
            predicted = 0.5 * (predicted + plain.head.ages(mirrored.float()))
        total_loss += label_loss(plain.head, outputs, ages).item() * len(ages)  # the training loss
        predictions.append(predicted.float().cpu())
        targets.append(ages.cpu())
        if keep_outputs:
            kept.append(outputs.float().cpu())
    predicted, target = torch.cat(predictions or [torch.zeros(0)]), torch.cat(targets or [torch.zeros(0)])
    outputs = torch.cat(kept) if kept else None
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # each rank evaluated one contiguous block (custom_dataset_dataloader.shard): join them in rank order
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, (total_loss, predicted, target, outputs))
        total_loss = sum(part[0] for part in gathered)
        predicted, target = torch.cat([part[1] for part in gathered]), torch.cat([part[2] for part in gathered])
        if keep_outputs:
            outputs = torch.cat([part[3] for part in gathered if part[3] is not None])
    return {"loss": total_loss / max(len(target), 1), **label_metrics(predicted, target),
            **({"outputs": outputs} if keep_outputs else {})}


# consistency_weight's second view of each face: moved by up to this share of the side, turned by up to this many
# degrees and zoomed by up to this share, about the landmark jitter of a detector on a 60-250 px face
CONSISTENCY_SHIFT, CONSISTENCY_DEGREES, CONSISTENCY_ZOOM = 0.03, 3.0, 0.03


def moved_views(images: torch.Tensor) -> torch.Tensor:
    """Each normalised image (B, 3, H, W) moved, turned and zoomed a little at random (a different small similarity
    transform per image, edges replicated): the second view the consistency term compares ages on."""
    count = len(images)
    angle = torch.empty(count, device=images.device).uniform_(-1, 1) * math.radians(CONSISTENCY_DEGREES)
    scale = 1 + torch.empty(count, device=images.device).uniform_(-1, 1) * CONSISTENCY_ZOOM
    shift = torch.empty(count, 2, device=images.device).uniform_(-1, 1) * 2 * CONSISTENCY_SHIFT  # grid units: 2 = side
    rotation = torch.stack([torch.cos(angle), -torch.sin(angle), torch.sin(angle), torch.cos(angle)], 1).view(-1, 2, 2)
    theta = torch.cat([rotation / scale[:, None, None], shift[:, :, None]], 2)  # (B, 2, 3)
    grid = nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return nn.functional.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border",
                                     align_corners=False).to(images.dtype)


def consistency_weight_for_epoch(weight: float, ramp_epochs: int, epoch: int) -> float:
    """The consistency term's weight in `epoch` (1-based): `weight` from the start, or with ramp_epochs = r > 0,
    rising linearly from 0 in epoch 1 to `weight` in epoch r + 1, so that the model first learns ages and only then
    is held to giving a moved face the same one (from the start, a large weight holds every face to one answer
    before any age is learnt)."""
    return weight * min(1.0, (epoch - 1) / ramp_epochs) if ramp_epochs > 0 else weight


def mixup_batch(images: torch.Tensor, ages: torch.Tensor, alpha: float,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(images, partner ages, blended ages, mix): with alpha > 0, the batch blended with a shuffled copy of itself
    by one mix ~ Beta(alpha, alpha); else the batch as it is (mix 1)."""
    if alpha <= 0:
        return images, ages, ages, 1.0
    mix = float(torch.distributions.Beta(alpha, alpha).sample())
    permutation = torch.randperm(len(images), device=images.device)
    images = images.lerp(images[permutation], 1 - mix)  # (B, 3, H, W): mix * x + (1 - mix) * x[perm]
    partner_ages = ages[permutation]
    return images, partner_ages, ages.lerp(partner_ages, 1 - mix), mix  # blended: what the epoch's MAE is against


def batch_loss(head: nn.Module, outputs: torch.Tensor, ages: torch.Tensor, partner_ages: torch.Tensor, mix: float,
               consistency_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss, the outputs of the faces as they are): the head's loss, blended over mixup partners, plus the
    consistency term when the second half of `outputs` is the same faces moved (consistency_weight > 0)."""
    if consistency_weight > 0:
        outputs, moved_outputs = outputs.chunk(2)
    loss = label_loss(head, outputs, ages)
    if mix < 1:
        loss = mix * loss + (1 - mix) * label_loss(head, outputs, partner_ages)
    if consistency_weight > 0:
        loss = loss + consistency_weight * (head.ages(outputs) - head.ages(moved_outputs)).abs().mean()
    return loss, outputs


def optimiser_step(model: nn.Module, optimisation: Optimisation) -> None:
    """Unscale, clip, step (through the fp16 scaler when there is one), then the weight average and the schedule."""
    optimizer, scaler = optimisation.optimizer, optimisation.scaler
    if scaler is not None:
        scaler.unscale_(optimizer)
    if optimisation.grad_clip_norm > 0:
        nn.utils.clip_grad_norm_(model.parameters(), optimisation.grad_clip_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if optimisation.average is not None:
        optimisation.average.update(model)
    if optimisation.scheduler is not None:
        optimisation.scheduler.step()



# --- the training run: main, then the steps it takes in order ----------------------------------------------

SETTINGS = (*RECIPE_FIELDS, *RUN_FIELDS)  # what this script reads (its --help): the recipe and the runtime


def main(cfg: Config) -> dict[str, Any]:
    """Train, keep best.pt by valid MAE, evaluate it on the test set; returns the final metrics and paths."""
    rank, world_size, device = setup_distributed(cfg)
    try:
        return _train(cfg, rank, world_size, device)
    finally:
        if world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# On --resume the checkpoint_dir the run was found in is where it continues (a copied run folder is continued in
# place, never written back to where it was made); each of these other settings is the stored one unless it is
# typed on the resume command line, which then wins with a warning naming it (the data moved, a longer schedule,
# another device); every other setting, the recipe, comes from the checkpoint.
RESUME_FROM_COMMAND_LINE = ("data_dir", "csv_dir", "runs_dir", "pics_dir", "cache_dir", "epochs", "device",
                            "num_workers")


# The run's own output folders, which last.pt keeps beside the recipe so that a resume writes where the run wrote
RESUMED_OUTPUTS = ("runs_dir", "pics_dir", "cache_dir")


def _train(cfg: Config, rank: int, world_size: int, device: torch.device) -> dict[str, Any]:
    is_main = rank == 0
    if is_main:  # before the caches and the first epoch: a folder that cannot be written would fail an hour later
        check_writable_folders(cfg, ("checkpoint_dir", "runs_dir", "pics_dir", "cache_dir"))
    cfg, resume_state = start_or_resume(cfg, world_size)
    try:
        return _train_run(cfg, resume_state, rank, world_size, device)
    except BaseException:
        if is_main and resume_state is None:  # a start that failed leaves no empty run folder behind
            for folder in (Path(cfg.checkpoint_dir) / cfg.run_name, Path(cfg.runs_dir) / cfg.run_name):
                remove_empty_folder(folder)
        raise


def _train_run(cfg: Config, resume_state: dict[str, Any] | None, rank: int, world_size: int,
               device: torch.device) -> dict[str, Any]:
    is_main = rank == 0
    cfg = resolve_preprocessing(cfg)  # the backbone's normalisation and filter, stored in every checkpoint
    if is_main:
        print_config(cfg, "train.py", SETTINGS)
    run = prepare_run(cfg, rank, world_size, device, resume_state)
    start_epoch, best_valid_mae, history = 1, math.inf, []
    if is_main:
        check_checkpoint_space(run)
    if resume_state is not None:
        start_epoch, best_valid_mae, history = restore_state(run, resume_state)
    writer = None
    if is_main:
        write_json(run.run_dir / "config.json", recipe_dict(cfg))
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run.run_dir), purge_step=start_epoch)
        loaders = run.loaders
        print(f"device {device}, autocast {run.execution.dtype}, {type(loaders['train']).__name__} "
              f"(loading={cfg.loading}), {world_size} process(es), {len(loaders['train'].dataset)} train / "
              f"{len(loaders['valid'].dataset)} valid / {len(loaders['test'].dataset)} test images")
    started = time.perf_counter()
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            row = run_epoch(run, epoch)
            history.append(row)
            improved = row["valid_mae"] < best_valid_mae
            best_valid_mae = min(best_valid_mae, row["valid_mae"])
            if not is_main:
                continue
            for key, tag in TENSORBOARD_TAGS.items():
                if key in row:
                    writer.add_scalar(tag, row[key], epoch)
            for key in row.keys() - TENSORBOARD_TAGS.keys() - {"epoch", "seconds"}:  # a mix: each source's figures
                writer.add_scalar(f"sources/{key}", row[key], epoch)
            save_epoch(run, epoch, history, best_valid_mae, improved)
            print(format_epoch(row, cfg.epochs, improved), flush=True)
    except KeyboardInterrupt:
        if writer is not None:
            writer.close()
        last_path = run.checkpoint_dir / "last.pt"
        finished = f"{last_path} holds epoch {epoch - 1}" if last_path.is_file() else "no epoch had finished"
        where = "" if cfg.checkpoint_dir == Config().checkpoint_dir else f" --checkpoint_dir={cfg.checkpoint_dir}"
        raise SystemExit(f"\ninterrupted during epoch {epoch}: {finished}; continue with "
                         f"`python train.py --resume --run_name={cfg.run_name}{where}` (the run's data, split files "
                         "and epochs are stored in it)") from None
    if writer is not None:
        writer.close()
    _barrier(world_size)  # best.pt is complete before any rank reads it
    return finish_run(run, history, best_valid_mae, time.perf_counter() - started)


def finish_run(run: TrainingRun, history: list[dict[str, float]], best_valid_mae: float,
               seconds: float) -> dict[str, Any]:
    """Test best.pt (calibrating its temperature, with TTA when asked), write results.json and the learning curves,
    print the summary; returns the results."""
    cfg, best_path = run.cfg, run.checkpoint_dir / "best.pt"
    if not best_path.is_file() and run.is_main:  # epochs=0: evaluate the model as built
        save_checkpoint(best_path, run.model, cfg, epoch=0, valid_mae=math.inf, **run.face_facts)
    _barrier(run.world_size)
    tested = test_best_checkpoint(cfg, run.model, run.loaders, best_path, run.execution, run.is_main)
    test_metrics, calibration, tta_metrics = tested["test"], tested["calibration"], tested["tta"]
    test_ages = torch.tensor(test_metrics["targets"])  # NaN for binned rows
    baseline_mae = (test_ages - run.train_ages.mean()).abs().nanmean().item()
    by_source = source_metrics(run.loaders["test"].dataset.frame, test_metrics)
    bins = {key: test_metrics[key] for key in ("in_bin", "bin_distance") if key in test_metrics}
    results = {
        "run_name": cfg.run_name,
        "recipe": recipe_hash(cfg),  # config.RECIPE_FIELDS hashed: names the experiment, not where it ran
        "test_mae": test_metrics["mae"],
        "test_rmse": test_metrics["rmse"],
        "test_cs5": test_metrics["cs5"],
        "mean_age_baseline_test_mae": baseline_mae,
        **{f"test_{key}": value for key, value in bins.items()},
        "test_by_source": by_source,
        **({"test_by_source_tta": source_metrics(run.loaders["test"].dataset.frame, tta_metrics)}
           if tta_metrics and by_source else {}),
        "test_mae_by_decade": test_metrics["mae_by_decade"],
        **calibration,
        **{f"test_{key}": value for key, value in tested["age_gate"].items()},
        **({"test_mae_tta": tta_metrics["mae"], "test_cs5_tta": tta_metrics["cs5"]} if tta_metrics else {}),
        "best_valid_mae": best_valid_mae,
        "epochs": cfg.epochs,
        "train_seconds": seconds,
        "test_images": len(test_ages),
        "best_checkpoint": str(best_path),
        "last_checkpoint": str(run.checkpoint_dir / "last.pt"),
        "run_dir": str(run.run_dir),
        "history": history,
    }
    if not run.is_main:
        return results
    write_json(run.run_dir / "results.json", results)
    if history:
        curves_path = Path(cfg.pics_dir) / f"learning_curves_{cfg.run_name}.png"
        plot_learning_curves(history, curves_path, f"{cfg.run_name}: {cfg.model_name}, {cfg.image_size}px")
        results["learning_curves"] = str(curves_path)
    print(f"\ntest set ({len(test_ages)} images), best checkpoint", end="")
    if math.isfinite(test_metrics["mae"]):  # a test split of bins alone has no exact age to score
        print(f": MAE {test_metrics['mae']:.2f} years, CS@5 {test_metrics['cs5']:.3f}, RMSE "
              f"{test_metrics['rmse']:.2f} (predicting the mean training age: MAE {baseline_mae:.2f})", end="")
    print()
    if bins:
        print(f"binned test labels: {bins['in_bin']:.1%} inside the bin, {bins['bin_distance']:.2f} years from it")
    if by_source:
        print(f"test by source: {format_sources(by_source)}")
    if calibration:
        print(f"P(age >= {ADULT_AGE}) on the test set: expected calibration error "
              f"{calibration['test_ece_adult_uncalibrated']:.3f} -> {calibration['test_ece_adult_calibrated']:.3f} "
              f"with temperature {calibration['temperature']:.2f} fitted on the valid set")
    if tta_metrics:
        print(f"with flip TTA: MAE {tta_metrics['mae']:.2f} years, CS@5 {tta_metrics['cs5']:.3f}")
    print(f"checkpoints: {run.checkpoint_dir}/  TensorBoard + results.json: {run.run_dir}/")
    return results


@dataclass
class TrainingRun:
    """One training run's pieces, built by `prepare_run`: the resolved config, where it runs, the model as it trains
    (placed, wrapped) and the weights that are validated and kept, the loaders, the optimisation, and the face facts
    (crop geometry, face resolution) stored in every checkpoint beside the weights."""

    cfg: Config
    rank: int
    world_size: int
    execution: Execution
    model: nn.Module
    loaders: dict[str, Any]
    optimisation: Optimisation
    face_facts: dict[str, Any]
    train_ages: torch.Tensor

    @property
    def is_main(self) -> bool:  # the one rank that prints, logs and writes files
        return self.rank == 0

    @property
    def evaluated(self) -> nn.Module:  # the weight average when there is one
        average = self.optimisation.average
        return average.module if average is not None else self.model

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.cfg.checkpoint_dir) / self.cfg.run_name

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.runs_dir) / self.cfg.run_name


def prepare_run(cfg: Config, rank: int, world_size: int, device: torch.device,
                resume_state: dict[str, Any] | None) -> TrainingRun:
    """The model (from its seed), the loaders (rank 0 builds the decoded caches first), the face facts (measured on
    a new run's training faces, kept from the checkpoint on resume) and the optimisation."""
    is_main = rank == 0
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
    execution = Execution.for_config(cfg, device)
    seed_everything(cfg.seed, cfg.deterministic)  # the model's initial weights depend on the seed alone
    model = build_model(cfg)  # first: a failed weight download stops the run before any slow work
    # an image in two splits would be trained on and tested: checked before any cache is built. One set of images
    # three times is the deliberate exception: a check on the training faces themselves (hyperparameters_tuning.py's
    # step 2, overfitting a subset)
    splits = {split: read_dataset_csv(split_csv_path(cfg, split), cfg.max_age) for split in SPLITS}
    if len({frozenset(frame["image_name"]) for frame in splits.values()}) > 1:
        check_disjoint_splits(splits, f"the split files in {cfg.csv_dir}")
    if not is_main:
        _barrier(world_size)  # under torchrun rank 0 builds the decoded caches first; the others then find them
    loaders = {split: build_dataloader(cfg, split, device=device, rank=rank, world_size=world_size)
               for split in ("train", "valid", "test")}
    if is_main:
        _barrier(world_size)
    train_ages = typical_ages(loaders["train"].dataset.ranges)
    face_facts = {"crop_geometry": None, "face_resolution": None}
    if is_main:  # a resumed run keeps what was measured when it started (same training images)
        if resume_state is not None:
            face_facts = {key: resume_state.get(key) for key in face_facts}
        else:
            face_facts = {"crop_geometry": training_crop_geometry(cfg, loaders["train"].dataset.frame),
                          "face_resolution": face_resolution(loaders["train"].dataset.frame, cfg.data_dir)}
    if cfg.init_from:  # fine-tuning a trained model (e.g. the shipped one on more data): its head stays as it is
        start_from_model_file(model, cfg)
    else:
        model.set_age_statistics(train_ages.mean().item(), train_ages.std().item())
    freeze_early_backbone(cfg, model)
    if world_size > 1 and device.type == "cuda" and cfg.sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = place_model(cfg, model, device)
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)  # evaluate() and the checkpoints use the plain module (train.unwrap)
    optimizer = build_optimizer(cfg, model)
    optimisation = Optimisation(
        optimizer, build_scheduler(cfg, optimizer, len(loaders["train"])),
        torch.amp.GradScaler("cuda") if execution.dtype == torch.float16 else None,
        WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 else None,
        cfg.grad_clip_norm, cfg.accumulation_steps, cfg.mixup_alpha, cfg.consistency_weight)
    return TrainingRun(cfg, rank, world_size, execution, model, loaders, optimisation, face_facts, train_ages)


def start_or_resume(cfg: Config, world_size: int) -> tuple[Config, dict[str, Any] | None]:
    """The run's config and, with --resume, the last.pt state to continue from (RESUME_FROM_COMMAND_LINE says
    which settings come from where)."""
    if not cfg.resume:
        is_main = world_size == 1 or torch.distributed.get_rank() == 0  # one rank claims the folder
        return replace(cfg, run_name=_broadcast(new_run_name(cfg, claim=is_main), world_size)), None
    resume_from = find_resume_run(cfg)
    state = load_checkpoint(resume_from)
    broken = non_finite_tensors(state["model"])
    if broken:
        raise DivergedError(f"{resume_from} holds NaN or infinite weights ({len(broken)} tensors, e.g. {broken[0]}): "
                            "the run had diverged before this epoch was saved and cannot be continued; start a new "
                            "run, e.g. with a lower --lr")
    # the recipe, and the run's output folders (a file from before last.pt kept them apart stores them in its config)
    values = {**state["config"], **(state.get("run") or {})}
    stored_cfg = config_from_dict(values, str(resume_from))
    kept = [name for name in (*RECIPE_FIELDS, *RESUMED_OUTPUTS) if name in values]
    stored = {name: getattr(stored_cfg, name) for name in kept}
    typed = {name: getattr(cfg, name) for name in RESUME_FROM_COMMAND_LINE if name in cfg.given_keys}
    replaced = [f"{name}={value!r} (stored: {stored[name]!r})" for name, value in typed.items()
                if name in stored and value != stored[name]]
    if replaced:
        warnings.warn(f"--resume: the command line replaces the stored {', '.join(replaced)}", stacklevel=2)
    ignored = [name for name in cfg.given_keys if name in stored and name not in RESUME_FROM_COMMAND_LINE
               and getattr(cfg, name) != stored[name]]
    if ignored:
        warnings.warn(f"--resume keeps the checkpoint's recipe, so these settings on the command line are ignored: "
                      f"{', '.join(ignored)} (start a new run to change them)", stacklevel=2)
    # how this run executes (device, workers, speed settings) comes from this command line, the recipe from the file
    cfg = replace(cfg, **{**stored, **typed}, resume=True, run_name=resume_from.parent.name)
    state["path"] = str(resume_from)
    return cfg, state


def restore_state(run: TrainingRun, resume_state: dict[str, Any]) -> tuple[int, float, list[dict[str, float]]]:
    """Load a last.pt's weights, optimiser, schedule, scaler and average; returns (next epoch, best valid MAE,
    history)."""
    optimisation, average = run.optimisation, run.optimisation.average
    unwrap(run.model).load_state_dict(resume_state["model"])
    optimisation.optimizer.load_state_dict(resume_state["optimizer"])
    optimisation.scheduler.load_state_dict(resume_state["scheduler"])
    if optimisation.scaler is not None and "scaler" in resume_state:
        optimisation.scaler.load_state_dict(resume_state["scaler"])
    if average is not None and "average" in resume_state:
        average.load_state_dict(resume_state["average"])  # (a run from before ema_decay starts its average here)
    start_epoch, best_valid_mae = resume_state["epoch"] + 1, resume_state["best_valid_mae"]
    if run.is_main:
        print(f"resuming {run.cfg.run_name} from {resume_state['path']} at epoch {start_epoch} "
              f"(best valid MAE {best_valid_mae:.2f}); every setting comes from the checkpoint but those typed "
              f"on the command line among {', '.join(RESUME_FROM_COMMAND_LINE)}")
    return start_epoch, best_valid_mae, resume_state["history"]


def run_epoch(run: TrainingRun, epoch: int) -> dict[str, float]:
    """Train one epoch and validate; returns its history row."""
    cfg, loaders = run.cfg, run.loaders
    # Shuffling and augmentation of an epoch depend only on (seed, epoch): a run resumed from last.pt continues
    # exactly as the uninterrupted run would have (with deterministic=true, bit for bit on CPU).
    torch.manual_seed(cfg.seed * 1000 + epoch + 7919 * run.rank)  # augmentation and dropout draws
    loaders["train"].sampler.set_epoch(epoch)  # the order: the same permutation on every rank
    if isinstance(loaders["train"], DataLoader):
        loaders["train"].generator.manual_seed(cfg.seed * 1000 + epoch + 7919 * run.rank)  # worker seeds
    run.optimisation.consistency_weight = consistency_weight_for_epoch(
        cfg.consistency_weight, cfg.consistency_ramp_epochs, epoch)
    epoch_started = time.perf_counter()
    train_metrics = train_one_epoch(run.model, loaders["train"], run.optimisation, run.execution,
                                    description=f"epoch {epoch}/{cfg.epochs}", show_progress=run.is_main)
    valid_metrics = evaluate(run.evaluated, loaders["valid"], run.execution)
    # valid_mae picks the best epoch: the MAE, or where some labels are bins, the mean of the exact rows' errors and
    # the binned rows' distances to their bin (label_metrics' `error`)
    row = {"epoch": epoch, "train_loss": train_metrics["loss"], "train_mae": train_metrics["mae"],
           "valid_loss": valid_metrics["loss"], "valid_mae": valid_metrics["error"], "valid_cs5": valid_metrics["cs5"],
           "lr": run.optimisation.optimizer.param_groups[-1]["lr"]}  # the head's (the backbone's: x backbone_lr_scale)
    if "in_bin" in valid_metrics:  # binned labels: the share inside the bin and the distance to it
        row.update(valid_in_bin=valid_metrics["in_bin"], valid_bin_distance=valid_metrics["bin_distance"])
    for source, metrics in source_metrics(loaders["valid"].dataset.frame, valid_metrics).items():
        row.update({f"valid_{source}_{key}": value for key, value in metrics.items() if key != "faces"})
    if run.optimisation.average is not None:
        row["valid_mae_raw_weights"] = evaluate(run.model, loaders["valid"], run.execution)["error"]
    row["seconds"] = time.perf_counter() - epoch_started
    return row


def save_epoch(run: TrainingRun, epoch: int, history: list[dict[str, float]], best_valid_mae: float,
               improved: bool) -> None:
    """best.pt (the validated weights) when the epoch improved, and last.pt (everything a resume needs)."""
    optimisation, average = run.optimisation, run.optimisation.average
    if improved:
        save_checkpoint(run.checkpoint_dir / "best.pt", run.evaluated, run.cfg, epoch=epoch, valid_mae=best_valid_mae,
                        **run.face_facts)
    save_checkpoint(
        run.checkpoint_dir / "last.pt", run.model, run.cfg, epoch=epoch, best_valid_mae=best_valid_mae,
        history=history, **run.face_facts, run={name: getattr(run.cfg, name) for name in RESUMED_OUTPUTS},
        optimizer=optimisation.optimizer.state_dict(),
        scheduler=optimisation.scheduler.state_dict(),
        **({"scaler": optimisation.scaler.state_dict()} if optimisation.scaler is not None else {}),
        **({"average": average.state_dict()} if average is not None else {}),
    )


def check_checkpoint_space(run: TrainingRun) -> None:
    """Remove a killed run's checkpoint temporaries, and check the disk holds this run's checkpoints."""
    sweep_temporaries(run.checkpoint_dir)
    # best.pt (weights) and last.pt (weights, two AdamW moments, the average) at once, each written beside the old
    # one before the rename: about eight times the weights' bytes, checked before the first epoch
    weight_bytes = sum(parameter.numel() * 4 for parameter in unwrap(run.model).parameters())
    check_free_space(run.checkpoint_dir, 8 * weight_bytes + 50_000_000, "this run's checkpoints")


# The figures of an epoch: one row per epoch in the history, each with its TensorBoard tag.
TENSORBOARD_TAGS = {"train_loss": "loss/train", "valid_loss": "loss/valid", "train_mae": "mae/train",
                    "valid_mae": "mae/valid", "valid_cs5": "cs5/valid", "lr": "learning_rate",
                    "valid_mae_raw_weights": "mae/valid_raw_weights"}


def format_epoch(row: dict[str, float], epochs: int, improved: bool) -> str:
    """The line printed after an epoch, from its history row (and a second line per source of a mix)."""
    raw = f" (raw weights {row['valid_mae_raw_weights']:5.2f})" if "valid_mae_raw_weights" in row else ""
    # with bins among the labels the "MAE" is the mean error over exact ages and distances to bins (label_metrics)
    error = "MAE" if "valid_in_bin" not in row else "error"
    bins = f"  in bin {row['valid_in_bin']:.1%}" if "valid_in_bin" in row else ""
    line = (f"epoch {row['epoch']:3d}/{epochs}  train {error} {row['train_mae']:6.2f}  valid {error} "
            f"{row['valid_mae']:6.2f}{raw}  CS@5 {row['valid_cs5']:.3f}{bins}  lr {row['lr']:.2e}  "
            f"{row['seconds']:5.1f}s{'  * best' if improved else ''}")
    sources = {}
    for key, value in row.items():
        for kind in ("mae", "in_bin", "bin_distance"):
            if (key.startswith("valid_") and key.endswith(f"_{kind}") and key not in (f"valid_{kind}", "valid_in_bin")
                    and "raw" not in key):
                sources.setdefault(key.removeprefix("valid_").removesuffix(f"_{kind}"), {})[kind] = value
    return line + (f"\n           valid by source: {format_sources(sources)}" if sources else "")


def test_best_checkpoint(cfg: Config, model: nn.Module, loaders: dict[str, Any], best_path: Path,
                         execution: Execution, is_main: bool) -> dict[str, Any]:
    """Load best.pt into `model`, evaluate it on the test split and, for heads with probabilities, fit and store
    the temperature on the valid split; with cfg.tta also the flip-TTA test figures."""
    unwrap(model).load_state_dict(load_checkpoint(best_path)["model"])
    probabilistic = unwrap(model).head.has_probabilities
    test = evaluate(model, loaders["test"], execution, keep_outputs=probabilistic)
    calibration = {}
    if probabilistic:
        valid = evaluate(model, loaders["valid"], execution, keep_outputs=True)
        calibration = calibrate(model, valid, test)
        if is_main:
            best_state = load_checkpoint(best_path)
            save_checkpoint(best_path, model, cfg, **{key: value for key, value in best_state.items()
                                                      if key not in ("model", "config")})
    tta = evaluate(model, loaders["test"], execution, tta=True) if cfg.tta else None
    gate = age_gate_errors(torch.tensor(test["targets"]), torch.tensor(test["predictions"]),
                           adult_probability(model, test))
    return {"test": test, "calibration": calibration, "tta": tta, "age_gate": gate}


def evaluate_checkpoint(path: str | os.PathLike, split: str = "test", device: str = "cpu",
                        cache_dir: str | None = None) -> dict[str, Any]:
    """evaluate() of a saved checkpoint on one split of its own config (architecture, size, normalisation and
    data paths all from the file), in fp32: what a reader of the checkpoint alone would measure. `cache_dir`: where
    the decoded images go (a run's folder, not part of the recipe the file stores; None = config.py's default)."""
    model, trained_cfg, _ = load_model(path, device)
    data_cfg = replace(trained_cfg, num_workers=0, cache_dir=cache_dir or trained_cfg.cache_dir)
    loader = build_dataloader(data_cfg, split, device=torch.device(device))
    return evaluate(model, loader, Execution(torch.device(device)))



# --- what a run is built from: optimiser, schedule, initial weights, the training faces' geometry ------------

def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD; weight decay on weight matrices and kernels only, not on biases and norm scales. The backbone's
    parameters learn at lr * backbone_lr_scale (fine-tuning pretrained weights: below 1 keeps more of what they
    learnt), the head's and the age-statistics' at lr; the scheduler scales every group alike. Frozen parameters
    (freeze_early_backbone) are left out."""
    backbone = {id(parameter) for parameter in unwrap(model).backbone.parameters()}
    groups: dict[tuple[float, bool], dict[str, Any]] = {}  # (lr scale, decayed): with scale 1, the two groups of old
    for parameter in (parameter for parameter in model.parameters() if parameter.requires_grad):
        scale = cfg.backbone_lr_scale if id(parameter) in backbone else 1.0
        decayed = parameter.ndim > 1
        groups.setdefault((scale, decayed), {"params": [], "lr": cfg.lr * scale,
                                             "weight_decay": cfg.weight_decay if decayed else 0.0})
        groups[(scale, decayed)]["params"].append(parameter)
    groups = list(groups.values())
    # One fused kernel for the whole update where torch has one: faster on the CPU than the default multi-tensor
    # loop (RESULTS.md, "Figures that were code comments").
    fused = all(parameter.device.type in ("cpu", "cuda") for parameter in model.parameters()) or None
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)


def freeze_early_backbone(cfg: Config, model: nn.Module) -> int:
    """Keep the first frozen_share of the backbone's parameter tensors (in definition order: the input side, e.g.
    a stem and early blocks) at their starting values; before any wrapper (DDP) sees the model. Returns how many."""
    parameters = list(unwrap(model).backbone.parameters())
    frozen = round(cfg.frozen_share * len(parameters))
    for parameter in parameters[:frozen]:
        parameter.requires_grad_(False)
    return frozen


def build_scheduler(
    cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step multiplier of the peak lr: linear warm-up, then cosine to zero, a 0.1x step schedule, or flat."""
    total_steps = max(cfg.epochs * steps_per_epoch, 1)
    warmup_steps = min(int(cfg.warmup_epochs * steps_per_epoch), total_steps // 2)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.scheduler == "step":
            return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def start_from_model_file(model: nn.Module, cfg: Config) -> None:
    """Load cfg.init_from's weights into `model` (fp16 files are cast back), refusing a file of another
    architecture, head or age range with both named."""
    checkpoint = load_checkpoint(cfg.init_from)
    stored = config_from_model_file(checkpoint.get("config"), cfg.init_from)
    differing = [name for name in ("model_name", "head", "max_age") if getattr(stored, name) != getattr(cfg, name)]
    if differing:
        raise UsageError(f"--init_from={cfg.init_from} holds a model with another {', '.join(differing)} ("
                         + ", ".join(f"{name}={getattr(stored, name)!r}" for name in differing) + "); pass the same "
                         "values or another file")
    reference = model.state_dict()
    model.load_state_dict({key: value.to(reference[key].dtype) if key in reference else value
                           for key, value in checkpoint["model"].items()})
    print(f"starting from the weights of {cfg.init_from}")


def typical_ages(ranges: Any) -> torch.Tensor:
    """(N,) an age per label for the head's starting statistics: the exact age, or the middle of a bin (an open
    bin such as 70+ as 5 years past its start)."""
    ranges = torch.as_tensor(ranges)  # (N, 2)
    high = torch.where(ranges[:, 1].isinf(), ranges[:, 0] + 10, ranges[:, 1])
    return torch.where(ranges[:, 0] == ranges[:, 1], ranges[:, 0], (ranges[:, 0] + high) / 2)


def training_crop_geometry(cfg: Config, frame: pd.DataFrame) -> dict | None:
    """The crop geometry stored in the checkpoint: faces aligned by align.py (an alignment.json in data_dir) were
    warped onto its template by YuNet's landmarks, so inference with YuNet aligns to that template exactly; MTCNN's
    landmarks sit a little apart, so its geometry is measured on the training faces. Other data: both measured."""
    import json

    marker = Path(cfg.data_dir) / "alignment.json"
    if not marker.is_file():
        return measure_training_crop_geometry(cfg, frame)
    alignment = json.loads(marker.read_text())
    template = CropGeometry.from_dict({"landmarks": alignment["landmarks"]})
    print(f"crop geometry for {alignment['detector']}: align.py's {alignment['template']!r} template ({marker})")
    measured = measure_training_crop_geometry(cfg, frame, detectors=tuple(name for name in DETECTORS
                                                                           if name != alignment["detector"]))
    return {**(measured or {}), alignment["detector"]: template.to_dict()}


def measure_training_crop_geometry(cfg: Config, frame: pd.DataFrame,
                                   detectors: tuple[str, ...] = tuple(DETECTORS)) -> dict | None:
    """Where each detector's five landmarks sit in the training crops (see faces.py), from up to
    cfg.crop_geometry_images training images: {detector name: geometry}, stored in every checkpoint so that
    inference aligns faces the same way with whichever detector it runs. A detector whose package is missing, or
    that finds too few faces, is left out (inference then uses faces.DEFAULT_CROP_GEOMETRIES); None when no
    detector gives one or crop_geometry_images is 0."""
    if cfg.crop_geometry_images == 0:
        return None
    paths = [Path(cfg.data_dir) / name for name in frame["image_name"]]
    geometries = {}
    for name in detectors:
        try:
            geometry = measure_crop_geometry(paths, limit=cfg.crop_geometry_images, detector_name=name)
        except ImportError:  # OpenCV, or the package shipping this detector's weights, is missing
            continue
        print(f"crop geometry of the training faces ({name}, for inference): {geometry}")
        if geometry:
            geometries[name] = geometry.to_dict()
    return geometries or None



# --- run folders and records -------------------------------------------------------------------------------

def find_resume_run(cfg: Config) -> Path:
    """last.pt of run_name, or of the most recently written run under checkpoint_dir."""
    if cfg.run_name:
        path = Path(cfg.checkpoint_dir) / cfg.run_name / "last.pt"
        if not path.is_file():
            raise SystemExit(f"error: --resume found no {path}; check --run_name (runs are in {cfg.checkpoint_dir}/)")
        return path
    candidates = sorted(Path(cfg.checkpoint_dir).glob("*/last.pt"), key=lambda path: path.stat().st_mtime)
    if not candidates:
        raise SystemExit(f"error: --resume found no run with a last.pt in {cfg.checkpoint_dir}/; train one first")
    return candidates[-1]


def new_run_name(cfg: Config, claim: bool = True) -> str:
    """run_name, or <model>_<date>_<time>, with a suffix where that run exists. With `claim` its checkpoint folder
    is created here, atomically (mkdir without exist_ok): of two trainings started with one run_name at once, one
    gets the name and the other the next suffix, so no folder ever mixes two runs."""
    base = cfg.run_name or f"{cfg.model_name.replace('/', '_')}_{datetime.now():%Y%m%d_%H%M%S}"
    Path(cfg.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    name, suffix = base, 1
    while True:
        folder = Path(cfg.checkpoint_dir) / name
        if not (Path(cfg.runs_dir) / name).exists():
            if not claim and not folder.exists():
                return name
            if claim:
                try:
                    folder.mkdir()  # atomic: exactly one of two racing processes creates it
                    return name
                except FileExistsError:
                    pass
        suffix += 1
        name = f"{base}_{suffix}"


def write_json(path: Path, values: dict[str, Any]) -> None:
    with atomic_write_path(path) as temporary:
        temporary.write_text(json.dumps(values, indent=2) + "\n")


def plot_learning_curves(history: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(epochs, [row["train_loss"] for row in history], "o-", label="train")
    axes[0].plot(epochs, [row["valid_loss"] for row in history], "o-", label="valid")
    axes[1].plot(epochs, [row["valid_mae"] for row in history], "o-", color="tab:green", label="valid MAE")
    axes[1].plot(epochs, [row["valid_cs5"] * 100 for row in history], "o-", color="tab:purple", label="valid CS@5 %")
    axes[2].plot(epochs, [row["lr"] for row in history], "o-", color="tab:gray")
    axes[0].set(xlabel="epoch", ylabel="loss of the head", title="loss")
    axes[1].set(xlabel="epoch", title="validation")
    axes[2].set(xlabel="epoch", ylabel="learning rate", title="learning rate (end of epoch)")
    axes[0].legend()
    axes[1].legend()
    figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path, record=True)



# --- several processes (torchrun) --------------------------------------------------------------------------

def setup_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) of this process: torchrun's environment when it launched us, else (0, 1, ...).

    Under torchrun the process group is started here (nccl on CUDA, gloo on CPU) and each rank takes the GPU of
    its LOCAL_RANK."""
    device = resolve_device(cfg.device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def _broadcast(value: Any, world_size: int) -> Any:
    """Rank 0's `value` on every rank (a run name that contains the time must be the same everywhere)."""
    if world_size == 1:
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def _barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()



# --- speed machinery: precision, memory layout, weight average, the optimiser's state ------------------------

class DivergedError(UsageError):
    """The training loss became NaN or infinite."""


# Backbones that train faster under bf16 autocast on a CPU, by measurement (RESULTS.md, "Figures that were code
# comments"): the ResNets, Lite0 and agev1. torchvision's EfficientNet-B0 (depthwise convolutions without fast bf16
# kernels) and ViT-B/16 were slower under it, so they stay in fp32.
CPU_BF16_BACKBONES = ("resnet", "resnet18", "efficientnet_lite0", "agev1_resnet10")


# Backbones whose convolutions on tiny maps (the last stage at 64 px) train faster as unfold + matmul on a CPU
# (model.MatmulConv2d; measured in RESULTS.md, "Figures that were code comments").
CPU_MATMUL_BACKBONES = ("resnet", "resnet18")


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype for this device and backbone, or None for plain fp32."""
    if not cfg.mixed_precision:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cfg.model_name in CPU_BF16_BACKBONES:
        try:
            supported = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        except (AttributeError, RuntimeError):
            supported = False
        return torch.bfloat16 if supported else None
    return None


def place_model(cfg: Config, model: nn.Module, device: torch.device) -> nn.Module:
    """The model on `device` in the configured memory layout; on a CPU the ResNets' convolutions with tiny output
    maps become MatmulConv2d (the same parameters and state dict, a faster backward pass)."""
    if device.type == "cpu" and cfg.model_name in CPU_MATMUL_BACKBONES:
        use_matmul_convolutions(model, cfg.image_size)
    return model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)


@dataclass(frozen=True)
class Execution:
    """How batches run, for training and evaluation alike: the device, the autocast dtype (None: fp32) and the
    memory layout of the images."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype | None = None
    channels_last: bool = False

    @classmethod
    def for_config(cls, cfg: Config, device: torch.device) -> Execution:
        return cls(device, autocast_dtype(cfg, device), cfg.channels_last)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def to_device(self, images: torch.Tensor, ages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=True, memory_format=memory_format)  # (B, 3, H, W)
        return images, ages.to(self.device, non_blocking=True).float()  # (B,)


class WeightAverage:
    """An exponential moving average of a model's weights and batch-norm statistics (Polyak averaging, as timm's
    ModelEmaV2), kept by torch.optim.swa_utils.AveragedModel with use_buffers=True: after every optimiser step
    average = decay * average + (1 - decay) * weights (get_ema_multi_avg_fn). The decay ramps up as
    (1 + n) / (10 + n) over the first steps n, so the random initial weights are forgotten quickly; integer
    buffers (batch-norm step counters) are copied. Saved as {"model": state dict, "updates": n}, the format
    checkpoints have always had."""

    def __init__(self, model: nn.Module, decay: float):
        from torch.optim.swa_utils import AveragedModel

        self.decay = decay
        self.averaged = AveragedModel(unwrap(model), multi_avg_fn=self._ramped_update, use_buffers=True)
        self.module = self.averaged.module.eval().requires_grad_(False)

    def _ramped_update(self, averaged: list[torch.Tensor], current: list[torch.Tensor], averaged_before: torch.Tensor,
                       ) -> None:
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        if not averaged[0].is_floating_point():  # AveragedModel groups tensors by dtype: a list of counters
            torch._foreach_copy_(averaged, current)
            return
        update = int(averaged_before) + 1  # AveragedModel's first update copies; this is update 2, 3, ...
        get_ema_multi_avg_fn(min(self.decay, (1 + update) / (10 + update)))(averaged, current, averaged_before)

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(unwrap(model))

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.averaged.n_averaged.fill_(state["updates"])


@dataclass
class Optimisation:
    """What one optimiser step uses: the optimiser, its schedule (stepped per batch), the fp16 loss scaler, the
    weight average updated after every step, and the step's settings from the config."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None
    average: WeightAverage | None = None
    grad_clip_norm: float = 0.0
    accumulation_steps: int = 1
    mixup_alpha: float = 0.0
    consistency_weight: float = 0.0


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], reads=SETTINGS))
