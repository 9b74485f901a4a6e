"""The export_openvino stage on a tiny ResNet20 and synthetic data: IR files with cards behind
parity gates (FP32 IR == ONNX Runtime FP32 within the FP32 gate), nothing written on a failed
gate or a tampered ONNX file, an empty folder and a reason without openvino."""

import sys
from pathlib import Path

import pytest
import torch
from stage_settings import ONE_PROCESS

import stages.export as export_stage
import stages.export_openvino as stage
from pipeline.checkpoint import save_model
from pipeline.config import (
    ExportConfig,
    ParityTolerance,
    QuantizeConfig,
    RunConfig,
)
from pipeline.data import make_synthetic, save_prepared
from pipeline.errors import ArtifactIntegrityError, ParityError
from pipeline.export.cards import verified_card
from pipeline.flops import model_cost
from pipeline.models import build_model
from targets.onnxruntime_cpu import OnnxRuntimeCpuSettings
from targets.openvino_cpu import OpenVinoCpuTarget, OpenVinoSettings

SPEC = {"arch": "resnet20", "num_classes": 4, "base_width": 4}
ORT = OnnxRuntimeCpuSettings(graph_optimization="all", intra_op_threads=1, inter_op_threads=1,
                             providers=("CPUExecutionProvider",))
OPENVINO = OpenVinoSettings(threads=1)
needs_openvino = pytest.mark.skipif(not OpenVinoCpuTarget(OPENVINO).available()[0],
                                    reason=OpenVinoCpuTarget(OPENVINO).available()[1])


def export_config(**overrides) -> ExportConfig:
    values = dict(
        opset=18, simplifier="onnxsim", parity_images=64, parity_batch=64, eval_batch=32,
        fp16=ParityTolerance(max_rel_diff=1e-2, min_top1_agreement=0.95),
        int8=ParityTolerance(max_rel_diff=0.25, min_top1_agreement=0.8),
        quantize=QuantizeConfig(calibration_images=512, calibration_batch=128,
                                calibration_method="minmax", activation_type="uint8",
                                reduce_range=True, max_top1_drop=25.0))
    return ExportConfig(**(values | overrides))


def settings(**overrides) -> stage.Settings:
    return stage.Settings(RunConfig(seed=0, device="cpu", threads=1, distributed=ONE_PROCESS,
                                    profile="smoke"),
                          export_config(**overrides), ORT, OPENVINO)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A trained-looking model file, its data, and the export stage's ONNX files and cards."""
    root = tmp_path_factory.mktemp("export_openvino")
    dataset = make_synthetic(512, 64, 4, seed=0)
    save_prepared(dataset, root / "data" / "prepared.npz")
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    cost = model_cost(model)
    meta = {"classes": list(dataset.classes), "mean": list(dataset.mean),
            "std": list(dataset.std), "input_shape": [3, 32, 32], "dataset": dataset.name,
            "params": cost.params, "macs": cost.macs, "top1": 0.25}
    save_model(root / "models" / "student_final.pt", model, SPEC, meta)
    export_stage.run(export_config(), ORT, root / "models" / "student_final.pt",
                     root / "data" / "prepared.npz", root / "artifacts")
    return root


def paths(root: Path) -> stage.Paths:
    return stage.Paths(root / "models" / "student_final.pt", root / "data" / "prepared.npz",
                       root / "artifacts")


@pytest.fixture(scope="module")
def result(workspace) -> dict:
    return stage.run(settings(), paths(workspace), "student_final")


@needs_openvino
def test_every_ir_is_shipped_with_a_card_that_verifies(workspace, result):
    folder = workspace / "artifacts" / "openvino" / "student_final"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"student_final.{p}.{ext}" for p in ("fp32", "int8") for ext in ("xml", "bin",
                                                                         "card.json"))
    for precision in ("fp32", "int8"):
        card = verified_card(folder / f"student_final.{precision}.xml")
        assert card["precision"] == precision and card["opset"] == 18
        assert card["export"]["derived_from"] == f"student_final.{precision}.onnx"
        assert card["sidecars"][0]["file"] == f"student_final.{precision}.bin"
        assert card["metrics"]["openvino_top1"] == result["files"][precision]["top1"]
    assert "quantization" in verified_card(folder / "student_final.int8.xml")["export"]
    assert not list((workspace / "artifacts" / "openvino").glob("*.tmp"))


@needs_openvino
def test_fp32_ir_matches_pytorch_and_onnx_runtime_within_the_fp32_gate(result):
    assert result["status"] == "ok" and result["runtime"].startswith("openvino 20")
    gates = result["files"]["fp32"]["parity"]
    assert set(gates) == {"vs_torch_b1", "vs_torch_b64", "vs_onnxruntime_b1",
                          "vs_onnxruntime_b64", "batch_consistency"}
    for gate in gates.values():
        assert gate["rel_diff"] <= 1e-4 and gate["top1_agreement"] == 1.0
        assert gate["images"] == 64
    assert result["files"]["fp32"]["runtime_info"]["inference_precision"] == "f32"
    assert result["files"]["int8"]["runtime_info"]["inference_precision"] == "f32"
    assert result["files"]["int8"]["top1_drop_points"] == pytest.approx(
        100 * (result["files"]["fp32"]["top1"] - result["files"]["int8"]["top1"]))


@needs_openvino
@pytest.mark.slow  # a second conversion and check
def test_a_failed_gate_writes_nothing(workspace, result):
    folder = workspace / "artifacts" / "openvino" / "student_final"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    strict = settings(int8=ParityTolerance(max_rel_diff=1e-7, min_top1_agreement=1.0))
    with pytest.raises(ParityError, match=r"student_final.int8.xml vs torch at batch 1 on 64 "
                                          r"images: relative diff"):
        stage.run(strict, paths(workspace), "student_final")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@needs_openvino
def test_an_onnx_file_that_does_not_match_its_card_is_refused(workspace, tmp_path, result):
    root = tmp_path
    for sub in ("models", "data"):
        (root / sub).symlink_to(workspace / sub)
    (root / "artifacts").mkdir()
    for precision in ("fp32", "int8"):
        for suffix in ("onnx", "card.json"):
            name = f"student_final.{precision}.{suffix}"
            (root / "artifacts" / name).write_bytes((workspace / "artifacts" / name).read_bytes())
    with (root / "artifacts" / "student_final.int8.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ArtifactIntegrityError, match="does not match its card's"):
        stage.run(settings(), paths(root), "student_final")
    assert not (root / "artifacts" / "openvino" / "student_final").exists()


def test_without_openvino_the_folder_is_empty_and_the_metrics_say_why(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)
    folder = tmp_path / "artifacts" / "openvino" / "teacher"
    folder.mkdir(parents=True)
    (folder / "teacher.fp32.xml").write_text("left by an earlier run")
    metrics = stage.run(settings(), stage.Paths(tmp_path / "missing.pt", tmp_path / "none.npz",
                                                tmp_path / "artifacts"), "teacher")
    assert metrics["status"] == "skipped" and "openvino is not installed" in metrics["reason"]
    assert list(folder.iterdir()) == []
