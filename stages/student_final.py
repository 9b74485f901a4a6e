"""student_final stage: KD fine-tuning of the slimmed student from the teacher, on its own
schedule.

Writes models/student_final.pt (same pruned spec as the slimmed model),
metrics/student_final.json and plots/student_final.csv.
"""

from dataclasses import dataclass
from pathlib import Path

from pipeline.checkpoint import load_model, save_model
from pipeline.config import DistillConfig, RunConfig, TrainConfig
from pipeline.io import file_sha256
from pipeline.students import distillation_loss_fn, load_teacher
from pipeline.training import TrainingRun, evaluate, fit, prepare_model
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
    student_final: TrainConfig


def run(settings: Settings, paths: TrainingPaths) -> dict:
    cfg, seed = settings.student_final, settings.common.seed
    ctx = start_stage(settings.common, paths.dataset, __file__)
    loaded = load_model(paths.start, ctx.device)
    model = prepare_model(loaded.model, cfg, ctx.device)
    cost = cost_of(model, ctx)
    teacher = load_teacher(paths.teacher, ctx.device, cfg.channels_last)
    train_loader, test_loader = ctx.loaders(cfg, seed)
    top1_before = evaluate(model, test_loader)["top1"]
    result = fit(model, TrainingRun(
        cfg=cfg, train_loader=train_loader, test_loader=test_loader,
        loss_fn=distillation_loss_fn(teacher, settings.distill, cfg.label_smoothing),
        checkpoint_path=paths.checkpoint,
        fingerprint=ctx.fingerprint(cfg, seed, settings.distill, file_sha256(paths.teacher),
                                    file_sha256(paths.start)),
        title="finetune"))
    metrics = {**training_metrics(result, cfg, ctx, settings.common),
               "top1_before_finetune": top1_before, "arch": loaded.spec["arch"],
               "params": cost.params, "macs": cost.macs}
    meta = {**ctx.model_meta(cost, metrics["top1"]), "pruning": loaded.meta["pruning"]}
    save_model(paths.model, model, loaded.spec, meta)
    write_curves_and_metrics(result, paths.plots, paths.metrics, metrics)
    return metrics


def main() -> None:
    stage_main(__doc__, run, Settings,
               TrainingPaths("student_final", start=Path("models/student_slim.pt")))


if __name__ == "__main__":
    main()
