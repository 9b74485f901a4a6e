"""student_slim stage: remove the pruned channels of one method's student for real (DVC runs it
once per method: student_slim@<method>).

A structured method's gated student (models/student_pruned_<method>.pt) becomes a plain, narrower
network with its gates folded away (no gate or mask ops). Exactness is checked on real test
images in eval mode - slimmed logits must equal gated logits within `student_slim.tolerance`
relative (max-abs / max-abs of the gated logits) - and again after reloading the saved file,
which replays the pruning on a fresh model. A violation fails the stage before anything is
written. The `weight` method's student has nothing to remove: its zeros stay inside dense
tensors, and the file is passed on unchanged in its weights (exactness 0 by construction), with
its sparsity recorded. Group widths are the kept channels rounded up to multiples of
`student_slim.round_to`, or, with `student_slim.widths: table`, per group the width at or above
the kept channels that latency.target's table predicts fastest (latency/slim.json, written by
the latency_plan stage); the extra channels are the best closed ones, read by nobody, so the
function stays exact. Writes models/student_slim_<method>.pt and
metrics/student_slim_<method>.json.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint import load_model, read_checkpoint, save_model
from pipeline.config import RunConfig, SlimConfig
from pipeline.data import normalize
from pipeline.errors import CheckpointError, ParityError
from pipeline.flops import sparse_cost
from pipeline.io import write_json
from pipeline.latency.table import MissingRows
from pipeline.prune.budget import rounded_width
from pipeline.prune.gates import GatedModel
from pipeline.prune.latency import LatencyCost, fastest_widths, read_width_table
from pipeline.prune.slimming import exactness, layer_widths, slim
from pipeline.students import load_gated
from stages._cli import RESOLVED, load_settings, run_main
from stages._common import StageContext, cost_of, start_stage


@dataclass(frozen=True)
class Settings:
    common: RunConfig
    student_slim: SlimConfig


@dataclass(frozen=True)
class Paths:
    method: str
    pruned: Path  # models/student_pruned_<method>.pt
    model: Path  # models/student_slim_<method>.pt
    metrics: Path  # metrics/student_slim_<method>.json
    dataset: Path = Path("data/prepared.npz")
    width_plan: Path = Path("latency/slim.json")  # how widths are chosen (latency_plan stage)

    @classmethod
    def for_method(cls, method: str) -> "Paths":
        return cls(method, Path(f"models/student_pruned_{method}.pt"),
                   Path(f"models/student_slim_{method}.pt"),
                   Path(f"metrics/student_slim_{method}.json"))


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


def pruning_of(path: Path, method: str) -> dict[str, Any]:
    """The pruning record of the prune stage's file, which must be this method's."""
    meta = read_checkpoint(path)["meta"]
    pruning = meta.get("pruning")
    if not isinstance(pruning, dict) or pruning.get("method") != method:
        found = pruning.get("method") if isinstance(pruning, dict) else None
        raise CheckpointError(f"{path}: expected a student pruned by {method!r}, the file says "
                              f"{found!r}; run student_pruned@{method}")
    return pruning


def table_widths(gated: GatedModel, plan: Path, round_to: int) -> tuple[dict | None, dict]:
    """(per-group widths, what the table predicts) under `student_slim.widths: table`;
    (None, {}) when widths are rounded."""
    found = read_width_table(plan)
    if found is None:
        return None, {}
    cost = LatencyCost(gated, found.table, found.batch)
    kept = gated.kept_channels()
    widths = fastest_widths(cost, kept)
    rounded = {key: rounded_width(n, cost.widths[key], round_to) for key, n in kept.items()}
    try:
        rounded_ms = cost.predict(rounded)
    except MissingRows:  # rounded widths off the table's grid
        rounded_ms = None
    return widths, {"widths_by": "table", "table_batch": cost.batch,
                    "group_widths": widths, "predicted_ms": cost.predict(widths),
                    f"predicted_ms_round_to_{round_to}": rounded_ms}


def slim_structured(cfg: SlimConfig, ctx: StageContext, paths: Paths, record: dict) -> dict:
    gated, spec, meta = load_gated(paths.pruned, ctx.device)
    widths, chosen = (table_widths(gated, paths.width_plan, cfg.round_to)
                      if cfg.widths == "table" else (None, {}))
    slimmed, pruning = slim(gated, cfg.round_to, widths=widths, verify=False)
    images = check_images(ctx, cfg.check_images)
    max_abs, relative = require_exact(gated, slimmed, images, cfg.tolerance, "gated vs slimmed")
    before, after = cost_of(gated.plain_copy(), ctx), cost_of(slimmed, ctx)
    summary = {**record, "round_to": cfg.round_to, **chosen, "params_before": before.params,
               "params_after": after.params, "macs_before": before.macs,
               "macs_after": after.macs, "sparsity": 0.0}
    save_model(paths.model, slimmed, {**spec, "pruning": pruning},
               {**ctx.model_meta(after, meta["top1"]), "pruning": summary})
    reloaded = load_model(paths.model, ctx.device).model
    require_exact(slimmed, reloaded, images, cfg.tolerance, "slimmed vs reloaded from file")
    return {**summary, "max_abs_diff": max_abs, "rel_diff": relative,
            "check_images": len(images), "widths": layer_widths(slimmed)}


def pass_sparse(ctx: StageContext, paths: Paths, record: dict) -> dict:
    """Unstructured zeros: nothing to remove; the same weights go on, with their cost."""
    loaded = load_model(paths.pruned, ctx.device)
    dense, sparse = cost_of(loaded.model, ctx), sparse_cost(loaded.model, ctx.input_shape)
    summary = {**record, "round_to": None, "params_before": dense.params,
               "params_after": dense.params, "macs_before": dense.macs, "macs_after": dense.macs,
               "sparsity": sparse.sparsity, "params_nonzero": sparse.params_nonzero,
               "macs_nonzero": sparse.macs_nonzero}
    save_model(paths.model, loaded.model, loaded.spec,
               {**ctx.model_meta(dense, loaded.meta["top1"]), "pruning": summary})
    return {**summary, "max_abs_diff": 0.0, "rel_diff": 0.0, "check_images": 0,
            "widths": layer_widths(loaded.model)}


def run(settings: Settings, paths: Paths) -> dict:
    ctx = start_stage(settings.common, paths.dataset, __file__)
    record = pruning_of(paths.pruned, paths.method)
    metrics = (slim_structured(settings.student_slim, ctx, paths, record) if record["structured"]
               else pass_sparse(ctx, paths, record))
    write_json(paths.metrics, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolved", type=Path, default=RESOLVED)
    parser.add_argument("--method", required=True, help="a pruning method listed in prune.methods")
    args = parser.parse_args(argv)
    run_main(lambda: run(load_settings(Settings, args.resolved), Paths.for_method(args.method)))


if __name__ == "__main__":
    main()
