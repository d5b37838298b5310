import re
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import pytest
import torch

from config import (
    Config,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    describe,
    parse_config,
    resolve_device,
    to_argv,
    validate,
)
from files import atomic_write_path


def test_config_is_frozen():
    with pytest.raises(FrozenInstanceError):
        Config().lr = 1.0  # type: ignore[misc]


def test_overrides_convert_by_field_type():
    cfg = apply_overrides(Config(), [
        "--epochs=3", "--lr=1e-4", "--pretrained=false", "--model_name=vit", "--image_size=64",
        "--normalize_mean=0.5,0.5,0.5", "--resume",
    ])
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.lr == pytest.approx(1e-4)
    assert cfg.pretrained is False and cfg.resume is True
    assert cfg.model_name == "vit"
    assert cfg.normalize_mean == (0.5, 0.5, 0.5)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(SystemExit) as error:
        parse_config(["--learning_rate=0.1"])
    message = str(error.value)
    assert "--learning_rate" in message and "lr" in message and "model_name" in message


@pytest.mark.parametrize("argument", ["--epochs=three", "--pretrained=maybe", "--epochs", "lr=1"])
def test_bad_values_are_clear_errors(argument):
    with pytest.raises(SystemExit) as error:
        parse_config([argument])
    assert "error" in str(error.value)


def test_contradictory_settings_are_rejected():
    with pytest.raises(SystemExit, match="model_name"):
        parse_config(["--model_name=resnet101"])
    with pytest.raises(SystemExit, match="multiple of 16"):
        parse_config(["--model_name=vit", "--image_size=100"])


def test_config_dict_round_trip_survives_weights_only_load(tmp_path):
    cfg = Config(model_name="efficientnet", image_size=96)
    path = tmp_path / "config.pt"
    torch.save({"config": config_to_dict(cfg)}, path)
    assert config_from_dict(torch.load(path, weights_only=True)["config"]) == cfg


def test_resolve_device_auto_matches_hardware():
    device = resolve_device("auto")
    expected = "cuda" if torch.cuda.is_available() else None
    assert device.type == (expected or device.type) and device.type in ("cuda", "mps", "cpu")
    assert resolve_device("cpu").type == "cpu"


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_write_path(path) as temporary:
        temporary.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]
    with atomic_write_path(path) as temporary:
        temporary.write_text("new")
    assert path.read_text() == "new"


def test_the_seed_preset_is_the_seed_recipe_and_other_keys_win():
    cfg = parse_config(["--preset=seed", "--epochs=3"])
    assert (cfg.model_name, cfg.head, cfg.optimizer, cfg.lr, cfg.batch_size) == ("resnet", "l1", "sgd", 5e-4, 100)
    assert cfg.ema_decay == 0.0 and cfg.scheduler == "none" and cfg.epochs == 3  # none of our additions
    assert parse_config(["--preset=seed", "--lr=1e-3"]).lr == 1e-3


@pytest.mark.parametrize("preset", ["long", "scratch"])
def test_the_scratch_presets_change_only_their_settings(preset):
    from config import PRESETS

    cfg, defaults = parse_config([f"--preset={preset}"]), config_to_dict(Config())  # the settings (no given_keys)
    assert all(getattr(cfg, name) == value for name, value in PRESETS[preset].items())
    assert (cfg.model_name, cfg.pretrained, cfg.lr) == ("resnet18", False, 2e-3)
    changed = {name for name, value in config_to_dict(cfg).items() if value != defaults[name]}
    assert changed == {"preset"} | {name for name, value in PRESETS[preset].items() if value != defaults[name]}
    assert parse_config([f"--preset={preset}", "--epochs=20"]).epochs == 20
    if preset == "long":
        assert (cfg.epochs, cfg.weight_decay, cfg.erase_probability) == (40, 0.05, 0.5)


def test_help_prints_the_settings_the_line_would_run_with(capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_config(["--preset=long", "--lr=1e-3", "--help"])
    assert stopped.value.code == 0
    printed = capsys.readouterr().out
    assert re.search(r"^ +epochs += 40  #", printed, re.MULTILINE)
    assert re.search(r"^ +lr += 0\.001  #", printed, re.MULTILINE)


def test_to_argv_reproduces_a_config_and_the_parser_records_what_was_typed():
    cfg = parse_config(["--preset=long", "--head=coral", "--lr=3e-4", "--normalize_mean=0.5,0.5,0.5",
                        "--data_dir=data/UTKFace", "--pretrained=false"])
    assert set(cfg.given_keys) == {"preset", "head", "lr", "normalize_mean", "data_dir", "pretrained"}
    arguments = to_argv(cfg)
    assert parse_config(arguments) == cfg and "--head=coral" in arguments and "--pretrained=false" in arguments
    assert not any(argument.startswith("--data_dir") for argument in arguments)  # equal to the default
    assert to_argv(Config()) == [] and "given_keys" not in config_to_dict(cfg)


def test_enumerated_settings_take_their_values_from_their_types(capsys):
    with pytest.raises(SystemExit, match=re.escape("--optimizer=lamb is not one of adamw | sgd")):
        parse_config(["--optimizer=lamb"])
    with pytest.raises(SystemExit, match="scheduler='linear' is not one of cosine, step, none"):
        validate(replace(Config(), scheduler="linear"))
    with pytest.raises(SystemExit, match="unknown setting --given_keys"):
        parse_config(["--given_keys=lr"])
    assert "(adamw | sgd)" in describe(Config())


def test_every_setting_has_a_comment_for_help():
    from config import _field_types, field_comments

    comments = field_comments()
    assert set(_field_types()) == set(comments) and all(comments.values())
    assert comments["loading"].endswith("image by image, in DataLoader workers")  # a comment over two lines


@pytest.mark.parametrize(("script", "reads", "not_read"), [
    ("train.py", "lr", "port"),  # one script in the quick loop; each case starts a Python process
    pytest.param("eda.py", "check_images", "port", marks=pytest.mark.slow),
    pytest.param("app.py", "port", "lr", marks=pytest.mark.slow),
    pytest.param("inference.py", "tta_views", "weight_decay", marks=pytest.mark.slow)])
def test_help_lists_only_what_the_script_reads(script, reads, not_read):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    shown = subprocess.run([sys.executable, script, "--help"], cwd=root, capture_output=True, text=True, check=True,
                           timeout=120).stdout
    names = {line.split()[0] for line in shown.splitlines()[1:] if line.startswith("  ")}
    module = __import__(script[:-3])
    assert names == set(module.SETTINGS) and reads in names and not_read not in names
    assert f"{reads} " in shown and "#" in shown  # each with its value and its comment


def test_a_typed_setting_the_script_does_not_read_is_named():
    with pytest.warns(UserWarning, match=r"--port: not read by this script"):
        cfg = parse_config(["--port=9", "--data_dir=x"], reads=("data_dir",))
    assert cfg.data_dir == "x"
