"""latency_table stage: per-layer latency rows on latency.target, and the calibrated model.

Measures, through the target's own build/load/benchmark path (targets.latency_probe), one
ONNX probe per table row: every conv of the student over the grid of candidate widths
(latency.width_step), every residual add + ReLU, and the exact rows of the teacher. It then
measures whole networks that need no training (the teacher's and the student's architecture,
and the student at each of latency.sweep_widths, all with random weights), fits the latency
model (c0 + alpha x the sum of rows, per batch size) on them, and reports each network's
leave-one-out error. Held-out off-grid rows show how far interpolation between grid rows is off.
Writes latency/table.json and metrics/latency_table.json. A target that cannot run here gives a
table with status "skipped" and the reason.
"""

import argparse
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import LatencyConfig, LatencyNetworks
from pipeline.errors import ConfigError, ModelError, TargetUnavailable
from pipeline.export.onnx_export import export_onnx, save_onnx
from pipeline.export.simplify import simplify
from pipeline.io import write_json
from pipeline.latency.probes import empty_probe
from pipeline.latency.table import (
    LatencyTable,
    Row,
    conv_row,
    error_summary,
    fit_calibration,
    grid_widths,
    holdout_widths,
    needed_rows,
    unit_rows,
)
from pipeline.latency.units import Unit, named_units
from pipeline.models import build_model
from stages._cli import RESOLVED, load_settings, run_main
from stages._targets import load_target
from targets.base import Target
from targets.latency_probe import probe_timer, table_key, time_in_passes, unsupported

log = logging.getLogger("latency_table")
RUNS_TARGET = "latency.target"  # dvc.yaml: resolved/targets/${latency.target}.json/.code

TABLE = Path("latency/table.json")
METRICS = Path("metrics/latency_table.json")


@dataclass(frozen=True)
class Settings:
    latency: LatencyConfig
    networks: LatencyNetworks = field(metadata={"resolved": "latency_networks"})  # the two
    # architectures, the input shape, and how networks are exported (as the export stage does)


@dataclass
class Network:
    name: str
    model: nn.Module
    units: list[Unit] = field(default_factory=list)


def random_network(spec: dict[str, Any], shape: tuple[int, ...], seed: int) -> nn.Module:
    """A model of `spec` with random weights and BatchNorm statistics (dense fp32 latency does
    not depend on the values), in eval mode."""
    torch.manual_seed(seed)
    model = build_model(spec)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model.eval()


def calibration_networks(s: Settings, shape: tuple[int, ...]) -> list[Network]:
    """The teacher's and student's architectures, and the student at each sweep width."""
    arch = s.networks.student_arch
    teacher = random_network({"arch": s.networks.teacher_arch}, shape, 0)
    nets = [Network("teacher_arch", teacher),
            Network("student_arch", random_network({"arch": arch}, shape, 0))]
    for width in s.latency.sweep_widths:
        spec = {"arch": arch, "base_width": width}
        try:
            model = random_network(spec, shape, width)
        except ModelError as err:
            raise ConfigError(f"latency.sweep_widths: {arch} has no base "
                              f"width to sweep ({err}); set latency.sweep_widths: []") from err
        nets.append(Network(f"sweep_w{width}", model))
    for net in nets:
        net.units = [unit for _, unit in named_units(net.model, shape)]
    unique: dict[tuple[Unit, ...], Network] = {}
    for net in nets:  # a sweep width equal to the student's is the same network
        unique.setdefault(tuple(net.units), net)
    return list(unique.values())


def holdout_rows(student: list[Unit], width_step: int, count: int) -> list[tuple[Unit, Row]]:
    """Off-grid (cin, cout) rows of the student's conv shapes, spread over the shapes."""
    picks: list[tuple[Unit, Row]] = []
    shapes = list({u.family(): u for u in student if u.groups == 1}.values())
    per_shape = max(1, -(-count // max(len(shapes), 1)))
    for unit in shapes:
        cins = holdout_widths(grid_widths(unit.cin, width_step), per_shape) or [unit.cin]
        couts = holdout_widths(grid_widths(unit.cout, width_step), per_shape)
        for i, cout in enumerate(couts):  # each off-grid cout with an off-grid cin, in turn
            cin = cins[i % len(cins)]
            shaped = Unit(unit.h, cin, cout, unit.stride, unit.k)
            picks.append((shaped, conv_row(shaped, cin, cout)))
    return picks[:count]


def measure_holdout(table: LatencyTable, picks: list[tuple[Unit, Row]], timer,
                    passes: int) -> list[dict[str, Any]]:
    """The held-out rows measured, then compared with the interpolation of the grid rows."""
    picks = [(unit, row) for unit, row in picks if row.key not in table.rows]  # not measured
    interpolated = [table.interpolate_conv(unit) for unit, _ in picks]  # before they are
    table.ensure([row for _, row in picks], timer, passes)
    results = []
    for (_, row), guess in zip(picks, interpolated, strict=True):
        measured = table.rows[row.key]
        results.append({"row": row.key, "measured_ms": measured, "interpolated_ms": guess,
                        "rel_err": (guess - measured) / measured if measured else 0.0})
    return results


def export_network(net: Network, s: Settings, shape: tuple[int, ...], folder: Path) -> Path:
    proto = export_onnx(net.model, shape, s.networks.opset)
    proto, _ = simplify(proto, s.networks.simplifier)
    return save_onnx(proto, folder / f"{net.name}.onnx")


def build(s: Settings, target: Target, work: Path) -> tuple[LatencyTable, dict[str, Any]]:
    lat, started = s.latency, time.perf_counter()
    shape = s.networks.input_shape
    nets = calibration_networks(s, shape)
    student = next(n for n in nets if n.name == "student_arch").units
    rows = needed_rows(student, lat.width_step)
    rows.update((row.key, row) for net in nets for unit in net.units for row in unit_rows(unit))
    row_batch = max(lat.batch_sizes)
    log.info("%s: measuring %d rows at batch size %d", target.name, len(rows), row_batch)
    empty, info = time_in_passes(target, {"empty": _save_empty(work)}, lat.batch_sizes,
                                 lat.timing, lat.network_sessions)
    overhead = {batch: by_name["empty"] for batch, by_name in empty.items()}
    key = table_key(target, lat.batch_sizes, lat.timing, info["device"])
    with probe_timer(target, row_batch, lat.timing) as timer:
        table = LatencyTable.build(key, overhead, rows, timer, lat.width_step,
                                   lat.probe_sessions)
        rows_seconds = time.perf_counter() - started
        holdout = measure_holdout(table, holdout_rows(student, lat.width_step, lat.holdout),
                                  timer, lat.probe_sessions)
    files = {net.name: export_network(net, s, shape, work) for net in nets}
    measured, _ = time_in_passes(target, files, lat.batch_sizes, lat.timing,
                                 lat.network_sessions)
    sums = {b: {net.name: table.network_sum(net.units) for net in nets}
            for b in lat.batch_sizes}
    table.calibration = fit_calibration(sums, measured, table.overhead_ms)
    table.extra = {"status": "ok", "runtime_info": info["runtime_info"],
                   "networks": {n.name: [u.as_dict() for u in n.units] for n in nets},
                   "holdout": holdout, "build_seconds": {
                       "rows": rows_seconds, "total": time.perf_counter() - started}}
    return table, summary(table, holdout)


def _save_empty(work: Path) -> Path:
    return save_onnx(empty_probe(), work / "empty.onnx")


def summary(table: LatencyTable, holdout: list[dict[str, Any]]) -> dict[str, Any]:
    calibration = table.calibration
    per_batch = {}
    for batch in table.batch_sizes:
        nets = calibration.networks[batch]
        per_batch[str(batch)] = {
            "c0_ms": calibration.c0[batch], "alpha": calibration.alpha[batch],
            "empty_call_ms": table.overhead_ms[batch],
            "calibration_loo": error_summary(n["rel_err"] for n in nets.values())}
    return {"status": "ok", "target": table.key["target"], "rows": len(table.rows),
            "row_batch": table.row_batch, "build_seconds": table.extra["build_seconds"],
            "interpolation": error_summary(h["rel_err"] for h in holdout), "batch": per_batch}


def run(s: Settings, target: Target, table_path: Path = TABLE, metrics_path: Path = METRICS,
        work: Path | None = None) -> dict[str, Any]:
    reason = unsupported(target) or target.available()[1]
    if not reason:
        with tempfile.TemporaryDirectory(prefix="latency-table-") as folder:
            try:
                table, metrics = build(s, target, Path(work or folder))
                write_json(table_path, table.as_dict())
                write_json(metrics_path, metrics)
                return metrics
            except TargetUnavailable as err:
                reason = str(err)
    log.warning("latency tables skipped on %s: %s", target.name, reason)
    skipped = {"status": "skipped", "target": target.name, "reason": reason}
    write_json(table_path, skipped)
    write_json(metrics_path, skipped)
    return skipped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolved", type=Path, default=RESOLVED)
    args = parser.parse_args(argv)

    def body() -> None:
        settings = load_settings(Settings, args.resolved)
        run(settings, load_target(settings.latency.target, args.resolved))

    run_main(body)


if __name__ == "__main__":
    main()
