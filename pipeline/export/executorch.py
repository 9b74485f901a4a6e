"""ExecuTorch programs (.pte) for the XNNPACK backend, the mobile (Android/iOS) path: a trained
model -> torch.export -> lowered to XNNPACK -> one program per batch size.

Each program has a fixed input shape, so there is one per batch size (fed another batch, it
fails with "Attempted to resize a static tensor"). A dynamic batch was not used: while lowering
to XNNPACK, torch 2.14's fake convolution narrows a dynamic batch to at most 15, and only a
private torch setting avoids that.

FP32 lowers the exported graph as it is. INT8 uses the PT2E flow: capture, annotate with
ExecuTorch's XNNPACKQuantizer (int8 symmetric per-channel weights, int8 per-tensor activations,
histogram observers), calibrate on the images given (the stage passes the same ones the ONNX INT8
file was calibrated on), convert, then export and lower per batch size. The INT8 program lowers
the constant pad op outside XNNPACK: the option-A shortcut's channel pad reads a dequantised
tensor, which XNNPACK refuses when the program loads ("Failed to create StaticConstantPad").

executorch (extra `executorch`) and torchao are imported inside the functions.
"""

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.errors import ExportError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoweredProgram:
    """One .pte program and how much of it XNNPACK runs."""

    buffer: bytes  # the .pte file's bytes
    batch_size: int  # the program's fixed batch
    delegated_nodes: int  # graph nodes inside XNNPACK subgraphs
    portable_nodes: int  # nodes left to ExecuTorch's portable kernels


def executorch_versions() -> dict[str, str | None]:
    """Versions of the packages that make a program, for its card."""
    from pipeline.provenance import package_versions

    return package_versions(("torch", "executorch", "torchao"))


def _example(batch: int, input_shape: tuple[int, ...]) -> tuple[torch.Tensor]:
    return (torch.zeros(batch, *input_shape),)


def lower(module: nn.Module, batch: int, input_shape: tuple[int, ...],
          quantized: bool) -> LoweredProgram:
    """`module` exported at a fixed batch and lowered to XNNPACK."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import (
        ConstantPadConfig,
    )
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower

    configs = [c for c in ALL_PARTITIONER_CONFIGS if c is not ConstantPadConfig] \
        if quantized else None  # None: every config (see the module docstring for the pad)
    try:
        exported = torch.export.export(module, _example(batch, input_shape))
        edge = to_edge_transform_and_lower(exported,
                                           partitioner=[XnnpackPartitioner(configs=configs)])
        info = get_delegation_info(edge.exported_program().graph_module)
        buffer = edge.to_executorch().buffer
    except Exception as err:  # noqa: BLE001 - export and lowering raise many types
        raise ExportError(f"lowering to ExecuTorch/XNNPACK at batch {batch} failed: "
                          f"{type(err).__name__}: {err}") from err
    return LoweredProgram(bytes(buffer), batch, info.num_delegated_nodes,
                          info.num_non_delegated_nodes)


def quantize_pt2e(model: nn.Module, calibration: np.ndarray, batch_size: int) -> nn.Module:
    """`model` with INT8 quantize/dequantize pairs from XNNPACKQuantizer, calibrated on
    `calibration` (normalised float32 images), `batch_size` at a time."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if not len(calibration):
        raise ExportError("INT8 calibration needs at least one image, got none")
    largest = max(2, min(batch_size, len(calibration)))
    batch = torch.export.Dim("batch", min=1, max=largest)
    try:  # captured once with a dynamic batch, so any calibration batch size runs
        captured = torch.export.export(model, _example(2, tuple(calibration.shape[1:])),
                                       dynamic_shapes=({0: batch},)).module()
        quantizer = XNNPACKQuantizer().set_global(
            get_symmetric_quantization_config(is_per_channel=True))
        prepared = prepare_pt2e(captured, quantizer)
        with torch.no_grad():
            for start in range(0, len(calibration), largest):
                prepared(torch.from_numpy(np.ascontiguousarray(
                    calibration[start:start + largest], dtype=np.float32)))
        return convert_pt2e(prepared)
    except Exception as err:  # noqa: BLE001 - capture, observers and convert raise many types
        raise ExportError(f"PT2E INT8 quantisation failed: {type(err).__name__}: {err}") from err


def export_programs(model: nn.Module, precision: str, batch_sizes: tuple[int, ...],
                    input_shape: tuple[int, ...], calibration: np.ndarray | None = None,
                    calibration_batch: int = 128) -> dict[int, LoweredProgram]:
    """One XNNPACK program of `model` per batch size, at `precision` (fp32 or int8; int8
    needs `calibration` images)."""
    if precision not in ("fp32", "int8"):
        raise ExportError(f"ExecuTorch programs are made in fp32 or int8, not {precision}")
    model = model.eval()
    if precision == "int8":
        if calibration is None:
            raise ExportError("an INT8 ExecuTorch program needs calibration images")
        log.info("PT2E: calibrating on %d images", len(calibration))
        model = quantize_pt2e(model, calibration, calibration_batch)
    programs = {}
    for batch in batch_sizes:
        log.info("lowering %s to XNNPACK at batch %d", precision, batch)
        programs[batch] = lower(model, batch, input_shape, quantized=precision == "int8")
    return programs
