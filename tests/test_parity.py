"""Parity gates: the numbers they compute, and that each gate fails when it should."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from pipeline.config import ParityTolerance
from pipeline.errors import ParityError
from pipeline.export.onnx_export import clone, export_onnx, save_onnx
from pipeline.parity import (
    FP32_TOLERANCE,
    batched_logits,
    check_parity,
    compare_logits,
    consistency_gate,
    fixed_batch_predictor,
    measure_parity,
    reference_gates,
    runner_predictor,
    top1_accuracy,
    torch_predictor,
)
from targets.onnxruntime_cpu import OnnxRuntimeCpuSettings, OnnxRuntimeCpuTarget

RUNTIME = OnnxRuntimeCpuSettings(graph_optimization="all", intra_op_threads=1, inter_op_threads=1,
                               providers=("CPUExecutionProvider",))


class TinyCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return TinyCnn().eval()


@pytest.fixture(scope="module")
def exported(model) -> onnx.ModelProto:
    return export_onnx(model, (3, 32, 32), opset=18)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)


def onnx_logits(proto: onnx.ModelProto, images: np.ndarray, batch: int, tmp_path) -> np.ndarray:
    path = save_onnx(proto, tmp_path / "model.onnx")
    with OnnxRuntimeCpuTarget(RUNTIME).load(path) as runner:
        return batched_logits(runner_predictor(runner), images, batch)


def test_compare_logits_numbers():
    reference = np.array([[1.0, 2.0], [3.0, -4.0]])
    candidate = reference + np.array([[0.1, 0.0], [0.0, 0.0]])
    max_abs, rel, agreement = compare_logits(reference, candidate)
    assert max_abs == pytest.approx(0.1)
    assert rel == pytest.approx(0.1 / 4)
    assert agreement == 1.0
    flipped = np.array([[2.0, 1.0], [3.0, -4.0]])
    assert compare_logits(reference, flipped)[2] == 0.5
    assert compare_logits(np.zeros((1, 2)), np.zeros((1, 2))) == (0.0, 0.0, 1.0)
    assert compare_logits(np.zeros((1, 2)), np.ones((1, 2)))[1] == float("inf")


def test_shape_mismatch_is_a_parity_error():
    with pytest.raises(ParityError, match=r"reference \(2, 3\), candidate \(2, 4\)"):
        compare_logits(np.zeros((2, 3)), np.zeros((2, 4)))


def test_relative_gate_prints_measured_and_allowed_numbers():
    result = measure_parity(np.array([[1.0, 0.0]]), np.array([[1.001, 0.0]]), "torch", "x.onnx", 1)
    with pytest.raises(ParityError, match=r"x.onnx vs torch at batch 1 on 1 images: relative "
                                          r"diff 1\.000e-03 exceeds the allowed 1\.000e-04"):
        check_parity(result, FP32_TOLERANCE)
    assert check_parity(result, ParityTolerance(max_rel_diff=1e-2, min_top1_agreement=1.0))


def test_agreement_gate_prints_both_percentages():
    reference = np.array([[1.0, 0.99], [1.0, 0.0]])
    candidate = np.array([[0.99, 1.0], [1.0, 0.0]])  # tiny change, one top-1 flips
    result = measure_parity(reference, candidate, "torch", "y.onnx", 2)
    with pytest.raises(ParityError, match=r"top-1 agreement 50\.00% is below the required "
                                          r"99\.00%"):
        check_parity(result, ParityTolerance(max_rel_diff=0.1, min_top1_agreement=0.99))


def test_nan_logits_fail_the_gate():
    result = measure_parity(np.ones((2, 3)), np.full((2, 3), np.nan), "torch", "nan.onnx", 2)
    with pytest.raises(ParityError, match="relative diff nan"):
        check_parity(result, ParityTolerance(max_rel_diff=1e9, min_top1_agreement=1e-9))


def test_runner_returning_shifted_logits_fails(model, images):
    class ShiftedRunner:
        def infer(self, feeds):
            return {"logits": torch_predictor(model)(feeds["input"]) + 0.01}

    reference = batched_logits(torch_predictor(model), images, 64)
    shifted = batched_logits(runner_predictor(ShiftedRunner()), images, 64)
    with pytest.raises(ParityError, match="relative diff"):
        check_parity(measure_parity(reference, shifted, "torch", "shifted", 64), FP32_TOLERANCE)


@pytest.mark.parametrize("batch", [1, 64])
def test_exported_model_passes_the_fp32_gate(model, exported, images, batch, tmp_path):
    reference = batched_logits(torch_predictor(model), images, batch)
    candidate = onnx_logits(exported, images, batch, tmp_path)
    result = check_parity(measure_parity(reference, candidate, "torch", "onnx", batch),
                          FP32_TOLERANCE)
    assert result.images == 64 and result.top1_agreement == 1.0


def test_one_perturbed_onnx_weight_fails_the_fp32_gate(model, exported, images, tmp_path):
    perturbed = clone(exported)
    weights = max(perturbed.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    array = numpy_helper.to_array(weights).copy()
    array.flat[0] += 0.05  # one weight of the largest tensor (the second conv)
    weights.CopyFrom(numpy_helper.from_array(array, weights.name))
    reference = batched_logits(torch_predictor(model), images, 64)
    candidate = onnx_logits(perturbed, images, 64, tmp_path)
    with pytest.raises(ParityError, match="relative diff .* exceeds the allowed 1.000e-04"):
        check_parity(measure_parity(reference, candidate, "torch", "perturbed", 64),
                     FP32_TOLERANCE)


def test_batched_logits_covers_a_ragged_last_batch(model, images):
    predict = torch_predictor(model)
    whole = predict(images[:10])
    in_threes = batched_logits(predict, images[:10], 3)
    assert in_threes.shape == (10, 3)
    np.testing.assert_allclose(in_threes, whole, rtol=0, atol=1e-5)
    with pytest.raises(ParityError, match="batch size must be >= 1"):
        batched_logits(predict, images, 0)


def test_top1_accuracy():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert top1_accuracy(logits, np.array([1, 0, 0])) == pytest.approx(2 / 3)
    with pytest.raises(ParityError, match="3 logit rows for 2 labels"):
        top1_accuracy(logits, np.array([1, 0]))


def test_torch_predictor_refuses_a_model_in_training_mode():
    with pytest.raises(ParityError, match="training mode"):
        torch_predictor(TinyCnn().train())


def test_batch_consistency_gate_fails_on_batch_dependent_results():
    together = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    alone = together.copy()
    alone[7] += 0.5  # one sample changes when it runs alone
    with pytest.raises(ParityError, match=r"m.onnx vs m.onnx@batch64 at batch 1"):
        consistency_gate("m.onnx", {1: alone, 64: together}, FP32_TOLERANCE)
    passed = consistency_gate("m.onnx", {1: together, 64: together}, FP32_TOLERANCE)
    assert passed["batch_consistency"]["rel_diff"] == 0.0


def test_reference_gates_are_keyed_by_reference_and_batch():
    logits = np.random.default_rng(0).standard_normal((8, 4))
    gates = reference_gates("m.xml", {1: logits, 4: logits}, {1: logits, 4: logits},
                            "onnxruntime", FP32_TOLERANCE)
    assert set(gates) == {"vs_onnxruntime_b1", "vs_onnxruntime_b4"}
    with pytest.raises(ParityError, match="m.xml vs onnxruntime at batch 4"):
        reference_gates("m.xml", {4: logits + 1}, {4: logits}, "onnxruntime", FP32_TOLERANCE)


def test_fixed_batch_predictor_pads_the_tail_and_drops_the_padding():
    seen = []

    def predict(images):
        seen.append(len(images))
        assert len(images) == 4, "a fixed-batch runtime only takes its batch"
        return images.reshape(len(images), -1)[:, :2] * 2

    images = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    logits = batched_logits(fixed_batch_predictor(predict, 4), images, 4)
    assert seen == [4, 4, 4] and logits.shape == (10, 2)
    np.testing.assert_array_equal(logits, images[:, :2] * 2)
