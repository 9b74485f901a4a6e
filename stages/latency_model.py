"""latency_model stage: how well latency.target's table predicts the models that ship.

For the teacher, the dense student and every method's pruned student: the latency the table
predicts (c0 + alpha x the sum of the model's exact rows; rows a pruned width needs and the
table lacks are measured now) against the latency measured on the target, from the exported fp32
ONNX file (the fastest of latency.network_sessions sessions' medians, one session per pass
through all models, after checking each file's card). The
calibration networks of the latency_table stage (architectures and width sweep, random weights)
are reported with their leave-one-out error. For each pruned student, the speed-up over the dense
student predicted by MACs, predicted by the table and measured; with a latency budget, the
budget against the measured latency. Writes metrics/latency_model.json.
"""

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts import artifact_path, final_model
from pipeline.checkpoint import load_model
from pipeline.config import BenchmarkConfig, LatencyConfig, PruneConfig, ReportConfig, as_dict
from pipeline.export.cards import verified_card
from pipeline.io import read_json, write_json
from pipeline.latency.table import LatencyTable, error_summary, unit_rows
from pipeline.latency.units import named_units
from stages._cli import RESOLVED, load_settings, run_main
from stages._targets import load_target
from targets.base import Target
from targets.latency_probe import probe_timer, time_in_passes

RUNS_TARGET = "latency.target"  # dvc.yaml: resolved/targets/${latency.target}.json/.code


@dataclass(frozen=True)
class Settings:
    latency: LatencyConfig
    benchmark: BenchmarkConfig  # the reference models
    prune: PruneConfig  # the methods whose pruned students ship, and the budget
    report: ReportConfig  # which model is the dense student


@dataclass(frozen=True)
class Paths:
    table: Path = Path("latency/table.json")
    models: Path = Path("models")
    artifacts: Path = Path("artifacts")
    metrics: Path = Path("metrics/latency_model.json")


def model_units(path: Path):
    loaded = load_model(path)
    return [u for _, u in named_units(loaded.model, tuple(loaded.meta["input_shape"]))], loaded


def trained_rows(s: Settings, table: LatencyTable, target: Target, paths: Paths,
                 models: list[str]) -> dict[str, dict[str, Any]]:
    """Predicted and measured ms per model and batch size, and each model's MACs."""
    found = {}
    for model in models:
        units, loaded = model_units(paths.models / f"{model}.pt")
        onnx_file = artifact_path(paths.artifacts, model, "fp32")
        verified_card(onnx_file)  # the file is the one the export stage wrote
        found[model] = (units, loaded.meta["macs"], onnx_file)
    rows = [row for units, _, _ in found.values() for unit in units for row in unit_rows(unit)]
    with probe_timer(target, table.row_batch, s.latency.timing) as timer:
        measured_rows = table.ensure(rows, timer, s.latency.probe_sessions)
    measured, _ = time_in_passes(target, {model: onnx for model, (_, _, onnx) in found.items()},
                                 table.batch_sizes, s.latency.timing,
                                 s.latency.network_sessions)
    results = {model: {"macs": macs, "batch": {
        str(b): _compare(table.predict_ms(units, b), measured[b][model])
        for b in table.batch_sizes}} for model, (units, macs, _) in found.items()}
    return {"models": results, "rows_measured_now": measured_rows}


def _compare(predicted: float, measured: float) -> dict[str, float]:
    return {"predicted_ms": predicted, "measured_ms": measured,
            "rel_err": (predicted - measured) / measured}


def speedups(s: Settings, models: dict[str, Any], batch: str) -> dict[str, dict[str, float]]:
    """Per method: the pruned student's speed-up over the dense student, three ways."""
    dense = models[s.report.dense_model]
    out = {}
    for method in s.prune.methods:
        final = models[final_model(method)]
        d, f = dense["batch"][batch], final["batch"][batch]
        out[method] = {"macs": dense["macs"] / final["macs"],
                       "table": d["predicted_ms"] / f["predicted_ms"],
                       "measured": d["measured_ms"] / f["measured_ms"]}
    return out


def run(s: Settings, target: Target, paths: Paths) -> dict[str, Any]:
    data = read_json(paths.table)
    if data.get("status") != "ok":
        result = {"status": "skipped", "target": data.get("target"), "reason": data.get("reason")}
        write_json(paths.metrics, result)
        return result
    table = LatencyTable.from_dict(data)
    models = [*s.benchmark.models, *map(final_model, s.prune.methods)]
    trained = trained_rows(s, table, target, paths, models)
    per_batch = {}
    for batch in map(str, table.batch_sizes):
        calibration = table.calibration.networks[int(batch)]
        errors = [m["batch"][batch]["rel_err"] for m in trained["models"].values()]
        errors += [n["rel_err"] for n in calibration.values()]
        interpolation = [h["rel_err"] for h in data.get("holdout", [])]
        per_batch[batch] = {
            "models": {m: r["batch"][batch] for m, r in trained["models"].items()},
            "calibration_networks_loo": calibration,
            "median_abs_rel_err": statistics.median(abs(e) for e in errors),
            "max_abs_rel_err": max(abs(e) for e in errors), "networks": len(errors),
            "interpolation": error_summary(interpolation),
            "speedup_over_dense": speedups(s, trained["models"], batch)}
    result = {"status": "ok", "target": target.name, "precision": "fp32",
              "rows_measured_now": trained["rows_measured_now"], "batch": per_batch,
              "budget": budget_check(s, per_batch)}
    write_json(paths.metrics, result)
    return result


def budget_check(s: Settings, per_batch: dict[str, Any]) -> dict[str, Any] | None:
    """With a latency budget: each pruned student's measured latency against it."""
    budget = s.prune.latency_budget
    if budget is None:
        return as_dict(s.prune.budget) if s.prune.budget else None
    models = per_batch[str(budget.batch)]["models"]
    return {**as_dict(budget), "methods": {
        method: {"measured_ms": models[final_model(method)]["measured_ms"],
                 "predicted_ms": models[final_model(method)]["predicted_ms"],
                 "measured_over_budget": models[final_model(method)]["measured_ms"]
                 / budget.latency_ms} for method in s.prune.methods}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolved", type=Path, default=RESOLVED)
    args = parser.parse_args(argv)

    def body() -> None:  # validate_params checked that report.dense_model is benchmarked
        settings = load_settings(Settings, args.resolved)
        run(settings, load_target(settings.latency.target, args.resolved), Paths())

    run_main(body)


if __name__ == "__main__":
    main()
