"""What the student stages share: the frozen teacher and the KD training loss."""

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pipeline import distributed
from pipeline.checkpoint import load_model, read_checkpoint
from pipeline.config import DistillConfig, TrainConfig, ViewSchedule
from pipeline.distill import DistillationLoss, FrozenTeacher
from pipeline.errors import CheckpointError, ConfigError
from pipeline.io import file_sha256
from pipeline.models import build_model
from pipeline.prune.gates import GatedModel, attach_gates
from pipeline.teacher_cache import CachedTeacher, read_table, table_context, teacher_mode
from pipeline.training import LossFn, resolved_amp


def teacher_runtime(requested: str, device: torch.device, amp: str) -> str:
    """What runs the frozen teacher's forward pass: `auto` is ONNX Runtime when the student
    trains in fp32 on a CPU (faster there, benchmarks/train_paths.py), else PyTorch (on CUDA,
    and under bf16 autocast, which runs the teacher in bf16 too)."""
    if requested == "onnxruntime" and device.type != "cpu":
        raise ConfigError(f"distill.teacher_runtime=onnxruntime runs on the CPU, but training "
                          f"runs on {device}; use auto or torch")
    if requested != "auto":
        return requested
    return "onnxruntime" if device.type == "cpu" and amp == "off" else "torch"


def freeze_teacher(model: nn.Module, device: torch.device, cfg: TrainConfig | ViewSchedule,
                   runtime: str,
                   input_shape: tuple[int, ...]) -> FrozenTeacher:
    """`model` as the frozen teacher of a KD run with schedule `cfg` (its memory format and
    precision decide), its forward pass in the runtime `runtime` resolves to."""
    model = model.to(device).eval()
    if teacher_runtime(runtime, device, resolved_amp(device, cfg.amp)) == "onnxruntime":
        from pipeline.teacher_onnx import OnnxRuntimeTeacher  # exports: only when chosen

        return OnnxRuntimeTeacher(model, input_shape, threads=torch.get_num_threads())
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return FrozenTeacher(model)


def load_teacher(path, device: torch.device, cfg: TrainConfig, distill: DistillConfig,
                 logits: Path | None = None) -> FrozenTeacher:
    """The frozen teacher of a KD run with schedule `cfg`; with `logits` (the teacher_logits
    stage's table) one that serves the table's rows for the views it holds."""
    loaded = load_model(path, device)
    shape = tuple(loaded.meta["input_shape"])

    def live() -> FrozenTeacher:
        return freeze_teacher(loaded.model, device, cfg, distill.teacher_runtime, shape)

    table = read_table(logits) if logits is not None else None
    if table is None or len(table) == 0:
        return live()
    amp = resolved_amp(device, cfg.amp)
    runtime = teacher_runtime(distill.teacher_runtime, device, amp)
    mode = teacher_mode(runtime, device, amp, cfg.channels_last)
    return CachedTeacher(loaded.model.eval(), runtime, table,
                         table_context(file_sha256(path), mode), live)


def teacher_cache_metrics(teacher: FrozenTeacher) -> dict[str, object]:
    """For a stage's metrics: whether the teacher served logits from a table, and how many
    images it answered from the table and how many it ran, summed over the processes of a
    data-parallel run (each one counts only its own shard). Every process must call it."""
    if not isinstance(teacher, CachedTeacher):
        return {"teacher_cache": "off"}
    cached, computed = distributed.all_reduce_sum([teacher.cached, teacher.computed])
    return {"teacher_cache": "table", "teacher_images_cached": int(cached),
            "teacher_images_run": int(computed)}


def distillation_loss_fn(teacher: FrozenTeacher, cfg: DistillConfig, label_smoothing: float,
                         penalty: Callable[[], torch.Tensor] | None = None) -> LossFn:
    """Training loss: (1-alpha)*CE + alpha*KD, plus an optional extra term (e.g. a MACs budget)."""
    criterion = DistillationLoss(cfg.alpha, cfg.temperature, label_smoothing)

    def loss_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        logits = model(images)
        loss = criterion(logits, teacher(images), labels).total
        if penalty is not None:
            loss = loss + penalty()
        return loss, logits

    return loss_fn


def load_gated(path, device: torch.device) -> tuple[GatedModel, dict, dict]:
    """A gated student saved by a student_pruned stage: rebuilt from its spec, gates
    re-attached (their logits hold the method's keep decision)."""
    payload = read_checkpoint(path)
    model = build_model(payload["spec"]).to(device)
    example = torch.zeros(1, *payload["meta"]["input_shape"], device=device)
    gated = attach_gates(model, example)
    try:
        gated.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: gates do not fit the spec {payload['spec']}: {err}") from err
    return gated.eval(), payload["spec"], payload["meta"]
