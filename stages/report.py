"""report stage: reports/report.md (the method comparison - one row per pruning method and
reference with top-1, cost, sparsity, latency, speed-ups and Performance Efficiency - a table of
every benchmark row, findings in sentences) and its charts (reports/methods.png,
reports/latency.png, reports/accuracy_vs_latency.png), from the benchmark stage's
metrics/benchmark_<target>.json files for the targets listed in params, and the latency
model's predictions against measurements (metrics/latency_model.json)."""

import argparse
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import final_model
from pipeline.config import BenchmarkConfig, PruneConfig, ReportConfig
from pipeline.io import read_json
from pipeline.report import load_rows, write_report
from stages._cli import RESOLVED, load_settings, run_main


@dataclass(frozen=True)
class Settings:
    benchmark: BenchmarkConfig  # which targets and reference models were benchmarked
    prune: PruneConfig  # which methods ran, and their common MACs target
    report: ReportConfig


def run(settings: Settings, metrics_dir: Path, out_dir: Path) -> dict[str, Path]:
    files = [metrics_dir / f"benchmark_{target}.json" for target in settings.benchmark.targets]
    methods = settings.prune.methods
    models = (*settings.benchmark.models, *map(final_model, methods))
    latency = metrics_dir / "latency_model.json"
    return write_report(load_rows(files), settings.report, models, out_dir, methods,
                        settings.prune.target_macs, read_json(latency))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolved", type=Path, default=RESOLVED)
    parser.add_argument("--metrics", type=Path, default=Path("metrics"))
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args(argv)
    run_main(lambda: run(load_settings(Settings, args.resolved), args.metrics, args.out))


if __name__ == "__main__":
    main()
