"""train_teacher stage: train the teacher CNN on the prepared dataset.

Writes models/teacher.pt (spec + weights, loadable with weights_only=True), metrics/teacher.json
and plots/train_teacher.csv (per-epoch curves); keeps checkpoints/train_teacher.pt so that an
interrupted run resumes from its last completed epoch.
"""

from dataclasses import dataclass
from pathlib import Path

from pipeline.checkpoint import save_model
from pipeline.config import Params
from pipeline.models import build_model
from pipeline.training import TrainingRun, cross_entropy_loss, fit, prepare_model
from stages._cli import params_stage_main
from stages._common import cost_of, start_stage, training_metrics, write_curves_and_metrics


@dataclass(frozen=True)
class Paths:
    dataset: Path = Path("data/prepared.npz")
    model: Path = Path("models/teacher.pt")
    metrics: Path = Path("metrics/teacher.json")
    plots: Path = Path("plots/train_teacher.csv")
    checkpoint: Path = Path("checkpoints/train_teacher.pt")


def run(params: Params, paths: Paths) -> dict:
    cfg, seed = params.train_teacher, params.common.seed
    ctx = start_stage(params, paths.dataset, __file__)
    spec = {"arch": cfg.arch, "num_classes": len(ctx.dataset.classes)}
    model = build_model(spec)
    cost = cost_of(model, ctx)
    model = prepare_model(model, cfg, ctx.device)
    train_loader, test_loader = ctx.loaders(cfg, seed)
    result = fit(model, TrainingRun(
        cfg=cfg, train_loader=train_loader, test_loader=test_loader,
        loss_fn=cross_entropy_loss(cfg.label_smoothing), checkpoint_path=paths.checkpoint,
        fingerprint=ctx.fingerprint(cfg, spec, seed), title="teacher"))
    metrics = {**training_metrics(result, cfg, ctx, params), "arch": cfg.arch,
               "params": cost.params, "macs": cost.macs}
    save_model(paths.model, model, spec, ctx.model_meta(cost, metrics["top1"]))
    write_curves_and_metrics(result, paths.plots, paths.metrics, metrics)
    return metrics


def main() -> None:
    params_stage_main(__doc__, run, Paths())


if __name__ == "__main__":
    main()
