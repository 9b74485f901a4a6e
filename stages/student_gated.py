"""student_gated stage (PDD): train the gated student with CE + KD from the frozen teacher.

Every prunable channel group gets a 0/1 gate (straight-through ApproxSign) that trains jointly
with the weights; an optional budget penalty drives the kept MACs towards a target fraction.
Writes models/student_gated.pt (student weights + gate logits), metrics/student_gated.json
(top-1, kept channels per group, params/MACs before and after, gate flips per epoch) and
plots/student_gated.csv.
"""

from dataclasses import dataclass

import torch

from pipeline.checkpoint import save_model
from pipeline.config import DistillConfig, RunConfig, StudentGatedConfig
from pipeline.io import file_sha256
from pipeline.models import build_model
from pipeline.prune.gates import GatedModel, attach_gates, count_flips, macs_penalty
from pipeline.prune.slimming import slim
from pipeline.students import distillation_loss_fn, load_teacher
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
    student_gated: StudentGatedConfig


class GateMonitor:
    """Per-epoch gate statistics: flips since the epoch began, kept channels, kept MACs."""

    def __init__(self, gated: GatedModel):
        self.gated, self.snapshot = gated, gated.gate_states()

    def epoch_start(self, _epoch: int, _model) -> None:
        self.snapshot = self.gated.gate_states()  # after a resume restored the gates

    def epoch_end(self, _epoch: int, _model) -> dict:
        with torch.no_grad():
            kept_macs = self.gated.expected_macs().item() / self.gated.full_macs
        return {"gate_flips": count_flips(self.gated, self.snapshot),
                "kept_channels": sum(self.gated.kept_channels().values()),
                "kept_macs_fraction": round(kept_macs, 6)}


def budget_penalty(gated: GatedModel, cfg: StudentGatedConfig):
    if cfg.flops_weight == 0:
        return None
    return lambda: cfg.flops_weight * macs_penalty(gated, cfg.flops_target)


def pruning_summary(gated: GatedModel, ctx, cost_before) -> dict:
    """Kept channels per group, and the exact cost of the network the gates describe."""
    slimmed, _ = slim(gated, round_to=1, verify=False)
    cost_after = cost_of(slimmed, ctx)
    widths = gated.group_widths()
    return {"kept_channels": {key: {"kept": kept, "width": widths[key]}
                              for key, kept in gated.kept_channels().items()},
            "params_before": cost_before.params, "params_after": cost_after.params,
            "macs_before": cost_before.macs, "macs_after": cost_after.macs}


def run(settings: Settings, paths: TrainingPaths) -> dict:
    cfg, seed = settings.student_gated, settings.common.seed
    ctx = start_stage(settings.common, paths.dataset, __file__)
    spec = {"arch": settings.distill.student_arch, "num_classes": len(ctx.dataset.classes)}
    model = build_model(spec)
    cost_before = cost_of(model, ctx)
    model = prepare_model(model, cfg, ctx.device)
    gated = attach_gates(model, ctx.example_input(),
                         generator=torch.Generator(ctx.device).manual_seed(seed))
    monitor = GateMonitor(gated)
    teacher = load_teacher(paths.teacher, ctx.device, cfg.channels_last)
    train_loader, test_loader = ctx.loaders(cfg, seed)
    result = fit(gated, TrainingRun(
        cfg=cfg, train_loader=train_loader, test_loader=test_loader,
        loss_fn=distillation_loss_fn(teacher, settings.distill, cfg.label_smoothing,
                                     budget_penalty(gated, cfg)),
        checkpoint_path=paths.checkpoint,
        param_groups=[{"params": list(gated.model.parameters())},
                      {"params": gated.gate_parameters(), "lr": cfg.gate_lr,
                       "weight_decay": 0.0}],
        fingerprint=ctx.fingerprint(cfg, spec, seed, settings.distill,
                                    file_sha256(paths.teacher)),
        on_epoch_start=monitor.epoch_start, on_epoch_end=monitor.epoch_end, title="pdd"))
    metrics = {**training_metrics(result, cfg, ctx, settings.common), "arch": spec["arch"],
               **pruning_summary(gated, ctx, cost_before),
               "gate_flips_per_epoch": [row["gate_flips"] for row in result.history]}
    save_model(paths.model, gated, spec, ctx.model_meta(cost_before, metrics["top1"], gated=True))
    write_curves_and_metrics(result, paths.plots, paths.metrics, metrics)
    return metrics


def main() -> None:
    stage_main(__doc__, run, Settings, TrainingPaths("student_gated"))


if __name__ == "__main__":
    main()
