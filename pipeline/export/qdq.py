"""What precision an ONNX graph really computes in, and whether TensorRT's ONNX parser takes it.

TensorRT 11 builds only strongly typed networks (10.x offers the same mode), so an engine's
precision is whatever the ONNX file holds: FP16 initializers/Casts, or explicit
QuantizeLinear/DequantizeLinear pairs. A mislabelled file would silently give an engine of
another precision, so the file is audited before a build, on the CPU, without TensorRT.

What the parser refuses (onnx-tensorrt 10.1-GA onnxOpImporters.cpp QuantDequantLinearHelper and
docs/operators.md; the same checks in TensorRT 10.x and 11.x):
- UINT8 Q/DQ ("Found unsupported input type of UINT8"): ONNX Runtime's U8S8 files;
- non-zero zero points ("TensorRT only supports symmetric quantization");
- DequantizeLinear of an INT32 tensor (ONNX Runtime's quantized Conv bias, QuantizeBias=True).
"""

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class QdqReport:
    """Counts of the precision-bearing parts of a graph, and the Q/DQ nodes TensorRT refuses."""

    quantize_nodes: int = 0
    dequantize_nodes: int = 0
    fp16_tensors: int = 0  # float16 initializers + Cast(to=FLOAT16) nodes
    uint8: list[str] = field(default_factory=list)  # Q/DQ nodes with UINT8 data or zero point
    nonzero_zero_point: list[str] = field(default_factory=list)
    int32_dequantize: list[str] = field(default_factory=list)

    @property
    def qdq_nodes(self) -> int:
        return self.quantize_nodes + self.dequantize_nodes

    def tensorrt_problems(self) -> list[str]:
        """Why TensorRT's ONNX parser would refuse the graph; [] when it takes it."""
        problems = []
        if self.uint8:
            problems.append(f"{len(self.uint8)} Q/DQ node(s) on UINT8 (e.g. {self.uint8[0]!r}): "
                            "TensorRT quantizes to signed INT8 only (activation_type int8)")
        if self.nonzero_zero_point:
            problems.append(f"{len(self.nonzero_zero_point)} Q/DQ node(s) with a non-zero zero "
                            f"point (e.g. {self.nonzero_zero_point[0]!r}): TensorRT needs "
                            "symmetric quantization (ActivationSymmetric, WeightSymmetric)")
        if self.int32_dequantize:
            problems.append(f"{len(self.int32_dequantize)} DequantizeLinear node(s) on INT32 "
                            f"(e.g. {self.int32_dequantize[0]!r}, a quantized bias): TensorRT "
                            "dequantizes INT8 only (QuantizeBias False)")
        return problems


def _element_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {info.name: info.type.tensor_type.elem_type
             for info in [*graph.input, *graph.output, *graph.value_info]}
    types.update({init.name: init.data_type for init in graph.initializer})
    return types


def _is_fp16_cast(node: onnx.NodeProto) -> bool:
    return node.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT16
                                          for a in node.attribute)


def _audit_qdq(node: onnx.NodeProto, types: dict[str, int],
               initializers: dict[str, onnx.TensorProto], report: QdqReport) -> None:
    label = node.name or f"{node.op_type}->{node.output[0] if node.output else '?'}"
    data_type = types.get(node.input[0])
    if node.op_type == "QuantizeLinear":
        report.quantize_nodes += 1
    else:
        report.dequantize_nodes += 1
        if data_type == TensorProto.INT32:
            report.int32_dequantize.append(label)
    zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
    zero_type = types.get(zero_point) if zero_point else None
    dequantized = data_type if node.op_type == "DequantizeLinear" else None
    if TensorProto.UINT8 in (zero_type, dequantized):
        report.uint8.append(label)
    # An INT32 (bias) zero point is always 0; others are read when they are initializers,
    # which is how ONNX Runtime writes them.
    if zero_point in initializers and zero_type != TensorProto.INT32 and \
            np.any(numpy_helper.to_array(initializers[zero_point]) != 0):
        report.nonzero_zero_point.append(label)


def audit(model: onnx.ModelProto | str | os.PathLike) -> QdqReport:
    """Count Q/DQ and FP16 content of a model (or file, read without external weights)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model), load_external_data=False)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    types = _element_types(graph)
    report = QdqReport(fp16_tensors=sum(init.data_type == TensorProto.FLOAT16
                                        for init in graph.initializer))
    for node in graph.node:
        report.fp16_tensors += _is_fp16_cast(node)
        if node.op_type in QDQ_OPS:
            _audit_qdq(node, types, initializers, report)
    return report


def precision_problems(report: QdqReport, precision: str) -> list[str]:
    """Why a graph is not a `precision` graph that TensorRT can build; [] when it is."""
    problems = []
    if precision == "int8" and not report.qdq_nodes:
        problems.append("labelled int8 but has no QuantizeLinear/DequantizeLinear nodes "
                        "(TensorRT has no implicit INT8: quantize the ONNX first)")
    if precision == "fp16" and not report.fp16_tensors:
        problems.append("labelled fp16 but holds no float16 initializer or Cast to float16 "
                        "(a strongly typed build would run it in FP32)")
    if precision == "fp32" and (report.qdq_nodes or report.fp16_tensors):
        problems.append(f"labelled fp32 but holds {report.qdq_nodes} Q/DQ node(s) and "
                        f"{report.fp16_tensors} float16 tensor(s)")
    return problems + report.tensorrt_problems()
