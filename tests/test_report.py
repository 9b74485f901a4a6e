"""The comparison report on fixed rows: table cells, speedups, generated findings, charts."""

import json
from pathlib import Path

import pytest

from pipeline.comparison import collect, cost_table, efficiency, latency_table, retained
from pipeline.config import BenchmarkConfig, MacsBudget, PruneConfig, ReportConfig, TimingPlan
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
                        paid_off_speedup=1.1, chart_target="onnxruntime-cpu",
                        chart_precision="fp32")
MODELS = ("teacher", "student_dense", "student_final_pdd")
MACS = {"teacher": 120e6, "student_dense": 40e6, "student_final_pdd": 20e6,
        "student_final_weight": 40e6}
PARAMS = {"teacher": 850_000, "student_dense": 270_000, "student_final_pdd": 90_000,
          "student_final_weight": 270_000}
PROV = {"cpu_model": "Test CPU", "cpu_cores": 2, "threads": 2, "gpu": None,
        "git_revision": "abc123", "timestamp": "2026-01-01T00:00:00+00:00", "device": None}


def row(model, target, precision, batch, p50=None, top1=None, status="ok", reason=""):
    sparse = model == "student_final_weight"
    return {"model": model, "target": target, "precision": precision, "batch_size": batch,
            "status": status, "reason": reason, "top1": top1, "p50_ms": p50,
            "p99_ms": None if p50 is None else 1.5 * p50,
            "images_per_s": None if p50 is None else 1e3 * batch / p50, "macs": MACS[model],
            "size_mb": MACS[model] / 1e8, "provenance": PROV, "params": PARAMS[model],
            "params_nonzero": PARAMS[model] // 5 if sparse else PARAMS[model],
            "macs_nonzero": MACS[model] // 4 if sparse else MACS[model],
            "sparsity": 0.8 if sparse else 0.0, "checkpoint_top1": top1, "num_classes": 10,
            "method": model.removeprefix("student_final_") if "final" in model else None,
            "structured": not sparse if "final" in model else None}


ROWS = [
    # onnxruntime: the pruned student is 1.5x faster than the dense one (MACs predict 2x)
    row("teacher", "onnxruntime-cpu", "fp32", 1, 6.0, 0.93),
    row("student_dense", "onnxruntime-cpu", "fp32", 1, 3.0, 0.91),
    row("student_final_pdd", "onnxruntime-cpu", "fp32", 1, 2.0, 0.915),
    # torch: pruning made it slower
    row("teacher", "torch-cpu", "fp32", 1, 8.0, 0.93),
    row("student_dense", "torch-cpu", "fp32", 1, 4.0, 0.91),
    row("student_final_pdd", "torch-cpu", "fp32", 1, 5.0, 0.915),
    row("student_final_pdd", "torch-cuda", "fp32", 1, status="skipped",
        reason="no CUDA device visible to PyTorch"),
    row("student_final_pdd", "ssh-onnxruntime", "int8", 1, status="failed",
        reason="SshError: cannot reach pi@10.0.0.2:22\nover ssh"),
]


def test_table_has_speedups_against_the_teacher_and_notes():
    table = markdown_table(sort_rows(ROWS, MODELS), "teacher")
    assert ("| student_final_pdd | onnxruntime-cpu | fp32 | 1 | ok | 0.20 | 91.50 | 2.000 | "
            "3.000 | 500 | 3.00x | 6.00x |") in table
    assert "| teacher | torch-cpu | fp32 | 1 | ok | 1.20 | 93.00 | 8.000 | 12.000 | 125 | 1.00x" \
        in table
    assert "| student_final_pdd | torch-cuda | fp32 | 1 | skipped [2] | 0.20 | — | — |" in table
    assert "[1] SshError: cannot reach pi@10.0.0.2:22 over ssh" in table  # made one line
    assert "[2] no CUDA device visible to PyTorch" in table


def test_findings_say_where_pruning_paid_off_and_where_not():
    sentences = pruning_findings(ROWS, SETTINGS, "student_final_pdd")
    assert sentences[0] == ("Pruning paid off (student_final_pdd at least 1.10x faster than "
                            "student_dense) on onnxruntime-cpu fp32 batch 1 (1.50x measured vs "
                            "2.00x predicted by MACs).")
    assert sentences[1] == ("It did not pay off on torch-cpu fp32 batch 1 (0.80x measured vs 2.00x "
                            "predicted by MACs); student_final_pdd was even slower on torch-cpu "
                            "fp32 batch 1.")
    # realised: 1.5 / 2.0 and 0.8 / 2.0 -> median 0.575, printed as 57% (0.575 is 0.57499...)
    assert sentences[2] == ("Across the 2 comparable configurations, the measured speedup was a "
                            "median 57% of what the MACs reduction predicts.")


def test_no_comparable_rows_is_said_plainly():
    (sentence,) = pruning_findings(ROWS[:1], SETTINGS, "student_final_pdd")
    assert "cannot be said" in sentence


def _compared(predicted: float, measured: float) -> dict:
    return {"predicted_ms": predicted, "measured_ms": measured,
            "rel_err": (predicted - measured) / measured}


LATENCY_MODEL = {  # what stages/latency_model.py writes, for one batch size
    "status": "ok", "target": "onnxruntime-cpu", "precision": "fp32", "budget": {"macs": 0.5},
    "batch": {"1": {
        "models": {"teacher": _compared(9.0, 10.0), "student_dense": _compared(4.0, 4.0),
                   "student_final_pdd": _compared(2.0, 2.5)},
        "calibration_networks_loo": {"sweep_w8": {"loo_predicted_ms": 1.0, "measured_ms": 1.1,
                                                  "rel_err": -0.0909}},
        "median_abs_rel_err": 0.09, "max_abs_rel_err": 0.2, "networks": 4,
        "interpolation": {"n": 2, "median_abs_rel_err": 0.3, "max_abs_rel_err": 0.5},
        "speedup_over_dense": {"pdd": {"macs": 2.0, "table": 2.0, "measured": 1.6}}}}}


def test_a_skipped_latency_model_says_why():
    from pipeline.report import latency_model_section

    lines = latency_model_section({"status": "skipped", "target": "ssh-onnxruntime",
                                   "reason": "no host configured"})
    assert "Not measured on ssh-onnxruntime: no host configured" in lines


def test_stage_writes_report_and_charts(tmp_path):
    targets = ("onnxruntime-cpu", "torch-cpu", "torch-cuda", "ssh-onnxruntime")
    for target in targets:
        path = tmp_path / f"benchmark_{target}.json"
        results = {f"{r['model']}/{r['precision']}/b{r['batch_size']}": r
                   for r in ROWS if r["target"] == target}
        path.write_text(json.dumps({"target": target, "results": results}))
    benchmark = BenchmarkConfig(targets={t: ("fp32",) for t in targets}, models=MODELS[:2],
                                batch_sizes=(1,), eval_images=0,
                                timing=TimingPlan(warmup_iters=0, warmup_seconds=0.0,
                                                  min_iters=1, min_seconds=0.0))
    prune = PruneConfig(methods=("pdd",), budget=MacsBudget(macs=0.5))
    (tmp_path / "latency_model.json").write_text(json.dumps(LATENCY_MODEL))
    paths = run(Settings(benchmark, prune, SETTINGS), tmp_path, tmp_path / "reports")
    text = paths["report"].read_text()
    assert "## Latency model" in text and "| student_final_pdd | 2.000 | 2.500 | -20.0 % |" in text
    assert "| pdd | 2.00x | 2.00x | 1.60x |" in text
    assert text.startswith("# Benchmark report")
    assert "Pruning paid off" in text and "![latency per target](latency.png)" in text
    assert "## Method comparison" in text and "a common kept-MACs target of 0.50" in text
    assert "![top-1 vs measured latency](methods.png)" in text
    assert "Skipped (not available where the benchmark ran): torch-cuda." in text
    assert "- onnxruntime-cpu: Test CPU (2 cores, 2 threads); git abc123" in text
    assert "- torch-cuda:" not in text and "- ssh-onnxruntime:" not in text  # measured nothing
    for name in ("latency", "accuracy", "methods"):
        data = Path(paths[name]).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list((tmp_path / "reports").glob("*.tmp"))


def test_only_skipped_rows_still_make_a_report(tmp_path):
    paths = write_report(ROWS[6:], SETTINGS, MODELS, tmp_path, ["pdd"])
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
            row("student_final_pdd", "openvino-cpu", "fp32", 1, 1.6, 0.915),
            row("student_final_pdd", "openvino-cpu", "bf16", 1, 0.9, 0.91),
            row("student_final_pdd", "executorch-xnnpack", "int8", 1, 0.5, 0.9)]
    table = fastest_table(rows, MODELS)
    assert ("| student_final_pdd | fp32 | 1 | openvino-cpu | 1.600 | onnxruntime-cpu | 2.000 "
            "| 1.25x |" in table)
    assert "| teacher | fp32 | 1 | onnxruntime-cpu | 6.000 | torch-cpu | 8.000 | 1.33x |" in table
    assert "| student_final_pdd | int8 | 1 | executorch-xnnpack | 0.500 | — | — | — |" in table
    lines = table.splitlines()  # precisions in the order fp32, bf16, int8
    assert [line.split(" | ")[1] for line in lines if "student_final_pdd" in line] == [
        "fp32", "bf16", "int8"]
    assert "torch-cuda" not in table and "ssh-onnxruntime" not in table  # measured nothing


def test_provenance_names_the_runtime_version_when_recorded(tmp_path):
    measured = {**row("teacher", "openvino-cpu", "fp32", 1, 6.0, 0.93),
                "provenance": {**PROV, "runtime": "openvino 2026.4.1"}}
    text = write_report([measured], SETTINGS, MODELS, tmp_path)["report"].read_text()
    assert "- openvino-cpu (openvino 2026.4.1): Test CPU (2 cores, 2 threads)" in text
    assert "## Fastest runtime" in text


# ------------------------------------------------------------------ the method comparison
COMPARED_ROWS = [*ROWS,
                 row("student_final_weight", "onnxruntime-cpu", "fp32", 1, 3.1, 0.90),
                 row("student_final_weight", "torch-cpu", "fp32", 1, 4.1, 0.90)]


def table_rows(table: str) -> dict[str, list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("| ")][1:]
    return {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_cost_table_has_a_number_in_every_cell_and_the_project_pe():
    compared = collect(COMPARED_ROWS, SETTINGS, ["pdd", "weight"])
    assert [c.model for c in compared] == ["teacher", "student_dense", "student_final_pdd",
                                           "student_final_weight"]
    rows = table_rows(cost_table(compared, SETTINGS))
    for model, cells in rows.items():
        assert all(float(cell.rstrip("x").replace(",", "")) == float(
            cell.rstrip("x").replace(",", "")) for cell in cells[1:]), model
    pdd = rows["student_final_pdd"]
    assert pdd[:4] == ["pdd", "91.50", "+0.50", "90,000"]
    assert pdd[8] == "2.00x"  # MACs-predicted speed-up vs the dense student
    r = (0.915 - 0.1) / (0.91 - 0.1)
    assert float(pdd[9]) == pytest.approx(r * (1 - 90_000 / 270_000), abs=1e-3)
    assert float(pdd[10]) == pytest.approx(r * (1 - 2.0 / 3.0), abs=1e-3)
    weight = rows["student_final_weight"]
    assert weight[7:9] == ["80.0", "1.00x"]  # sparse, but a dense runtime runs every MAC
    assert float(weight[9]) == pytest.approx(retained(0.90, 0.91, 10) * 0.8, abs=1e-3)
    assert rows["teacher"][9:] == ["0.000", "0.000"] and rows["student_dense"][9:] == [
        "0.000", "0.000"]


def test_latency_table_gives_p50_and_measured_speedup_per_target():
    compared = collect(COMPARED_ROWS, SETTINGS, ["pdd", "weight"])
    table = latency_table(compared, SETTINGS)
    assert "onnxruntime-cpu fp32 b1: p50 ms (speed-up)" in table
    rows = table_rows(table)
    assert rows["student_final_pdd"] == ["2.000 (1.50x)", "5.000 (0.80x)"]
    assert rows["student_dense"] == ["3.000 (1.00x)", "4.000 (1.00x)"]
    assert rows["teacher"][0] == "6.000 (0.50x)"


def test_pe_is_zero_without_compression_or_above_chance_accuracy():
    compared = {c.model: c for c in collect(COMPARED_ROWS, SETTINGS, ["pdd"])}
    dense = compared["student_dense"]
    assert efficiency(dense, dense, SETTINGS) == (0.0, 0.0)
    assert retained(0.1, 0.91, 10) == 0.0 and retained(0.91, 0.91, 10) == 1.0


def test_the_report_says_weight_pruning_is_not_faster_on_dense_runtimes(tmp_path):
    text = write_report(COMPARED_ROWS, SETTINGS, (*MODELS, "student_final_weight"), tmp_path,
                        ["pdd", "weight"], None)["report"].read_text()
    assert "weight: its zeros sit inside dense weight tensors" in text
    assert "No common MACs target was set" in text
    assert "student_final_weight" in text.split("## Findings")[0]
