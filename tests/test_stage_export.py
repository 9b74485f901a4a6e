"""The export stage end to end on a tiny ResNet20 and synthetic data (512 train, 64 test)."""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import stages.export as export_stage
from pipeline.checkpoint import save_model
from pipeline.config import ExportConfig, ParityTolerance, QuantizeConfig, as_dict
from pipeline.data import make_synthetic, save_prepared
from pipeline.errors import DataError, ParityError
from pipeline.export.cards import card_path, load_verified_onnx
from pipeline.export.qdq import audit, precision_problems
from pipeline.flops import model_cost
from pipeline.io import write_json
from pipeline.models import build_model
from targets.onnxruntime_cpu import OnnxRuntimeCpuSettings

SHIPPED = ("fp32", "fp16", "int8")
VARIANT_STEMS = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int8_trt": "int8.trt"}
RUNTIME = OnnxRuntimeCpuSettings(graph_optimization="all", intra_op_threads=1, inter_op_threads=1,
                                 providers=("CPUExecutionProvider",))
SPEC = {"arch": "resnet20", "num_classes": 4, "base_width": 4}


def export_config(**overrides) -> ExportConfig:
    values = dict(
        opset=18, simplifier="onnxsim", parity_images=64, parity_batch=64, eval_batch=32,
        fp16=ParityTolerance(max_rel_diff=1e-2, min_top1_agreement=0.95),
        int8=ParityTolerance(max_rel_diff=0.25, min_top1_agreement=0.8),
        quantize=QuantizeConfig(calibration_images=512, calibration_batch=128,
                                calibration_method="percentile", activation_type="uint8",
                                reduce_range=True, max_top1_drop=25.0))
    return ExportConfig(**(values | overrides))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    dataset = make_synthetic(512, 64, 4, seed=0)
    save_prepared(dataset, root / "data" / "prepared.npz")
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    cost = model_cost(model)
    meta = {"classes": list(dataset.classes), "mean": list(dataset.mean),
            "std": list(dataset.std), "input_shape": [3, 32, 32], "dataset": dataset.name,
            "params": cost.params, "macs": cost.macs, "top1": 0.25}
    save_model(root / "models" / "student_final_pdd.pt", model, SPEC, meta)
    return root


@pytest.fixture(scope="module")
def result(workspace) -> dict:
    return export_stage.run(export_config(), RUNTIME, workspace / "models" / "student_final_pdd.pt",
                            workspace / "data" / "prepared.npz", workspace / "artifacts")


def test_every_shipped_file_is_written_with_a_card_that_verifies(workspace, result):
    shipped = sorted(path.name for path in (workspace / "artifacts").iterdir())
    assert shipped == sorted(f"student_final_pdd.{p}.{ext}" for p in (*SHIPPED, "int8.trt")
                             for ext in ("onnx", "card.json"))
    for variant, stem in VARIANT_STEMS.items():
        path = workspace / "artifacts" / f"student_final_pdd.{stem}.onnx"
        verified = load_verified_onnx(path)
        assert verified.card["precision"] == stem.split(".")[0]
        assert verified.card["model"] == "student_final_pdd" and verified.card["opset"] == 18
        assert verified.card["metrics"]["onnxruntime_top1"] == result["files"][variant]["top1"]
        assert card_path(path).name == f"student_final_pdd.{stem}.card.json"
    assert result["files"]["exported"]["path"] is None  # checked, then dropped


def test_the_tensorrt_int8_file_is_one_tensorrt_parses(workspace, result):
    trt = workspace / "artifacts" / "student_final_pdd.int8.trt.onnx"
    assert precision_problems(audit(trt), "int8") == []
    cpu_file = workspace / "artifacts" / "student_final_pdd.int8.onnx"
    cpu_problems = precision_problems(audit(cpu_file), "int8")
    assert any("UINT8" in problem for problem in cpu_problems)
    card = load_verified_onnx(trt).card
    assert card["export"]["quantization"]["extra_options"]["QuantizeBias"] is False
    assert card["export"]["derived_from"] == "student_final_pdd.fp32.onnx"
    assert result["int8_trt_top1_drop_points"] == pytest.approx(
        100 * (result["files"]["fp32"]["top1"] - result["files"]["int8_trt"]["top1"]))
    assert result["files"]["int8_trt"]["parity"]["vs_torch_b64"]["images"] == 64


def test_metrics_hold_parity_node_counts_sizes_and_accuracy(result):
    assert result["model"] == "student_final_pdd" and result["parity_batches"] == [1, 64]
    assert result["simplify"]["nodes_before"] == result["files"]["exported"]["nodes"] == 58
    assert result["simplify"]["nodes_after"] == result["files"]["fp32"]["nodes"] == 56
    for variant, entry in result["files"].items():
        assert entry["size_bytes"] > 0 and 0 <= entry["top1"] <= 1
        gates = {"vs_torch_b1", "vs_torch_b64", "batch_consistency"}
        assert gates <= set(entry["parity"]), variant
        assert entry["parity"]["vs_torch_b1"]["images"] == 64
    for variant in ("exported", "fp32"):
        for gate in result["files"][variant]["parity"].values():
            assert gate["rel_diff"] <= 1e-4 and gate["top1_agreement"] == 1.0
    assert result["files"]["fp32"]["parity"]["vs_exported_b64"]["rel_diff"] <= 1e-4
    assert result["files"]["fp16"]["size_bytes"] < result["files"]["fp32"]["size_bytes"]
    assert result["int8_top1_drop_points"] == pytest.approx(
        100 * (result["files"]["fp32"]["top1"] - result["files"]["int8"]["top1"]))
    assert json.loads(json.dumps(result)) == result  # plain JSON for metrics/export_<m>.json


@pytest.mark.parametrize("precision", SHIPPED)
def test_each_file_gives_the_same_per_sample_results_at_batch_1_and_64(workspace, result,
                                                                      precision):
    session = ort.InferenceSession(str(workspace / "artifacts" /
                                       f"student_final_pdd.{precision}.onnx"),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)
    together = session.run(["logits"], {"input": x})[0]
    alone = np.concatenate([session.run(["logits"], {"input": x[i:i + 1]})[0]
                            for i in range(64)])
    scale = np.abs(together).max()
    assert np.abs(alone - together).max() / scale <= 1e-4
    assert (alone.argmax(1) == together.argmax(1)).all()


@pytest.mark.slow  # a second full export (~10 s on 2 cores)
def test_a_failed_gate_stops_the_stage_before_any_card(workspace, tmp_path):
    strict_fp16 = export_config(fp16=ParityTolerance(max_rel_diff=1e-7, min_top1_agreement=1.0))
    with pytest.raises(ParityError, match=r"student_final_pdd.fp16.onnx vs torch at batch 1 on 64 "
                                          r"images: relative diff .* exceeds the allowed "
                                          r"1\.000e-07"):
        export_stage.run(strict_fp16, RUNTIME, workspace / "models" / "student_final_pdd.pt",
                         workspace / "data" / "prepared.npz", tmp_path)
    assert (tmp_path / "student_final_pdd.fp16.onnx").is_file()
    assert not list(tmp_path.glob("*.card.json"))


def test_too_few_training_images_for_calibration(workspace, tmp_path):
    config = export_config(quantize=QuantizeConfig(
        calibration_images=1024, calibration_batch=128, calibration_method="minmax",
        activation_type="uint8", reduce_range=False, max_top1_drop=1.0))
    with pytest.raises(DataError, match="calibration needs 1024 training images .* has 512"):
        export_stage.run(config, RUNTIME, workspace / "models" / "student_final_pdd.pt",
                         workspace / "data" / "prepared.npz", tmp_path)


def test_dataset_with_other_classes_is_refused(workspace, tmp_path):
    save_prepared(make_synthetic(512, 8, 3, seed=0), tmp_path / "other.npz")
    with pytest.raises(DataError, match="expected the same"):
        export_stage.run(export_config(), RUNTIME, workspace / "models" / "student_final_pdd.pt",
                         tmp_path / "other.npz", tmp_path)


def test_parity_images_must_cover_the_large_batch():
    with pytest.raises(ValueError, match="parity_images=32 must be >= parity_batch=64"):
        export_config(parity_images=32)


def test_main_reads_resolved_settings_and_writes_the_metrics_file(tmp_path, monkeypatch):
    calls = {}

    def fake_run(cfg, runtime, model_path, dataset_path, out_dir, name):
        calls.update(cfg=cfg, runtime=runtime, model=model_path, data=dataset_path, out=out_dir,
                     name=name)
        return {"model": name}

    config = export_config()
    common = {"profile": "smoke", "seed": 0, "device": "cpu", "threads": 1,
              "distributed": {"nproc_per_node": 1, "nnodes": 1, "rdzv_endpoint": "",
                              "sync_batchnorm": True, "max_restarts": 0, "timeout_s": 600}}
    for stem, content in {"common": common, "export": as_dict(config),
                          "targets/onnxruntime-cpu": as_dict(RUNTIME)}.items():
        write_json(tmp_path / "resolved" / f"{stem}.json", content)
    monkeypatch.setattr(export_stage, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["export", "--name", "teacher"])
    export_stage.main()
    assert calls == {"cfg": config, "runtime": RUNTIME, "model": Path("models/teacher.pt"),
                     "data": Path("data/prepared.npz"), "out": Path("artifacts"),
                     "name": "teacher"}
    assert json.loads((tmp_path / "metrics" / "export_teacher.json").read_text()) == {
        "model": "teacher"}


def test_the_tensorrt_int8_file_is_checked_as_written_not_through_fused_int8_kernels():
    """ONNX Runtime's fused int8 kernels saturate on CPUs without VNNI (16-bit pair sums) with
    the TensorRT file's full-range weights; its gates must see the QDQ arithmetic TensorRT
    runs, whichever CPU checks it."""
    checked = export_stage.verifying_target("int8_trt", RUNTIME).settings
    assert checked.graph_optimization == "disable"
    assert (checked.intra_op_threads, checked.providers) == (1, ("CPUExecutionProvider",))
    for variant in ("exported", "fp32", "fp16", "int8"):
        assert export_stage.verifying_target(variant, RUNTIME).settings == RUNTIME


def test_the_tensorrt_int8_top1_is_the_files_own_qdq_arithmetic(workspace, result):
    from pipeline.data import load_prepared, normalize  # noqa: PLC0415 - this test only

    dataset = load_prepared(workspace / "data" / "prepared.npz")
    mean = torch.tensor(dataset.mean).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std).view(1, -1, 1, 1)
    images = normalize(dataset.test.images, mean, std).numpy()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        str(workspace / "artifacts" / "student_final_pdd.int8.trt.onnx"), options,
        providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    top1 = float((logits.argmax(1) == dataset.test.labels.numpy()).mean())
    assert result["files"]["int8_trt"]["top1"] == pytest.approx(top1)
