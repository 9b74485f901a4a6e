"""student_final stage: KD fine-tuning of one method's slimmed student, on its own schedule
(DVC runs it once per method: student_final@<method>).

The teacher is the one the method's prune stage named (its model file says so): the frozen
teacher, or for `prune_then_kd` with `recovery_teacher: unpruned` the unpruned student itself
(the prune stage's gated student with every gate open). A student with unstructured zeros
(`weight`) keeps every zero at exactly zero (pipeline.prune.sparse.ZeroKeeper; checked after
training). Writes models/student_final_<method>.pt (the same pruned spec as the slimmed model),
metrics/student_final_<method>.json and plots/student_final_<method>.csv.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

from pipeline.checkpoint import load_model, save_model
from pipeline.config import DistillConfig, RunConfig, TrainConfig
from pipeline.distill import FrozenTeacher
from pipeline.errors import CheckpointError
from pipeline.flops import sparse_cost
from pipeline.io import file_sha256
from pipeline.prune.sparse import ZeroKeeper
from pipeline.students import (
    distillation_loss_fn,
    freeze_teacher,
    load_gated,
    load_teacher,
    teacher_cache_metrics,
)
from pipeline.training import TrainingRun, evaluate, fit, prepare_model
from stages._cli import RESOLVED, load_settings, run_main
from stages._common import (
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
    student_final: TrainConfig


def paths_for(method: str) -> TrainingPaths:
    return TrainingPaths(f"student_final_{method}", start=Path(f"models/student_slim_{method}.pt"))


def unpruned_path(method: str) -> Path:
    """The prune stage's gated student: with its gates open, the network before pruning."""
    return Path("models") / f"student_pruned_{method}.pt"


def recovery_teacher(pruning: dict, method: str, paths: TrainingPaths, device,
                     cfg: TrainConfig, distill: DistillConfig) -> tuple[FrozenTeacher, Path]:
    """The teacher the fine-tuning distils from, and the file it came from."""
    if pruning.get("recovery_teacher", "teacher") == "teacher":
        teacher = load_teacher(paths.teacher, device, cfg, distill, paths.teacher_logits)
        return teacher, paths.teacher
    source = unpruned_path(method)
    gated, _, meta = load_gated(source, device)
    unpruned = gated.plain_copy()  # every gate open: the trained network before pruning
    return freeze_teacher(unpruned, device, cfg, distill.teacher_runtime,
                          tuple(meta["input_shape"])), source


def run(settings: Settings, method: str, paths: TrainingPaths) -> dict:
    cfg, seed = settings.student_final, settings.common.seed
    ctx = start_stage(settings.common, paths.dataset, __file__)
    loaded = load_model(paths.start, ctx.device)
    pruning = loaded.meta.get("pruning") or {}
    if pruning.get("method") != method:
        raise CheckpointError(f"{paths.start}: expected a student pruned by {method!r}, the file "
                              f"says {pruning.get('method')!r}; run student_slim@{method}")
    model = prepare_model(loaded.model, cfg, ctx.device)
    cost = cost_of(model, ctx)
    keeper = None if pruning.get("structured", True) else ZeroKeeper(model)
    teacher, teacher_file = recovery_teacher(pruning, method, paths, ctx.device, cfg,
                                             settings.distill)
    train_loader, test_loader = ctx.loaders(cfg, seed)
    top1_before = evaluate(model, test_loader)["top1"]
    result = fit(model, TrainingRun(
        cfg=cfg, train_loader=train_loader, test_loader=test_loader,
        loss_fn=distillation_loss_fn(teacher, settings.distill, cfg.label_smoothing),
        checkpoint_path=paths.checkpoint,
        fingerprint=ctx.fingerprint(cfg, seed, settings.distill, teacher.runtime,
                                    file_sha256(teacher_file),
                                    file_sha256(paths.start)),
        title=f"finetune {method}"))
    if keeper is not None:
        keeper.check(f"student_final@{method}")
        keeper.remove()
    sparse = sparse_cost(model, ctx.input_shape)
    metrics = {**training_metrics(result, cfg, ctx, settings.common), "method": method,
               "teacher_runtime": teacher.runtime, **teacher_cache_metrics(teacher),
               "top1_before_finetune": top1_before, "arch": loaded.spec["arch"],
               "params": cost.params, "macs": cost.macs, "params_nonzero": sparse.params_nonzero,
               "macs_nonzero": sparse.macs_nonzero, "sparsity": sparse.sparsity,
               "recovery_teacher": pruning.get("recovery_teacher", "teacher")}
    meta = {**ctx.model_meta(cost, metrics["top1"]), "pruning": pruning}
    save_model(paths.model, model, loaded.spec, meta)
    write_curves_and_metrics(result, paths.plots, paths.metrics, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolved", type=Path, default=RESOLVED)
    parser.add_argument("--method", required=True, help="a pruning method listed in prune.methods")
    args = parser.parse_args(argv)
    run_main(lambda: run(load_settings(Settings, args.resolved), args.method,
                         paths_for(args.method)))


if __name__ == "__main__":
    main()
