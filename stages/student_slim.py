"""student_slim stage: remove the gated-off channels for real and fold the gates away.

The result is a plain dense network (no gate or mask ops). Exactness is checked on real test
images in eval mode - slimmed logits must equal gated logits within `student_slim.tolerance`
relative (max-abs / max-abs of the gated logits) - and again after reloading the saved file,
which replays the pruning on a fresh model. A violation fails the stage before anything is
written. Writes models/student_slim.pt and metrics/student_slim.json.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.checkpoint import load_model, save_model
from pipeline.config import RunConfig, SlimConfig
from pipeline.data import normalize
from pipeline.errors import ParityError
from pipeline.io import write_json
from pipeline.prune.slimming import exactness, layer_widths, slim
from pipeline.students import load_gated
from stages._cli import stage_main
from stages._common import cost_of, start_stage


@dataclass(frozen=True)
class Settings:
    common: RunConfig
    student_slim: SlimConfig


@dataclass(frozen=True)
class Paths:
    dataset: Path = Path("data/prepared.npz")
    gated: Path = Path("models/student_gated.pt")
    model: Path = Path("models/student_slim.pt")
    metrics: Path = Path("metrics/student_slim.json")


def check_images(ctx, count: int) -> torch.Tensor:
    images = ctx.dataset.test.images[:count].to(ctx.device)
    mean = torch.tensor(ctx.dataset.mean, device=ctx.device).view(1, -1, 1, 1)
    std = torch.tensor(ctx.dataset.std, device=ctx.device).view(1, -1, 1, 1)
    return normalize(images, mean, std)


def require_exact(reference, candidate, images, tolerance: float, what: str) -> tuple[float, float]:
    max_abs, relative = exactness(reference, candidate, images)
    if relative > tolerance:
        raise ParityError(f"{what}: logits differ by max-abs {max_abs:.3e}, relative "
                          f"{relative:.3e} > tolerance {tolerance:.1e}")
    return max_abs, relative


def run(settings: Settings, paths: Paths) -> dict:
    cfg = settings.student_slim
    ctx = start_stage(settings.common, paths.dataset, __file__)
    gated, spec, meta = load_gated(paths.gated, ctx.device)
    slimmed, pruning = slim(gated, cfg.round_to, verify=False)
    images = check_images(ctx, cfg.check_images)
    max_abs, relative = require_exact(gated, slimmed, images, cfg.tolerance, "gated vs slimmed")
    before, after = cost_of(gated.plain_copy(), ctx), cost_of(slimmed, ctx)
    summary = {"method": "pdd", "round_to": cfg.round_to, "params_before": before.params,
               "params_after": after.params, "macs_before": before.macs, "macs_after": after.macs}
    slim_spec = {**spec, "pruning": pruning}
    save_model(paths.model, slimmed, slim_spec,
               {**ctx.model_meta(after, meta["top1"]), "pruning": summary})
    reloaded = load_model(paths.model, ctx.device).model
    require_exact(slimmed, reloaded, images, cfg.tolerance, "slimmed vs reloaded from file")
    metrics = {**summary, "max_abs_diff": max_abs, "rel_diff": relative,
               "check_images": len(images), "widths": layer_widths(slimmed)}
    write_json(paths.metrics, metrics)
    return metrics


def main() -> None:
    stage_main(__doc__, run, Settings, Paths())


if __name__ == "__main__":
    main()
