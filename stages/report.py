"""report stage: reports/report.md (one table of every benchmark row, findings in sentences)
and its charts (reports/latency.png, reports/accuracy_vs_latency.png), from the benchmark
stage's metrics/bench_<target>.json files for the targets listed in params."""

import argparse
from pathlib import Path

from pipeline.config import ReportConfig, load_params
from pipeline.report import ReportSettings, load_rows, write_report
from stages._cli import run_main


def run(cfg: ReportConfig, models: tuple[str, ...], bench_files: list[Path],
        out_dir: Path) -> dict[str, Path]:
    settings = ReportSettings(cfg.baseline_model, cfg.dense_model, cfg.pruned_model,
                              cfg.paid_off_speedup)
    return write_report(load_rows(bench_files), settings, models, out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args(argv)

    def body() -> None:
        params = load_params(args.params)
        files = [Path(f"metrics/bench_{target}.json") for target in params.benchmark.targets]
        run(params.report, params.benchmark.models, files, args.out)

    run_main(body)


if __name__ == "__main__":
    main()
