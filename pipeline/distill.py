"""Knowledge distillation (Hinton et al. 2015): the loss PDD trains the gated student with.

Convention (documented because papers differ):

    loss = (1 - alpha) * CE(student, labels) + alpha * KD
    KD   = T^2 * KL( softmax(teacher / T) || softmax(student / T) ),  batch mean

`alpha` is the weight of the distillation term (reference PDD settings: alpha = 0.6, T = 3).
The T^2 factor keeps the soft-target gradients on the scale of the hard-target ones when T
changes. Both distributions are passed to `F.kl_div` as log-probabilities with
`log_target=True`: the reference PDD code passes log-probabilities as the target without that
flag, which computes a different (wrong) quantity.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch."""
    student_log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher_log_p = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(student_log_p, teacher_log_p, reduction="batchmean", log_target=True)
    return kl * temperature**2


class LossTerms(NamedTuple):
    total: torch.Tensor  # what to backpropagate
    ce: torch.Tensor  # hard-label cross-entropy (with label smoothing if set)
    kd: torch.Tensor  # T^2-scaled KL to the teacher, before the alpha weight


class DistillationLoss(nn.Module):
    """(1 - alpha) * CE(s, y) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))."""

    def __init__(self, alpha: float = 0.6, temperature: float = 3.0,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"distillation alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ConfigError(f"distillation temperature must be > 0, got {temperature}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.alpha, self.temperature, self.label_smoothing = alpha, temperature, label_smoothing

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                targets: torch.Tensor) -> LossTerms:
        ce = F.cross_entropy(student_logits.float(), targets,
                             label_smoothing=self.label_smoothing)
        kd = kd_loss(student_logits, teacher_logits.detach(), self.temperature)
        return LossTerms((1.0 - self.alpha) * ce + self.alpha * kd, ce, kd)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, temperature={self.temperature}, "
                f"label_smoothing={self.label_smoothing}")


class FrozenTeacher(nn.Module):
    """A teacher that never trains: no gradients, always in eval mode, forward without autograd.

    `.train()` on this wrapper (or on a parent module holding it) leaves the teacher in eval
    mode, so its BatchNorm statistics and dropout never change during distillation. The
    forward runs under `torch.no_grad()` rather than `inference_mode()`: inference tensors
    cannot be saved for the student's backward pass, which the KD loss needs.
    """

    runtime = "torch"  # what runs the forward pass (pipeline.teacher_onnx: "onnxruntime")

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher.eval()
        self.teacher.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, *args, **kwargs) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(*args, **kwargs)
