"""Timing latency-table probes and whole networks on a target, through the one measuring path.

A probe (pipeline.latency.probes) is saved as an ONNX file and measured with targets.measure,
like any shipped model: SSH devices and every later ONNX runtime time probes with no code of
their own. Latency tables are measured in fp32 on targets that start from ONNX files.
"""

import platform
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from pipeline.config import as_dict
from pipeline.errors import PipelineError, TargetUnavailable
from pipeline.latency.table import TimeProbe
from pipeline.provenance import cpu_model
from pipeline.timing import TimingPlan
from targets.base import Target, TensorSpec
from targets.measure import measure

TABLE_PRECISION = "fp32"


def random_feeds(spec: TensorSpec, batch: int) -> dict[str, np.ndarray]:
    shape = (batch, *spec.shape[1:])
    return {spec.name: np.random.default_rng(0).standard_normal(shape).astype(spec.dtype)}


def unsupported(target: Target) -> str:
    """Why latency tables cannot be measured on `target`, or "" when they can."""
    if target.source != "onnx":
        return (f"target {target.name!r} starts from {target.source} files; latency tables are "
                "measured with ONNX probes on targets that run ONNX files")
    return ""


def time_onnx(target: Target, path: Path, batch_sizes: Sequence[int],
              plan: TimingPlan) -> tuple[dict[int, float], dict[str, Any]]:
    """(median ms per batch size, the device/runtime info) of one ONNX file in one session."""
    rows = measure(target, path, batch_sizes, plan, random_feeds, precision=TABLE_PRECISION)
    bad = [row for row in rows if row["status"] != "ok"]
    if bad and bad[0]["status"] == "skipped":
        raise TargetUnavailable(bad[0]["reason"])
    if bad:
        raise PipelineError(f"timing {path.name} on {target.name} failed: {bad[0]['reason']}")
    info = {"device": rows[0].get("device"), "runtime_info": rows[0].get("runtime_info")}
    return {row["batch_size"]: row["p50_ms"] for row in rows}, info


def time_in_passes(target: Target, files: dict[str, Path], batch_sizes: Sequence[int],
                   plan: TimingPlan, passes: int
                   ) -> tuple[dict[int, dict[str, float]], dict[str, Any]]:
    """(batch size -> name -> ms, the device/runtime info of the first session) for each ONNX
    file: the fastest of `passes` sessions' medians, one session per pass through all files.
    On the 2-core VM a whole session could run in a slow mode (ResNet20 w14 at batch 1:
    0.57 ms, once 1.04 ms), and a slow spell of the machine then falls on different files in
    different passes."""
    best: dict[int, dict[str, float]] = {b: {} for b in batch_sizes}
    info: dict[str, Any] = {}
    for _ in range(passes):
        for name, path in files.items():
            times, first = time_onnx(target, path, batch_sizes, plan)
            info = info or first
            for batch in batch_sizes:
                best[batch][name] = min(times[batch], best[batch].get(name, times[batch]))
    return best, info


@contextmanager
def probe_timer(target: Target, batch: int, plan: TimingPlan) -> Iterator[TimeProbe]:
    """A TimeProbe for LatencyTable.build/ensure: saves each probe to a temp file and times it
    at `batch` (ms)."""
    with tempfile.TemporaryDirectory(prefix="latency-probe-") as folder:
        path = Path(folder) / "probe.onnx"

        def time_probe(probe: onnx.ModelProto) -> float:
            onnx.save(probe, str(path))
            return time_onnx(target, path, [batch], plan)[0][batch]

        yield time_probe


def table_key(target: Target, batch_sizes: Sequence[int], plan: TimingPlan,
              device: dict[str, Any] | None) -> dict[str, Any]:
    """What a table's rows are valid for: the same key means the same machine and settings."""
    return {"target": target.name, "runtime": target.runtime(),
            "device": device or {"cpu": cpu_model(), "machine": platform.machine()},
            "threads": target.threads, "precision": TABLE_PRECISION,
            "settings": as_dict(target.settings), "batch_sizes": list(batch_sizes),
            "plan": as_dict(plan), "probe_format": 1}
