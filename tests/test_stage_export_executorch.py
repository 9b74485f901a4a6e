"""The export_executorch stage on a tiny ResNet20 and synthetic data: one program per precision
and batch size with cards behind parity gates, nothing written on a failed gate, an empty folder
and a reason without executorch."""

import sys
from pathlib import Path

import pytest
import torch
from stage_settings import ONE_PROCESS

import stages.export_executorch as stage
from pipeline.checkpoint import save_model
from pipeline.config import (
    ExportConfig,
    ParityTolerance,
    ProgramBatches,
    QuantizeConfig,
    RunConfig,
)
from pipeline.data import make_synthetic, save_prepared
from pipeline.errors import ParityError
from pipeline.export.cards import verified_card
from pipeline.flops import model_cost
from pipeline.models import build_model
from targets.executorch_xnnpack import ExecuTorchSettings, ExecuTorchXnnpackTarget

SPEC = {"arch": "resnet20", "num_classes": 4, "base_width": 4}
EXECUTORCH = ExecuTorchSettings(threads=1)
needs_executorch = pytest.mark.skipif(not ExecuTorchXnnpackTarget(EXECUTORCH).available()[0],
                                      reason=ExecuTorchXnnpackTarget(EXECUTORCH).available()[1])


def settings(batch_sizes=(1, 4), **export_overrides) -> stage.Settings:
    export = dict(
        opset=18, simplifier="onnxsim", parity_images=16, parity_batch=4, eval_batch=32,
        fp16=ParityTolerance(max_rel_diff=1e-2, min_top1_agreement=0.95),
        int8=ParityTolerance(max_rel_diff=0.5, min_top1_agreement=0.5),
        quantize=QuantizeConfig(calibration_images=512, calibration_batch=128,
                                calibration_method="minmax", activation_type="uint8",
                                reduce_range=True, max_top1_drop=50.0))
    batches = ProgramBatches(tuple(sorted(set(batch_sizes))))
    return stage.Settings(RunConfig(seed=0, device="cpu", threads=1, distributed=ONE_PROCESS,
                                    profile="smoke"),
                          ExportConfig(**(export | export_overrides)), batches, EXECUTORCH)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export_executorch")
    dataset = make_synthetic(512, 24, 4, seed=0)
    save_prepared(dataset, root / "data" / "prepared.npz")
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    cost = model_cost(model)
    meta = {"classes": list(dataset.classes), "mean": list(dataset.mean),
            "std": list(dataset.std), "input_shape": [3, 32, 32], "dataset": dataset.name,
            "params": cost.params, "macs": cost.macs, "top1": 0.25}
    save_model(root / "models" / "student_final.pt", model, SPEC, meta)
    return root


def paths(root: Path) -> stage.Paths:
    return stage.Paths(root / "models" / "student_final.pt", root / "data" / "prepared.npz",
                       root / "artifacts")


@pytest.fixture(scope="module")
def result(workspace) -> dict:
    return stage.run(settings(), paths(workspace), "student_final")


@needs_executorch
@pytest.mark.slow
def test_one_program_per_precision_and_batch_size_each_with_a_card(workspace, result):
    folder = workspace / "artifacts" / "executorch" / "student_final"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"student_final.{p}.b{b}.{ext}" for p in ("fp32", "int8") for b in (1, 4)
        for ext in ("pte", "card.json"))
    for key, entry in result["files"].items():
        card = verified_card(entry["path"])
        assert card["precision"] == entry["precision"] and card["opset"] is None
        assert card["input"]["shape"] == [entry["batch_size"], 3, 32, 32]
        assert card["output"]["shape"] == [entry["batch_size"], 4]
        assert card["export"]["backend"] == "XNNPACK" and entry["delegated_nodes"] > 0, key
        assert card["metrics"]["executorch_top1"] == entry["top1"]
    assert "quantization" in verified_card(folder / "student_final.int8.b4.pte")["export"]
    assert not list((workspace / "artifacts" / "executorch").glob("*.tmp"))


@needs_executorch
@pytest.mark.slow
def test_fp32_programs_pass_the_fp32_gate_at_their_own_batch(result):
    assert result["status"] == "ok" and result["batch_sizes"] == [1, 4]
    gates = {**result["files"]["fp32.b1"]["parity"], **result["files"]["fp32.b4"]["parity"]}
    assert set(gates) == {"vs_torch_b1", "vs_torch_b4", "batch_consistency"}
    for gate in gates.values():
        assert gate["rel_diff"] <= 1e-4 and gate["top1_agreement"] == 1.0
        assert gate["images"] == 16
    assert result["int8_top1_drop_points"] == pytest.approx(
        100 * (result["files"]["fp32.b4"]["top1"] - result["files"]["int8.b4"]["top1"]))


@needs_executorch
@pytest.mark.slow
def test_a_failed_gate_writes_nothing(workspace, tmp_path):
    out = stage.Paths(workspace / "models" / "student_final.pt", workspace / "data" /
                      "prepared.npz", tmp_path)
    strict = settings((2,), int8=ParityTolerance(max_rel_diff=1e-7, min_top1_agreement=1.0))
    with pytest.raises(ParityError, match=r"student_final.int8.b2.pte vs torch at batch 2 on 16 "
                                          r"images: relative diff"):
        stage.run(strict, out, "student_final")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["executorch"]


def test_without_executorch_the_folder_is_empty_and_the_metrics_say_why(monkeypatch, tmp_path):
    for name in [n for n in sys.modules if n == "executorch" or n.startswith("executorch.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "executorch", None)
    folder = tmp_path / "artifacts" / "executorch" / "teacher"
    folder.mkdir(parents=True)
    (folder / "teacher.fp32.b1.pte").write_bytes(b"left by an earlier run")
    metrics = stage.run(settings(), stage.Paths(tmp_path / "missing.pt", tmp_path / "none.npz",
                                                tmp_path / "artifacts"), "teacher")
    assert metrics["status"] == "skipped" and "executorch is not installed" in metrics["reason"]
    assert list(folder.iterdir()) == []
