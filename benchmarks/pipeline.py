"""Speed and memory of our training pipeline against the seed repository's, of data loading, and of inference.

Contenders alternate inside every repeat (A, B, A, B, ...), so drift of the machine (heat, other load) falls on
all of them; each figure is the median over the repeats.

1. Training throughput: images/s over whole optimiser steps, data loading included, for resnet18, resnet
   (ResNet-50) and efficientnet_lite0 with the same image size, batch size, optimizer, head and initial weights:
   - seed: a faithful re-implementation of the seed repository's pipeline: a DataLoader whose workers decode each
     JPEG with PIL every epoch and apply torchvision transforms per image (Resize, RandomHorizontalFlip,
     RandomRotation(10), ColorJitter(0.2, 0.2, 0.2), ToTensor, Normalize); fp32, NCHW;
   - ours: train.py's default path: loading=batch from the decoded cache, whole-batch augmentation,
     channels_last, bf16 autocast when the CPU supports it (train.autocast_dtype), and train.place_model (on the
     CPU, the ResNets' convolutions on tiny maps as matrix products).
   Both run train.train_one_epoch with train.build_optimizer (fused), so the optimiser step is the same code.
   - ceiling: ours with the data path taken away: the same model, optimiser, autocast and layout training on one
     augmented batch that already sits on the device. The median over repeats of ours / ceiling within each repeat
     (the two run one after the other) is the JSON's ceiling_share per model.
   - data only: ours with the model taken away (the same loader and augmentation at the training size, batches
     drawn and dropped). Its time per batch over ours' time per step is the JSON's data_path_share: a second,
     less noisy reading of the same gap, since ceiling_share is a ratio of two noisy step times.
2. Data loading alone (no model), at 128 px: the seed's JPEG path, our per-image path from the cache
   (loading=sample, DataLoader workers) and our batch path (loading=batch), augmentation included in each, plus
   the batch path without augmentation (reading and normalising only).
3. Inference, for resnet18 and efficientnet_lite0: batch throughput (64 faces) and single-face latency of the
   eager model (fp32 NCHW, and bf16 + channels_last), its TorchScript export, its ONNX Runtime export and that
   export quantised to static int8 (export_jit.write_int8; the accuracy check lives in export_jit.py).
4. Peak memory of each contender: the proportional set size (PSS, shared pages split fairly) of this process
   and its DataLoader workers, sampled every 0.5 s while it runs (Linux; n/a elsewhere).

Reads:  --data_dir, a folder of UTKFace-named images (default: 1,200 faces generated at 200 px, the size of
        UTKFace's aligned crops, in a temporary folder). Caches are built in that temporary folder too.
Writes: runs/benchmark/benchmark_<date>_<time>.json (every repeat of every contender); prints the table.

Run:  python -m benchmarks.pipeline                                   # about 3 minutes on 2 CPU cores
      python -m benchmarks.pipeline --data_dir=../shared/data/utkface200 --image_size=64 --device=cpu
"""

from __future__ import annotations

import copy
import itertools
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from config import RECIPE_FIELDS, RUN_FIELDS, Config, parse_config, print_config, resolve_device, seed_everything
from files import atomic_write_path

BENCHMARK_DEFAULTS = Config(  # data_dir '' = generated faces
    data_dir="", image_size=64, pretrained=False, batch_size=64, optimizer="sgd", lr=5e-4, num_workers=2,
    erase_probability=0.0,  # the seed had no random erasing: both contenders augment alike
)
GENERATED_FACES, GENERATED_SIZE = 1200, 200  # the default data: UTKFace-sized JPEGs
MODELS = ("resnet18", "resnet", "efficientnet_lite0")  # the small backbone, the seed's ResNet-50, the offline one
# per model: (warm-up, timed steps); 16 timed steps (3 s) left the ceiling share noisy, 40 steps and back-to-back
# pairs steady it (RESULTS.md, "Training speed")
STEPS = {"resnet18": (3, 40), "resnet": (2, 8), "efficientnet_lite0": (3, 40)}
DATA_ONLY_BATCHES = 40
INFERENCE_MODELS = ("resnet18", "efficientnet_lite0")
REPEATS = 3
LOADING_SIZE, LOADING_BATCHES = 128, 12
LATENCY_RUNS = 20


class _BackgroundSampler:
    """Calls `_take` at once and then every `interval` seconds in a daemon thread while the `with` block runs, when
    `_ready` (asked on entering) says there is something to read."""

    def __init__(self, interval: float):
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _ready(self) -> bool:
        raise NotImplementedError

    def _take(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> _BackgroundSampler:
        if self._ready():
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exception: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take()
            self._stop.wait(self.interval)


class PeakMemory(_BackgroundSampler):
    """Peak memory in MiB of a process and its child processes while the `with` block runs (None off Linux): for
    each of `fields` of /proc/<pid>/smaps_rollup (Pss, the proportional set size, by default; Pss_Anon and others
    exist), summed over the process tree of `pid` ("self" = this process). peak_mib is the first field's.

    Sampled every half second: reading /proc/<pid>/smaps_rollup takes the process's memory-map lock, and
    sampling every 50 ms slowed a ResNet-18 training step by 8-13 % (measured), which would bias the timings."""

    def __init__(self, interval: float = 0.5, pid: str = "self", fields: tuple[str, ...] = ("Pss",)):
        super().__init__(interval)
        self.pid, self.fields = pid, fields
        self.peaks: dict[str, float] | None = None

    @property
    def peak_mib(self) -> float | None:
        return None if self.peaks is None else self.peaks[self.fields[0]]

    def _ready(self) -> bool:
        if _rollup_kib(_process_tree(self.pid), self.fields) is None:
            return False
        self.peaks = dict.fromkeys(self.fields, 0.0)
        return True

    def _take(self) -> None:
        totals = _rollup_kib(_process_tree(self.pid), self.fields)
        if totals is not None:
            self.peaks = {field: max(self.peaks[field], totals[field] / 1024) for field in self.fields}


def _process_tree(pid: str = "self") -> list[str]:
    """The process and all its descendants, from /proc/<pid>/task/*/children."""
    pids, index = [str(Path(f"/proc/{pid}").resolve().name)], 0
    while index < len(pids):
        for children in Path(f"/proc/{pids[index]}/task").glob("*/children"):
            try:
                pids += children.read_text().split()
            except OSError:
                pass
        index += 1
    return pids


def _rollup_kib(pids: list[str], fields: tuple[str, ...]) -> dict[str, int] | None:
    """Each field of smaps_rollup in KiB, summed over pids (None when no process could be read)."""
    totals, found = dict.fromkeys(fields, 0), False
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in totals:
                    totals[name] += int(value.split()[0])
                    found = True
        except OSError:
            continue
    return totals if found else None


class SeedFaceDataset(torch.utils.data.Dataset):
    """The seed repository's data set: open the JPEG with PIL on every access, torchvision transforms per image."""

    def __init__(self, paths: list[Path], ages: list[float], image_size: int, mean: tuple, std: tuple):
        from torchvision import transforms

        self.paths, self.ages = paths, ages
        self.transform = transforms.Compose([
            transforms.Resize((image_size, image_size)),
            transforms.RandomHorizontalFlip(),
            transforms.RandomRotation(10),
            transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            pixels = self.transform(image.convert("RGB"))  # (3, S, S) float32
        return pixels, torch.tensor(self.ages[index], dtype=torch.float32), -1, -1


def seed_loader(cfg: Config, csv_path: Path, image_size: int) -> torch.utils.data.DataLoader:
    from custom_dataset_dataloader import read_dataset_csv, resolve_image_path
    from model import resolve_preprocessing

    cfg = resolve_preprocessing(cfg)  # the backbone's normalisation, as the seed's ImageNet one for torchvision's
    frame = read_dataset_csv(csv_path)
    paths = [resolve_image_path(cfg.data_dir, name) for name in frame["image_name"]]
    dataset = SeedFaceDataset(paths, frame["age"].astype(float).tolist(), image_size, cfg.normalize_mean,
                              cfg.normalize_std)
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                       num_workers=cfg.num_workers)


def our_loader(cfg: Config, csv_path: Path, device: torch.device):
    from custom_dataset_dataloader import build_dataloader

    return build_dataloader(cfg, "train", csv_path=str(csv_path), device=device)


class _Steps:
    """`count` batches taken from a shared iterator (so warm-up and timed steps continue one stream)."""

    def __init__(self, batches: Iterator, count: int):
        self.batches, self.count = batches, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator:
        return itertools.islice(self.batches, self.count)


def _forever(loader: Any) -> Iterator:
    epoch = 0
    while True:
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


class GpuUtilisation(_BackgroundSampler):
    """The mean share of time a CUDA device ran kernels while the `with` block runs, sampled every half second from
    NVML (torch.cuda.utilization, which needs the nvidia-ml-py package; else `nvidia-smi`): None off CUDA, or where
    neither answers."""

    def __init__(self, device: torch.device, interval: float = 0.5):
        super().__init__(interval)
        self.device, self.samples = device, []
        self._read: Callable[[], float] | None = None

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) / 100 if self.samples else None

    def _reader(self) -> Callable[[], float] | None:
        import subprocess

        def from_nvidia_smi() -> float:
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            answer = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu",
                                     "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
            return float(answer.stdout.strip())

        for read in (lambda: float(torch.cuda.utilization(self.device)), from_nvidia_smi):
            try:
                read()
                return read
            except Exception:  # noqa: BLE001 - no NVML binding, no nvidia-smi, or no answer: try the next
                continue
        return None

    def _ready(self) -> bool:
        if self.device.type == "cuda":
            self._read = self._reader()
        return self._read is not None

    def _take(self) -> None:
        self.samples.append(self._read())


def measure_training(cfg: Config, model_name: str, contender: str, csv_path: Path, device: torch.device,
                     steps: tuple[int, int] | None = None) -> dict:
    """images/s of whole training steps (data included), peak memory and (on CUDA) GPU utilisation, for one contender
    and backbone. steps: (warm-up, timed) steps, STEPS[model_name] by default; timed 0 = one epoch of the loader.
    With cfg.compile, ours and the ceiling run under torch.compile (its compilation falls in the warm-up)."""
    import train
    from model import build_model

    model_cfg = replace(cfg, model_name=model_name)
    warmup, timed = steps or STEPS[model_name]
    if contender == "data only":  # the loader of ours at the training size, without a model
        return measure_batches(our_loader(model_cfg, csv_path, device), DATA_ONLY_BATCHES)
    with PeakMemory() as memory:
        seed_everything(cfg.seed)
        model = build_model(model_cfg)
        model.set_age_statistics(33.0, 20.0)
        fast = contender in ("ours", "ceiling")
        execution = train.Execution.for_config(model_cfg, device) if fast else train.Execution(device)
        model = train.place_model(model_cfg, model, device) if fast else model.to(device)
        optimizer = train.build_optimizer(model_cfg, model)
        if fast and model_cfg.compile:
            model = torch.compile(model)
        loader = our_loader(model_cfg, csv_path, device) if fast else seed_loader(model_cfg, csv_path, cfg.image_size)
        timed = timed or len(loader)
        batches = _forever(loader)
        if contender == "ceiling":  # the model-only step: one augmented batch already on the device, over and over
            batches = itertools.repeat(next(batches))
        optimisation = train.Optimisation(optimizer)
        started = time.perf_counter()
        train.train_one_epoch(model, _Steps(batches, warmup), optimisation, execution, show_progress=False)
        _synchronize(device)
        warmup_seconds = time.perf_counter() - started
        with GpuUtilisation(device) as utilisation:
            started = time.perf_counter()
            train.train_one_epoch(model, _Steps(batches, timed), optimisation, execution, show_progress=False)
            _synchronize(device)
            seconds = time.perf_counter() - started
        del batches  # stops the seed's worker processes
    return {"images_per_second": timed * cfg.batch_size / seconds, "seconds": seconds, "steps": timed,
            "warmup_seconds": warmup_seconds, "peak_mib": memory.peak_mib, "gpu_utilisation": utilisation.mean}


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that a clock read after it counts them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_batches(loader: Any, count: int) -> dict:
    """images/s of drawing `count` batches from `loader` after a first, uncounted one (worker start-up)."""
    with PeakMemory() as memory:
        batches = _forever(loader)
        next(batches)
        started = time.perf_counter()
        images = sum(len(batch[0]) for batch in itertools.islice(batches, count))
        seconds = time.perf_counter() - started
        del batches  # stops the workers
    return {"images_per_second": images / seconds, "peak_mib": memory.peak_mib}


def measure_loading(cfg: Config, contender: str, csv_path: Path) -> dict:
    """images/s of augmented, normalised batches at LOADING_SIZE px, with no model."""
    from custom_dataset_dataloader import BatchAugmentation
    from model import resolve_preprocessing

    loading = "sample" if contender == "cache, per image" else "batch"
    loading_cfg = resolve_preprocessing(replace(cfg, image_size=LOADING_SIZE, loading=loading))
    if contender == "seed JPEG":
        loader = seed_loader(loading_cfg, csv_path, LOADING_SIZE)
    else:
        loader = our_loader(loading_cfg, csv_path, torch.device("cpu"))
    if contender == "cache, batch, no augmentation":
        loader.augmentation = BatchAugmentation(loading_cfg, train=False)  # read + normalise only
    return measure_batches(loader, LOADING_BATCHES)


def inference_runners(cfg: Config, folder: Path, model_name: str) -> dict[str, Callable[[torch.Tensor], Any]]:
    """Eager fp32, eager bf16 + channels_last, TorchScript, ONNX Runtime and its static int8 versions of one model."""
    import export_jit
    import train
    from model import build_model

    seed_everything(cfg.seed)
    cfg = replace(cfg, model_name=model_name)
    model = build_model(cfg).eval()
    example = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    runners: dict[str, Callable[[torch.Tensor], Any]] = {"eager fp32": model}
    fast_model = copy.deepcopy(model).to(memory_format=torch.channels_last)  # the same weights, NHWC
    dtype = train.autocast_dtype(cfg, torch.device("cpu"))

    def fast(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            return fast_model(images.contiguous(memory_format=torch.channels_last))

    runners["eager bf16 + channels_last" if dtype else "eager channels_last"] = fast
    metadata = {"config.json": "{}"}
    export_jit.export_torchscript(model, example, folder / f"{model_name}.torchscript", metadata)
    runners["TorchScript"] = torch.jit.load(str(folder / f"{model_name}.torchscript"))
    try:
        import onnxruntime

        onnx_path = folder / f"{model_name.replace('/', '_')}.onnx"
        export_jit.export_onnx(model, example, onnx_path, metadata)
        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        runners["ONNX Runtime"] = lambda images: session.run(None, {"images": images.numpy()})[0]
        for method in ("u8s8", "s8s8"):  # the two static int8 forms export_jit.py may write
            int8_path = onnx_path.with_name(f"{onnx_path.stem}.{method}.onnx")
            # speed only (an untrained model): the ranges come from random batches; export_jit.py calibrates on
            # real crops and checks the test MAE
            calibration = (torch.randn(1, 3, cfg.image_size, cfg.image_size).numpy() for _ in range(16))
            export_jit.write_int8(onnx_path, int8_path, calibration, method)
            int8 = onnxruntime.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
            try:
                int8.run(None, {"images": example.numpy()})
            except Exception as error:  # noqa: BLE001 - int8 depthwise kernels refuse some tiny feature maps
                print(f"{model_name} int8 {method} does not run at {cfg.image_size} px ({type(error).__name__}): "
                      "its row is left out")
                continue
            runners[f"ONNX Runtime int8 {method}"] = lambda images, int8=int8: int8.run(
                None, {"images": images.numpy()})[0]
    except ImportError:
        print("onnx / onnxruntime not installed: the ONNX Runtime row is skipped")
    return runners


@torch.inference_mode()
def measure_inference(runner: Callable[[torch.Tensor], Any], image_size: int, batch_size: int) -> dict:
    batch, single = torch.randn(batch_size, 3, image_size, image_size), torch.randn(1, 3, image_size, image_size)
    with PeakMemory() as memory:
        runner(batch)
        runner(single)
        started = time.perf_counter()
        for _ in range(3):
            runner(batch)
        throughput = 3 * batch_size / (time.perf_counter() - started)
        latencies = []
        for _ in range(LATENCY_RUNS):
            started = time.perf_counter()
            runner(single)
            latencies.append(1000 * (time.perf_counter() - started))
    return {"images_per_second": throughput, "latency_ms": statistics.median(latencies), "peak_mib": memory.peak_mib}


def prepare_data(cfg: Config, folder: Path, models: tuple[str, ...] = MODELS) -> tuple[Config, Path]:
    """The data set CSV of cfg.data_dir (generated faces when it does not exist) and the caches `models` need."""
    import eda
    from custom_dataset_dataloader import build_image_cache, read_dataset_csv, write_dataset_csv

    if not cfg.data_dir:
        from demo import generate_dataset

        data_dir = folder / "faces"
        print(f"no --data_dir: generating {GENERATED_FACES} faces at {GENERATED_SIZE} px in "
              f"{data_dir}", flush=True)
        generate_dataset(data_dir, GENERATED_FACES, seed=cfg.seed, size=GENERATED_SIZE)
        cfg = replace(cfg, data_dir=str(data_dir))
    frame, _, _ = eda.scan_folder(cfg.data_dir, check_images=False)
    csv_path = folder / "benchmark_set.csv"
    write_dataset_csv(frame, csv_path)
    cfg = replace(cfg, cache_dir=str(folder / "cache"))
    from model import resolve_preprocessing

    interpolations = {resolve_preprocessing(replace(cfg, model_name=name)).interpolation for name in models}
    for size, interpolation in sorted({(cfg.image_size, name) for name in interpolations}
                                      | {(LOADING_SIZE, resolve_preprocessing(cfg).interpolation)}):
        started = time.perf_counter()
        build_image_cache(read_dataset_csv(csv_path), cfg.data_dir, size, cfg.cache_dir, csv_path.stem,
                          cfg.num_workers, interpolation)
        print(f"decoded cache of {len(frame)} images at {size} px ({interpolation}) built in "
              f"{time.perf_counter() - started:.1f}s (once per data set, size and filter; train.py reuses it)",
              flush=True)
    return cfg, csv_path


def _median(runs: list[dict], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.median(values) if values else None


def _row(name: str, runs: list[dict], baseline: float | None = None, latency: bool = False) -> str:
    speed, memory = _median(runs, "images_per_second"), _median(runs, "peak_mib")
    text = f"  {name:<30}{speed:>10.1f} img/s"
    if latency:
        text += f"{_median(runs, 'latency_ms'):>10.2f} ms"
    text += f"{memory:>10.0f} MiB" if memory is not None else f"{'n/a':>14}"
    if baseline:
        text += f"   x{speed / baseline:.2f}"
    return text


SETTINGS = (*RECIPE_FIELDS, *RUN_FIELDS)  # what this script reads (its --help)


def main(cfg: Config) -> dict[str, Any]:
    """Run every measurement, print the table, write the JSON; returns {section: {contender: [runs]}}."""
    print_config(cfg, "benchmarks.pipeline", SETTINGS)
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="benchmark_") as temporary:
        folder = Path(temporary)
        cfg, csv_path = prepare_data(cfg, folder)
        for model_name in MODELS:
            section = results.setdefault(f"training {model_name}", {"seed": [], "ours": [], "ceiling": [],
                                                                           "data only": []})
            for repeat in range(REPEATS):
                for contender in section:
                    section[contender].append(measure_training(cfg, model_name, contender, csv_path, device))
                    print(f"training {model_name} repeat {repeat + 1}/{REPEATS} {contender}: "
                          f"{section[contender][-1]['images_per_second']:.1f} img/s", flush=True)
        loading = results.setdefault("loading", {
            "seed JPEG": [], "cache, per image": [], "cache, batch": [], "cache, batch, no augmentation": []})
        for _ in range(REPEATS):
            for contender in loading:
                loading[contender].append(measure_loading(cfg, contender, csv_path))
        for model_name in INFERENCE_MODELS:
            runners = inference_runners(cfg, folder, model_name)
            inference = results.setdefault(f"inference {model_name}", {name: [] for name in runners})
            for _ in range(REPEATS):
                for name, runner in runners.items():
                    inference[name].append(measure_inference(runner, cfg.image_size, cfg.batch_size))

    processor = f"{torch.get_num_threads()} threads, {device}"
    print(f"\n=== benchmark ({processor}; median of {REPEATS} alternating repeats; memory = peak PSS of the "
          "process and its workers) ===")
    ceiling_shares: dict[str, float] = {}
    data_path_shares: dict[str, float] = {}
    for model_name in MODELS:
        section = results[f"training {model_name}"]
        print(f"training {model_name}, {cfg.image_size} px, batch {cfg.batch_size}, {cfg.optimizer}, data included")
        print(_row("seed pipeline (PIL, fp32)", section["seed"]))
        print(_row("ours (cache, bf16, NHWC)", section["ours"], _median(section["seed"], "images_per_second")))
        share = statistics.median(ours["images_per_second"] / ceiling["images_per_second"]  # side by side in time,
                                  for ours, ceiling in zip(section["ours"], section["ceiling"], strict=True))
        ceiling_shares[model_name] = share  # so the minutes-long drift of the machine cancels within each pair
        print(_row("model only (the ceiling)", section["ceiling"], _median(section["seed"], "images_per_second")))
        ours_step = cfg.batch_size / _median(section["ours"], "images_per_second")  # seconds per step
        data_path_shares[model_name] = cfg.batch_size / _median(section["data only"], "images_per_second") / ours_step
        print(f"  ours is {share:.1%} of the ceiling; drawing a batch alone takes "
              f"{data_path_shares[model_name]:.1%} of ours' step time")
    print(f"data loading alone, {LOADING_SIZE} px, batch {cfg.batch_size}, augmentation included")
    baseline = _median(results["loading"]["seed JPEG"], "images_per_second")
    for name, runs in results["loading"].items():
        print(_row(name, runs, None if name == "seed JPEG" else baseline))
    for model_name in INFERENCE_MODELS:
        print(f"inference {model_name}, {cfg.image_size} px: batch of {cfg.batch_size} (img/s) and one face (ms)")
        section = results[f"inference {model_name}"]
        baseline = _median(section["eager fp32"], "images_per_second")
        for name, runs in section.items():
            print(_row(name, runs, None if name == "eager fp32" else baseline, latency=True))
    seconds = time.perf_counter() - started
    print(f"benchmark finished in {seconds:.0f}s")
    output = Path(cfg.runs_dir) / "benchmark" / f"benchmark_{datetime.now():%Y%m%d_%H%M%S}.json"
    with atomic_write_path(output) as path:
        path.write_text(json.dumps({"config": {"image_size": cfg.image_size, "batch_size": cfg.batch_size,
                                               "data_dir": cfg.data_dir, "device": str(device)},
                                    "seconds": seconds, "ceiling_share": ceiling_shares,
                                    "data_path_share": data_path_shares, "results": results},
                                   indent=2) + "\n")
    print(f"every repeat: {output}")
    return results


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], base=BENCHMARK_DEFAULTS, reads=SETTINGS))
