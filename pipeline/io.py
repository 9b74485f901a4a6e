"""File helpers: the one atomic-write path, JSON/CSV outputs, hashing, run-wide seeding/threads.

Every file the pipeline writes goes through `atomic_output`: the content is written to a temp
file beside the target, flushed to disk (fsync), then renamed over the target, so a crash or a
kill at any moment leaves either the old file or the new one, never half of either.

In data-parallel training (pipeline.distributed) every process runs the whole stage, and only
global rank 0 writes: what the other processes write here goes to a scratch folder that is
removed at once, so the processes never race on an output and a stage needs no code for it.

torch is imported only by the functions that use it: a stage that finds its target missing
(most engine and export stages on a CPU-only machine) writes its `skipped` result without
paying for torch's import (about 3 s per stage on a 2-core host).
"""

import csv
import hashlib
import io
import json
import os
import random
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        descriptor = os.open(path, flags)
    except OSError:  # some file systems do not open directories; the rename still happened
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def writes_files() -> bool:
    """False in a data-parallel process other than global rank 0: only rank 0 writes."""
    torch = sys.modules.get("torch")
    if torch is None:  # not imported yet: no process group can have been started
        return True
    group = torch.distributed
    return not (group.is_available() and group.is_initialized()) or group.get_rank() == 0


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write `path`'s new content to; on success it replaces `path`.

    The temp file sits in the same folder (a rename across file systems is not atomic) and
    ends in `.tmp` (ignored by git and DVC). If the body raises, the temp file is removed and
    `path` is left as it was. In a process other than rank 0 (`writes_files`) the content is
    written to a scratch folder and dropped, and `path` is never touched.
    """
    path = Path(path)
    if not writes_files():
        with tempfile.TemporaryDirectory(prefix="not-rank-0-") as scratch:
            yield Path(scratch) / path.name
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"nothing was written to {tmp} for {path}")
        _fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_path(path.parent)


@contextmanager
def staged_folder(folder: str | os.PathLike, last: str = ".card.json") -> Iterator[Path]:
    """Yield a temp folder beside `folder` to build its new content in. If the body succeeds,
    `folder` ends up holding exactly the staged files: files it had that were not staged are
    removed, then each staged file is moved in atomically, names ending in `last` after the
    others (cards after the files they vouch for). If the body raises, `folder` is untouched.
    For folders a stage owns as a whole (one DVC output)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-",
                                     suffix=".tmp") as staging:
        yield Path(staging)
        staged = sorted(Path(staging).iterdir(), key=lambda p: (p.name.endswith(last), p.name))
        if any(not path.is_file() for path in staged):
            raise IsADirectoryError(f"only files can be staged for {folder}")
        folder.mkdir(exist_ok=True)
        for stale in folder.iterdir():
            if stale.name not in {path.name for path in staged}:
                stale.unlink()
        for path in staged:
            with atomic_output(folder / path.name) as tmp:
                os.replace(path, tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; PipelineError naming the file when it is missing or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise PipelineError(f"{path} not found; the stage that writes it has not run") from err
    except (OSError, ValueError) as err:
        raise PipelineError(f"{path} is not readable JSON: {err}") from err


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """Rows as CSV with the union of keys as header (in first-seen order)."""
    header: list[str] = []
    for row in rows:
        header += [key for key in row if key not in header]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-able parts (configs, specs, file hashes)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    import torch

    torch.manual_seed(seed)


def set_threads(threads: int) -> None:
    """0 leaves torch's default (one per core)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
