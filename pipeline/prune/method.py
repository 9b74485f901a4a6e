"""One interface for every pruning method: a prune phase that ends in something the slim stage
consumes.

A method gets a `PruneJob` (a fresh student, the frozen teacher, the prune phase's schedule and
data, the common budget) and returns a `PruneOutcome`:

- a structured method returns a `GatedModel` whose gate logits hold its keep decision (kept +1,
  pruned < 0, see `GatedModel.set_keep`), so exact slimming, export, parity gates, INT8 and the
  benchmark work for every method unchanged;
- an unstructured one (`weight`) returns the dense model with zeros in its weights.

Every method trains in exactly one `fit` over the prune phase's epochs (`student_pruned`), so
the epoch budget `student_pruned + student_final = student_dense` holds for all of them, and an
interrupted run resumes from the phase's one checkpoint.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from pipeline.config import DistillConfig, TrainConfig
from pipeline.data import BatchLoader
from pipeline.distill import FrozenTeacher
from pipeline.models.resnet_cifar import ZeroPadShortcut
from pipeline.prune.budget import Decision, Masks, Scores, macs_fraction, select_at_target
from pipeline.prune.gates import GatedModel, attach_gates
from pipeline.prune.latency import (
    LatencyCost,
    LatencyPlan,
    WidthTable,
    select_at_latency,
    select_at_target_by_table,
)
from pipeline.students import distillation_loss_fn
from pipeline.training import EpochHook, EpochStartHook, FitResult, LossFn, TrainingRun, fit

Penalty = Callable[[], torch.Tensor]


@dataclass
class PruneJob:
    """What the student_pruned stage hands to a method."""

    student: nn.Module  # a freshly initialised student on its device, never trained
    teacher: FrozenTeacher  # the trained teacher (models/teacher.pt)
    train: TrainConfig  # the prune phase's schedule (params: student_pruned)
    distill: DistillConfig
    target_macs: float | None  # common kept-MACs target; None = the method's own size
    round_to: int  # decisions are made at the widths slimming ships (student_slim.round_to)
    seed: int
    train_loader: BatchLoader
    test_loader: BatchLoader
    example_input: torch.Tensor  # one zero sample on the device, for tracing
    checkpoint: Path  # the phase's resume checkpoint
    fingerprint: str  # settings, data, code, teacher and method settings: resume only if equal
    title: str
    latency: LatencyPlan | None = None  # a latency budget (prune.budget.latency_ms) instead
    width_table: WidthTable | None = None  # student_slim.widths: table under a MACs budget:
    # the MACs decision is made at the widths the table will ship

    @property
    def has_budget(self) -> bool:
        """A common budget (MACs or latency) is set, not each method's own size."""
        return self.target_macs is not None or self.latency is not None

    def gate(self, model: nn.Module) -> GatedModel:
        """Gates on every channel group of `model` (logits drawn from the run's seed)."""
        generator = torch.Generator(self.example_input.device).manual_seed(self.seed)
        return attach_gates(model, self.example_input, generator=generator)

    def kd_loss(self, penalty: Penalty | None = None,
                teacher: FrozenTeacher | None = None) -> LossFn:
        """(1 - alpha) CE + alpha T^2 KL from `teacher` (default: the job's), plus `penalty`."""
        return distillation_loss_fn(teacher or self.teacher, self.distill,
                                    self.train.label_smoothing, penalty)

    def fit(self, model: nn.Module, loss_fn: LossFn, param_groups: list[dict[str, Any]],
            on_epoch_end: EpochHook | None = None,
            on_epoch_start: EpochStartHook | None = None) -> FitResult:
        """The phase's one training run. `param_groups` is required: a GatedModel's
        `parameters()` include the gate logits, which only PDD trains."""
        return fit(model, TrainingRun(
            cfg=self.train, train_loader=self.train_loader, test_loader=self.test_loader,
            loss_fn=loss_fn, checkpoint_path=self.checkpoint, fingerprint=self.fingerprint,
            param_groups=param_groups, on_epoch_end=on_epoch_end, on_epoch_start=on_epoch_start,
            title=self.title))


@dataclass
class PruneOutcome:
    model: nn.Module  # GatedModel with the keep decision, or the sparse dense model (weight)
    result: FitResult  # the phase's training history
    decision: dict[str, Any]  # JSON: how the keep decision was made (mode, threshold, kept ...)
    alternatives: dict[str, Masks] = field(default_factory=dict)  # e.g. the method's own size
    # when it was driven to the common target: evaluated and reported, not shipped
    recovery_teacher: str = "teacher"  # whom student_final distils from: teacher | unpruned


class PruneMethod(Protocol):
    name: ClassVar[str]
    structured: ClassVar[bool]  # False: zeros inside dense weights, nothing to slim

    def prune(self, job: PruneJob) -> PruneOutcome: ...


def model_parameters(gated: GatedModel) -> list[dict[str, Any]]:
    """The optimizer groups of a gated model whose gates do not train: its weights only."""
    gated.freeze_gates()
    return [{"params": list(gated.model.parameters())}]


def decide(gated: GatedModel, scores: Scores, job: PruneJob, own: Masks,
           fixed: frozenset[str] = frozenset(), **details: Any) -> tuple[dict[str, Any],
                                                                        dict[str, Masks]]:
    """Write the keep decision: at the common target when one is set, else the method's own
    (`own`). Returns the decision summary and, in target mode, the own-size masks as an
    alternative to report."""
    if job.latency is not None:
        return _decide_at_latency(gated, scores, job.latency, fixed, details), {"own size": own}
    if job.target_macs is None:
        gated.set_keep(own, scores)
        return {"mode": "own size", "macs_fraction": macs_fraction(gated, own),
                "kept": _kept(own), **details}, {}
    if job.width_table is not None:
        chosen, widths_by = _decide_at_table_widths(gated, scores, job, fixed)
    else:
        chosen = select_at_target(gated, scores, job.target_macs, job.round_to, fixed)
        widths_by = {"widths_by": f"round_to {job.round_to}"}
    gated.set_keep(chosen.masks, scores)
    summary = {"mode": "target", "target_macs": job.target_macs,
               "macs_fraction": chosen.macs_fraction, "threshold": chosen.threshold,
               "top_up_blocks": chosen.top_up_blocks, "kept": chosen.kept(), **widths_by,
               **details}
    return summary, {"own size": own}


def _decide_at_table_widths(gated: GatedModel, scores: Scores, job: PruneJob,
                            fixed: frozenset[str]) -> tuple[Decision, dict[str, Any]]:
    table = job.width_table
    chosen = select_at_target_by_table(LatencyCost(gated, table.table, table.batch), scores,
                                       job.target_macs, fixed)
    return chosen.decision, {"widths_by": "table", "table_batch": table.batch,
                             "predicted_ms": chosen.predicted_ms,
                             "inner_target_macs": chosen.inner_target}


def _decide_at_latency(gated: GatedModel, scores: Scores, plan: LatencyPlan,
                       fixed: frozenset[str], details: dict[str, Any]) -> dict[str, Any]:
    chosen = select_at_latency(LatencyCost(gated, plan.table, plan.batch), scores,
                               plan.budget_ms, fixed)
    gated.set_keep(chosen.masks, scores)
    return {"mode": "latency", "latency_budget_ms": plan.budget_ms, "batch": plan.batch,
            "predicted_ms": chosen.predicted_ms, "knapsack_steps": chosen.steps,
            "macs_fraction": macs_fraction(gated, chosen.masks), "kept": chosen.widths,
            **details}


def _kept(masks: Masks) -> dict[str, int]:
    return {key: int(mask.sum()) for key, mask in masks.items()}


def streams(gated: GatedModel) -> frozenset[str]:
    """Groups whose channels several layers write (residual streams): more than one conv
    producer, or an option-A shortcut among the producers."""
    coupled = set()
    for group in gated.plan.groups:
        producers = [gated.model.get_submodule(name) for name in group.producers]
        convs = [m for m in producers if isinstance(m, nn.modules.conv._ConvNd)]
        if len(convs) > 1 or any(isinstance(m, ZeroPadShortcut) for m in producers):
            coupled.add(group.key)
    return frozenset(coupled)
