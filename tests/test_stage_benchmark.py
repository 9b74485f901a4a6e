"""The benchmark stage on tiny models: rows for every model x precision x batch, with status,
accuracy through the runtime, agreement with PyTorch and provenance; skipped and failed rows."""

import csv
import json
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch
from sshd_fixture import (
    NEEDS_SSH_CLIENT,
    free_port,
    serve_sshd,
    settings_for,
    tamper,
    tiny_checkpoint,
    tiny_onnx,
    unconfigured_ssh,
    with_card,
)

from pipeline.checkpoint import load_model, save_model
from pipeline.config import BenchmarkConfig, TimingPlan
from pipeline.data import make_synthetic, save_prepared
from pipeline.errors import ArtifactIntegrityError
from pipeline.io import file_sha256
from pipeline.prune.sparse import apply_masks, magnitude_masks
from stages import benchmark as benchmark_stage
from stages.benchmark import BenchPaths, run
from targets.onnxruntime_cpu import OnnxRuntimeCpuSettings
from targets.registry import make_target
from targets.torch_eager import TorchSettings

MODELS = ("teacher", "student_final_pdd")


@pytest.fixture(scope="module")
def sshd_server(tmp_path_factory):
    yield from serve_sshd(tmp_path_factory)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    save_prepared(make_synthetic(20, 24, 10, seed=0), root / "data" / "prepared.npz")
    (root / "models").mkdir()
    (root / "artifacts").mkdir()
    for model, width in zip(MODELS, (8, 4), strict=True):
        checkpoint = tiny_checkpoint(root / "models" / f"{model}.pt", base_width=width)
        if model != "teacher":
            make_sparse(checkpoint)
        with_card(tiny_onnx(checkpoint, root / "artifacts" / f"{model}.fp32.onnx"), model)
    return root


def make_sparse(checkpoint: Path) -> None:
    """Half the weights zero, recorded as the `weight` method's student."""
    loaded = load_model(checkpoint)
    apply_masks(loaded.model, magnitude_masks(loaded.model, 0.5))
    save_model(checkpoint, loaded.model, loaded.spec,
               {**loaded.meta, "top1": 0.5, "pruning": {"method": "weight", "structured": False}})


def paths(root: Path, target: str) -> BenchPaths:
    return BenchPaths(root / "metrics" / f"benchmark_{target}.json",
                      root / "plots" / f"benchmark_{target}.csv", root / "data" / "prepared.npz",
                      root / "models", root / "artifacts")


def config(targets: dict, **overrides) -> BenchmarkConfig:
    values = dict(
        targets=targets, models=MODELS, batch_sizes=(1, 4), eval_images=12,
        timing=TimingPlan(warmup_iters=1, warmup_seconds=0.0, min_iters=2, min_seconds=0.0))
    return BenchmarkConfig(**(values | overrides))


SETTINGS = {"torch": TorchSettings(threads=1),
            "onnxruntime": OnnxRuntimeCpuSettings(graph_optimization="all", intra_op_threads=1,
                                                  inter_op_threads=1,
                                                  providers=("CPUExecutionProvider",)),
            "ssh": unconfigured_ssh()}


def target(name: str, ssh=None):
    """Target `name` through the factory, with test settings (the SSH device: `ssh`)."""
    from targets.registry import target_class

    key = target_class(name).settings_key
    return make_target(name, ssh if key == "ssh" and ssh is not None else SETTINGS[key])


def test_torch_cpu_rows_carry_accuracy_latency_and_provenance(workspace):
    out = paths(workspace, "torch-cpu")
    rows = run(config({"torch-cpu": ("fp32",)}), target("torch-cpu"), out)
    assert [(r["model"], r["batch_size"]) for r in rows] == [
        ("teacher", 1), ("teacher", 4), ("student_final_pdd", 1), ("student_final_pdd", 4)]
    for row in rows:
        assert row["status"] == "ok" and row["reason"] == ""
        assert row["agreement"] == 1.0 and 0 <= row["top1"] <= 1 and row["eval_images"] == 12
        assert row["n"] == 2 and row["p50_ms"] > 0 and row["clock"] == "host"
        assert row["provenance"]["threads"] == 1 and row["provenance"]["cpu_model"]
        assert row["size_mb"] > 0 and row["artifact"].endswith(f"{row['model']}.pt")
    assert rows[0]["macs"] > rows[2]["macs"]  # width 8 teacher vs width 4 student
    teacher, student = rows[0], rows[2]
    assert teacher["sparsity"] == 0.0 and teacher["params_nonzero"] == teacher["params"]
    assert teacher["method"] is None and teacher["num_classes"] == 10
    assert student["method"] == "weight" and student["structured"] is False
    assert student["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert student["params_nonzero"] < student["params"]
    assert student["macs_nonzero"] < student["macs"] and student["checkpoint_top1"] == 0.5
    saved = json.loads(out.metrics.read_text())
    assert saved["target"] == "torch-cpu" and saved["available"] is True
    assert saved["results"]["student_final_pdd/fp32/b4"]["p50_ms"] == rows[3]["p50_ms"]
    with out.plots.open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 4 and table[0]["prov_threads"] == "1" and "prov_git_revision" in table[0]


def test_onnxruntime_rows_and_a_missing_artifact(workspace):
    rows = run(config({"onnxruntime-cpu": ("fp32", "int8")}, batch_sizes=(4,),
                      models=MODELS[:1]),
               target("onnxruntime-cpu"), paths(workspace, "onnxruntime-cpu"))
    fp32, int8 = rows
    assert fp32["status"] == "ok" and fp32["agreement"] >= 0.9
    assert fp32["artifact"].endswith("teacher.fp32.onnx")
    assert fp32["artifact_sha256"] == file_sha256(workspace / "artifacts" / "teacher.fp32.onnx")
    assert int8["status"] == "failed" and "teacher.int8.onnx not found" in int8["reason"]
    assert int8["p50_ms"] is None


def test_static_batch_artifact_skips_other_batch_sizes(workspace, tmp_path):
    root = tmp_path
    (root / "models").mkdir()
    (root / "artifacts").mkdir()
    (root / "data").mkdir()
    (root / "data" / "prepared.npz").write_bytes((workspace / "data" / "prepared.npz").read_bytes())
    checkpoint = tiny_checkpoint(root / "models" / "teacher.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(load_model(checkpoint).model, (torch.zeros(1, 3, 32, 32),),
                          str(root / "artifacts" / "teacher.fp32.onnx"), input_names=["input"],
                          output_names=["logits"], dynamo=False)
    with_card(root / "artifacts" / "teacher.fp32.onnx", "teacher")
    rows = run(config({"onnxruntime-cpu": ("fp32",)}, eval_images=5, models=("teacher",)),
               target("onnxruntime-cpu"), paths(root, "onnxruntime-cpu"))
    assert [(r["batch_size"], r["status"]) for r in rows] == [(1, "ok"), (4, "skipped")]
    assert "fixed at 1" in rows[1]["reason"]
    assert rows[0]["agreement"] >= 0.8 and rows[0]["eval_images"] == 5  # tail padding worked


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_unavailable_target_gives_skipped_rows_with_the_reason(workspace, monkeypatch):
    def no_reference_needed(*_):
        raise AssertionError("a skipped target ran the PyTorch reference over the eval images")

    monkeypatch.setattr(benchmark_stage, "torch_predictions", no_reference_needed)
    out = paths(workspace, "torch-cuda")
    rows = run(config({"torch-cuda": ("fp32",)}), target("torch-cuda"), out)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"skipped"}
    assert all("CUDA" in r["reason"] for r in rows)
    assert json.loads(out.metrics.read_text())["available"] is False


@NEEDS_SSH_CLIENT
def test_unreachable_edge_device_gives_failed_rows_in_time(workspace, tmp_path):
    (tmp_path / "known_hosts").write_text("")
    ssh = unconfigured_ssh(host="nobody@127.0.0.1", port=free_port(),
                           known_hosts=str(tmp_path / "known_hosts"), command_timeout_s=20.0)
    started = time.monotonic()
    rows = run(config({"ssh-onnxruntime": ("fp32",)}, batch_sizes=(1,), models=MODELS[:1]),
               target("ssh-onnxruntime", ssh), paths(workspace, "ssh-onnxruntime"))
    assert time.monotonic() - started < 20.0
    (row,) = rows
    assert row["status"] == "failed"
    assert "SshError" in row["reason"] and "cannot reach nobody@127.0.0.1" in row["reason"]


@pytest.mark.edge
def test_edge_device_over_ssh(workspace, sshd_server):
    s = settings_for(sshd_server)
    rows = run(config({"ssh-onnxruntime": ("fp32",)}, models=MODELS[1:]),
               target("ssh-onnxruntime", s), paths(workspace, "ssh-onnxruntime"))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["agreement"] >= 0.9 and rows[1]["n"] == 2
    device = rows[0]["provenance"]["device"]
    assert device["onnxruntime"] and device["ssh_host"] == f"{s.host}:{s.port}"


def copy_of(workspace: Path, folder: Path) -> Path:
    """The workspace's inputs (not the results other tests wrote into it)."""
    shutil.copytree(workspace, folder, ignore=shutil.ignore_patterns("metrics", "plots"))
    return folder


@pytest.mark.parametrize("target_name", ["onnxruntime-cpu", "ssh-onnxruntime"])
def test_an_artifact_that_does_not_match_its_card_stops_the_stage(workspace, tmp_path,
                                                                   target_name):
    root = copy_of(workspace, tmp_path / "ws")
    tamper(root / "artifacts" / "student_final_pdd.fp32.onnx")
    out = paths(root, target_name)
    with pytest.raises(ArtifactIntegrityError, match=r"student_final_pdd\.fp32\.onnx: sha256 \w+ "
                                                     r"does not match its card's .*rebuild it "
                                                     r"with `dvc repro export_student_final@pdd`"):
        run(config({target_name: ("fp32",)}), target(target_name), out)
    assert not out.metrics.exists()


def test_an_artifact_without_its_card_stops_the_stage(workspace, tmp_path):
    root = copy_of(workspace, tmp_path / "ws")
    (root / "artifacts" / "teacher.fp32.card.json").unlink()
    with pytest.raises(ArtifactIntegrityError, match=r"teacher\.fp32\.card\.json: model card not "
                                                     r"found.*`dvc repro export@teacher`"):
        run(config({"onnxruntime-cpu": ("fp32",)}), target("onnxruntime-cpu"),
            paths(root, "onnxruntime-cpu"))


@pytest.mark.edge
def test_a_mismatched_artifact_is_never_uploaded(workspace, sshd_server, tmp_path):
    root = copy_of(workspace, tmp_path / "ws")
    tamper(root / "artifacts" / "teacher.fp32.onnx")
    with pytest.raises(ArtifactIntegrityError, match="does not match its card"):
        run(config({"ssh-onnxruntime": ("fp32",)}), target("ssh-onnxruntime",
                                                           settings_for(sshd_server)),
            paths(root, "ssh-onnxruntime"))
    assert sorted(sshd_server.folder.glob("prune-deploy.*")) == []  # no temp folder was made
OPENVINO = make_target("openvino-cpu", {"threads": 1})
EXECUTORCH = make_target("executorch-xnnpack", {"threads": 1})


@pytest.mark.skipif(not OPENVINO.available()[0], reason=OPENVINO.available()[1])
def test_openvino_rows_run_the_shipped_ir_and_bf16_compiles_the_fp32_one(workspace):
    folder = workspace / "artifacts" / "openvino" / "teacher"
    with_card(OPENVINO.build(workspace / "artifacts" / "teacher.fp32.onnx", folder), "teacher")
    rows = run(config({"openvino-cpu": ("fp32", "bf16", "int8")}, models=MODELS[:1]),
               OPENVINO, paths(workspace, "openvino-cpu"))
    fp32, bf16, int8 = rows[0:2], rows[2:4], rows[4:6]
    assert [r["status"] for r in fp32] == ["ok", "ok"] and fp32[0]["agreement"] == 1.0
    assert fp32[0]["artifact"] == bf16[0]["artifact"] == str(folder / "teacher.fp32.xml")
    assert fp32[0]["size_mb"] > (folder / "teacher.fp32.xml").stat().st_size / 1e6  # + .bin
    prov = fp32[0]["provenance"]
    assert prov["runtime"].startswith("openvino 20") and prov["packages"]["openvino"]
    assert prov["runtime_info"]["inference_precision"] == "f32" and prov["threads"] == 1
    if OPENVINO.precision_available("bf16")[0]:
        assert [r["status"] for r in bf16] == ["ok", "ok"]
        assert bf16[0]["provenance"]["runtime_info"]["inference_precision"] == "bf16"
    else:
        assert {r["status"] for r in bf16} == {"skipped"}
    assert {r["status"] for r in int8} == {"failed"}
    assert "teacher.int8.xml not found (run the export_openvino stage)" in int8[0]["reason"]


@pytest.mark.slow  # lowers two programs
@pytest.mark.skipif(not EXECUTORCH.available()[0], reason=EXECUTORCH.available()[1])
def test_executorch_rows_run_one_program_per_batch_size(workspace):
    from pipeline.export.executorch import export_programs

    folder = workspace / "artifacts" / "executorch" / "student_final_pdd"
    folder.mkdir(parents=True)
    model = load_model(workspace / "models" / "student_final_pdd.pt").model
    for batch, program in export_programs(model, "fp32", (1, 4), (3, 32, 32)).items():
        (folder / f"student_final_pdd.fp32.b{batch}.pte").write_bytes(program.buffer)
        with_card(folder / f"student_final_pdd.fp32.b{batch}.pte", "student_final_pdd")
    rows = run(config({"executorch-xnnpack": ("fp32", "int8")}, models=MODELS[1:]), EXECUTORCH,
               paths(workspace, "executorch-xnnpack"))
    assert [(r["precision"], r["batch_size"], r["status"]) for r in rows] == [
        ("fp32", 1, "ok"), ("fp32", 4, "ok"), ("int8", 1, "failed"), ("int8", 4, "failed")]
    assert [Path(r["artifact"]).name for r in rows[:2]] == ["student_final_pdd.fp32.b1.pte",
                                                             "student_final_pdd.fp32.b4.pte"]
    assert rows[0]["agreement"] == rows[1]["agreement"] == 1.0 and rows[1]["eval_images"] == 12
    assert rows[0]["provenance"]["runtime_info"] == {"threadpool_threads": 1}
    assert "(run the export_executorch stage)" in rows[2]["reason"]


@pytest.mark.parametrize(("name", "package"), [("openvino-cpu", "openvino"),
                                               ("executorch-xnnpack", "executorch")])
def test_a_missing_extra_gives_skipped_rows_with_the_reason(workspace, monkeypatch, name,
                                                            package):
    import sys

    for module in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, package, None)  # importing it now raises ImportError
    out = paths(workspace, name)
    rows = run(config({name: ("fp32", "int8")}), make_target(name, {"threads": 1}), out)
    assert len(rows) == 8 and {r["status"] for r in rows} == {"skipped"}
    assert all(f"{package} is not installed" in r["reason"] and f"[{package}]" in r["reason"]
               for r in rows)
    saved = json.loads(out.metrics.read_text())
    assert saved["available"] is False and f"{package} is not installed" in saved["reason"]
