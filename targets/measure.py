"""The one measuring path, shared by the benchmark stage and `prune-deploy bench`.

For one artifact on one target at one precision: build it (offline, in a temp folder), load it
(the precision goes to runtimes that choose it when compiling, e.g. OpenVINO's bf16), optionally
measure accuracy through the runtime once, then the latency distribution per batch size with
the warm-up/stopping rule of pipeline.timing. Every outcome is a row - ok, skipped (target or
batch size not available, with the reason) or failed (with the error) - never a missing one,
and never another target's number in its place.
"""

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import TargetUnavailable
from pipeline.timing import LatencyStats, TimingPlan
from targets.base import Runner, Target, TensorSpec, fixed_batch

log = logging.getLogger(__name__)

# feeds(spec, batch) -> the runner's inputs for one call at that batch size
FeedsFn = Callable[[TensorSpec, int], dict[str, np.ndarray]]
# accuracy(runner) -> fields shared by every batch size's row (e.g. top1, agreement)
AccuracyFn = Callable[[Runner], dict[str, Any]]


def latency_fields(stats: LatencyStats) -> dict[str, Any]:
    """A LatencyStats as row fields (phase medians as <phase>_p50_ms)."""
    phases = {f"{phase}_p50_ms": value for phase, value in stats.phase_p50_ms.items()}
    return {"p50_ms": stats.p50_ms, "p90_ms": stats.p90_ms, "p99_ms": stats.p99_ms,
            "mean_ms": stats.mean_ms, "std_ms": stats.std_ms, "n": stats.n,
            "images_per_s": stats.throughput, "clock": stats.clock, **phases}


def _every_batch(batch_sizes: Sequence[int], status: str, reason: str) -> list[dict[str, Any]]:
    return [{"batch_size": batch, "status": status, "reason": reason} for batch in batch_sizes]


def _batch_row(runner: Runner, batch: int, plan: TimingPlan, feeds: FeedsFn) -> dict[str, Any]:
    """One batch size's latency; a failure here (e.g. out of memory) spares the other sizes."""
    spec = runner.inputs[0]
    if fixed_batch(spec) not in (None, batch):
        return {"status": "skipped",
                "reason": f"the artifact's batch size is fixed at {fixed_batch(spec)}"}
    try:
        stats = runner.benchmark(feeds(spec, batch), plan)
    except Exception as err:  # noqa: BLE001 - a failed row with the error, the traceback logged
        log.exception("batch %d failed", batch)
        return {"status": "failed", "reason": f"{type(err).__name__}: {err}"}
    return {"status": "ok", "reason": "", **latency_fields(stats)}


def _measure_loaded(runner: Runner, source: Path, batch_sizes: Sequence[int], plan: TimingPlan,
                    feeds: FeedsFn, accuracy: AccuracyFn | None) -> list[dict[str, Any]]:
    if len(runner.inputs) != 1:
        raise TargetUnavailable(f"{source}: expected one image input, found "
                                f"{[spec.name for spec in runner.inputs]}")
    shared = accuracy(runner) if accuracy is not None else {}
    rows = []
    for batch in batch_sizes:
        fields = _batch_row(runner, batch, plan, feeds)
        device = dict(runner.device_info) if runner.device_info else None  # a copy per row
        runtime = dict(runner.runtime_info) if runner.runtime_info else None
        rows.append({"batch_size": batch, **shared, **fields, "device": device,
                     "runtime_info": runtime})
        log.info("%s b%d: %s %s", source.name, batch, fields["status"],
                 f"p50 {fields['p50_ms']:.3f} ms" if "p50_ms" in fields else fields["reason"])
    return rows


def _unavailable(target: Target, precision: str | None) -> str:
    """Why `target` cannot run `precision` here, or "" when it can."""
    ok, reason = target.available()
    if not ok:
        return f"target {target.name!r} is not available: {reason}"
    if precision is not None:
        ok, reason = target.precision_available(precision)
        if not ok:
            return f"{precision} on target {target.name!r} is not available here: {reason}"
    return ""


def measure(target: Target, source: Path, batch_sizes: Sequence[int], plan: TimingPlan,
            feeds: FeedsFn, accuracy: AccuracyFn | None = None, missing_hint: str = "",
            precision: str | None = None) -> list[dict[str, Any]]:
    """Rows (one per batch size) for `source` (a file of the target's `source` kind) built and
    run on `target` at `precision` (None: the file's own). `missing_hint` is appended to the
    reason when `source` does not exist."""
    source = Path(source)
    why_not = _unavailable(target, precision)
    if why_not:
        return _every_batch(batch_sizes, "skipped", why_not)
    if not source.is_file():
        return _every_batch(batch_sizes, "failed", f"{source} not found{missing_hint}")
    try:
        with tempfile.TemporaryDirectory() as build_dir:
            built = target.build(source, Path(build_dir))  # runtime-side files live only here
            with target.load(built, precision) as runner:
                return _measure_loaded(runner, source, batch_sizes, plan, feeds, accuracy)
    except TargetUnavailable as err:  # e.g. the edge device lacks the runtime
        return _every_batch(batch_sizes, "skipped", str(err))
    except Exception as err:  # noqa: BLE001 - a runtime's failure is a result row, not a crash
        log.exception("%s on %s failed", source, target.name)
        return _every_batch(batch_sizes, "failed", f"{type(err).__name__}: {err}")
