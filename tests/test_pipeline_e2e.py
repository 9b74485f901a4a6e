"""The whole pipeline on the smoke profile, in a scratch git repository: started the way the
README documents (`dvc exp run -S profile=smoke` from a clean, committed workspace), then
`dvc repro` for the rest."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["pipeline", "stages", "targets", "dvc.yaml", "params.yaml", ".dvc/config",
                 ".dvcignore", ".gitignore", "pyproject.toml"]
OUTPUT_DIRS = ["models", "metrics", "artifacts", "plots", "reports", "data", "checkpoints",
               "resolved", "latency"]
METHODS = ("pdd", "kddp", "prune_then_kd", "sdap", "netslim", "weight")  # the smoke profile's

pytestmark = pytest.mark.slow


def dvc(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    # The stages' `python` must be this interpreter (the project's venv), found first on PATH.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    # A guard against hangs: the smoke run with both edge runtimes took 35 minutes on a 2-core
    # VM shared with other jobs (load average 10-19).
    return subprocess.run([str(Path(bin_dir) / "dvc"), *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=3600)


def stages_run(result: subprocess.CompletedProcess) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", result.stdout))


# What consumes every model: the benchmarks, the engine stages, the latency model and the report.
EVERY_MODELS_STAGES = re.compile(r"(benchmark|engine)@.+|report|latency_model")


def snapshot(workdir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(workdir)): p.read_bytes()
            for d in OUTPUT_DIRS for p in sorted((workdir / d).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("repo")
    for name in PROJECT_FILES:
        source, target = REPO / name, workdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    for command in (["init", "-q"], ["config", "user.name", "e2e test"],
                    ["config", "user.email", "e2e@example.invalid"],
                    ["config", "commit.gpgsign", "false"], ["add", "-A"],
                    ["commit", "-q", "-m", "scratch copy"]):
        subprocess.run(["git", *command], cwd=workdir, check=True, capture_output=True)
    # The documented profile switch: DVC rewrites params.yaml (YAML 1.2, quotes dropped where
    # not needed, e.g. amp: "off" -> amp: off) and the stages must read what DVC wrote.
    first = dvc(workdir, "exp", "run", "-S", "profile=smoke")
    assert first.returncode == 0, first.stdout + first.stderr
    # Then all six methods (the file lists two), set where dvc.yaml reads the list: only the
    # new methods' chains run, and what measures every model.
    second = dvc(workdir, "exp", "run", "-S", f"prune.methods=[{','.join(METHODS)}]")
    assert second.returncode == 0, second.stdout + second.stderr
    (workdir / "stages_run.json").write_text(json.dumps(
        {"first": sorted(stages_run(first)), "second": sorted(stages_run(second))}))
    return workdir


def test_adding_methods_runs_their_chains_and_nothing_else_again(smoke_repo):
    ran = json.loads((smoke_repo / "stages_run.json").read_text())
    written = ("pdd", "netslim")  # params.yaml's prune.methods
    assert {f"student_pruned@{m}" for m in written} <= set(ran["first"])
    added = [m for m in METHODS if m not in written]
    assert {f"student_final@{m}" for m in added} <= set(ran["second"])
    # latency_plan reads the budget from resolved/prune.json, which also lists the methods: it
    # re-runs in seconds and writes the same files, so nothing after it re-runs.
    again = [stage for stage in ran["second"] if stage in ran["first"] and stage
             not in ("validate_params", "latency_plan")
             and not EVERY_MODELS_STAGES.fullmatch(stage)]
    assert not again, again


def test_the_documented_profile_switch_runs_from_a_clean_workspace(smoke_repo):
    params = (smoke_repo / "params.yaml").read_text()
    assert "profile: smoke" in params
    # YAML 1.1 would read an unquoted off as False; DVC writes it unquoted, we read YAML 1.2
    assert re.search(r"student_dense: \{[^}]*\bamp:\s+off\b", params), "DVC kept the quotes"
    assert json.loads((smoke_repo / "resolved" / "common.json").read_text())["profile"] == "smoke"
    assert json.loads((smoke_repo / "resolved" / "student_dense.json").read_text())["amp"] == "off"
    assert json.loads((smoke_repo / "metrics" / "teacher.json").read_text())["epochs"] == 2


def test_a_student_trained_in_fp32_on_a_cpu_learns_from_the_teacher_in_onnxruntime(smoke_repo):
    metrics = json.loads((smoke_repo / "metrics" / "student_dense.json").read_text())
    assert (metrics["amp"], metrics["teacher_runtime"]) == ("off", "onnxruntime")


def test_smoke_repro_writes_the_teacher_metrics(smoke_repo):
    metrics = json.loads((smoke_repo / "metrics" / "teacher.json").read_text())
    for key in ("top1", "params", "macs", "epochs", "train_seconds", "images_per_second",
                "device", "data_checksum"):
        assert key in metrics, key
    assert 0.0 <= metrics["top1"] <= 1.0
    assert (smoke_repo / "models" / "teacher.pt").is_file()
    assert len((smoke_repo / "plots" / "teacher.csv").read_text().splitlines()) >= 2


def read_metrics(repo: Path, name: str) -> dict:
    return json.loads((repo / "metrics" / f"{name}.json").read_text())


STRUCTURED = METHODS[:-1]


def test_smoke_repro_runs_every_method_through_prune_slim_and_finetune(smoke_repo):
    assert (smoke_repo / "models" / "student_dense.pt").is_file()
    for method in METHODS:
        for stage in ("student_pruned", "student_slim", "student_final"):
            assert (smoke_repo / "models" / f"{stage}_{method}.pt").is_file(), (stage, method)
            assert (smoke_repo / "metrics" / f"{stage}_{method}.json").is_file(), (stage, method)
        pruned = read_metrics(smoke_repo, f"student_pruned_{method}")
        slim = read_metrics(smoke_repo, f"student_slim_{method}")
        final = read_metrics(smoke_repo, f"student_final_{method}")
        assert pruned["method"] == slim["method"] == final["method"] == method
        assert pruned["epochs"] + final["epochs"] == read_metrics(smoke_repo,
                                                                  "student_dense")["epochs"]
        table = read_metrics(smoke_repo, f"compression_{method}")
        assert set(table["models"]) == {"teacher", "student_dense", "student_final"}
        if method in STRUCTURED:  # driven to the common target, sliced exactly
            assert pruned["decision"]["mode"] == "target"
            assert pruned["decision"]["macs_fraction"] <= 0.5
            assert slim["rel_diff"] <= 1e-4 and slim["macs_after"] <= 0.5 * slim["macs_before"]
            assert table["student_final_vs_student_dense"]["flops_reduction"] >= 0.5
            assert final["sparsity"] == 0.0
        else:  # unstructured: same shapes, zeros kept through fine-tuning
            assert slim["macs_after"] == slim["macs_before"] and slim["rel_diff"] == 0.0
            assert slim["sparsity"] == pytest.approx(0.8, abs=1e-4)
            assert final["sparsity"] == pytest.approx(slim["sparsity"], abs=1e-9)
    pdd = read_metrics(smoke_repo, "student_pruned_pdd")
    assert len(pdd["decision"]["gate_flips_per_epoch"]) == pdd["epochs"]
    assert "own size" in pdd["alternatives"]


MODELS = ("teacher", "student_dense", *(f"student_final_{m}" for m in METHODS))


def test_smoke_repro_exports_every_model_behind_parity_gates(smoke_repo):
    for model in MODELS:
        for precision in ("fp32", "fp16", "int8", "int8.trt"):
            assert (smoke_repo / "artifacts" / f"{model}.{precision}.onnx").is_file()
            assert (smoke_repo / "artifacts" / f"{model}.{precision}.card.json").is_file()
        assert (smoke_repo / "metrics" / f"export_{model}.json").is_file()


def test_the_weight_methods_onnx_holds_plain_tensors_with_zeros(smoke_repo):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    dense = onnx.load(str(smoke_repo / "artifacts" / "student_dense.fp32.onnx"))
    sparse = onnx.load(str(smoke_repo / "artifacts" / "student_final_weight.fp32.onnx"))
    assert {n.op_type for n in sparse.graph.node} == {n.op_type for n in dense.graph.node}
    weights = [numpy_helper.to_array(init) for init in sparse.graph.initializer
               if numpy_helper.to_array(init).ndim in (2, 4)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
    assert zeros == pytest.approx(0.8, abs=0.01) and np.isfinite(zeros)


def method_table(report: str) -> dict[str, list[str]]:
    """The method comparison's first table: model -> its cells."""
    section = report.split("## Method comparison", 1)[1].split("\n\n|", 1)[1]
    lines = ("|" + section).split("\n\n", 1)[0].splitlines()[2:]
    return {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_smoke_repro_benchmarks_every_target_and_reports(smoke_repo):
    rows = [row for path in sorted((smoke_repo / "metrics").glob("benchmark_*.json"))
            for row in json.loads(path.read_text())["results"].values()]
    by_target = {row["target"]: row for row in rows}
    assert by_target["onnxruntime-cpu"]["status"] == "ok"
    assert by_target["torch-cpu"]["status"] == "ok"
    if not torch_cuda_available():
        assert by_target["torch-cuda"]["status"] == "skipped" and by_target["torch-cuda"]["reason"]
    assert {row["model"] for row in rows} == set(MODELS)
    report = (smoke_repo / "reports" / "report.md").read_text()
    assert "| student_final_pdd | onnxruntime-cpu | int8 |" in report
    table = method_table(report)
    assert set(table) == set(MODELS)
    for model, cells in table.items():  # a number in every column (after the method name)
        for cell in cells[1:]:
            assert float(cell.rstrip("x").replace(",", "")) == float(
                cell.rstrip("x").replace(",", "")), (model, cell)
    for png in ("latency.png", "accuracy_vs_latency.png", "methods.png"):
        assert (smoke_repo / "reports" / png).read_bytes()[:4] == b"\x89PNG"


def test_smoke_repro_measures_a_latency_table_and_checks_its_model(smoke_repo):
    """The real table stage on ONNX Runtime CPU (a tiny grid), the plan pruning reads, and the
    latency model against every shipped model's measured latency."""
    built = json.loads((smoke_repo / "metrics" / "latency_table.json").read_text())
    assert built["status"] == "ok" and built["rows"] > 0, built
    assert built["target"] == "onnxruntime-cpu"
    plan = json.loads((smoke_repo / "latency" / "budget.json").read_text())
    assert plan["budget"] == {"macs": 0.5} and plan["table"] is None  # a MACs budget
    checked = json.loads((smoke_repo / "metrics" / "latency_model.json").read_text())
    assert checked["status"] == "ok", checked
    part = checked["batch"]["1"]
    assert set(part["models"]) == set(MODELS)
    for row in part["models"].values():
        assert row["predicted_ms"] > 0 and row["measured_ms"] > 0
    assert set(part["speedup_over_dense"]) == set(METHODS)
    report = (smoke_repo / "reports" / "report.md").read_text()
    assert "## Latency model" in report and "| student_final_pdd |" in report


ENGINE_STAGES = [f"{target}-{precision}" for target in ("tensorrt", "ssh-tensorrt")
                 for precision in ("fp32", "fp16", "int8")]


@pytest.mark.parametrize("item", ENGINE_STAGES)
def test_smoke_repro_runs_every_engine_stage_and_goes_on(smoke_repo, item):
    """Without TensorRT, a GPU or a configured device (CI, this machine) each engine stage
    records `skipped` rows with the reason and leaves an empty engine folder, and the pipeline
    completes (the report exists); where TensorRT and a GPU exist, the local rows are ok."""
    result = read_metrics(smoke_repo, f"engine_{item}")
    target, precision = result["target"], result["precision"]
    assert f"{target}-{precision}" == item and set(result["models"]) == set(MODELS)
    folder = smoke_repo / "engines" / target / precision
    assert folder.is_dir()
    statuses = {row["status"] for row in result["models"].values()}
    if result["available"]:
        assert statuses == {"ok"}
        assert len(list(folder.glob("*.engine"))) == len(list(folder.glob("*.card.json"))) \
            == len(MODELS)
    else:
        assert statuses == {"skipped"} and result["reason"]
        assert all(result["reason"] in row["reason"] for row in result["models"].values())
        assert not list(folder.glob("*.engine"))
    assert (smoke_repo / "reports" / "report.md").is_file()


EDGE_RUNTIMES = {"openvino-cpu": ("export_openvino", ("fp32", "int8")),
                 "executorch-xnnpack": ("export_executorch", ("fp32", "int8"))}


@pytest.mark.parametrize("target", list(EDGE_RUNTIMES))
def test_smoke_repro_ships_and_measures_the_edge_runtimes(smoke_repo, target):
    """With the extra installed (CI installs both): every file passed its gates and every row
    was measured. Without it: skipped rows and exports that say why, never a failed repro."""
    stage, precisions = EDGE_RUNTIMES[target]
    results = read_metrics(smoke_repo, f"benchmark_{target}")
    exports = [read_metrics(smoke_repo, f"{stage}_{model}") for model in MODELS]
    rows = list(results["results"].values())
    if not results["available"]:
        assert {row["status"] for row in rows} == {"skipped"} and rows[0]["reason"]
        assert {export["status"] for export in exports} == {"skipped"}
        pytest.skip(f"{target} is not available here: {results['reason']}")
    assert {export["status"] for export in exports} == {"ok"}
    for export in exports:
        fp32_gates = [gate for key, entry in export["files"].items() if key.startswith("fp32")
                      for gate in entry["parity"].values()]
        assert fp32_gates and all(g["rel_diff"] <= 1e-4 and g["top1_agreement"] == 1.0
                                  for g in fp32_gates)
    measured = {(row["model"], row["precision"], row["batch_size"]): row["status"]
                for row in rows if row["precision"] in precisions}
    assert set(measured) == {(m, p, b) for m in MODELS for p in precisions for b in (1, 64)}
    assert set(measured.values()) == {"ok"}, measured


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def test_second_repro_does_nothing_and_says_so(smoke_repo):
    before = snapshot(smoke_repo)
    again = dvc(smoke_repo, "repro")
    assert again.returncode == 0, again.stderr
    assert "Data and pipelines are up to date" in again.stdout
    assert snapshot(smoke_repo) == before


@pytest.mark.parametrize(("module", "expected"), [
    ("pipeline/report.py", {"report"}),
    # validate_params imports every target to validate its settings (it re-runs in seconds) and
    # writes each target's code hash, which only the benchmark of that target depends on.
    # The engine stages of ssh-tensorrt depend on its code hash the same way.
    ("targets/ssh.py", {"validate_params", "benchmark@ssh-onnxruntime", "report",
                        "engine@ssh-tensorrt-fp32", "engine@ssh-tensorrt-fp16",
                        "engine@ssh-tensorrt-int8"}),
    ("targets/torch_eager.py", {"validate_params", "benchmark@torch-cpu", "benchmark@torch-cuda",
                                "benchmark@torch-cuda-graphs", "report"}),
])
def test_a_code_edit_reruns_only_the_stages_that_run_it(smoke_repo, module, expected):
    path = smoke_repo / module
    original = path.read_text()
    path.write_text(original + "# an edit\n")
    try:
        edited = dvc(smoke_repo, "repro")
    finally:
        path.write_text(original)
        restored = dvc(smoke_repo, "repro")
    assert edited.returncode == 0 and restored.returncode == 0, edited.stderr + restored.stderr
    assert stages_run(edited) == expected


def test_a_method_edit_reruns_that_methods_chain_only(smoke_repo):
    """A method's module reaches its own chain (through resolved/methods/<m>.code) and what
    measures every model; never the teacher, the dense student or another method."""
    path = smoke_repo / "pipeline" / "prune" / "netslim.py"
    original = path.read_text()
    path.write_text(original + "# an edit\n")
    try:
        edited = dvc(smoke_repo, "repro")
    finally:
        path.write_text(original)
        restored = dvc(smoke_repo, "repro")
    assert edited.returncode == 0 and restored.returncode == 0, edited.stderr + restored.stderr
    ran = stages_run(edited)
    assert {"validate_params", "student_pruned@netslim"} <= ran
    others = {stage for stage in ran if stage != "validate_params"
              and not stage.endswith("@netslim") and not EVERY_MODELS_STAGES.fullmatch(stage)}
    assert not others, others


def set_param(path: Path, keys: tuple, value) -> None:
    """Set one value the way `dvc exp run -S` does (ruamel.yaml round trip)."""
    yaml = YAML()
    document = yaml.load(path.read_text())
    node = document
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    with path.open("w") as handle:
        yaml.dump(document, handle)


@pytest.mark.parametrize(
    ("keys", "value", "key"),
    # The smoke profile sets the teacher's lr, so that is where a bad one takes effect.
    [(("profiles", "smoke", "teacher", "lr"), -0.02, "teacher.lr"),
     (("profiles", "smoke", "teacher", "lr"), "fast", "teacher.lr"),
     (("common", "colour"), "red", "common.colour"),
     # Cross-section references, checked before DVC deletes any output.
     (("benchmark", "models"), ["teacher", "student_gated"], "benchmark.models"),
     (("report", "dense_model"), "student_slim", "report.dense_model"),
     # A base value the active profile overrides must be valid too.
     (("data", "synthetic_test"), 0, "data.synthetic_test"),
     # Bad pruning settings are refused before any method's outputs are deleted.
     (("prune", "budget"), {"macs": 1.5}, "prune.budget"),
     (("weight", "sparsity"), 1.0, "weight.sparsity"),
     (("prune", "methods"), ["pdd", "magic"], "prune.methods")],
)
def test_bad_params_stop_with_the_key_and_touch_nothing(smoke_repo, keys, value, key):
    params = smoke_repo / "params.yaml"
    good = params.read_text()
    before = snapshot(smoke_repo)  # resolved/ included: the last valid settings stay
    set_param(params, keys, value)
    try:
        result = dvc(smoke_repo, "repro")
    finally:
        params.write_text(good)
    assert result.returncode != 0
    assert key in result.stdout + result.stderr
    assert snapshot(smoke_repo) == before
