"""Why config.py keeps its own `--key=value` parser: ours against tyro and jsonargparse on the repo's command lines.

Issue #38 asked to parse with a well-kept library where it fits (tyro and jsonargparse are both installable) or to
keep ours with a measured reason. Each parser reads the same frozen Config dataclass and gets the command lines the
README and the robustness guarantees promise; a row says what each parser did with one command line (the value it
produced, or that it stopped), and whether that is what the repository promises. The last row is the cost of
importing the parser module and parsing one training command line in a fresh interpreter (median of 5).

tyro is tried as it comes (booleans as `--flag/--no-flag`) and with `tyro.conf.FlagConversionOff`
(booleans as `--flag=True`), jsonargparse with `ArgumentParser.add_class_arguments(Config)`.

Reads:  nothing.  Writes: results/parsers.csv; prints the table.
Run:    pip install tyro jsonargparse && python -m experiments.parsers
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from config import Config, apply_overrides
from files import write_csv

OUTPUT = Path("results") / "parsers.csv"
# (what the repository promises, the command line, the check of a parsed Config; None: it must stop)
CASES: list[tuple[str, list[str], Callable[[Config], bool] | None]] = [
    ("a float", ["--lr=3e-4"], lambda cfg: cfg.lr == 3e-4),
    ("a boolean as the README writes it", ["--pretrained=false"], lambda cfg: cfg.pretrained is False),
    ("a bare boolean flag", ["--tta"], lambda cfg: cfg.tta is True),
    ("a timm model name", ["--model_name=timm/resnet50"], lambda cfg: cfg.model_name == "timm/resnet50"),
    ("an unknown key stops", ["--lrr=1"], None),
    ("a wrong type stops", ["--image_size=64.5"], None),
    ("a flag given twice stops", ["--epochs=5", "--epochs=6"], None),
]
TRAINING_LINE = ["--model_name=resnet18", "--epochs=5", "--lr=3e-4", "--pretrained=False"]


def ours(arguments: list[str]) -> Config:
    return apply_overrides(Config(), arguments)


def tyro_default(arguments: list[str]) -> Config:
    import tyro

    return tyro.cli(Config, args=arguments)


def tyro_flags_off(arguments: list[str]) -> Config:
    import tyro

    return tyro.cli(Config, args=arguments, config=(tyro.conf.FlagConversionOff,))


def jsonargparse_classes(arguments: list[str]) -> Config:
    import jsonargparse

    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Config, "config")
    namespace = parser.parse_args([argument.replace("--", "--config.", 1) for argument in arguments])
    return parser.instantiate_classes(namespace).config


PARSERS: dict[str, tuple[Callable[[list[str]], Config], str]] = {
    "ours (config.py)": (ours, "from config import Config, apply_overrides; apply_overrides(Config(), {args})"),
    "tyro": (tyro_default, "import tyro; from config import Config; tyro.cli(Config, args={args})"),
    "tyro, FlagConversionOff": (tyro_flags_off, "import tyro; from config import Config; "
                                "tyro.cli(Config, args={args}, config=(tyro.conf.FlagConversionOff,))"),
    "jsonargparse": (jsonargparse_classes, "import sys; sys.argv = ['x']; from experiments.parsers import "
                     "jsonargparse_classes; jsonargparse_classes({args})"),
}


def outcome(parse: Callable[[list[str]], Config], arguments: list[str],
            check: Callable[[Config], bool] | None) -> str:
    """'as promised' or what the parser did instead, in a few words."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            cfg = parse(arguments)
    except (SystemExit, argparse.ArgumentError):  # a parser's own refusal of the line
        return "as promised" if check is None else "stops"
    except Exception as error:  # noqa: BLE001 - a parser that cannot read Config at all is an outcome too
        return f"raises {type(error).__name__}: {error}"
    if check is None:
        name = arguments[-1].split("=")[0][2:]
        return f"accepted ({name}={getattr(cfg, name, '?')})"
    return "as promised" if check(cfg) else "another value"


def startup_seconds(template: str, repeats: int = 5) -> str:
    """Median wall time of a fresh interpreter importing the parser and parsing TRAINING_LINE, or 'fails'."""
    code = template.format(args=repr(TRAINING_LINE))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        if subprocess.run([sys.executable, "-c", code], capture_output=True).returncode != 0:
            return "fails"
        times.append(time.perf_counter() - start)
    return f"{statistics.median(times):.3f}"


def main() -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    for promise, arguments, check in CASES:
        row = {"case": promise, "command_line": " ".join(arguments)}
        row.update({name: outcome(parse, arguments, check) for name, (parse, _) in PARSERS.items()})
        rows.append(row)
    startup = {"case": "import + parse a training line (s, median of 5)", "command_line": " ".join(TRAINING_LINE)}
    startup.update({name: startup_seconds(template) for name, (_, template) in PARSERS.items()})
    rows.append(startup)
    frame = pd.DataFrame(rows)
    write_csv(frame, OUTPUT)
    print(frame.to_string(index=False))
    return frame


if __name__ == "__main__":
    main()
