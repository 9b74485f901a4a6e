"""What the student stages share: the frozen teacher and the KD training loss."""

from collections.abc import Callable

import torch
from torch import nn

from pipeline.checkpoint import load_model, read_checkpoint
from pipeline.config import DistillConfig
from pipeline.distill import DistillationLoss, FrozenTeacher
from pipeline.errors import CheckpointError
from pipeline.models import build_model
from pipeline.prune.gates import GatedModel, attach_gates
from pipeline.training import LossFn


def load_teacher(path, device: torch.device, channels_last: bool) -> FrozenTeacher:
    teacher = load_model(path, device).model
    if channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    return FrozenTeacher(teacher)


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
