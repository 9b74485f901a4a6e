"""teacher stage: train the teacher CNN on the prepared dataset.

Writes models/teacher.pt (spec + weights, loadable with weights_only=True), metrics/teacher.json
and plots/teacher.csv (per-epoch curves); keeps checkpoints/teacher.pt so that an interrupted
run resumes from its last completed epoch.
"""

from dataclasses import dataclass

from pipeline.checkpoint import save_model
from pipeline.config import RunConfig, TeacherConfig
from pipeline.models import build_model
from pipeline.training import TrainingRun, cross_entropy_loss, fit, prepare_model
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
    teacher: TeacherConfig


def run(settings: Settings, paths: TrainingPaths) -> dict:
    cfg, seed = settings.teacher, settings.common.seed
    ctx = start_stage(settings.common, paths.dataset, __file__)
    spec = {"arch": cfg.arch, "num_classes": len(ctx.dataset.classes)}
    model = build_model(spec)
    cost = cost_of(model, ctx)
    model = prepare_model(model, cfg, ctx.device)
    train_loader, test_loader = ctx.loaders(cfg, seed)
    result = fit(model, TrainingRun(
        cfg=cfg, train_loader=train_loader, test_loader=test_loader,
        loss_fn=cross_entropy_loss(cfg.label_smoothing), checkpoint_path=paths.checkpoint,
        fingerprint=ctx.fingerprint(cfg, spec, seed), title="teacher"))
    metrics = {**training_metrics(result, cfg, ctx, settings.common), "arch": cfg.arch,
               "params": cost.params, "macs": cost.macs}
    save_model(paths.model, model, spec, ctx.model_meta(cost, metrics["top1"]))
    write_curves_and_metrics(result, paths.plots, paths.metrics, metrics)
    return metrics


def main() -> None:
    stage_main(__doc__, run, Settings, TrainingPaths("teacher"))


if __name__ == "__main__":
    main()
