"""trtexec's machine-readable outputs, parsed; and the trtexec command line of one benchmark.

Formats, as written by trtexec (samples/common/sampleReporting.cpp):
- `--exportTimes=F`: a JSON array, one object per inference, warm-up included, times in ms:
  startEnqMs/endEnqMs, startH2dMs/endH2dMs, startComputeMs/endComputeMs, startD2hMs/endD2hMs
  (timestamps since the run started), h2dMs, computeMs, d2hMs, latencyMs (= h2d + compute +
  d2h), endToEndMs. TensorRT 7 named the copies inMs/outMs (startInMs ...); both are read.
Pure parsing: nothing here needs TensorRT installed.
"""

import json
import math
import re
from typing import Any

from pipeline.errors import ConfigError, PipelineError
from pipeline.timing import LatencyStats, TimingPlan, phase_stats

# phase -> accepted key names, newest first
PHASE_KEYS = {"h2d": ("h2dMs", "inMs"), "compute": ("computeMs",), "d2h": ("d2hMs", "outMs")}
PRECISION_FLAGS = {"fp32": (), "fp16": ("--fp16",), "int8": ("--int8",)}


class TrtexecOutputError(PipelineError):
    """A trtexec JSON file is not in the format trtexec writes, or holds no timed inference."""


def _load_array(text: str, what: str) -> list[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise TrtexecOutputError(f"{what}: not JSON ({err})") from err
    if not isinstance(data, list):
        raise TrtexecOutputError(f"{what}: expected a JSON array, got {type(data).__name__}")
    return data


def _phase(entry: dict[str, Any], phase: str, index: int) -> float:
    for key in PHASE_KEYS[phase]:
        if isinstance(entry.get(key), int | float):
            return float(entry[key])
    raise TrtexecOutputError(f"--exportTimes entry {index}: no numeric "
                             f"{' or '.join(PHASE_KEYS[phase])}; keys are {sorted(entry)}")


def parse_times(text: str, warmup_ms: float = 0.0) -> list[dict[str, float]]:
    """Per-inference phase times in seconds, dropping trtexec's warm-up queries (those whose
    compute started before `warmup_ms`, trtexec's own rule)."""
    samples = []
    for index, entry in enumerate(_load_array(text, "--exportTimes")):
        if not isinstance(entry, dict):
            raise TrtexecOutputError(f"--exportTimes entry {index}: expected an object")
        if float(entry.get("startComputeMs", math.inf)) < warmup_ms:
            continue
        samples.append({phase: _phase(entry, phase, index) / 1e3 for phase in PHASE_KEYS})
    if not samples:
        raise TrtexecOutputError(f"--exportTimes holds no inference after the {warmup_ms} ms "
                                 "warm-up")
    return samples


def times_stats(text: str, batch_size: int, warmup_ms: float = 0.0) -> LatencyStats:
    """LatencyStats of an --exportTimes file: latency = h2d + compute + d2h, as trtexec's."""
    return phase_stats(parse_times(text, warmup_ms), batch_size, "trtexec")


def _decode_version(code: str) -> str:
    """trtexec's banner code: v8601 -> 8.6.1 (TensorRT 8), v100300 -> 10.3.0 (TensorRT >= 10)."""
    number = int(code)
    if len(code) >= 6:
        return f"{number // 10000}.{number // 100 % 100}.{number % 100}"
    return f"{number // 1000}.{number // 100 % 10}.{number % 100}"


def parse_log(log: str) -> dict[str, str | None]:
    """TensorRT version and GPU from trtexec's console log (for provenance)."""
    version = re.search(r"TensorRT version:\s*([\d.]+)", log)
    banner = re.search(r"\[TensorRT v(\d+)\]", log)
    device = re.search(r"Selected Device:\s*(.+)", log)
    capability = re.search(r"Compute Capability:\s*([\d.]+)", log)
    return {"tensorrt": version.group(1) if version else
            (_decode_version(banner.group(1)) if banner else None),
            "gpu": device.group(1).strip() if device else None,
            "compute_capability": capability.group(1) if capability else None}


def benchmark_command(trtexec: str, onnx_file: str, input_name: str, shape: tuple[int, ...] | None,
                      precision: str, plan: TimingPlan, times_file: str) -> list[str]:
    """The argument list of one trtexec benchmark (no shell involved).

    shape: the input shape to build and run for (None when the model's input is static).
    trtexec warms up by time only, so plan.warmup_iters cannot be enforced; its --iterations and
    --duration are both minimums, like the plan's.
    """
    if precision not in PRECISION_FLAGS:
        raise ConfigError(f"precision {precision!r} unknown; expected one of "
                                 f"{sorted(PRECISION_FLAGS)}")
    command = [trtexec, f"--onnx={onnx_file}", *PRECISION_FLAGS[precision],
               f"--warmUp={math.ceil(1e3 * plan.warmup_seconds)}",
               f"--iterations={plan.min_iters}", f"--duration={math.ceil(plan.min_seconds)}",
               f"--exportTimes={times_file}"]
    if shape is not None:
        command.append(f"--shapes={input_name}:{'x'.join(str(d) for d in shape)}")
    return command
