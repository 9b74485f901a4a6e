"""teacher_logits stage: the frozen teacher's logits for every training view the student stages
will show it, computed once (pipeline.teacher_cache).

For each student stage's schedule (resolved/teacher_views.json: epochs, batch size, precision,
memory format) it draws the training batches that stage's loader will draw, epoch by epoch, and
runs the teacher on each view not seen yet, in the mode that stage would run it. With the quick
profile's equal batch sizes that is the dense student's 6 epochs; the prune and fine-tune phases
add no view.

Writes data/teacher_logits.npy (no rows when distill.teacher_cache is false: every student
stage then runs its teacher live) and metrics/teacher_logits.json.
"""

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.checkpoint import load_model
from pipeline.config import RunConfig, TeacherViews, ViewSchedule
from pipeline.io import file_sha256, write_json
from pipeline.students import freeze_teacher, teacher_runtime
from pipeline.teacher_cache import (
    TableBuilder,
    table_context,
    table_dtype,
    teacher_mode,
    write_table,
)
from pipeline.training import autocast, resolved_amp, training_loader
from stages._cli import stage_main
from stages._common import StageContext, start_stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    common: RunConfig
    teacher_views: TeacherViews


@dataclass(frozen=True)
class Paths:
    dataset: Path = Path("data/prepared.npz")
    teacher: Path = Path("models/teacher.pt")
    table: Path = Path("data/teacher_logits.npy")
    metrics: Path = Path("metrics/teacher_logits.json")


@dataclass
class Tables:
    """One TableBuilder per teacher mode the schedules ask for."""

    ctx: StageContext
    views: TeacherViews
    paths: Paths
    builders: dict[str, TableBuilder] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.loaded = load_model(self.paths.teacher, self.ctx.device)
        self.teacher_sha256 = file_sha256(self.paths.teacher)

    def add(self, schedule: ViewSchedule, seed: int) -> int:
        """Every view of `schedule`'s epochs the tables lack, through the teacher in its mode."""
        device = self.ctx.device
        amp = resolved_amp(device, schedule.amp)
        runtime = teacher_runtime(self.views.teacher_runtime, device, amp)
        mode = teacher_mode(runtime, device, amp, schedule.channels_last)
        if mode not in self.builders:  # a copy each: freezing sets the memory format
            teacher = freeze_teacher(copy.deepcopy(self.loaded.model), device, schedule, runtime,
                                     tuple(self.loaded.meta["input_shape"]))
            self.builders[mode] = TableBuilder(teacher, table_context(self.teacher_sha256, mode))
        loader = training_loader(self.ctx.dataset, schedule.batch_size, schedule.channels_last,
                                 device, seed)
        added = 0
        for epoch in range(schedule.epochs):
            loader.set_epoch(epoch)
            added += self.builders[mode].add((images for images, _ in loader),
                                             lambda: autocast(device, amp))
        log.info("%s: %d new views of %d epochs (teacher: %s)", schedule.stage, added,
                 schedule.epochs, mode)
        return added

    def table(self) -> np.ndarray:
        classes = len(self.ctx.dataset.classes)
        parts = [builder.table(classes) for builder in self.builders.values()]
        return np.concatenate(parts) if parts else np.empty(0, table_dtype(classes))


def run(settings: Settings, paths: Paths) -> dict:
    views = settings.teacher_views
    if not views.enabled:
        write_table(paths.table, np.empty(0, table_dtype(0)))
        metrics = {"enabled": False, "views": 0}
        write_json(paths.metrics, metrics)
        return metrics
    ctx = start_stage(settings.common, paths.dataset, __file__)
    tables = Tables(ctx, views, paths)
    began = time.perf_counter()
    added = {schedule.stage: tables.add(schedule, settings.common.seed)
             for schedule in views.schedules}
    seconds = time.perf_counter() - began
    table = tables.table()
    write_table(paths.table, table)
    metrics = {"enabled": True, "views": len(table), "new_views_by_stage": added,
               "modes": sorted(tables.builders), "seconds": round(seconds, 2),
               "views_per_second": round(len(table) / seconds, 1) if seconds else 0.0,
               "device": str(ctx.device), "profile": settings.common.profile}
    write_json(paths.metrics, metrics)
    return metrics


def main() -> None:
    stage_main(__doc__, run, Settings, Paths())


if __name__ == "__main__":
    main()
