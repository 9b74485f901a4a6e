"""`dvc repro` on the smoke profile, in a scratch copy of the repository."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["pipeline", "stages", "targets", "dvc.yaml", "params.yaml", ".dvc/config",
                 ".dvcignore", ".gitignore", "pyproject.toml"]
OUTPUT_DIRS = ["models", "metrics", "artifacts", "plots", "reports", "data", "checkpoints"]
METHODS = ("pdd", "kddp", "prune_then_kd", "sdap", "netslim", "weight")  # the smoke profile's

pytestmark = pytest.mark.slow


def dvc(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    # The stages' `python` must be this interpreter (the project's venv), found first on PATH.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    return subprocess.run([str(Path(bin_dir) / "dvc"), *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=1800)


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
    params = workdir / "params.yaml"
    text = params.read_text().replace("profile: quick", "profile: smoke", 1)
    # the smoke profile's method list, written where dvc.yaml reads it (validate_params insists)
    params.write_text(text.replace("  methods: [pdd, netslim]", "  methods: [" + ", ".join(
        METHODS) + "]", 1))
    subprocess.run(["git", "init", "-q"], cwd=workdir, check=True)
    first = dvc(workdir, "repro")
    assert first.returncode == 0, first.stdout + first.stderr
    return workdir


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
        for precision in ("fp32", "fp16", "int8"):
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


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def test_second_repro_does_nothing_and_says_so(smoke_repo):
    before = snapshot(smoke_repo)
    again = dvc(smoke_repo, "repro")
    assert again.returncode == 0, again.stderr
    assert "Data and pipelines are up to date" in again.stdout
    assert snapshot(smoke_repo) == before


def stages_run(result: subprocess.CompletedProcess) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", result.stdout))


@pytest.mark.parametrize(("module", "expected"), [
    ("pipeline/report.py", {"report"}),
    # a method's module reaches its own chain only (through resolved/methods/<m>.code)
    ("pipeline/prune/netslim.py", {"validate_params", "student_pruned@netslim"}),
    # validate_params imports every target to validate its settings (it re-runs in seconds) and
    # writes each target's code hash, which only the benchmark of that target depends on.
    ("targets/ssh.py", {"validate_params", "benchmark@ssh-onnxruntime", "report"}),
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


@pytest.mark.parametrize(
    ("old", "new", "key"),
    # The smoke profile sets the teacher's lr, so that is where a bad one takes effect.
    [("arch: resnet32, epochs: 2, batch_size: 64, lr: 0.02",
      "arch: resnet32, epochs: 2, batch_size: 64, lr: -0.02", "teacher.lr"),
     ("arch: resnet32, epochs: 2, batch_size: 64, lr: 0.02",
      "arch: resnet32, epochs: 2, batch_size: 64, lr: fast", "teacher.lr"),
     ("  seed: 0 ", "  seed: 0\n  colour: red ", "common.colour"),
     # bad pruning settings are refused before any method's outputs are deleted
     ("  target_macs: 0.5 ", "  target_macs: 1.5 ", "prune.target_macs"),
     ("  sparsity: 0.8 ", "  sparsity: 1.0 ", "weight.sparsity"),
     ("  methods: [pdd, kddp", "  methods: [pdd, magic, kddp", "prune.methods")],
)
def test_bad_params_stop_with_the_key_and_touch_nothing(smoke_repo, old, new, key):
    params = smoke_repo / "params.yaml"
    good = params.read_text()
    assert old in good
    before = snapshot(smoke_repo)
    params.write_text(good.replace(old, new, 1))
    try:
        result = dvc(smoke_repo, "repro")
    finally:
        params.write_text(good)
    assert result.returncode != 0
    assert key in result.stdout + result.stderr
    assert snapshot(smoke_repo) == before
