"""student_dense stage: the unpruned student, trained with the same KD recipe and epoch budget
as every method's student_pruned + student_final, so that "pruned vs unpruned" is a measured
comparison.

Writes models/student_dense.pt, metrics/student_dense.json, plots/student_dense.csv.
"""

from dataclasses import dataclass

from pipeline.checkpoint import save_model
from pipeline.config import DistillConfig, RunConfig, TrainConfig
from pipeline.io import file_sha256
from pipeline.models import build_model
from pipeline.students import distillation_loss_fn, load_teacher, teacher_cache_metrics
from pipeline.training import TrainingRun, fit, prepare_model
from stages._cli import stage_main
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
    student_dense: TrainConfig


def run(settings: Settings, paths: TrainingPaths) -> dict:
    cfg, seed = settings.student_dense, settings.common.seed
    ctx = start_stage(settings.common, paths.dataset, __file__)
    spec = {"arch": settings.distill.student_arch, "num_classes": len(ctx.dataset.classes)}
    model = build_model(spec)
    cost = cost_of(model, ctx)
    model = prepare_model(model, cfg, ctx.device)
    teacher = load_teacher(paths.teacher, ctx.device, cfg, settings.distill, paths.teacher_logits)
    train_loader, test_loader = ctx.loaders(cfg, seed)
    result = fit(model, TrainingRun(
        cfg=cfg, train_loader=train_loader, test_loader=test_loader,
        loss_fn=distillation_loss_fn(teacher, settings.distill, cfg.label_smoothing),
        checkpoint_path=paths.checkpoint,
        fingerprint=ctx.fingerprint(cfg, spec, seed, settings.distill, teacher.runtime,
                                    file_sha256(paths.teacher)),
        title="student_dense"))
    metrics = {**training_metrics(result, cfg, ctx, settings.common),
               "teacher_runtime": teacher.runtime, **teacher_cache_metrics(teacher),
               "arch": spec["arch"],
               "params": cost.params, "macs": cost.macs}
    save_model(paths.model, model, spec, ctx.model_meta(cost, metrics["top1"]))
    write_curves_and_metrics(result, paths.plots, paths.metrics, metrics)
    return metrics


def main() -> None:
    stage_main(__doc__, run, Settings, TrainingPaths("student_dense"))


if __name__ == "__main__":
    main()
