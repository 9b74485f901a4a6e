"""Probe models for latency tables: the small ONNX graphs a table row is timed with.

The exporter folds BatchNorm into the conv and onnxsim leaves Conv(W, b) -> Relu, so a layer is
exactly that graph, built with onnx.helper in about a millisecond (a dynamo export per probe
would take seconds, for hundreds of probes). A row is the *difference* of two probes, a lead-in
conv followed by the layer minus the lead-in alone: a layer on its own would also pay for
converting its input and output between NCHW and the runtime's internal layout, which inside a
network happens once, not per layer (measured here: the sum of isolated one-layer probes came
to 1.5x ResNet20's latency on ONNX Runtime CPU at batch 1, 2 threads).

Every probe has the project's interface: one input "input" (batch, C, H, W) float32 and one
output "logits" (batch, N), so it is built, loaded and timed by any ONNX target through the
one measuring path (targets.measure) like a shipped model.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.latency.units import Unit

OPSET = 18
IR_VERSION = 10  # what onnxruntime >= 1.20 and OpenVINO read


def _model(nodes: list, inputs: tuple[int, int], initializers: list, name: str,
           last: str) -> onnx.ModelProto:
    channels, height = inputs
    flat = numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape")
    nodes = [*nodes, helper.make_node("Reshape", [last, "flat_shape"], ["logits"])]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                       ["batch", channels, height, height])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", None])],
        [*initializers, flat])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _conv(rng: np.random.Generator, name: str, source: str, unit: Unit) -> tuple[list, list]:
    """Conv k x k (stride, groups) + bias -> Relu, weights He-initialised: (nodes, weights)."""
    fan_in = unit.cin // unit.groups * unit.k * unit.k
    weight = (rng.standard_normal((unit.cout, unit.cin // unit.groups, unit.k, unit.k))
              * (2 / fan_in) ** 0.5).astype(np.float32)
    bias = (rng.standard_normal(unit.cout) * 0.1).astype(np.float32)
    pad = unit.k // 2
    nodes = [helper.make_node("Conv", [source, f"{name}_w", f"{name}_b"], [f"{name}_conv"],
                              kernel_shape=[unit.k, unit.k], pads=[pad] * 4,
                              strides=[unit.stride] * 2, group=unit.groups),
             helper.make_node("Relu", [f"{name}_conv"], [name])]
    return nodes, [numpy_helper.from_array(weight, f"{name}_w"),
                   numpy_helper.from_array(bias, f"{name}_b")]


def lead_in(h: int, channels: int) -> Unit:
    """The conv every probe starts with: it hands the measured layer its input in the layout
    the runtime keeps between convs (e.g. ONNX Runtime's NCHWc blocks), as in a network."""
    return Unit(h, channels, channels)


def lead_in_probe(h: int, channels: int, seed: int = 0) -> onnx.ModelProto:
    """The lead-in conv alone: what a conv probe's time is measured against."""
    nodes, weights = _conv(np.random.default_rng(seed), "lead", "input", lead_in(h, channels))
    return _model(nodes, (channels, h), weights, "lead_in_probe", "lead")


def conv_probe(unit: Unit, residual: bool = False, seed: int = 0) -> onnx.ModelProto:
    """input (batch, cin, h, h) -> lead-in conv -> the unit's Conv + bias -> Relu -> flatten.

    With `residual` (cin == cout, stride 1) the unit ends like a residual block instead:
    Conv + bias -> Add(lead-in output) -> Relu, so that the add costs what it costs where a
    runtime fuses it into the conv."""
    rng = np.random.default_rng(seed)
    lead_nodes, lead_weights = _conv(rng, "lead", "input", lead_in(unit.h, unit.cin))
    nodes, weights = _conv(rng, "unit", "lead", unit)
    if residual:
        nodes[-1] = helper.make_node("Add", ["unit_conv", "lead"], ["unit_sum"])
        nodes.append(helper.make_node("Relu", ["unit_sum"], ["unit"]))
    return _model([*lead_nodes, *nodes], (unit.cin, unit.h), [*lead_weights, *weights],
                  "conv_probe", "unit")


def add_relu_probe(h: int, channels: int) -> onnx.ModelProto:
    """input -> Add(x, x) -> Relu -> flatten: a residual add and its ReLU, on their own."""
    nodes = [helper.make_node("Add", ["input", "input"], ["sum"]),
             helper.make_node("Relu", ["sum"], ["relu"])]
    return _model(nodes, (channels, h), [], "add_relu_probe", "relu")


def empty_probe(h: int = 8, channels: int = 3) -> onnx.ModelProto:
    """The same interface with no work: what one call costs by itself."""
    return _model([], (channels, h), [], "empty_probe", "input")
