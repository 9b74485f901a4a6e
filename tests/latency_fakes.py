"""A fake clock for latency tables: probe and network times from a formula, no timing at all.

Convs cost like ONNX Runtime's NCHWc kernels on AVX-512 (channels padded to blocks of 16), so
the fake has the staircase real tables show; a residual add costs per element; every call costs
OVERHEAD_MS. Used where a real measurement would make a test flaky.
"""

import math

import onnx
from onnx import numpy_helper

OVERHEAD_MS = 0.01
CONV_MS_PER_MAC = 2e-8  # per padded multiply-accumulate
ADD_MS_PER_ELEMENT = 1e-7


def padded(channels: int) -> int:
    return 16 * math.ceil(channels / 16)


def conv_ms(h: int, cin: int, cout: int, stride: int = 1, k: int = 3) -> float:
    h_out = math.ceil(h / stride)
    return CONV_MS_PER_MAC * padded(cin) * padded(cout) * k * k * h_out * h_out


def add_ms(h: int, channels: int) -> float:
    return ADD_MS_PER_ELEMENT * channels * h * h


def probe_ms(model: onnx.ModelProto) -> float:
    """Batch-1 time of a probe graph: the sum of its convs and adds, plus one call."""
    weights = {init.name: numpy_helper.to_array(init).shape for init in model.graph.initializer}
    dims = model.graph.input[0].type.tensor_type.shape.dim
    h = dims[2].dim_value
    total = OVERHEAD_MS
    for node in model.graph.node:
        if node.op_type == "Conv":
            cout, cin, k, _ = weights[node.input[1]]
            stride = next((a.ints[0] for a in node.attribute if a.name == "strides"), 1)
            total += conv_ms(h, cin, cout, stride, k)
            h = math.ceil(h / stride)
            channels = cout
        elif node.op_type == "Add":
            total += add_ms(h, channels)
    return total


def fake_timer(batch: int):
    """A TimeProbe at `batch`: `batch` times the batch-1 work, plus one call."""
    def time_probe(model):
        return OVERHEAD_MS + batch * (probe_ms(model) - OVERHEAD_MS)
    return time_probe


def network_ms(units, batch: int = 1) -> float:
    """A network's fake time: its units' convs and adds, plus one call."""
    work = sum(conv_ms(u.h, u.cin, u.cout, u.stride, u.k)
               + (add_ms(u.h_out, u.cout) if u.epilogue == "add_relu" else 0.0) for u in units)
    return OVERHEAD_MS + batch * work
