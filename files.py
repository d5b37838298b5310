"""Every rule about the files this project writes: atomic writes, temporaries, ownership, locks, space checks.

The policy (also the README's "Robustness" section):
1. Never delete or replace a file the program did not create in this run or record as its own. What we write is
   recorded in a hidden folder of ours, `.age_estimation/`, beside it (one small record a file: its name and the
   SHA-256 of what was written); an existing file whose record is missing or whose content changed is a user's,
   and a stage refuses to replace it before any slow work (`claim_outputs`).
2. Every write is atomic: the bytes go to a temporary inside `.age_estimation/` on the same file system and are
   renamed over the target only when complete (`atomic_write_path`); the files of one result (a split's three
   CSVs) are all written before any is renamed (`atomic_write_paths`). Only files inside our hidden folder are
   ever swept as stale temporaries, so a user's `.thesis.20240101.tmp.docx` beside an output is never looked at.
3. One run writes into an output folder at a time: a stage holds the folder's lock (`folder_lock`, a file in our
   hidden folder naming the process); a second run into the same folder stops with a sentence naming the first.
4. Before slow work, the output folders are probed for writability and free space (`check_writable_folders`,
   `check_free_space`), so a full or read-only disk is one sentence, not a traceback an hour in.

Reads and writes nothing by itself; every script imports it. No command of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from config import UsageError

OURS = ".age_estimation"  # the hidden folder of ours beside what we write: temporaries, records, the lock
_TEMPORARY = re.compile(r"^(\d+)\.[0-9a-f]{8}\.")  # <pid>.<random>.<name>: a temporary of the process pid
_LOCK = "lock"
_RECORDS = "written"


class FileRuleError(UsageError):
    """A file rule stops the run before any work: one sentence naming the file and the way out."""


def _our_folder(folder: Path) -> Path:
    own = folder / OURS
    own.mkdir(parents=True, exist_ok=True)
    return own


def _tidy(folder: Path) -> None:
    """Remove our hidden folder when nothing of ours is left in it (a run's temporaries are gone)."""
    with contextlib.suppress(OSError):
        (folder / OURS).rmdir()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process (EPERM), or a number no process can have
        return True
    return True


def temporary_path(path: Path) -> Path:
    """A fresh temporary name for `path`, in our hidden folder beside it, with the same suffix (OpenCV picks a
    video's codec and ONNX Runtime nothing, by suffix) and a name short enough wherever `path`'s is."""
    sweep_temporaries(path.parent)
    name = f"{path.stem[:80]}{path.suffix[:20]}"
    for _ in range(5):
        temporary = _our_folder(path.parent) / f"{os.getpid()}.{secrets.token_hex(4)}.{name}"
        try:  # created at once: our hidden folder is not empty, so no other run's tidying removes it meanwhile
            os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return temporary
        except FileNotFoundError:  # another run tidied the hidden folder away between the two calls: again
            continue
    raise FileRuleError(f"no temporary file could be made for {path} in {path.parent / OURS}; try again")


@contextlib.contextmanager
def atomic_write_path(path: str | os.PathLike, record: bool = False) -> Iterator[Path]:
    """Yield a temporary path for `path`; rename it over `path` only if the block succeeds, so an interrupted or
    failed write never leaves a half-written checkpoint, CSV or figure. With `record` the result is recorded as ours
    (record_written), so a later run may replace it."""
    with atomic_write_paths([path], record) as (temporary,):
        yield temporary


@contextlib.contextmanager
def atomic_write_paths(paths: list[str | os.PathLike], record: bool = False) -> Iterator[list[Path]]:
    """Temporaries for several files that form one result: none is renamed into place unless all were written."""
    targets = [Path(path) for path in paths]
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
    temporaries = [temporary_path(target) for target in targets]
    try:
        yield temporaries
        for temporary, target in zip(temporaries, targets, strict=True):
            os.replace(temporary, target)
            if record:
                record_written(target)
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
        for folder in {target.parent for target in targets}:
            _tidy(folder)


@contextlib.contextmanager
def scratch_path(near: str | os.PathLike) -> Iterator[Path]:
    """A temporary file with `near`'s suffix in our hidden folder beside it, removed when the block ends (an
    intermediate file no one keeps, e.g. the model ONNX Runtime's quantiser prepares)."""
    temporary = temporary_path(Path(near))
    try:
        yield temporary
    finally:
        discard(temporary)


def commit(temporary: Path, target: str | os.PathLike, record: bool = False) -> None:
    """Rename a complete temporary_path over `target` (the caller decided it is complete: a recorded video)."""
    os.replace(temporary, target)
    if record:
        record_written(target)
    _tidy(Path(target).parent)


def discard(temporary: Path) -> None:
    """Remove a temporary_path that will not become a result (a failed or empty write)."""
    temporary.unlink(missing_ok=True)
    _tidy(temporary.parent.parent)


def remove_older_than(folder: str | os.PathLike, seconds: float) -> None:
    """Delete the files under a folder this run created for itself (the app's temporary folder) that are older
    than `seconds`; nothing outside it is touched."""
    now = time.time()
    for path in Path(folder).rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink() and now - path.stat().st_mtime > seconds:
                path.unlink(missing_ok=True)


def remove_scratch_folder(folder: str | os.PathLike) -> None:
    """Delete a folder this run created for its own scratch work (a benchmark's generated faces or caches)."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def sweep_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete our temporaries in `folder`'s hidden folder whose writing process is gone (a SIGKILL or a crash
    during a write left them, e.g. a 150 MB checkpoint); a live process's are left alone, and nothing outside our
    hidden folder is ever looked at. Returns what was removed."""
    own = Path(folder) / OURS
    removed = []
    if not own.is_dir():
        return removed
    for path in own.iterdir():
        match = _TEMPORARY.match(path.name)
        if match and path.is_file() and int(match[1]) != os.getpid() and not _process_alive(int(match[1])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _record_path(path: Path) -> Path:
    # named by a digest of the file name: a record's name stays short for any name the file system allows
    return path.parent / OURS / _RECORDS / hashlib.sha256(path.name.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def record_written(path: str | os.PathLike) -> None:
    """Record `path` (just written by us) as ours: its name and the SHA-256 of its content."""
    path = Path(path)
    record = _record_path(path)
    record.parent.mkdir(parents=True, exist_ok=True)
    temporary = record.with_name(f"{os.getpid()}.{secrets.token_hex(4)}.record")
    temporary.write_text(json.dumps({"name": path.name, "sha256": file_sha256(path)}))
    os.replace(temporary, record)


def written_by_us(path: str | os.PathLike) -> bool:
    """Whether an existing regular file is one we wrote and nobody changed since: its record names it with the same
    content. Only a regular file is opened (a FIFO would block, a device be read for ever)."""
    path = Path(path)
    try:
        if not path.is_file():
            return False
        stored = json.loads(_record_path(path).read_text())
        return stored.get("name") == path.name and stored.get("sha256") == file_sha256(path)
    except (OSError, ValueError, AttributeError):
        return False


def forget_written(path: str | os.PathLike) -> None:
    """Remove the record of a file of ours that was just removed or replaced by something else."""
    _record_path(Path(path)).unlink(missing_ok=True)


def remove_ours(path: str | os.PathLike) -> bool:
    """Delete `path` only if it is ours (written_by_us); returns whether it was deleted."""
    path = Path(path)
    if not written_by_us(path):
        return False
    path.unlink(missing_ok=True)
    forget_written(path)
    return True


def remove_empty_folder(folder: str | os.PathLike) -> bool:
    """Remove a folder of ours that holds nothing (a run that failed before writing anything); returns whether it
    was removed. A folder with anything in it, ours or not, stays."""
    folder = Path(folder)
    _tidy(folder)
    try:
        folder.rmdir()
    except OSError:
        return False
    return True


def claim_outputs(outputs: list[Path], inputs: list[Path] = (), what: str = "this project") -> None:
    """Stop before any work if an output is an input of this run, a folder, not a regular file, an existing file
    we did not write (it would be replaced), if two outputs coincide or if its folder cannot be written."""
    sources = {Path(path).resolve() for path in inputs}
    seen = set()
    for output in map(Path, outputs):
        try:  # a name too long for the file system raises OSError from resolve() or is_dir()
            resolved = output.resolve()
            if resolved in sources:
                raise FileRuleError(f"{output} is also an input of this run; choose another output (nothing was "
                                    "written)")
            if resolved in seen:
                raise FileRuleError(f"two results would both be written to {output}; choose another output")
            seen.add(resolved)
            if output.is_dir():
                raise FileRuleError(f"{output} is a folder; give a file name for the output")
            if output.exists() and not output.is_file():
                raise FileRuleError(f"{output} is not a regular file (a FIFO, a device...); give the name of a new "
                                    "file")
            if output.exists() and not written_by_us(output):
                raise FileRuleError(f"{output} exists and was not written by {what} (or was changed since); move "
                                    "that file or choose another output: it is never replaced")
            probe_writable(output.parent)  # before any input is read: a folder under a file, a read-only disk
        except OSError as error:
            raise FileRuleError(f"{output} cannot be written ({type(error).__name__}: {error.strerror or error}); "
                                "choose another path") from None


def _lock_holder(lock: Path) -> dict[str, Any] | None:
    """The lock's record, or None where it is unreadable (a process killed while writing it)."""
    try:
        values = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) and isinstance(values.get("pid"), int) else None


_held: dict[Path, int] = {}  # this process's locks (a folder locked twice by one run is one lock)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold `folder` for this run: a second run into it (any stage) stops with a sentence naming this one. A lock
    left by a killed run (its process is gone) is taken over; the lock is a file in our hidden folder."""
    import sys

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    lock = _our_folder(folder) / _LOCK
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "command": " ".join(sys.argv)[:300],
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileNotFoundError:  # another run tidied our hidden folder away in between
            _our_folder(folder)
            continue
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None and (holder.get("host") != mine["host"] or _process_alive(holder["pid"])):
                raise FileRuleError(
                    f"{folder} is being written by another run ({holder.get('what')}, process {holder['pid']} on "
                    f"{holder.get('host')}, since {holder.get('since')}); wait for it to end or choose another output "
                    f"folder (a lock left by a crash on another machine: delete {lock})") from None
            lock.unlink(missing_ok=True)  # a dead run's lock
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(json.dumps(mine))
        break
    else:
        raise FileRuleError(f"{lock} could not be taken; try again")
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        if (_lock_holder(lock) or {}).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)
        _tidy(folder)


def probe_writable(folder: str | os.PathLike) -> None:
    """Create `folder` and write and remove a probe file in it (the only sure test of a path under a file, a name
    too long, a read-only or full file system); OSError when that fails."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = _our_folder(folder) / f"{os.getpid()}.{secrets.token_hex(4)}.probe"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    finally:
        _tidy(folder)


def check_writable_folders(cfg: Any, names: tuple[str, ...]) -> None:
    """Stop before any slow work when one of the output folder settings `names` cannot be written (probe_writable)."""
    for name in names:
        folder = Path(getattr(cfg, name))
        try:
            probe_writable(folder)
        except OSError as error:
            raise FileRuleError(f"--{name}={folder} cannot be written ({type(error).__name__}: "
                                f"{error.strerror or error}); choose another folder") from None


def check_free_space(folder: str | os.PathLike, needed_bytes: int, what: str) -> None:
    """Stop before slow work when `folder`'s file system has less room than `needed_bytes` for `what`."""
    import shutil

    folder = Path(folder)
    existing = next((parent for parent in (folder, *folder.parents) if parent.exists()), Path("."))
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise FileRuleError(f"not enough free space for {what} in {folder}: about {needed_bytes / 1e6:.0f} MB "
                            f"needed, {free / 1e6:.0f} MB free; free some space or choose another folder")


def describe_write_error(error: Exception, path: str | os.PathLike) -> str:
    """One sentence for a write that failed midway (a full disk most often; torch reports it as a RuntimeError of
    its stream writer); what was there before is intact."""
    if getattr(error, "errno", None) == 28:
        reason = "the disk is full"
    else:
        reason = getattr(error, "strerror", None) or (str(error).splitlines() or [""])[0][:160]
    return (f"{path} could not be written ({type(error).__name__}: {reason}); what was there before is unchanged; "
            "free some space or choose another folder")


def write_csv(frame: Any, path: str | os.PathLike, float_format: str | None = None, record: bool = False) -> None:
    """Write a pandas DataFrame as CSV atomically, without the index and with "\n" line ends, so equal frames give
    equal bytes on every platform (every CSV this project writes goes through here)."""
    write_csvs([frame], [path], float_format, record)


def write_csvs(frames: list[Any], paths: list[str | os.PathLike], float_format: str | None = None,
               record: bool = False) -> None:
    """Several CSVs that form one result (a split's train, valid and test files): none replaces its old file
    unless all were written, so a failure never leaves a new train split beside an old test split."""
    with atomic_write_paths(paths, record) as temporaries:
        for frame, temporary in zip(frames, temporaries, strict=True):
            frame.to_csv(temporary, index=False, float_format=float_format, lineterminator="\n")


def save_figure(figure: Any, path: str | os.PathLike, record: bool = False) -> None:
    """Write a matplotlib figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_write_path(path, record) as temporary:
            figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(figure)
