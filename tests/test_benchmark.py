"""benchmarks.pipeline end to end on the tiny generated faces, with every loop cut to one step (the figures themselves
are for the README, not for tests)."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks import pipeline as benchmark

pytestmark = pytest.mark.slow  # whole trainings or subprocesses: left out by -m "not slow"


def test_benchmark_measures_every_contender_and_writes_its_json(split_config, monkeypatch, capsys):
    monkeypatch.setattr(benchmark, "MODELS", ("resnet18",))
    monkeypatch.setattr(benchmark, "STEPS", {"resnet18": (1, 1)})
    monkeypatch.setattr(benchmark, "INFERENCE_MODELS", ("resnet18", "efficientnet_lite0"))
    monkeypatch.setattr(benchmark, "REPEATS", 1)
    monkeypatch.setattr(benchmark, "LOADING_SIZE", 32)
    monkeypatch.setattr(benchmark, "LOADING_BATCHES", 1)
    monkeypatch.setattr(benchmark, "DATA_ONLY_BATCHES", 2)
    monkeypatch.setattr(benchmark, "LATENCY_RUNS", 2)
    cfg = replace(split_config, batch_size=8, num_workers=0, optimizer="sgd")
    results = benchmark.main(cfg)

    training = results["training resnet18"]
    assert set(training) == {"seed", "ours", "ceiling", "data only"}
    assert set(results["loading"]) == {"seed JPEG", "cache, per image", "cache, batch", "cache, batch, no augmentation"}
    for model_name in ("resnet18", "efficientnet_lite0"):
        assert {"eager fp32", "TorchScript", "ONNX Runtime"} <= set(results[f"inference {model_name}"])
    for section in results.values():
        for runs in section.values():
            assert len(runs) == 1 and runs[0]["images_per_second"] > 0
            assert runs[0]["peak_mib"] is None or runs[0]["peak_mib"] > 50  # at least torch itself
    written = sorted((Path(cfg.runs_dir) / "benchmark").glob("benchmark_*.json"))
    stored = json.loads(written[0].read_text())
    assert len(written) == 1 and stored["results"] == results
    assert stored["ceiling_share"]["resnet18"] > 0  # ours / the model-only step
    assert 0 < stored["data_path_share"]["resnet18"]  # a batch drawn alone / ours' whole step
    table = capsys.readouterr().out
    assert "seed pipeline (PIL, fp32)" in table and "img/s" in table


def test_seed_dataset_reads_jpegs_with_the_seed_transforms(split_config):
    from custom_dataset_dataloader import split_csv_path

    loader = benchmark.seed_loader(replace(split_config, batch_size=4, num_workers=0), split_csv_path(split_config,
                                   "train"), image_size=32)
    images, ages, _, _ = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert ages.dtype == torch.float32 and torch.all(ages >= 0)
    assert images.min() < -1 and images.max() > 1  # ImageNet-normalised, not [0, 1]


def test_scale_benchmark_runs_every_stage_in_its_own_process(tmp_path, monkeypatch):
    from benchmarks import scale as benchmark_scale
    from config import folders_under

    monkeypatch.setattr(benchmark_scale, "DISTINCT_FACES", 20)  # 20 drawn faces, the rest copies under new names
    monkeypatch.setattr(benchmark_scale, "FACE_SIZE", 64)
    monkeypatch.setattr(benchmark_scale, "WORKER_ROUNDS", 1)
    cfg = replace(benchmark_scale.SCALE_DEFAULTS, scale_sizes="40", image_size=32, **folders_under(tmp_path))
    result = benchmark_scale.main(cfg)
    (size,) = result["sizes"]
    comparison = {f"{stage}, {workers} worker(s)" for stage in ("image check", "cache") for workers in (1, 2)}
    assert size["faces"] == 40 and set(size["stages"]) == {*benchmark_scale.STAGES, *comparison}
    (pair,) = size["worker_rounds"]
    assert set(pair) == comparison and set(result["worker_speedup"]) == {"image check", "cache"}
    assert result["worker_speedup"]["cache"] == pytest.approx(
        pair["cache, 1 worker(s)"]["seconds"] / pair["cache, 2 worker(s)"]["seconds"])
    for figures in size["stages"].values():
        assert figures["seconds"] > 0 and figures["resident_mib"] >= figures["anonymous_mib"] > 50  # torch's own
    assert size["cache_bytes"] >= 40 * 3 * 32 * 32  # every face decoded into the cache
    stored = json.loads(Path(result["json"]).read_text())
    assert stored["sizes"] == result["sizes"] and Path(result["figure"]).stat().st_size > 10_000
    assert list(Path(cfg.csv_dir).glob("*")) == []  # every stage wrote into its own temporary workspace


def test_scale_report_computes_growth_marginal_cost_and_the_extrapolation():
    from benchmarks import scale as benchmark_scale

    def size(count: int, seconds: float, memory: float) -> dict:
        stages = {stage: {"seconds": seconds, "anonymous_mib": memory, "resident_mib": 2 * memory}
                  for stage in benchmark_scale.STAGES}
        return {"faces": count, "stages": stages, "csv_bytes": 40 * count}

    # 2 s fixed + 1 ms per image: the per-image time falls, the marginal cost stays 1 ms; memory 100 MiB + 1 KiB/face
    sizes = [size(count, 2 + count / 1000, 100 + count / 1024) for count in (1000, 4000, 8000)]
    summary = benchmark_scale.report(sizes)
    for stage in benchmark_scale.STAGES:
        assert summary["growth_of_time_per_image"][stage] == pytest.approx((2 + 8) / 8000 / ((2 + 1) / 1000))
        assert summary["marginal_ms_per_image"][stage] == pytest.approx([1.0, 1.0])
        assert summary["extrapolation"]["minutes"][stage] == pytest.approx((2 + 8) * 500_000 / 8000 / 60)
        assert summary["extrapolation"]["anonymous_gib"][stage] == pytest.approx((100 + 500_000 / 1024) / 1024)
    assert summary["extrapolation"]["cache_gib"][64] == pytest.approx(500_000 * 3 * 64 * 64 / 2**30)


def test_scale_benchmark_refuses_nonsense_sizes(tmp_path):
    from benchmarks import scale as benchmark_scale

    with pytest.raises(SystemExit, match="20 faces or more"):
        benchmark_scale.main(replace(benchmark_scale.SCALE_DEFAULTS, scale_sizes="5", runs_dir=str(tmp_path)))


def test_gpu_benchmark_times_one_epoch_of_every_contender(split_config, monkeypatch, capsys):
    """benchmarks.gpu runs the same code on the CPU (no GPU is lent here): whole epochs, figures and JSON."""
    from benchmarks import gpu as benchmark_gpu
    from custom_dataset_dataloader import read_dataset_csv

    monkeypatch.setattr(benchmark_gpu, "WARMUP_STEPS", 1)
    cfg = replace(split_config, model_name="resnet18", image_size=32, batch_size=8, num_workers=0, compile=False,
                  device="cpu")
    summary = benchmark_gpu.main(cfg)

    results = summary["results"]
    assert list(results) == ["seed", "ours", "ceiling"]  # no compiled contender with --compile=False
    data_set_size = len(read_dataset_csv(Path(cfg.csv_dir) / "utkface_dataset.csv"))
    for figures in results.values():
        assert figures["steps"] == data_set_size // cfg.batch_size  # one whole epoch (drop_last), not a few steps
        assert figures["images_per_second"] > 0 and figures["seconds"] > 0 and figures["warmup_seconds"] > 0
        assert figures["gpu_utilisation"] is None  # the CPU has none to report
    assert summary["ceiling_share"] > 0
    written = sorted((Path(cfg.runs_dir) / "benchmark").glob("gpu_*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["results"] == results
    assert "ours is" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not a folder"):
        benchmark_gpu.main(replace(cfg, data_dir=str(Path(cfg.data_dir) / "missing")))


def test_gpu_utilisation_is_the_mean_of_its_samples_and_none_off_cuda(monkeypatch):
    import time

    with benchmark.GpuUtilisation(torch.device("cpu")) as off:
        pass
    assert off.mean is None
    readings = iter([40.0, 60.0] * 100)
    monkeypatch.setattr(benchmark.GpuUtilisation, "_reader", lambda self: lambda: next(readings))
    with benchmark.GpuUtilisation(torch.device("cuda"), interval=0.01) as busy:
        time.sleep(0.2)
    assert len(busy.samples) >= 2 and 0.4 <= busy.mean <= 0.6  # percent -> share
