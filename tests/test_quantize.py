"""FP16 and INT8 (QDQ, per-channel) variants of a tiny CNN, calibrated on 512 synthetic images."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from pydantic import ValidationError
from torch import nn

from pipeline.config import QuantizeConfig
from pipeline.data import make_synthetic, normalize
from pipeline.errors import ExportError, ParityError
from pipeline.export.onnx_export import export_onnx, tensor_dims
from pipeline.export.qdq import QDQ_OPS, audit, precision_problems
from pipeline.export.quantize import (
    ImageBatches,
    check_tensorrt_int8,
    convert_fp16,
    quantize_int8,
    quantize_int8_with_tensorrt,
)
from pipeline.export.simplify import simplify
from pipeline.parity import check_int8_drop, compare_logits


def quantize_config(**overrides) -> QuantizeConfig:
    values = dict(calibration_images=512, calibration_batch=128, calibration_method="minmax",
                  activation_type="uint8", reduce_range=False, max_top1_drop=1.0)
    return QuantizeConfig(**(values | overrides))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """(512 calibration images, 64 test images), normalised like a trained model expects."""
    dataset = make_synthetic(512, 64, 3, seed=0)
    mean = torch.tensor(dataset.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (normalize(dataset.train.images, mean, std).numpy(),
            normalize(dataset.test.images, mean, std).numpy())


@pytest.fixture(scope="module")
def fp32() -> onnx.ModelProto:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)).eval()
    return simplify(export_onnx(model, (3, 32, 32), opset=18), "onnxsim")[0]


def run(proto: onnx.ModelProto, images: np.ndarray, as_written: bool = False) -> np.ndarray:
    """Logits through ONNX Runtime; `as_written`: graph optimisation off, so QDQ pairs run as
    written (the TensorRT file's arithmetic; fused int8 kernels saturate on CPUs without VNNI,
    targets.onnxruntime_cpu.qdq_reference)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if as_written:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": images})[0]


def initializer(proto: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == name)


def test_fp16_keeps_float32_io_and_stores_fp16_weights(fp32, data):
    fp16 = convert_fp16(fp32)
    for value in (fp16.graph.input[0], fp16.graph.output[0]):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert tensor_dims(fp16.graph.input[0]) == ["batch", 3, 32, 32]
    conv_weights = [t for t in fp16.graph.initializer if len(t.dims) == 4]
    assert conv_weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in conv_weights)
    onnx.checker.check_model(fp16, full_check=True)  # topologically sorted after conversion
    images = data[1]
    _, rel, agreement = compare_logits(run(fp32, images), run(fp16, images))
    assert rel < 1e-2 and agreement >= 0.95


@pytest.mark.parametrize("activation_type, zero_point_type", [("uint8", np.uint8),
                                                               ("int8", np.int8)])
def test_int8_is_qdq_with_per_channel_weights(fp32, data, activation_type, zero_point_type):
    int8 = quantize_int8(fp32, data[0], quantize_config(activation_type=activation_type))
    ops = [node.op_type for node in int8.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    assert "QLinearConv" not in ops  # QDQ format, not the operator format
    convs = [node for node in int8.graph.node if node.op_type == "Conv"]
    producers = {out: node for node in int8.graph.node for out in node.output}
    for conv in convs:
        weight_dq = producers[conv.input[1]]
        assert weight_dq.op_type == "DequantizeLinear"
        scales = initializer(int8, weight_dq.input[1])
        out_channels = initializer(int8, weight_dq.input[0]).shape[0]
        assert scales.shape == (out_channels,)  # one scale per output channel
        assert initializer(int8, weight_dq.input[0]).dtype == np.int8
    activation_q = next(node for node in int8.graph.node if node.op_type == "QuantizeLinear")
    assert initializer(int8, activation_q.input[2]).dtype == zero_point_type
    assert int8.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    _, rel, agreement = compare_logits(run(fp32, data[1]), run(int8, data[1]))
    assert rel < 0.1 and agreement >= 0.9


def activation_scales(int8: onnx.ModelProto) -> list[float]:
    return [float(initializer(int8, node.input[1])) for node in int8.graph.node
            if node.op_type == "QuantizeLinear"]


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods_choose_their_own_ranges(fp32, data, method):
    minmax = quantize_int8(fp32, data[0], quantize_config(calibration_method="minmax"))
    int8 = quantize_int8(fp32, data[0], quantize_config(calibration_method=method))
    # ONNX Runtime's own entropy defaults give exactly the minmax ranges; ours must not.
    assert len(activation_scales(int8)) == len(activation_scales(minmax)) > 0
    assert activation_scales(int8) != activation_scales(minmax)
    _, rel, agreement = compare_logits(run(fp32, data[1]), run(int8, data[1]))
    assert rel < 0.2 and agreement >= 0.8


def test_too_few_calibration_images_is_an_error(fp32, data):
    with pytest.raises(ExportError, match="calibration needs 512 images .* got 100"):
        quantize_int8(fp32, data[0][:100], quantize_config())


def test_config_requires_at_least_512_calibration_images():
    with pytest.raises(ValidationError, match="greater than or equal to 512"):
        quantize_config(calibration_images=256)


def test_image_batches_cover_every_image_once():
    images = np.arange(10 * 3, dtype=np.float32).reshape(10, 3, 1, 1)
    reader = ImageBatches(images, 4)
    batches = []
    while (feed := reader.get_next()) is not None:
        batches.append(feed["input"])
    assert [len(b) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), images)


def test_int8_accuracy_drop_limit():
    assert check_int8_drop(0.90, 0.895, 1.0) == pytest.approx(0.5)
    assert check_int8_drop(0.90, 0.92, 0.0) == pytest.approx(-2.0)  # a gain is fine
    with pytest.raises(ParityError, match=r"INT8 top-1 88\.00% is 2\.00 points below FP32 "
                                          r"90\.00%; allowed drop is 1\.00 points"):
        check_int8_drop(0.90, 0.88, 1.0)


# --- the INT8 file for TensorRT (pipeline.export.qdq says what its ONNX parser takes) ---

def test_tensorrt_int8_is_symmetric_signed_with_float_biases(fp32, data):
    cpu, trt = quantize_int8_with_tensorrt(fp32, data[0], quantize_config(reduce_range=True))
    report = audit(trt)
    assert report.qdq_nodes > 0 and report.tensorrt_problems() == []
    zero_points = [initializer(trt, node.input[2]) for node in trt.graph.node
                   if node.op_type in QDQ_OPS and len(node.input) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    conv_biases = [initializer(trt, node.input[2]) for node in trt.graph.node
                   if node.op_type == "Conv" and len(node.input) > 2]
    assert conv_biases and all(b.dtype == np.float32 for b in conv_biases)
    assert "Relu" in [node.op_type for node in trt.graph.node]  # kept when symmetric
    # The CPU file is untouched by the second quantisation: same as quantize_int8's.
    alone = quantize_int8(fp32, data[0], quantize_config(reduce_range=True))
    assert cpu.SerializeToString() == alone.SerializeToString()
    _, rel, agreement = compare_logits(run(fp32, data[1]), run(trt, data[1], as_written=True))
    assert rel < 0.1 and agreement >= 0.9


def test_audit_names_what_tensorrt_refuses_in_the_cpu_file(fp32, data):
    cpu = quantize_int8(fp32, data[0], quantize_config(activation_type="uint8"))
    report = audit(cpu)
    assert report.uint8 and report.nonzero_zero_point and report.int32_dequantize
    problems = precision_problems(report, "int8")
    assert len(problems) == 3
    assert "UINT8" in problems[0] and "symmetric" in problems[1] and "INT32" in problems[2]
    with pytest.raises(ExportError, match="not buildable by TensorRT: .*UINT8"):
        check_tensorrt_int8(cpu)


def test_audit_checks_the_label_against_the_content(fp32, data):
    assert precision_problems(audit(fp32), "fp32") == []
    assert "no QuantizeLinear" in precision_problems(audit(fp32), "int8")[0]
    assert "no float16" in precision_problems(audit(fp32), "fp16")[0]
    fp16 = convert_fp16(fp32)
    assert audit(fp16).fp16_tensors > 0 and precision_problems(audit(fp16), "fp16") == []
    assert "labelled fp32 but holds 0 Q/DQ node(s) and" in precision_problems(audit(fp16),
                                                                              "fp32")[0]
