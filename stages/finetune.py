"""finetune stage: KD fine-tuning of the slimmed student from the teacher, on its own schedule.

Writes models/student_final.pt (same pruned spec as the slimmed model), metrics/finetune.json
and plots/finetune.csv.
"""

from dataclasses import dataclass
from pathlib import Path

from pipeline.checkpoint import load_model, save_model
from pipeline.config import Params
from pipeline.io import file_sha256
from pipeline.students import distillation_loss_fn, load_teacher
from pipeline.training import TrainingRun, evaluate, fit, prepare_model
from stages._cli import params_stage_main
from stages._common import cost_of, start_stage, training_metrics, write_curves_and_metrics


@dataclass(frozen=True)
class Paths:
    dataset: Path = Path("data/prepared.npz")
    teacher: Path = Path("models/teacher.pt")
    slim: Path = Path("models/student_slim.pt")
    model: Path = Path("models/student_final.pt")
    metrics: Path = Path("metrics/finetune.json")
    plots: Path = Path("plots/finetune.csv")
    checkpoint: Path = Path("checkpoints/finetune.pt")


def run(params: Params, paths: Paths) -> dict:
    cfg, seed = params.finetune, params.common.seed
    ctx = start_stage(params, paths.dataset, __file__)
    loaded = load_model(paths.slim, ctx.device)
    model = prepare_model(loaded.model, cfg, ctx.device)
    cost = cost_of(model, ctx)
    teacher = load_teacher(paths.teacher, ctx.device, cfg.channels_last)
    train_loader, test_loader = ctx.loaders(cfg, seed)
    top1_before = evaluate(model, test_loader)["top1"]
    result = fit(model, TrainingRun(
        cfg=cfg, train_loader=train_loader, test_loader=test_loader,
        loss_fn=distillation_loss_fn(teacher, params.distill, cfg.label_smoothing),
        checkpoint_path=paths.checkpoint,
        fingerprint=ctx.fingerprint(cfg, seed, params.distill, file_sha256(paths.teacher),
                                    file_sha256(paths.slim)),
        title="finetune"))
    metrics = {**training_metrics(result, cfg, ctx, params), "top1_before_finetune": top1_before,
               "arch": loaded.spec["arch"], "params": cost.params, "macs": cost.macs}
    meta = {**ctx.model_meta(cost, metrics["top1"]), "pruning": loaded.meta["pruning"]}
    save_model(paths.model, model, loaded.spec, meta)
    write_curves_and_metrics(result, paths.plots, paths.metrics, metrics)
    return metrics


def main() -> None:
    params_stage_main(__doc__, run, Paths())


if __name__ == "__main__":
    main()
