"""Interruption and determinism: a killed run resumes to the same result; Ctrl-C leaves a usable last.pt."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import train
from config import Config, to_argv
from model import DistributionHead, load_checkpoint

pytestmark = pytest.mark.slow  # whole trainings or subprocesses: left out by -m "not slow"

REPO = Path(__file__).resolve().parents[1]


def command_line(cfg: Config) -> list[str]:
    """`python train.py --key=value ...` for every setting of cfg that differs from the defaults."""
    return [sys.executable, str(REPO / "train.py"), *to_argv(cfg)]


def start_and_interrupt(cfg: Config, sig: int) -> subprocess.CompletedProcess:
    """Start train.py, wait until epoch 1 is saved, then send `sig` during epoch 2."""
    last = Path(cfg.checkpoint_dir) / cfg.run_name / "last.pt"
    # A shell starts background jobs with SIGINT ignored, and a child inherits that (Python then never raises
    # KeyboardInterrupt): give the child the default disposition, as a terminal would.
    process = subprocess.Popen(command_line(cfg), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300  # generous: a fresh virtual environment compiles every module on first import
    while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if process.poll() is not None or not last.is_file():
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"epoch 1 was not saved while training ran (exit code {process.returncode}):\n{output[-3000:]}")
    process.send_signal(sig)
    output, _ = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, output)


@pytest.fixture
def deterministic_config(split_config: Config) -> Config:
    return replace(split_config, epochs=3, deterministic=True, batch_size=16)


def test_same_seed_gives_identical_metrics(deterministic_config):
    first = train.main(replace(deterministic_config, epochs=2, run_name="first"))
    second = train.main(replace(deterministic_config, epochs=2, run_name="second"))
    assert [row["valid_mae"] for row in first["history"]] == [row["valid_mae"] for row in second["history"]]
    assert first["test_mae"] == second["test_mae"]


def test_kill_9_then_resume_matches_an_uninterrupted_run(deterministic_config):
    reference = train.main(replace(deterministic_config, run_name="uninterrupted"))
    killed = start_and_interrupt(replace(deterministic_config, run_name="killed"), signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    saved = load_checkpoint(Path(deterministic_config.checkpoint_dir) / "killed" / "last.pt")
    assert 1 <= saved["epoch"] < 3
    resumed = train.main(replace(deterministic_config, run_name="killed", resume=True))
    assert [row["epoch"] for row in resumed["history"]] == [1, 2, 3]
    assert [row["valid_mae"] for row in resumed["history"]] == [row["valid_mae"] for row in reference["history"]]
    assert resumed["test_mae"] == reference["test_mae"]


@pytest.mark.skipif(os.name != "posix", reason="SIGINT delivery to a child process")
def test_ctrl_c_exits_cleanly_with_a_usable_last_checkpoint(deterministic_config):
    cfg = replace(deterministic_config, run_name="ctrl_c", epochs=50)
    interrupted = start_and_interrupt(cfg, signal.SIGINT)
    output = interrupted.stdout[-3000:]  # shown if an assertion fails
    assert interrupted.returncode == 1, output
    assert "interrupted during epoch" in interrupted.stdout and "--resume" in interrupted.stdout, output
    assert "Traceback" not in interrupted.stdout, output
    assert load_checkpoint(Path(cfg.checkpoint_dir) / "ctrl_c" / "last.pt")["epoch"] >= 1


def test_a_diverging_loss_stops_training_and_keeps_the_last_good_checkpoint(split_config, monkeypatch):
    cfg = replace(split_config, epochs=3, run_name="diverges")
    original = DistributionHead.loss  # the defaults' dex head
    steps = []

    def poisoned(head, outputs, ages):
        loss = original(head, outputs, ages)
        if head.training:
            steps.append(1)
            if len(steps) == 8:  # step 2 of epoch 2 (6 steps per epoch)
                return loss * float("nan")
        return loss

    monkeypatch.setattr(DistributionHead, "loss", poisoned)
    with pytest.raises(train.DivergedError) as error:
        train.main(cfg)
    message = error.value.code
    assert "epoch 2/3" in message and "step 2 of 6" in message and "nan" in message
    last = load_checkpoint(Path(cfg.checkpoint_dir) / "diverges" / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(value).all() for value in last["model"].values()
                                      if value.is_floating_point())
