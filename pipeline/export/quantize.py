"""Reduced-precision variants of a checked FP32 ONNX model: FP16 and static INT8 (QDQ).

FP16 uses onnxruntime.transformers.float16 (it ships with onnxruntime; onnxconverter-common is
not a dependency) with keep_io_types, so callers still feed and read float32.
INT8 uses onnxruntime.quantization.quantize_static: QDQ format, per-channel int8 weights, and
uint8 or int8 activations from params. On ONNX Runtime 1.31's CPU provider (AVX2, no VNNI)
S8S8 QDQ fuses only 9 of ResNet20's 19 convolutions into QLinearConv and runs slower than FP32,
while U8S8 fuses all of them and the residual Adds (1.5-1.7x faster than FP32); with 7-bit
weights (reduce_range) U8S8 also avoids int16 saturation. Measurements: docs/export.md.
TensorRT gets a second INT8 file from the same calibration: symmetric signed INT8 activations
and weights (zero points 0) and float biases, the only Q/DQ form its ONNX parser takes
(pipeline.export.qdq).
"""

import tempfile
from pathlib import Path

import numpy as np
import onnx

from pipeline.config import QuantizeConfig
from pipeline.errors import ExportError
from pipeline.export.onnx_export import (
    INPUT_NAME,
    check_interface,
    clone,
    default_opset,
    external_data_files,
    save_onnx,
    tensor_dims,
    verify_onnx,
)
from pipeline.export.qdq import audit, precision_problems

# method -> (ONNX Runtime CalibrationMethod, calibrator options). quantize_static cannot pass
# histogram sizes, and its entropy default (128 bins, 128 quantised bins) leaves a single
# candidate threshold - the full range - so "entropy" came out bit-identical to minmax
# (docs/export.md). Calibrating here with TensorRT's 2048/128 bins makes it a real KL search.
CALIBRATION_METHODS = {
    "minmax": ("MinMax", {}),
    "entropy": ("Entropy", {"num_bins": 2048, "num_quantized_bins": 128}),
    "percentile": ("Percentile", {"num_bins": 2048, "percentile": 99.999}),
}
ACTIVATION_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}
# ONNX Runtime options for the TensorRT INT8 file (quantize_static's extra_options; its docstring:
# "use symmetric QuantType.QInt8 for both activations and weights when targeting GPU/TRT").
# Float biases, because TensorRT does not dequantize ONNX Runtime's INT32 bias.
TENSORRT_INT8_OPTIONS = {"ActivationSymmetric": True, "WeightSymmetric": True,
                         "QuantizeBias": False}


def _check_same_interface(converted: onnx.ModelProto, source: onnx.ModelProto) -> None:
    input_shape = tuple(tensor_dims(source.graph.input[0])[1:])
    check_interface(converted, input_shape, default_opset(source))


def convert_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """FP16 weights and compute, float32 input and output; checked, with inferred shapes."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    try:
        converted = convert_float_to_float16(clone(proto), keep_io_types=True)
        # The converter appends the Casts for the kept float32 I/O after the nodes that use
        # them; the ONNX checker rejects a graph that is not topologically sorted.
        OnnxModel(converted).topological_sort()
    except Exception as err:  # noqa: BLE001 - the converter raises whatever its passes raise
        raise ExportError(f"FP16 conversion failed: {type(err).__name__}: {err}") from err
    converted = verify_onnx(converted)
    _check_same_interface(converted, proto)
    return converted


class ImageBatches:
    """Calibration data for quantize_static: {"input": batch} dicts, then None when exhausted.

    ONNX Runtime's CalibrationDataReader accepts any object with `get_next` (its
    __subclasshook__), so onnxruntime is not imported to define this class.
    """

    def __init__(self, images: np.ndarray, batch_size: int) -> None:
        self._images = np.ascontiguousarray(images, dtype=np.float32)
        self._batch_size = batch_size
        self._start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._start >= len(self._images):
            return None
        batch = self._images[self._start:self._start + self._batch_size]
        self._start += self._batch_size
        return {INPUT_NAME: batch}


def calibrate(model_path: Path, images: np.ndarray, settings: QuantizeConfig,
              folder: Path) -> Path:
    """Activation ranges by the configured method, saved as ONNX Runtime's calibration cache."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator, save_tensors_data

    method, options = CALIBRATION_METHODS[settings.calibration_method]
    calibrator = create_calibrator(
        model_path, augmented_model_path=str(folder / "augmented.onnx"),
        calibrate_method=getattr(CalibrationMethod, method), providers=["CPUExecutionProvider"],
        extra_options=dict(options))
    calibrator.collect_data(ImageBatches(images, settings.calibration_batch))
    cache = folder / "ranges.json"
    save_tensors_data(calibrator.compute_data(), cache)
    return cache


def _quantize_static(source: Path, target: Path, ranges: Path, settings: QuantizeConfig,
                     tensorrt: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if tensorrt:  # signed INT8, zero points 0, float biases (pipeline.export.qdq)
        activations, reduce_range, extra = QuantType.QInt8, False, dict(TENSORRT_INT8_OPTIONS)
    else:
        activations = getattr(QuantType, ACTIVATION_TYPES[settings.activation_type])
        reduce_range, extra = settings.reduce_range, {}
    quantize_static(
        source, target, None, calibration_cache_path=ranges,
        calibrate_method=getattr(CalibrationMethod,
                                 CALIBRATION_METHODS[settings.calibration_method][0]),
        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
        weight_type=QuantType.QInt8, activation_type=activations, extra_options=extra)


def _quantize_calibrated(proto: onnx.ModelProto, images: np.ndarray, settings: QuantizeConfig,
                         tensorrt: tuple[bool, ...]) -> tuple[onnx.ModelProto, ...]:
    """One INT8 model per entry of `tensorrt`, all from one calibration pass."""
    if len(images) < settings.calibration_images:
        raise ExportError(f"INT8 calibration needs {settings.calibration_images} images "
                          f"(export.quantize.calibration_images), got {len(images)}")
    quantized = []
    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        folder = Path(tmp)
        source = folder / "fp32.onnx"
        save_onnx(proto, source)
        try:
            ranges = calibrate(source, images[:settings.calibration_images], settings, folder)
            for index, for_tensorrt in enumerate(tensorrt):
                target = folder / f"int8_{index}.onnx"
                _quantize_static(source, target, ranges, settings, for_tensorrt)
                external_data_files(target)  # only files the quantiser wrote beside it
                quantized.append(onnx.load(target))
        except Exception as err:  # noqa: BLE001 - calibration and quantizer raise many types
            raise ExportError(f"INT8 quantisation failed: {type(err).__name__}: {err}") from err
    checked = tuple(verify_onnx(model) for model in quantized)
    for model in checked:
        _check_same_interface(model, proto)
    return checked


def quantize_int8(proto: onnx.ModelProto, images: np.ndarray,
                  settings: QuantizeConfig) -> onnx.ModelProto:
    """Static INT8 QDQ model calibrated on the first `settings.calibration_images` of `images`
    (normalised float32, as the model expects them), with the settings' activation type."""
    return _quantize_calibrated(proto, images, settings, (False,))[0]


def quantize_int8_with_tensorrt(proto: onnx.ModelProto, images: np.ndarray,
                                settings: QuantizeConfig) -> tuple[onnx.ModelProto,
                                                                   onnx.ModelProto]:
    """(quantize_int8's model, the symmetric model TensorRT takes), calibrated once: the
    calibration pass is most of the cost, the second quantize_static is cheap."""
    cpu, tensorrt = _quantize_calibrated(proto, images, settings, (False, True))
    check_tensorrt_int8(tensorrt)
    return cpu, tensorrt


def check_tensorrt_int8(proto: onnx.ModelProto) -> None:
    """ExportError unless TensorRT's ONNX parser takes the file's Q/DQ nodes (a newer ONNX
    Runtime could change what the options above produce)."""
    problems = precision_problems(audit(proto), "int8")
    if problems:
        raise ExportError("the INT8 file for TensorRT is not buildable by TensorRT: "
                          + "; ".join(problems))
