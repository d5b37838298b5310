"""`torchrun --nproc_per_node=2 train.py` on the CPU (gloo): it trains, rank 0 alone writes, and the weights equal
those of one process that takes the same global batches.

Each rank normalises its batch norms over its own half of the global batch, so the single-process reference
runs with accumulation_steps=2: the same two half-batches (images 0, 2, 4, ... and 1, 3, 5, ...), the same
per-half statistics, gradients averaged before one optimiser step, just as DistributedDataParallel does.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import train
from config import to_argv
from model import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow,  # subprocesses under torchrun
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")]


def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(split_config):
    cfg = replace(split_config, epochs=2, batch_size=16, mixed_precision=False, dropout=0.0, flip=False,
                  rotation_degrees=0.0, translate_fraction=0.0, scale_jitter=0.0, color_jitter=0.0,
                  run_name="distributed")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
         *to_argv(cfg)],
        capture_output=True, text=True, timeout=240, env=environment, cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("resolved config") == 1  # rank 0 alone prints
    run_dirs = list(Path(cfg.runs_dir).iterdir())
    assert [path.name for path in run_dirs] == ["distributed"]  # rank 0 alone writes, under one run name
    results = json.loads((run_dirs[0] / "results.json").read_text())
    assert results["test_images"] == len(train.build_dataloader(cfg, "test").dataset)  # blocks gathered, all rows

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank: float sums in the same order, so the weights agree closely
    try:
        single = train.main(replace(cfg, accumulation_steps=2, run_name="single"))
    finally:
        torch.set_num_threads(threads)
    distributed_state = load_checkpoint(Path(cfg.checkpoint_dir) / "distributed" / "last.pt")["model"]
    single_state = load_checkpoint(single["last_checkpoint"])["model"]
    assert not torch.equal(single_state["head.1.weight"], train.build_model(cfg).state_dict()["head.1.weight"])
    for name, value in single_state.items():
        if "running" in name or "num_batches" in name:
            continue  # DDP keeps rank 0's running statistics; accumulation updates them once per half-batch
        torch.testing.assert_close(distributed_state[name], value, atol=2e-4, rtol=1e-3, msg=name)
    for distributed_epoch, single_epoch in zip(results["history"], single["history"], strict=True):
        # training loss and MAE summed over both ranks' halves: the same as one process over the whole batches
        assert distributed_epoch["train_loss"] == pytest.approx(single_epoch["train_loss"], rel=1e-3)
    # (test MAEs differ a little: they use the batch-norm running statistics, which are not compared above)

    resumed = subprocess.run(  # --resume under torchrun: continues the run from last.pt to a third epoch
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
         *to_argv(replace(cfg, epochs=3, resume=True))],
        capture_output=True, text=True, timeout=240, env=environment, cwd=ROOT,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming distributed from" in resumed.stdout and resumed.stdout.count("resuming") == 1
    history = json.loads((run_dirs[0] / "results.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert sorted(path.name for path in Path(cfg.runs_dir).iterdir()) == ["distributed", "single"]
