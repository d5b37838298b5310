"""The prepared GPU measurement: one training epoch of ResNet-50 at 128 px on UTKFace (~15k training faces), ours
against the seed repository's pipeline, with the GPU's utilisation and the model-only ceiling.

Contenders, each one whole epoch of the data set after WARMUP_STEPS uncounted steps, through the same
train.train_one_epoch and optimiser (pipeline.measure_training, which benchmarks.pipeline times on the CPU):
- seed: the seed's pipeline (PIL decoding and torchvision transforms per image in DataLoader workers, fp32, NCHW);
- ours: the decoded uint8 cache resident on the GPU, whole-batch augmentation on the GPU, bf16 autocast,
  channels_last (train.py's default path on a GPU);
- ours, compiled: the same under torch.compile (--compile=False leaves it out; its compilation is the warm-up's);
- ceiling: ours with the data path taken away, training on one batch already on the GPU, an epoch's steps.
Each reports images/s, seconds, the mean GPU utilisation over the timed epoch (NVML, pipeline.GpuUtilisation)
and peak host memory. ceiling_share = ours / ceiling, as in benchmarks.pipeline.

No GPU was lent while this was written: it runs in the tests on the CPU with a tiny data set and ResNet-18, and
its GPU figures are for whoever has one (record them in RESULTS.md, "Training speed").

Reads:  --data_dir (default ../shared/data/utkface64, UTKFace at 64 px upsampled to 128 as a user's run would;
        '' = 1,200 generated faces)
Writes: runs/benchmark/gpu_<date>_<time>.json (every contender's figures); prints the table.

Run:  python -m benchmarks.gpu                              # a CUDA machine, a few minutes
      python -m benchmarks.gpu --data_dir=<folder> --batch_size=128 --compile=False
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from benchmarks import pipeline
from config import RECIPE_FIELDS, RUN_FIELDS, Config, UsageError, parse_config, print_config, resolve_device
from files import atomic_write_path

GPU_DEFAULTS = replace(
    pipeline.BENCHMARK_DEFAULTS, data_dir="../shared/data/utkface64", model_name="resnet", image_size=128,
    batch_size=256,  # a GPU-sized batch for both contenders (the seed used 100, too few to keep an H200 busy)
    num_workers=8,  # the seed's decoding workers (ours reads its cache and needs none)
    compile=True,
)
WARMUP_STEPS = 5  # cuDNN's algorithm search, worker start-up and (compiled) compilation fall here


SETTINGS = (*RECIPE_FIELDS, *RUN_FIELDS)  # what this script reads (its --help)


def main(cfg: Config) -> dict[str, Any]:
    """Every contender's epoch, the table, the JSON; returns {"results": {contender: figures}, "ceiling_share"}."""
    import tempfile

    print_config(cfg, "benchmarks.gpu", SETTINGS)
    device = resolve_device(cfg.device)
    if device.type != "cuda":
        print(f"warning: no CUDA device ({device}): these figures measure the {device.type}, not a GPU")
    if cfg.data_dir and not Path(cfg.data_dir).is_dir():
        raise UsageError(f"--data_dir={cfg.data_dir} is not a folder: give a folder of UTKFace-named images, or "
                         "--data_dir= (empty) for generated faces")
    contenders = {"seed": "seed", "ours": "ours"} | ({"ours, compiled": "ours"} if cfg.compile else {})
    contenders["ceiling"] = "ceiling"  # the model-only step of ours as it is uncompiled
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="benchmark_gpu_") as temporary:
        prepared, csv_path = pipeline.prepare_data(cfg, Path(temporary), models=(cfg.model_name,))
        for name, contender in contenders.items():
            run_cfg = replace(prepared, compile=name == "ours, compiled")
            results[name] = pipeline.measure_training(run_cfg, cfg.model_name, contender, csv_path, device,
                                                       steps=(WARMUP_STEPS, 0))
            print(f"{name}: {results[name]['images_per_second']:.0f} img/s", flush=True)
    share = results["ours"]["images_per_second"] / results["ceiling"]["images_per_second"]
    seed_rate = results["seed"]["images_per_second"]
    print(f"\n=== one training epoch: {cfg.model_name}, {cfg.image_size} px, batch {cfg.batch_size}, {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'no GPU'}) ===")
    print(f"{'contender':<16}{'img/s':>9}{'× seed':>8}{'epoch s':>9}{'warm-up s':>11}{'GPU busy':>10}{'host MiB':>10}")
    for name, figures in results.items():
        busy = figures["gpu_utilisation"]
        memory = figures["peak_mib"]
        print(f"{name:<16}{figures['images_per_second']:>9.0f}{figures['images_per_second'] / seed_rate:>7.2f}×"
              f"{figures['seconds']:>9.1f}{figures['warmup_seconds']:>11.1f}"
              f"{'n/a' if busy is None else f'{busy:.0%}':>10}{'n/a' if memory is None else f'{memory:.0f}':>10}")
    print(f"ours is {share:.1%} of the ceiling")
    output = Path(cfg.runs_dir) / "benchmark" / f"gpu_{datetime.now():%Y%m%d_%H%M%S}.json"
    summary = {"results": results, "ceiling_share": share}
    with atomic_write_path(output) as path:
        path.write_text(json.dumps({"config": {"model_name": cfg.model_name, "image_size": cfg.image_size,
                                               "batch_size": cfg.batch_size, "data_dir": cfg.data_dir,
                                               "device": str(device)}, **summary}, indent=2) + "\n")
    print(f"written: {output}")
    return summary


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], base=GPU_DEFAULTS, reads=SETTINGS))
