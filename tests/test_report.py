"""The comparison report on fixed rows: table cells, speedups, generated findings, charts."""

import json
from pathlib import Path

import pytest

from pipeline.config import BenchmarkConfig, ReportConfig, TimingPlan
from pipeline.report import (
    ReportError,
    fastest_table,
    load_rows,
    markdown_table,
    pruning_findings,
    sort_rows,
    write_report,
)
from stages.report import Settings, run

SETTINGS = ReportConfig(baseline_model="teacher", dense_model="student_dense",
                        pruned_model="student_final", paid_off_speedup=1.1)
MODELS = ("teacher", "student_dense", "student_final")
MACS = {"teacher": 120e6, "student_dense": 40e6, "student_final": 20e6}
PROV = {"cpu_model": "Test CPU", "cpu_cores": 2, "threads": 2, "gpu": None,
        "git_revision": "abc123", "timestamp": "2026-01-01T00:00:00+00:00", "device": None}


def row(model, target, precision, batch, p50=None, top1=None, status="ok", reason=""):
    return {"model": model, "target": target, "precision": precision, "batch_size": batch,
            "status": status, "reason": reason, "top1": top1, "p50_ms": p50,
            "p99_ms": None if p50 is None else 1.5 * p50,
            "images_per_s": None if p50 is None else 1e3 * batch / p50, "macs": MACS[model],
            "size_mb": MACS[model] / 1e8, "provenance": PROV}


ROWS = [
    # onnxruntime: the pruned student is 1.5x faster than the dense one (MACs predict 2x)
    row("teacher", "onnxruntime-cpu", "fp32", 1, 6.0, 0.93),
    row("student_dense", "onnxruntime-cpu", "fp32", 1, 3.0, 0.91),
    row("student_final", "onnxruntime-cpu", "fp32", 1, 2.0, 0.915),
    # torch: pruning made it slower
    row("teacher", "torch-cpu", "fp32", 1, 8.0, 0.93),
    row("student_dense", "torch-cpu", "fp32", 1, 4.0, 0.91),
    row("student_final", "torch-cpu", "fp32", 1, 5.0, 0.915),
    row("student_final", "torch-cuda", "fp32", 1, status="skipped",
        reason="no CUDA device visible to PyTorch"),
    row("student_final", "ssh-onnxruntime", "int8", 1, status="failed",
        reason="SshError: cannot reach pi@10.0.0.2:22\nover ssh"),
]


def test_table_has_speedups_against_the_teacher_and_notes():
    table = markdown_table(sort_rows(ROWS, MODELS), "teacher")
    assert ("| student_final | onnxruntime-cpu | fp32 | 1 | ok | 0.20 | 91.50 | 2.000 | 3.000 | "
            "500 | 3.00x | 6.00x |") in table
    assert "| teacher | torch-cpu | fp32 | 1 | ok | 1.20 | 93.00 | 8.000 | 12.000 | 125 | 1.00x" \
        in table
    assert "| student_final | torch-cuda | fp32 | 1 | skipped [2] | 0.20 | — | — |" in table
    assert "[1] SshError: cannot reach pi@10.0.0.2:22 over ssh" in table  # made one line
    assert "[2] no CUDA device visible to PyTorch" in table


def test_findings_say_where_pruning_paid_off_and_where_not():
    sentences = pruning_findings(ROWS, SETTINGS)
    assert sentences[0] == ("Pruning paid off (student_final at least 1.10x faster than "
                            "student_dense) on onnxruntime-cpu fp32 batch 1 (1.50x measured vs "
                            "2.00x predicted by MACs).")
    assert sentences[1] == ("It did not pay off on torch-cpu fp32 batch 1 (0.80x measured vs 2.00x "
                            "predicted by MACs); student_final was even slower on torch-cpu fp32 "
                            "batch 1.")
    # realised: 1.5 / 2.0 and 0.8 / 2.0 -> median 0.575, printed as 57% (0.575 is 0.57499...)
    assert sentences[2] == ("Across the 2 comparable configurations, the measured speedup was a "
                            "median 57% of what the MACs reduction predicts.")


def test_no_comparable_rows_is_said_plainly():
    (sentence,) = pruning_findings(ROWS[:1], SETTINGS)
    assert "cannot be said" in sentence


def test_stage_writes_report_and_charts(tmp_path):
    targets = ("onnxruntime-cpu", "torch-cpu", "torch-cuda", "ssh-onnxruntime")
    for target in targets:
        path = tmp_path / f"benchmark_{target}.json"
        results = {f"{r['model']}/{r['precision']}/b{r['batch_size']}": r
                   for r in ROWS if r["target"] == target}
        path.write_text(json.dumps({"target": target, "results": results}))
    benchmark = BenchmarkConfig(targets={t: ("fp32",) for t in targets}, models=MODELS,
                                batch_sizes=(1,), eval_images=0,
                                timing=TimingPlan(warmup_iters=0, warmup_seconds=0.0,
                                                  min_iters=1, min_seconds=0.0))
    paths = run(Settings(benchmark, SETTINGS), tmp_path, tmp_path / "reports")
    text = paths["report"].read_text()
    assert text.startswith("# Benchmark report")
    assert "Pruning paid off" in text and "![latency per target](latency.png)" in text
    assert "Skipped (not available where the benchmark ran): torch-cuda." in text
    assert "- onnxruntime-cpu: Test CPU (2 cores, 2 threads); git abc123" in text
    assert "- torch-cuda:" not in text and "- ssh-onnxruntime:" not in text  # measured nothing
    for name in ("latency", "accuracy"):
        data = Path(paths[name]).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list((tmp_path / "reports").glob("*.tmp"))


def test_only_skipped_rows_still_make_a_report(tmp_path):
    paths = write_report(ROWS[6:], SETTINGS, MODELS, tmp_path)
    assert "cannot be said" in paths["report"].read_text()
    assert "- no target measured anything" in paths["report"].read_text()
    assert paths["accuracy"].stat().st_size > 0


def test_provenance_says_when_the_runtime_chose_its_threads(tmp_path):
    measured = {**row("teacher", "onnxruntime-cpu", "fp32", 1, 6.0, 0.93),
                "provenance": {**PROV, "threads": 0}}
    text = write_report([measured], SETTINGS, MODELS, tmp_path)["report"].read_text()
    assert "- onnxruntime-cpu: Test CPU (2 cores, runtime's default threads); git abc123" in text


def test_bad_inputs_are_report_errors(tmp_path):
    with pytest.raises(ReportError, match="not a benchmark results file"):
        load_rows([tmp_path / "missing.json"])
    with pytest.raises(ReportError, match="no benchmark rows"):
        write_report([], SETTINGS, MODELS, tmp_path)


def test_fastest_runtime_per_model_precision_and_batch():
    rows = [*ROWS,
            row("student_final", "openvino-cpu", "fp32", 1, 1.6, 0.915),
            row("student_final", "openvino-cpu", "bf16", 1, 0.9, 0.91),
            row("student_final", "executorch-xnnpack", "int8", 1, 0.5, 0.9)]
    table = fastest_table(rows, MODELS)
    assert ("| student_final | fp32 | 1 | openvino-cpu | 1.600 | onnxruntime-cpu | 2.000 | 1.25x |"
            in table)
    assert "| teacher | fp32 | 1 | onnxruntime-cpu | 6.000 | torch-cpu | 8.000 | 1.33x |" in table
    assert "| student_final | int8 | 1 | executorch-xnnpack | 0.500 | — | — | — |" in table
    lines = table.splitlines()  # precisions in the order fp32, bf16, int8
    assert [line.split(" | ")[1] for line in lines if "student_final" in line] == [
        "fp32", "bf16", "int8"]
    assert "torch-cuda" not in table and "ssh-onnxruntime" not in table  # measured nothing


def test_provenance_names_the_runtime_version_when_recorded(tmp_path):
    measured = {**row("teacher", "openvino-cpu", "fp32", 1, 6.0, 0.93),
                "provenance": {**PROV, "runtime": "openvino 2026.4.1"}}
    text = write_report([measured], SETTINGS, MODELS, tmp_path)["report"].read_text()
    assert "- openvino-cpu (openvino 2026.4.1): Test CPU (2 cores, 2 threads)" in text
    assert "## Fastest runtime" in text
