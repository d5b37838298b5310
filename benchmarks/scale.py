"""How the cost of each stage grows with the data set: time per image and peak memory against N.

For each N in --scale_sizes, N UTKFace-named 200 px faces are written to a temporary folder, and each stage runs
in a fresh Python process, as a user runs it, on that folder:
  eda           eda.main: scan the names, check every image (decoded in --num_workers processes), the figures
  split         split_dataset.main
  cache         custom_dataset_dataloader.main: the decoded 64 px caches of the three splits (memory-mapped)
  train epoch   one epoch of ResNet-18 at 64 px from scratch (train.main --epochs=1; the epoch's own time from its
                log line: training plus the validation pass)
Each stage's time is measured around its main(cfg) inside the child, so the imports (a constant) are left out,
torchvision's among them: the cache and training stages import it lazily, to read the backbone's normalisation
(2-3 s, which had counted as serial work of the cache build).
Meanwhile this process samples the child's process tree (workers included) every 0.5 s for two peaks, each the
proportional set size (a page shared by a parent and its forked workers counts once, split between them):
  anonymous (Pss_Anon)  what the stage allocates itself: the figure that runs a machine out of memory;
  resident (Pss)        that plus the file pages it maps, among them the memory-mapped cache (page cache that
                        the kernel can drop: it grows with N by design and is not the stage's own memory).
Time per image is given two ways: the stage's seconds / N, and the marginal seconds per extra image between two
sizes, (t(N2) - t(N1)) / (N2 - N1), which leaves out what a stage costs whatever N (worker start-up, figures):
a stage that grows faster than linearly shows as a rising marginal cost.
At the largest N the image check (eda.scan_folder alone) and the cache build then run WORKER_ROUNDS more times
each with num_workers=2 and at once with 1: the speed-up with 2 workers on 2 cores is the median of the rounds'
ratios, each of two runs back to back.

The faces: demo.py's generator draws min(N, 5,000) distinct faces once (two processes); each N gets those files
and, past 5,000, byte copies of them under new UTKFace names with freshly drawn labels. What is measured is
decoding, resizing and bookkeeping per file, which does not depend on which face a file shows; drawing 80,000
faces would take 40 CPU minutes.

Reads:  nothing (generated data).  Writes: runs/benchmark/scale_<date>_<time>.json (every figure) and
        pics/scale_benchmark.png (log-log: time per image and peak memory against N); prints the table and an
        extrapolation to 500,000 faces.
Run:    python -m benchmarks.scale                                   # 5k, 20k and 80k faces: ~25 min on 2 cores
        python -m benchmarks.scale --scale_sizes=5000,20000          # ~6 min
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from config import RECIPE_FIELDS, RUN_FIELDS, Config, folders_under, parse_config, print_config
from files import atomic_write_path, remove_scratch_folder, save_figure

SCALE_DEFAULTS = Config(image_size=64, model_name="resnet18", pretrained=False, epochs=1, num_workers=2)
DISTINCT_FACES, FACE_SIZE = 5000, 200
STAGES = ("eda", "split", "cache", "train epoch")
EXTRAPOLATE_TO, CACHE_SIZES = 500_000, (64, 128, 224)
# rounds of (2 workers, then 1) for the image check and the cache build at the largest N: single pairs minutes apart
# gave 1.48-1.83x for the same code (RESULTS.md, "Scale")
WORKER_ROUNDS = 3
SAMPLE_SECONDS = 0.5  # reading smaps_rollup takes the memory-map lock; PeakMemory measured 0.5 s harmless
_EPOCH_LINE = re.compile(r"^epoch\s+1/1 .*?([\d.]+)s", re.MULTILINE)


def run_stage(arguments: list[str]) -> None:
    """In the child: run one stage on the --key=value settings that follow its name; print its seconds."""
    stage, cfg = arguments[0], parse_config(arguments[1:])
    if stage == "eda":
        import eda as module
    elif stage == "image check":
        import eda

        started = time.perf_counter()
        eda.scan_folder(cfg.data_dir, True, num_workers=cfg.num_workers)
        print(f"STAGE_SECONDS {time.perf_counter() - started}")
        return
    elif stage == "split":
        import split_dataset as module
    elif stage == "cache":
        import custom_dataset_dataloader as module
    elif stage == "train epoch":
        import train as module
    else:
        raise SystemExit(f"error: unknown stage {stage!r}")
    if stage in ("cache", "train epoch"):
        import torchvision  # noqa: F401 - imported inside main (model.resolve_preprocessing): timed apart, as above
    started = time.perf_counter()
    module.main(cfg)
    print(f"STAGE_SECONDS {time.perf_counter() - started}")


def measure_stage(stage: str, cfg: Config, log: Path) -> dict[str, float]:
    """Run a stage in a child process; its seconds and peak memory (MiB). Stops with the log's tail on failure."""
    settings = [f"--{name}={getattr(cfg, name)}" for name in (
        "data_dir", "csv_dir", "pics_dir", "cache_dir", "checkpoint_dir", "runs_dir", "num_workers", "image_size",
        "model_name", "pretrained", "epochs", "seed")]
    command = [sys.executable, "-c", "import sys; from benchmarks import scale; scale.run_stage(sys.argv[1:])", stage,
               *settings, "--tta=false", "--run_name=scale", "--device=cpu"]
    from benchmarks.pipeline import PeakMemory  # here, not at the top: the stages' own processes need not import it

    with log.open("w") as output:
        child = subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent, stdout=output,
                                 stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
        with PeakMemory(SAMPLE_SECONDS, str(child.pid), ("Pss_Anon", "Pss")) as memory:
            code = child.wait()
    peaks = memory.peaks or {"Pss_Anon": 0.0, "Pss": 0.0}  # zeros off Linux
    text = log.read_text()
    if code != 0 or "STAGE_SECONDS" not in text:
        raise SystemExit(f"error: stage {stage!r} failed (exit {code}); the end of {log}:\n{text[-3000:]}")
    seconds = float(text.rsplit("STAGE_SECONDS", 1)[1].split()[0])
    if stage == "train epoch":
        seconds = float(_EPOCH_LINE.findall(text)[-1])
    return {"seconds": seconds, "anonymous_mib": peaks["Pss_Anon"], "resident_mib": peaks["Pss"]}


def _generate_chunk(folder: str, count: int, seed: int, first_index: int) -> list[str]:
    from demo import generate_dataset

    return [str(path) for path in generate_dataset(folder, count, seed=seed, size=FACE_SIZE, first_index=first_index)]


def draw_faces(folder: Path, count: int, seed: int, workers: int = 2) -> list[Path]:
    """count distinct faces drawn by demo.py's generator into folder, in `workers` processes."""
    chunks = [(index * count // workers, (index + 1) * count // workers) for index in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        drawn = pool.map(_generate_chunk, [str(folder)] * workers, [end - start for start, end in chunks],
                         [seed + index for index in range(workers)], [start for start, _ in chunks])
        return [Path(path) for paths in drawn for path in paths]


def write_faces(folder: Path, count: int, drawn: list[Path], seed: int) -> None:
    """count UTKFace-named faces in folder: the drawn ones (at most count), then copies of them under new names with
    freshly drawn labels (see the docstring)."""
    import numpy as np

    from demo import sample_labels

    for path in drawn[:count]:
        shutil.copyfile(path, folder / path.name)
    labels = sample_labels(max(count - len(drawn), 0), np.random.default_rng(seed + 1000))
    for index, (age, gender, race) in enumerate(labels):
        target = folder / f"{age}_{gender}_{race}_2026010113{index:07d}.jpg.chip.jpg"
        shutil.copyfile(drawn[index % len(drawn)], target)


def measure_size(cfg: Config, count: int, drawn: list[Path], root: Path, worker_comparison: bool) -> dict[str, Any]:
    """Every stage on `count` faces (from the drawn ones) under root; with worker_comparison also 1-worker runs."""
    faces = root / "faces"
    faces.mkdir(parents=True)
    started = time.perf_counter()
    write_faces(faces, count, drawn, cfg.seed)
    print(f"N = {count:,}: faces written in {time.perf_counter() - started:.0f}s", flush=True)
    stage_cfg = replace(cfg, data_dir=str(faces), **folders_under(root))
    result: dict[str, Any] = {"faces": count, "stages": {}}
    for stage in STAGES:
        result["stages"][stage] = measure_stage(stage, stage_cfg, root / f"{stage.replace(' ', '_')}.log")
        figures = result["stages"][stage]
        print(f"  {stage:<12} {figures['seconds']:8.1f}s {1000 * figures['seconds'] / count:8.3f} ms/image "
              f"peak anonymous {figures['anonymous_mib']:7.0f} MiB, resident {figures['resident_mib']:7.0f} MiB",
              flush=True)
    result["csv_bytes"] = sum(path.stat().st_size for path in Path(stage_cfg.csv_dir).glob("*.csv"))
    result["cache_bytes"] = sum(path.stat().st_size for path in Path(stage_cfg.cache_dir).glob("*.npy"))
    if worker_comparison:
        result["worker_rounds"] = [worker_round(stage_cfg, root, index) for index in range(WORKER_ROUNDS)]
        for name in result["worker_rounds"][0]:  # each run's figures: the round with the median seconds
            runs = sorted((pair[name] for pair in result["worker_rounds"]), key=lambda figures: figures["seconds"])
            result["stages"][name] = runs[len(runs) // 2]
    remove_scratch_folder(faces)  # the next N needs the disk, not these
    return result


def worker_round(cfg: Config, root: Path, index: int) -> dict[str, dict[str, float]]:
    """The image check and the cache build with 2 workers, each followed at once by the same with 1 (a fresh cache
    folder each time): one pair per stage, minutes apart from the next round's."""
    figures = {}
    for stage in ("image check", "cache"):
        for workers in (2, 1):
            name, cache_dir = f"{stage}, {workers} worker(s)", root / f"cache_round{index}_{workers}"
            figures[name] = measure_stage(stage, replace(cfg, num_workers=workers, cache_dir=str(cache_dir)),
                                          root / f"{stage.replace(' ', '_')}_round{index}_{workers}.log")
            remove_scratch_folder(cache_dir)
        one, two = (figures[f"{stage}, {workers} worker(s)"]["seconds"] for workers in (1, 2))
        print(f"  worker round {index + 1}/{WORKER_ROUNDS}: {stage}, 1 worker {one:.1f}s, 2 workers {two:.1f}s: "
              f"x{one / two:.2f}", flush=True)
    return figures


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [result["faces"] for result in results]
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage in STAGES:
        stages = [result["stages"][stage] for result in results]
        time_axis.plot(sizes, [1000 * figures["seconds"] / size for figures, size in zip(stages, sizes, strict=True)],
                       marker="o", label=stage)
        memory_axis.plot(sizes, [figures["anonymous_mib"] for figures in stages], marker="o", label=stage)
    memory_axis.plot(sizes, [result["csv_bytes"] / 2**20 for result in results], "k--", label="the CSVs' size")
    for axis, label in ((time_axis, "ms per image"), (memory_axis, "peak anonymous memory (MiB)")):
        axis.set(xscale="log", yscale="log", xlabel="faces in the data set (N)", ylabel=label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    time_axis.set_title("time per image (flat = linear total)")
    memory_axis.set_title("peak memory of each stage")
    save_figure(figure, path)


def report(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Print the table, the growth from the smallest to the largest N and the extrapolation; return the figures."""
    smallest, largest = results[0], results[-1]
    print(f"\n{'stage':<12} " + " ".join(f"{result['faces']:>17,}" for result in results) + "   growth of ms/image")
    growth = {}
    for stage in STAGES:
        cells = [f"{1000 * figures['seconds'] / result['faces']:6.3f} ms {figures['anonymous_mib']:5.0f}M"
                 for result in results for figures in [result["stages"][stage]]]
        per_image = [r["stages"][stage]["seconds"] / r["faces"] for r in (smallest, largest)]
        growth[stage] = per_image[1] / per_image[0]
        print(f"{stage:<12} " + " ".join(f"{cell:>17}" for cell in cells) + f"   x{growth[stage]:.2f}")
    print("(each cell: ms per image, peak anonymous MiB)")
    marginal: dict[str, list[float]] = {}
    if len(results) > 1:
        print("marginal ms per extra image between consecutive sizes:")
        for stage in STAGES:
            marginal[stage] = [1000 * (later["stages"][stage]["seconds"] - earlier["stages"][stage]["seconds"])
                               / (later["faces"] - earlier["faces"]) for earlier, later in itertools.pairwise(results)]
            print(f"  {stage:<12} " + " ".join(f"{value:8.3f}" for value in marginal[stage]))
    speedups = {}
    for stage in ("image check", "cache"):
        ratios = [pair[f"{stage}, 1 worker(s)"]["seconds"] / pair[f"{stage}, 2 worker(s)"]["seconds"]
                  for pair in largest.get("worker_rounds", [])]
        if ratios:  # the median of the rounds' ratios: each pair ran back to back, so the machine's drift cancels
            speedups[stage] = statistics.median(ratios)
            print(f"{stage} at N = {largest['faces']:,}, 2 workers against 1: x{speedups[stage]:.2f} (median of "
                  + ", ".join(f"x{ratio:.2f}" for ratio in ratios) + ")")
    scale = EXTRAPOLATE_TO / largest["faces"]
    print(f"\nextrapolated to {EXTRAPOLATE_TO:,} faces (linearly from N = {largest['faces']:,}):")
    extrapolation: dict[str, Any] = {"minutes": {}, "cache_gib": {}, "anonymous_gib": {}}
    for stage in STAGES:
        figures = largest["stages"][stage]
        previous = results[-2]["stages"][stage] if len(results) > 1 else figures
        slope = (figures["anonymous_mib"] - previous["anonymous_mib"]) / max(largest["faces"] - (
            results[-2]["faces"] if len(results) > 1 else 0), 1)
        memory = figures["anonymous_mib"] + max(slope, 0.0) * (EXTRAPOLATE_TO - largest["faces"])
        extrapolation["minutes"][stage] = figures["seconds"] * scale / 60
        extrapolation["anonymous_gib"][stage] = memory / 1024
        print(f"  {stage:<12} {figures['seconds'] * scale / 60:7.1f} min, peak anonymous memory "
              f"{memory / 1024:6.2f} GiB (the last two sizes' slope)")
    for size in CACHE_SIZES:
        extrapolation["cache_gib"][size] = EXTRAPOLATE_TO * 3 * size * size / 2**30
    print("  decoded cache on disk (N x 3 x S x S bytes): " + ", ".join(
        f"{size} px {gib:.1f} GiB" for size, gib in extrapolation["cache_gib"].items()))
    return {"growth_of_time_per_image": growth, "marginal_ms_per_image": marginal, "worker_speedup": speedups,
            "extrapolation": extrapolation}


SETTINGS = (*RECIPE_FIELDS, *RUN_FIELDS, "scale_sizes")  # what this script reads (its --help)


def main(cfg: Config) -> dict[str, Any]:
    """Measure every size, print the table, write the JSON and the figure; returns the figures."""
    print_config(cfg, "benchmarks.scale", SETTINGS)
    sizes = sorted({int(value) for value in cfg.scale_sizes.split(",") if value.strip()})
    if not sizes or sizes[0] < 20:
        raise SystemExit(f"error: --scale_sizes={cfg.scale_sizes!r}: give comma-separated sizes of 20 faces or more")
    free = shutil.disk_usage(tempfile.gettempdir()).free
    needed = sizes[-1] * (12_000 + 3 * cfg.image_size**2 * 2)  # JPEGs plus two caches, with room to spare
    if free < needed:
        raise SystemExit(f"error: {sizes[-1]:,} faces need about {needed / 2**30:.1f} GiB in "
                         f"{tempfile.gettempdir()}, which has {free / 2**30:.1f} GiB free; pass smaller --scale_sizes")
    results = []
    with tempfile.TemporaryDirectory(prefix="scale_drawn_") as pool:
        started = time.perf_counter()
        drawn = draw_faces(Path(pool), min(sizes[-1], DISTINCT_FACES), cfg.seed)
        print(f"{len(drawn):,} distinct faces drawn in {time.perf_counter() - started:.0f}s", flush=True)
        for count in sizes:
            with tempfile.TemporaryDirectory(prefix=f"scale_{count}_") as temporary:
                results.append(measure_size(cfg, count, drawn, Path(temporary), worker_comparison=count == sizes[-1]))
    summary = report(results)
    figure = Path(cfg.pics_dir) / "scale_benchmark.png"
    plot(results, figure)
    output = Path(cfg.runs_dir) / "benchmark" / f"scale_{datetime.now():%Y%m%d_%H%M%S}.json"
    with atomic_write_path(output) as path:
        path.write_text(json.dumps({"sizes": results, **summary, "cpu_count": os.cpu_count()}, indent=2) + "\n")
    print(f"\nwrote {figure} and {output}")
    return {"sizes": results, **summary, "figure": str(figure), "json": str(output)}


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], base=SCALE_DEFAULTS, reads=SETTINGS))
