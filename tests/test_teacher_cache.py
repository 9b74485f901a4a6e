"""The teacher-logit table (pipeline.teacher_cache, stage teacher_logits): a student distilled
from the table trains exactly as one distilled from the live teacher, a view the table lacks runs
live, and a table of another teacher, another mode or another kind of file is never served."""

import dataclasses

import numpy as np
import pytest
import torch
from stage_settings import ONE_PROCESS

from pipeline.checkpoint import save_model
from pipeline.config import DistillConfig, RunConfig, TeacherViews, TrainConfig, ViewSchedule
from pipeline.data import make_synthetic, save_prepared
from pipeline.distill import FrozenTeacher
from pipeline.errors import CheckpointError
from pipeline.io import file_sha256
from pipeline.models import build_model
from pipeline.students import distillation_loss_fn, load_teacher, teacher_cache_metrics
from pipeline.teacher_cache import (
    CachedTeacher,
    TableBuilder,
    pixels,
    read_table,
    table_context,
    table_dtype,
    teacher_mode,
    view_keys,
    write_table,
)
from pipeline.training import TrainingRun, autocast, fit, make_loaders, training_loader
from stages import teacher_logits as stage

CPU = torch.device("cpu")
SPEC = {"arch": "resnet20", "num_classes": 4, "base_width": 4}
CONTEXT = table_context("0" * 64, teacher_mode("torch", CPU, "off", False))


def schedule(epochs: int = 2, batch_size: int = 16) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=batch_size, eval_batch_size=32, lr=0.05,
                       momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="cosine",
                       milestones=(), gamma=0.1, warmup_epochs=0, label_smoothing=0.0,
                       amp="off", channels_last=False)


DISTILL = DistillConfig(student_arch="resnet20", temperature=3.0, alpha=0.6,
                        teacher_runtime="torch", teacher_cache=True)


def teacher_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return build_model(SPEC).eval()


def table_of(teacher: FrozenTeacher, dataset, cfg: TrainConfig, context: bytes,
             seed: int = 0) -> np.ndarray:
    builder = TableBuilder(teacher, context)
    loader = training_loader(dataset, cfg.batch_size, cfg.channels_last, CPU, seed)
    for epoch in range(cfg.epochs):
        loader.set_epoch(epoch)
        builder.add((images for images, _ in loader), lambda: autocast(CPU, "off"))
    return builder.table(len(dataset.classes))


def distinct_views(dataset, batch_size: int, epochs: int, context: bytes) -> int:
    """How many different views `epochs` of a loader draw (a crop and flip can recur)."""
    loader = training_loader(dataset, batch_size, False, CPU, seed=0)
    keys = set()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        keys.update(key for images, _ in loader for key in view_keys(pixels(images), context))
    return len(keys)


def train_student(teacher: FrozenTeacher, dataset, cfg: TrainConfig, tmp_path, seed: int = 0):
    torch.manual_seed(0)
    student = build_model(SPEC)
    train, test = make_loaders(dataset, cfg, CPU, seed=seed)
    fit(student, TrainingRun(cfg=cfg, train_loader=train, test_loader=test,
                             loss_fn=distillation_loss_fn(teacher, DISTILL, 0.0),
                             checkpoint_path=tmp_path / f"resume-{id(teacher)}.pt",
                             fingerprint="test", title="kd"))
    return student.state_dict()


def test_a_views_key_is_its_exact_pixels_whatever_the_batch_and_memory_format():
    images = torch.randn(6, 3, 8, 8)
    keys = view_keys(pixels(images), CONTEXT)
    assert len(set(keys)) == 6
    assert view_keys(pixels(images[2:4]), CONTEXT) == keys[2:4]
    assert view_keys(pixels(images.contiguous(memory_format=torch.channels_last)),
                     CONTEXT) == keys
    changed = images.clone()
    changed[0, 1, 3, 3] += 1e-6
    assert view_keys(pixels(changed), CONTEXT)[0] != keys[0]
    assert view_keys(pixels(images.flip(3)), CONTEXT)[0] != keys[0]
    other_mode = table_context("0" * 64, teacher_mode("onnxruntime", CPU, "off", False))
    assert view_keys(pixels(images), other_mode)[0] != keys[0]


def test_a_student_distilled_from_the_table_trains_exactly_as_from_the_live_teacher(tmp_path):
    dataset = make_synthetic(64, 32, 4, seed=0)
    cfg = schedule(epochs=2)
    live = FrozenTeacher(teacher_model())
    table = table_of(live, dataset, cfg, CONTEXT)
    assert len(table) == distinct_views(dataset, 16, 2, CONTEXT) > 64  # each view once
    cached = CachedTeacher(teacher_model(), "torch", table, CONTEXT,
                           make_live=lambda: pytest.fail("the table holds every view"))
    from_table = train_student(cached, dataset, cfg, tmp_path)
    from_live = train_student(live, dataset, cfg, tmp_path)
    assert all(torch.equal(from_table[k], from_live[k]) for k in from_live)
    assert (cached.cached, cached.computed) == (2 * 64, 0)
    assert teacher_cache_metrics(cached) == {"teacher_cache": "table",
                                             "teacher_images_cached": 128,
                                             "teacher_images_run": 0}
    assert teacher_cache_metrics(live) == {"teacher_cache": "off"}


def test_views_the_table_lacks_run_through_the_live_teacher(tmp_path):
    dataset = make_synthetic(64, 32, 4, seed=0)
    live = FrozenTeacher(teacher_model())
    table = table_of(live, dataset, schedule(epochs=1), CONTEXT)  # epoch 0 only
    built = []
    cached = CachedTeacher(teacher_model(), "torch", table, CONTEXT,
                           make_live=lambda: built.append(1) or FrozenTeacher(teacher_model()))
    from_table = train_student(cached, dataset, schedule(epochs=2), tmp_path)
    from_live = train_student(live, dataset, schedule(epochs=2), tmp_path)
    assert all(torch.equal(from_table[k], from_live[k]) for k in from_live)
    assert (cached.cached, cached.computed, built) == (64, 64, [1])  # built once, on need


def test_a_table_of_another_teacher_file_serves_nothing(tmp_path):
    dataset = make_synthetic(32, 16, 4, seed=0)
    table = table_of(FrozenTeacher(teacher_model()), dataset, schedule(epochs=1), CONTEXT)
    other = table_context("1" * 64, teacher_mode("torch", CPU, "off", False))
    cached = CachedTeacher(teacher_model(), "torch", table, other,
                           make_live=lambda: FrozenTeacher(teacher_model()))
    loader = training_loader(dataset, 16, False, CPU, seed=0)
    for images, _ in loader:
        cached(images)
    assert (cached.cached, cached.computed) == (0, 32)


def test_tables_round_trip_and_other_files_are_refused(tmp_path):
    table = np.zeros(3, table_dtype(4))
    table["key"] = [bytes([i]) * 16 for i in range(3)]
    table["logits"] = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_table(tmp_path / "t.npy", table)
    assert read_table(tmp_path / "t.npy").tobytes() == table.tobytes()
    np.save(tmp_path / "floats.npy", np.zeros((3, 4), np.float32))
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "scalar.npy", np.zeros(3, [("key", "V16"), ("logits", "<f4")]))
    for name in ("floats.npy", "pickled.npy", "missing.npy", "scalar.npy"):
        with pytest.raises(CheckpointError, match="teacher-logit table"):
            read_table(tmp_path / name)


def stage_workspace(tmp_path, epochs: tuple[int, ...], enabled: bool = True):
    dataset = make_synthetic(48, 16, 4, seed=0)
    save_prepared(dataset, tmp_path / "prepared.npz")
    meta = {"classes": list(dataset.classes), "mean": list(dataset.mean),
            "std": list(dataset.std), "input_shape": [3, 32, 32], "dataset": "synthetic",
            "top1": 0.1, "params": 1, "macs": 1}
    save_model(tmp_path / "teacher.pt", teacher_model(), SPEC, meta)
    names = ("student_dense", "student_pruned", "student_final")
    views = TeacherViews(enabled, "torch", tuple(
        ViewSchedule(name, count, 16, "off", True)
        for name, count in zip(names, epochs, strict=True)))
    settings = stage.Settings(common=RunConfig(seed=0, device="cpu", threads=0,
                                               distributed=ONE_PROCESS, profile="smoke"),
                              teacher_views=views)
    paths = stage.Paths(dataset=tmp_path / "prepared.npz", teacher=tmp_path / "teacher.pt",
                        table=tmp_path / "logits.npy", metrics=tmp_path / "metrics.json")
    return dataset, settings, paths


def test_the_stage_stores_each_view_of_the_student_stages_once(tmp_path):
    dataset, settings, paths = stage_workspace(tmp_path, epochs=(4, 2, 2))
    metrics = stage.run(settings, paths)
    views = distinct_views(dataset, 16, 4, CONTEXT)
    assert 3 * 48 < metrics["views"] == views <= 4 * 48
    assert metrics["new_views_by_stage"] == {"student_dense": views, "student_pruned": 0,
                                             "student_final": 0}
    student_cfg = dataclasses.replace(schedule(epochs=2), channels_last=True)
    teacher = load_teacher(paths.teacher, CPU, student_cfg, DISTILL, paths.table)
    assert isinstance(teacher, CachedTeacher)
    loader = training_loader(dataset, 16, True, CPU, seed=0)
    live = FrozenTeacher(teacher_model().to(memory_format=torch.channels_last))
    for epoch in range(2):
        loader.set_epoch(epoch)
        for images, _ in loader:
            assert torch.equal(teacher(images), live(images))
    assert (teacher.cached, teacher.computed) == (96, 0)


def test_a_teacher_in_another_mode_finds_no_row(tmp_path):
    dataset, settings, paths = stage_workspace(tmp_path, epochs=(2, 1, 1))
    stage.run(settings, paths)
    nchw = schedule(epochs=1)  # the table was made for channels_last students
    teacher = load_teacher(paths.teacher, CPU, nchw, DISTILL, paths.table)
    images = next(iter(training_loader(dataset, 16, False, CPU, seed=0)))[0]
    teacher(images)
    assert (teacher.cached, teacher.computed) == (0, 16)


def test_without_the_cache_the_stage_writes_an_empty_table_and_students_run_live(tmp_path):
    _, settings, paths = stage_workspace(tmp_path, epochs=(2, 1, 1), enabled=False)
    assert stage.run(settings, paths) == {"enabled": False, "views": 0}
    assert len(read_table(paths.table)) == 0
    teacher = load_teacher(paths.teacher, CPU, schedule(), DISTILL, paths.table)
    assert not isinstance(teacher, CachedTeacher) and teacher.runtime == "torch"


def test_the_keys_tie_rows_to_the_teacher_file(tmp_path):
    dataset, settings, paths = stage_workspace(tmp_path, epochs=(1, 1, 1))
    stage.run(settings, paths)
    mode = teacher_mode("torch", CPU, "off", True)
    images = next(iter(training_loader(dataset, 16, True, CPU, seed=0)))[0]
    rows = set(read_table(paths.table)["key"].tobytes()[i:i + 16] for i in range(0, 16 * 48, 16))
    ours = view_keys(pixels(images), table_context(file_sha256(paths.teacher), mode))
    assert set(ours) <= rows
