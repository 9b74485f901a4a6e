"""The ONNX Runtime CPU target: providers, optimised artifacts, input checks, dynamic batch."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from pipeline.errors import (
    ArtifactIntegrityError,
    BuildError,
    ConfigError,
    FeedError,
    TargetUnavailable,
)
from pipeline.export.onnx_export import save_onnx
from pipeline.export.quantize import convert_fp16
from targets.base import Target
from targets.onnxruntime_cpu import OnnxRuntimeCpuSettings, OnnxRuntimeCpuTarget
from targets.registry import make_target, target_class, target_names


def settings(**overrides) -> OnnxRuntimeCpuSettings:
    values = dict(graph_optimization="all", intra_op_threads=1, inter_op_threads=1,
                  providers=("CPUExecutionProvider",))
    return OnnxRuntimeCpuSettings(**(values | overrides))


def conv_model() -> onnx.ModelProto:
    """Conv + Relu + pool + Gemm by hand: enough for every optimisation level to change it."""
    rng = np.random.default_rng(0)
    weights = [helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3],
                                  rng.standard_normal(108).astype(np.float32)),
               helper.make_tensor("fc_w", TensorProto.FLOAT, [4, 3],
                                  rng.standard_normal(12).astype(np.float32)),
               helper.make_tensor("fc_b", TensorProto.FLOAT, [3], [0.1, -0.2, 0.3])]
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                      ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                             ir_version=10)  # ONNX Runtime 1.31 reads IR <= 13


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return save_onnx(conv_model(), tmp_path_factory.mktemp("ort") / "tiny.onnx")


def batch(count: int) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((count, 3, 32, 32)).astype(np.float32)


def test_registry_maps_names_to_target_classes():
    assert target_class("onnxruntime-cpu") is OnnxRuntimeCpuTarget
    for name in target_names():
        cls = target_class(name)
        assert issubclass(cls, Target) and cls.name == name
        assert cls.settings_key and cls.Settings is not None
    with pytest.raises(ConfigError, match="unknown target 'no-such-target'"):
        target_class("no-such-target")


def test_the_factory_validates_settings_against_the_targets_schema():
    target = make_target("onnxruntime-cpu", {"graph_optimization": "all", "intra_op_threads": 1,
                                             "inter_op_threads": 1,
                                             "providers": ["CPUExecutionProvider"]})
    assert isinstance(target, OnnxRuntimeCpuTarget) and target.threads == 1
    with pytest.raises(ConfigError, match=r"runtimes\.onnxruntime\.intra_op_threads: .*greater"):
        make_target("onnxruntime-cpu", {"graph_optimization": "all", "intra_op_threads": -1,
                                        "inter_op_threads": 1,
                                        "providers": ["CPUExecutionProvider"]})


def test_importing_the_registry_loads_no_target_module():
    code = ("import sys, targets.registry; "
            "print(sorted(m for m in sys.modules if m.startswith('targets')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "['targets', 'targets.base', 'targets.registry']"


def test_declares_what_it_supports():
    assert OnnxRuntimeCpuTarget.precisions == ("fp32", "fp16", "int8")
    assert OnnxRuntimeCpuTarget.dynamic_batch is True
    assert OnnxRuntimeCpuTarget(settings()).available() == (True, "")


def test_absent_provider_is_reported_and_refused(model_path, tmp_path):
    target = OnnxRuntimeCpuTarget(settings(providers=("NoSuchExecutionProvider",
                                                      "CPUExecutionProvider")))
    ok, reason = target.available()
    assert not ok and "['NoSuchExecutionProvider'] requested but not in this onnxruntime" in reason
    with pytest.raises(TargetUnavailable, match="NoSuchExecutionProvider"):
        target.build(model_path, tmp_path)
    with pytest.raises(TargetUnavailable, match="NoSuchExecutionProvider"):
        target.load(model_path)


def test_provider_dropped_by_the_session_is_an_error(model_path, monkeypatch):
    class SessionWithoutFake:
        def __init__(self, path, options, providers):
            self.requested = providers

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["FakeExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", SessionWithoutFake)
    target = OnnxRuntimeCpuTarget(settings(providers=("FakeExecutionProvider",
                                                      "CPUExecutionProvider")))
    with pytest.raises(TargetUnavailable, match=r"dropped execution provider\(s\) "
                                                r"\['FakeExecutionProvider'\]"):
        target.load(model_path)


@pytest.mark.parametrize("level", ["disable", "basic", "extended", "all"])
def test_build_saves_the_optimised_graph_that_computes_the_same(model_path, tmp_path, level):
    target = OnnxRuntimeCpuTarget(settings(graph_optimization=level))
    artifact = target.build(model_path, tmp_path / "built")
    assert artifact == tmp_path / "built" / "tiny.onnxruntime-cpu.onnx"
    assert artifact.stat().st_size > 0 and not list(artifact.parent.glob("*.tmp"))
    optimised = onnx.load(artifact)
    if level in ("extended", "all"):  # Conv + Relu fused by ONNX Runtime
        assert "Relu" not in [node.op_type for node in optimised.graph.node]
    with target.load(model_path) as source, target.load(artifact) as built:
        x = batch(4)
        np.testing.assert_allclose(built.infer({"input": x})["logits"],
                                   source.infer({"input": x})["logits"], rtol=1e-5, atol=1e-5)


def test_session_options_come_from_the_settings(model_path):
    target = OnnxRuntimeCpuTarget(settings(graph_optimization="basic", intra_op_threads=2,
                                           inter_op_threads=1))
    with target.load(model_path) as runner:
        options = runner._session.get_session_options()
        assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
        assert options.graph_optimization_level == \
            onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
        assert runner.providers == ["CPUExecutionProvider"]


def test_runner_reports_its_input_with_a_dynamic_batch(model_path):
    with OnnxRuntimeCpuTarget(settings()).load(model_path) as runner:
        (spec,) = runner.inputs
        assert (spec.name, spec.dtype, spec.shape) == ("input", np.dtype(np.float32),
                                                       ("batch", 3, 32, 32))


def test_batch_1_and_batch_64_give_the_same_per_sample_results(model_path):
    x = batch(64)
    with OnnxRuntimeCpuTarget(settings()).load(model_path) as runner:
        together = runner.infer({"input": x})["logits"]
        one_by_one = np.concatenate([runner.infer({"input": x[i:i + 1]})["logits"]
                                     for i in range(64)])
    assert together.shape == (64, 3)
    np.testing.assert_allclose(one_by_one, together, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("feeds, message", [
    ({"input": batch(2).astype(np.float64)}, "has dtype float64, expected float32"),
    ({"image": batch(2)}, r"inputs \['image'\] given, expected \['input'\]"),
    ({"input": batch(2)[:, :, :28]}, r"has shape \(2, 3, 28, 32\), expected \('batch', 3, 32"),
    ({"input": batch(2)[0]}, r"has shape \(3, 32, 32\)"),
    ({"input": [[0.0]]}, "not numpy arrays"),
])
def test_runner_checks_feeds_before_running(model_path, feeds, message):
    with OnnxRuntimeCpuTarget(settings()).load(model_path) as runner, \
            pytest.raises(FeedError, match=message):
        runner.infer(feeds)


def test_fp16_file_runs_with_float32_io(model_path, tmp_path):
    fp16_path = save_onnx(convert_fp16(onnx.load(model_path)), tmp_path / "tiny.fp16.onnx")
    target = OnnxRuntimeCpuTarget(settings())
    with target.load(model_path) as fp32, target.load(fp16_path) as fp16:
        x = batch(8)
        assert fp16.inputs[0].dtype == np.float32
        np.testing.assert_allclose(fp16.infer({"input": x})["logits"],
                                   fp32.infer({"input": x})["logits"], rtol=0, atol=2e-2)


def test_unloadable_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model at all")
    target = OnnxRuntimeCpuTarget(settings())
    with pytest.raises(ArtifactIntegrityError, match="not a valid ONNX model"):
        target.load(garbage)  # parsed for its external-data files before ONNX Runtime sees it
    with pytest.raises(BuildError, match="ONNX file not found"):
        target.build(tmp_path / "missing.onnx", tmp_path)


def test_closed_runner_refuses_to_run(model_path):
    runner = OnnxRuntimeCpuTarget(settings()).load(model_path)
    runner.close()
    with pytest.raises(BuildError, match="is closed"):
        runner.infer({"input": batch(1)})
