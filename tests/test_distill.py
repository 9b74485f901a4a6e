import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.distill import DistillationLoss, FrozenTeacher, kd_loss
from pipeline.errors import ConfigError


def _logits(seed: int, shape=(4, 5)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def _softmax_by_hand(logits: torch.Tensor) -> torch.Tensor:
    exp = torch.exp(logits.double() - logits.double().max(dim=1, keepdim=True).values)
    return exp / exp.sum(dim=1, keepdim=True)


def _kd_by_hand(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    p_teacher = _softmax_by_hand(teacher / temperature)
    p_student = _softmax_by_hand(student / temperature)
    kl_per_sample = (p_teacher * (p_teacher.log() - p_student.log())).sum(dim=1)
    return kl_per_sample.mean().item() * temperature**2


def _ce_by_hand(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> float:
    log_p = _softmax_by_hand(logits).log()
    nll = -log_p[torch.arange(len(targets)), targets]
    uniform = -log_p.mean(dim=1)
    return ((1 - smoothing) * nll + smoothing * uniform).mean().item()


@pytest.mark.parametrize("temperature", [1.0, 3.0, 7.5])
def test_kd_loss_equals_hand_computed_kl_times_t_squared(temperature):
    student, teacher = _logits(0), _logits(1)
    expected = _kd_by_hand(student, teacher, temperature)
    assert kd_loss(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise():
    logits = _logits(2)
    assert kd_loss(logits, logits.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, _logits(3), 3.0).item() > 0.01


def test_kd_loss_is_not_the_reference_codes_log_target_bug():
    student, teacher = _logits(4), _logits(5)
    buggy = F.kl_div(F.log_softmax(student / 3, 1), F.log_softmax(teacher / 3, 1),
                     reduction="batchmean") * 9
    ours = kd_loss(student, teacher, 3.0).item()
    assert math.isfinite(ours)
    assert not math.isclose(ours, buggy.item(), rel_tol=1e-3)  # the bug gives NaN or garbage


@pytest.mark.parametrize("alpha,smoothing", [(0.6, 0.0), (0.0, 0.1), (1.0, 0.0), (0.3, 0.2)])
def test_distillation_loss_combines_ce_and_kd_with_alpha(alpha, smoothing):
    student, teacher = _logits(6), _logits(7)
    targets = torch.tensor([0, 3, 4, 1])
    terms = DistillationLoss(alpha, 3.0, smoothing)(student, teacher, targets)
    ce, kd = _ce_by_hand(student, targets, smoothing), _kd_by_hand(student, teacher, 3.0)
    assert terms.ce.item() == pytest.approx(ce, rel=1e-5)
    assert terms.kd.item() == pytest.approx(kd, rel=1e-5)
    assert terms.total.item() == pytest.approx((1 - alpha) * ce + alpha * kd, rel=1e-5)


def test_distillation_loss_gradient_reaches_the_student_only():
    student = _logits(8).requires_grad_()
    teacher = _logits(9).requires_grad_()
    DistillationLoss()(student, teacher, torch.tensor([1, 2, 3, 4])).total.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize("kwargs,word", [({"alpha": 1.5}, "alpha"),
                                         ({"temperature": 0.0}, "temperature"),
                                         ({"label_smoothing": 1.0}, "label_smoothing")])
def test_distillation_loss_rejects_bad_settings(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        DistillationLoss(**kwargs)


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5),
                         nn.Linear(4, 3))


def test_frozen_teacher_stays_in_eval_mode_and_never_updates():
    teacher = FrozenTeacher(_teacher())
    parent = nn.ModuleDict({"teacher": teacher, "student": nn.Linear(2, 2)}).train()
    assert parent["student"].training and not teacher.teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    bn = teacher.teacher[1]
    stats_before = bn.running_mean.clone()
    x = torch.randn(8, 3, 6, 6)
    first, second = teacher(x), teacher(x)
    assert torch.equal(bn.running_mean, stats_before)  # eval-mode BN: statistics untouched
    assert torch.equal(first, second)  # eval-mode dropout: deterministic
    assert first.grad_fn is None and not first.requires_grad
    assert math.isfinite(first.sum().item())
