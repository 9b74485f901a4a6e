"""student_pruned stage: the prune phase of one pruning method (DVC runs it once per method in
prune.methods: student_pruned@<method>).

A fresh student trains for student_pruned.epochs under the method (pipeline/prune/<method>.py,
behind pipeline.prune.method.PruneMethod) with KD from the frozen teacher, and the method decides
what to remove: at the common budget (prune.budget: kept MACs, or a latency priced by
latency/budget.json, which the latency_plan stage writes; a MACs budget is met at the widths
the table ships when latency/budget.json carries the width table) or at its own size. Writes
models/student_pruned_<method>.pt - a gated student whose gates hold the keep decision
(structured methods), or the dense student with zeros in its weights (`weight`) -
metrics/student_pruned_<method>.json (top-1 as trained and after the decision, the decision,
kept channels, params/MACs before and after, the method's own-size decision when a target was
set) and plots/student_pruned_<method>.csv.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint import save_model
from pipeline.codebase import code_hash
from pipeline.config import (
    DistillConfig,
    MethodBudget,
    RunConfig,
    TrainConfig,
    as_dict,
    load_method_settings,
)
from pipeline.flops import sparse_cost
from pipeline.io import file_sha256
from pipeline.models import build_model
from pipeline.prune.budget import Masks
from pipeline.prune.gates import GatedModel
from pipeline.prune.latency import (
    LatencyPlan,
    WidthTable,
    read_budget_plan,
    read_width_table,
    require_priced,
)
from pipeline.prune.method import PruneJob, PruneOutcome
from pipeline.prune.registry import make_method, method_module
from pipeline.prune.slimming import slim
from pipeline.students import load_teacher, teacher_cache_metrics
from pipeline.training import evaluate, prepare_model
from stages._cli import RESOLVED, load_settings, run_main
from stages._common import (
    StageContext,
    TrainingPaths,
    cost_of,
    start_stage,
    training_metrics,
    write_curves_and_metrics,
)


@dataclass(frozen=True)
class Settings:
    common: RunConfig
    distill: DistillConfig
    student_pruned: TrainConfig  # the prune phase's schedule, shared by every method


@dataclass(frozen=True)
class MethodSettings:
    """resolved/methods/<method>.json: the common budget and the method's own section."""

    name: str
    budget: MethodBudget
    settings: Any

    @classmethod
    def load(cls, name: str, resolved: Path = RESOLVED) -> "MethodSettings":
        return cls(name, *load_method_settings(name, resolved / "methods" / f"{name}.json"))


def paths_for(method: str) -> TrainingPaths:
    return TrainingPaths(f"student_pruned_{method}")


def latency_plan(budget: MethodBudget, path: Path) -> LatencyPlan | None:
    """The latency budget and its table, when prune.budget is a latency."""
    if budget.latency_ms is None:
        return None
    return read_budget_plan(path)


def width_table(budget: MethodBudget, path: Path) -> WidthTable | None:
    """The table a MACs decision is priced with, when slimming ships the table's widths."""
    if budget.target_macs is None:
        return None
    return read_width_table(path)


def network_cost(gated: GatedModel, ctx: StageContext) -> dict[str, int]:
    """Params and MACs of the network the gates describe (their kept channels, no rounding)."""
    cost = cost_of(slim(gated, round_to=1, verify=False)[0], ctx)
    return {"params_after": cost.params, "macs_after": cost.macs}


def evaluate_alternative(gated: GatedModel, masks: Masks, test_loader, ctx) -> dict[str, Any]:
    """An alternative keep decision's size and top-1 (before fine-tuning); the gates come back
    to the shipped decision afterwards."""
    saved = {key: gated.gate(key).logits.detach().clone() for key in gated.group_keys}
    try:
        gated.set_keep(masks)
        return {"top1": evaluate(gated, test_loader)["top1"], **network_cost(gated, ctx),
                "kept": gated.kept_channels()}
    finally:
        with torch.no_grad():
            for key, logits in saved.items():
                gated.gate(key).logits.copy_(logits)


def decision_metrics(outcome: PruneOutcome, structured: bool, ctx: StageContext,
                     test_loader) -> dict[str, Any]:
    model = outcome.model
    if not structured:
        return {"top1": evaluate(model, test_loader)["top1"], **outcome.decision}
    widths = model.group_widths()
    return {"top1": evaluate(model, test_loader)["top1"], "decision": outcome.decision,
            "kept_channels": {key: {"kept": kept, "width": widths[key]}
                              for key, kept in model.kept_channels().items()},
            **network_cost(model, ctx),
            "alternatives": {name: evaluate_alternative(model, masks, test_loader, ctx)
                             for name, masks in outcome.alternatives.items()}}


def pruning_meta(method: MethodSettings, structured: bool, outcome: PruneOutcome) -> dict:
    """What the model file says about its pruning (read by slim, fine-tuning, export cards)."""
    return {"method": method.name, "structured": structured,
            "target_macs": method.budget.target_macs if structured else None,
            "recovery_teacher": outcome.recovery_teacher,
            "settings": as_dict(method.settings)}


def run(settings: Settings, method: MethodSettings, paths: TrainingPaths) -> dict:
    cfg, seed = settings.student_pruned, settings.common.seed
    ctx = start_stage(settings.common, paths.dataset, __file__)
    spec = {"arch": settings.distill.student_arch, "num_classes": len(ctx.dataset.classes)}
    student = build_model(spec)  # first, right after seeding: every method starts alike
    cost_before = cost_of(student, ctx)
    student = prepare_model(student, cfg, ctx.device)
    teacher = load_teacher(paths.teacher, ctx.device, cfg, settings.distill, paths.teacher_logits)
    train_loader, test_loader = ctx.loaders(cfg, seed)
    pruner = make_method(method.name, method.settings)
    latency = latency_plan(method.budget, paths.latency_budget)
    widths = width_table(method.budget, paths.latency_budget)
    pricing = latency.table if latency else widths.table if widths else None
    if pricing is not None and pruner.structured:
        require_priced(student, ctx.input_shape, pricing)  # before training, not after
    job = PruneJob(
        student=student, teacher=teacher, train=cfg, distill=settings.distill,
        target_macs=method.budget.target_macs, round_to=method.budget.round_to, seed=seed,
        train_loader=train_loader, test_loader=test_loader, example_input=ctx.example_input(),
        checkpoint=paths.checkpoint, title=method.name,
        fingerprint=ctx.fingerprint(cfg, spec, seed, settings.distill, teacher.runtime,
                                    file_sha256(paths.teacher),
                                    method.name, as_dict(method.budget), as_dict(method.settings),
                                    code_hash(method_module(method.name)),
                                    file_sha256(paths.latency_budget) if pricing else None),
        latency=latency, width_table=widths)
    outcome = pruner.prune(job)
    trained = training_metrics(outcome.result, cfg, ctx, settings.common)
    metrics = {**trained, "teacher_runtime": teacher.runtime, **teacher_cache_metrics(teacher),
               "top1_trained": trained["top1"],
               "method": method.name,
               "arch": spec["arch"], "params_before": cost_before.params,
               "macs_before": cost_before.macs,
               **decision_metrics(outcome, pruner.structured, ctx, test_loader)}
    meta = ctx.model_meta(cost_before, metrics["top1"], gated=pruner.structured,
                          pruning=pruning_meta(method, pruner.structured, outcome))
    if not pruner.structured:
        sparse = sparse_cost(outcome.model, ctx.input_shape)
        metrics.update(params_after=sparse.params_nonzero, macs_after=cost_before.macs)
    save_model(paths.model, outcome.model, spec, meta)
    write_curves_and_metrics(outcome.result, paths.plots, paths.metrics, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolved", type=Path, default=RESOLVED)
    parser.add_argument("--method", required=True, help="a pruning method listed in prune.methods")
    args = parser.parse_args(argv)
    run_main(lambda: run(load_settings(Settings, args.resolved),
                         MethodSettings.load(args.method, args.resolved), paths_for(args.method)))


if __name__ == "__main__":
    main()
