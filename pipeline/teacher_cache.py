"""The frozen teacher's logits, computed once and shared by every student stage.

Every student stage (student_dense, each method's student_pruned and student_final) distils
from the same teacher over the same augmented training views: a loader draws epoch e's shuffle,
crops and flips from (seed, e) alone, so with equal batch sizes the dense student's six epochs
hold every view the prune and fine-tune phases see in their three. Run live, the teacher's
forward pass is about half of a KD step's arithmetic on a CPU (ResNet56 forward: 125 M MACs per
image; ResNet20 forward and backward: about 120 M), repeated for each of those stages.

The teacher_logits stage runs the teacher once over every distinct view and stores its logits
in a table keyed by a hash of (teacher file, teacher mode, the view's exact float32 pixels). A
student's `CachedTeacher` hashes each batch it is given and serves the stored rows; a batch with
a view the table lacks runs through the live teacher (built on first need), and both counts are
reported. The stage runs the teacher as a student stage would (same runtime, precision, memory
format, batch composition), so a cached row is the logit the live teacher would give.
"""

import hashlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from pipeline.distill import FrozenTeacher
from pipeline.errors import CheckpointError
from pipeline.io import atomic_output

log = logging.getLogger(__name__)

KEY_BYTES = 16  # blake2b digest size: 128 bits, no collision in any table this project makes


def table_dtype(classes: int) -> np.dtype:
    """One row per view: the view's key and the teacher's logits for it."""
    return np.dtype([("key", f"V{KEY_BYTES}"), ("logits", "<f4", (classes,))])


def teacher_mode(runtime: str, device: torch.device, amp: str, channels_last: bool) -> str:
    """What decides the teacher's numbers besides its weights: a table row serves only a
    student whose teacher runs in the same mode."""
    layout = "channels_last" if channels_last and runtime == "torch" else "nchw"
    return f"{runtime}/{device.type}/{amp}/{layout}"


def table_context(teacher_sha256: str, mode: str) -> bytes:
    """The hashing key that ties a table's rows to one teacher file in one mode."""
    return hashlib.sha256(f"{teacher_sha256}|{mode}".encode()).digest()


def pixels(images: torch.Tensor) -> np.ndarray:
    """The batch as C-contiguous NCHW float32 on the CPU: the bytes a view is keyed by."""
    return images.detach().to("cpu", torch.float32).contiguous().numpy()


def view_keys(array: np.ndarray, context: bytes) -> list[bytes]:
    """One key per image of the NCHW batch `array`: its exact pixels, hashed under `context`
    (a crop, a flip or one changed pixel gives another key)."""
    return [hashlib.blake2b(np.ascontiguousarray(row), digest_size=KEY_BYTES,
                            key=context).digest() for row in array]


def read_table(path: Path) -> np.ndarray:
    """A table written by `write_table` (no pickle is ever loaded)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no teacher-logit table; run the teacher_logits stage "
                              "(dvc repro teacher_logits)")
    try:
        table = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a teacher-logit table ({err})") from err
    names = table.dtype.names or ()
    classes = table.dtype["logits"].shape[:1] if names == ("key", "logits") else ()
    if not classes or table.ndim != 1 or table.dtype != table_dtype(classes[0]):
        raise CheckpointError(f"{path}: not a teacher-logit table (dtype {table.dtype}, "
                              f"shape {table.shape}); run the teacher_logits stage again")
    return table


def write_table(path: Path, table: np.ndarray) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as out:
        np.save(out, table, allow_pickle=False)


class CachedTeacher(FrozenTeacher):
    """A FrozenTeacher that serves stored logits for the views its table holds.

    A batch whose every view is in the table is answered from it; any other batch runs through
    the live teacher, which `make_live` builds on first need (an ONNX Runtime teacher costs an
    export). `cached` and `computed` count the images answered each way.
    """

    def __init__(self, teacher: torch.nn.Module, runtime: str, table: np.ndarray,
                 context: bytes, make_live: Callable[[], FrozenTeacher]) -> None:
        super().__init__(teacher)
        self.runtime = runtime
        self.logits = table["logits"]
        self.rows = {bytes(key): row for row, key in enumerate(table["key"])}
        self.context, self.make_live = context, make_live
        self.live: FrozenTeacher | None = None
        self.cached = self.computed = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rows = [self.rows.get(key) for key in view_keys(pixels(images), self.context)]
        if None not in rows:
            self.cached += len(rows)
            return torch.from_numpy(self.logits[rows]).to(images.device)
        if self.live is None:
            log.info("teacher: a batch with views the logit table lacks; running it live")
            self.live = self.make_live()
        self.computed += len(rows)
        return self.live(images)


class TableBuilder:
    """Collects one row per distinct view of the batches it is given."""

    def __init__(self, teacher: FrozenTeacher, context: bytes) -> None:
        self.teacher, self.context = teacher, context
        self.keys: list[bytes] = []
        self.logits: list[np.ndarray] = []
        self.seen: set[bytes] = set()

    def add(self, batches: Iterable[torch.Tensor], autocast: Callable[[], object]) -> int:
        """Run the teacher on each batch with a new view (under `autocast()`, as in training);
        returns how many views were new."""
        added = 0
        for images in batches:
            keys = view_keys(pixels(images), self.context)
            fresh = [i for i, key in enumerate(keys) if key not in self.seen]
            if not fresh:
                continue
            with autocast():
                logits = self.teacher(images).float().cpu().numpy()
            for i in fresh:
                if keys[i] not in self.seen:  # a view twice in one batch: keep the first
                    self.seen.add(keys[i])
                    self.keys.append(keys[i])
                    self.logits.append(logits[i])
                    added += 1
        return added

    def table(self, classes: int) -> np.ndarray:
        table = np.empty(len(self.keys), dtype=table_dtype(classes))
        if self.keys:
            table["key"] = np.frombuffer(b"".join(self.keys), dtype=f"V{KEY_BYTES}")
            table["logits"] = np.stack(self.logits)
        return table
