"""trtexec's outputs, parsed; and the trtexec command lines of one benchmark and of one build.

Formats, as written by trtexec (samples/common/sampleReporting.cpp):
- `--exportTimes=F`: a JSON array, one object per inference, times in ms: startEnqMs/endEnqMs,
  startH2dMs/endH2dMs, startComputeMs/endComputeMs, startD2hMs/endD2hMs (timestamps since the
  run started), h2dMs, computeMs, d2hMs, latencyMs (= h2d + compute + d2h). TensorRT 7 named
  the copies inMs/outMs (startInMs ...); both are read. TensorRT 8.6, 10.x and 11.x leave the
  warm-up out already (exportJSONTrace starts after it), so the warm-up filter is a safeguard.
- The console log (samples/common/logging.h, sampleDevice.cpp, sampleEngines.cpp at v10.3.0 and
  v11.1): a first line `&&&& RUNNING TensorRT.trtexec [TensorRT v100300] [b30] # <command>`
  (version code major*10000 + minor*100 + patch from 10.0 on, v8601 = 8.6.1 before; the
  ` [bNN]` build tag from 10.5 on), then `[date] [I] ` lines such as `Selected Device: Orin`,
  `Compute Capability: 8.7`, `TensorRT version: 10.3.0` and `Engine built in 10.72 sec.`;
  warnings and errors go to stderr.

The arguments depend on the TensorRT version (trtexec migration guide 10.x -> 11.x, TensorRT
11.0.0 and 11.4.1 docs; sampleOptions.cpp at v10.0.0 ... v11.1), so the device's trtexec is
asked first (`version_probe`): 11.x removed --fp16/--int8 ("Unknown option", exit 1) and times
without the host-device copies unless --includeDataTransfers is given, which 10.x does not know.
Pure: nothing here needs TensorRT installed.
"""

import json
import math
import re
from typing import Any

from pipeline.errors import ConfigError, PipelineError
from pipeline.timing import LatencyStats, TimingPlan, phase_stats
from targets.engines import ShapeProfile

# phase -> accepted key names, newest first
PHASE_KEYS = {"h2d": ("h2dMs", "inMs"), "compute": ("computeMs",), "d2h": ("d2hMs", "outMs")}
# TensorRT 8.x/9.x build FP16/INT8 only with these weak-typing flags; 11.x removed them.
LEGACY_PRECISION_FLAGS = {"fp32": (), "fp16": ("--fp16",), "int8": ("--int8",)}
BANNER = re.compile(r"\[TensorRT v(\d+)\]")  # in `&&&& RUNNING TensorRT.trtexec [TensorRT v...]`


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


def _decode_version(code: str) -> tuple[int, int, int]:
    """trtexec's banner code: v8601 -> 8.6.1 (TensorRT 8), v100300 -> 10.3.0 (TensorRT >= 10)."""
    number = int(code)
    if len(code) >= 6:
        return number // 10000, number // 100 % 100, number % 100
    return number // 1000, number // 100 % 10, number % 100


def banner_version(log: str) -> tuple[int, int, int] | None:
    """The TensorRT version in trtexec's first line (`trtexec --help` prints it too)."""
    banner = BANNER.search(log)
    return _decode_version(banner.group(1)) if banner else None


def version_probe(trtexec: str) -> list[str]:
    """A shell-free command whose output starts with trtexec's banner, whatever its exit status
    (the banner comes before argument parsing, so --help prints it on every version)."""
    return ["sh", "-c", '"$1" --help 2>&1 | head -n 5', "sh", trtexec]


def probed_version(text: str, trtexec: str) -> tuple[int, int, int]:
    version = banner_version(text)
    if version is None:
        first = text.strip().splitlines()[:1] or ["nothing"]
        raise TrtexecOutputError(f"{trtexec} --help printed {first[0]!r}, not trtexec's "
                                 "'&&&& RUNNING TensorRT.trtexec [TensorRT vNNNNNN]' banner; "
                                 "cannot tell which TensorRT (and so which flags) it has")
    return version


def _number(pattern: str, log: str) -> float | None:
    found = re.search(pattern, log)
    return float(found.group(1)) if found else None


def parse_log(log: str) -> dict[str, str | float | None]:
    """TensorRT version, GPU and (for a build) build time from trtexec's console log."""
    version = re.search(r"TensorRT version:\s*([\d.]+)", log)
    banner = banner_version(log)
    device = re.search(r"Selected Device:\s*(.+)", log)
    capability = re.search(r"Compute Capability:\s*([\d.]+)", log)
    return {"tensorrt": version.group(1) if version else
            (".".join(map(str, banner)) if banner else None),
            "gpu": device.group(1).strip() if device else None,
            "compute_capability": capability.group(1) if capability else None,
            "build_seconds": _number(r"Engine built in ([\d.]+) sec", log)}


def _check_precision(precision: str) -> None:
    if precision not in LEGACY_PRECISION_FLAGS:
        raise ConfigError(f"precision {precision!r} unknown; expected one of "
                          f"{sorted(LEGACY_PRECISION_FLAGS)}")


def typing_args(version: tuple[int, ...], precision: str, tf32: bool) -> list[str]:
    """Arguments that build the precision the ONNX file holds, on this TensorRT version.

    10.x: --stronglyTyped (since 10.0): layer types come from the ONNX graph (FP16 casts, INT8
    Q/DQ), as 11.x always does. 11.x: nothing - strong typing is the only mode, --stronglyTyped
    is a deprecated no-op and --fp16/--int8 were removed. 8.x/9.x: the weak-typing --fp16/--int8.
    --noTF32 (all versions) keeps FP32 layers out of TF32, which TensorRT enables by default.
    """
    _check_precision(precision)
    if version[0] >= 11:
        args: list[str] = []
    elif version[0] == 10:
        args = ["--stronglyTyped"]
    else:
        args = list(LEGACY_PRECISION_FLAGS[precision])
    return args if tf32 else [*args, "--noTF32"]


def _shape(input_name: str, shape: tuple[int, ...]) -> str:
    return f"{input_name}:{'x'.join(str(d) for d in shape)}"


def benchmark_command(trtexec: str, onnx_file: str, input_name: str, shape: tuple[int, ...] | None,
                      precision: str, plan: TimingPlan, times_file: str,
                      version: tuple[int, ...], tf32: bool = False) -> list[str]:
    """The argument list of one trtexec benchmark (no shell involved).

    shape: the input shape to build and run for (None when the model's input is static).
    trtexec warms up by time only, so plan.warmup_iters cannot be enforced; its --iterations and
    --duration are both minimums, like the plan's. 11.x times the copies only when asked
    (--includeDataTransfers, unknown to 10.x), and the h2d/d2h phases must be measured.
    """
    command = [trtexec, f"--onnx={onnx_file}", *typing_args(version, precision, tf32),
               f"--warmUp={math.ceil(1e3 * plan.warmup_seconds)}",
               f"--iterations={plan.min_iters}", f"--duration={math.ceil(plan.min_seconds)}",
               f"--exportTimes={times_file}"]
    if version[0] >= 11:
        command.append("--includeDataTransfers")
    if shape is not None:
        command.append(f"--shapes={_shape(input_name, shape)}")
    return command


def build_command(trtexec: str, onnx_file: str, engine_file: str, timing_cache: str,
                  profile: ShapeProfile, precision: str, workspace_mib: int,
                  version: tuple[int, ...], tf32: bool = False) -> list[str]:
    """The argument list that builds and saves one engine, without running it.

    --timingCacheFile loads the cache when the file exists and writes it back after the build;
    --memPoolSize takes MiB with an M suffix (10.x replaced 8.x's --workspace). A static input
    takes no shapes.
    """
    shapes = [f"--minShapes={_shape(profile.input, profile.min)}",
              f"--optShapes={_shape(profile.input, profile.opt)}",
              f"--maxShapes={_shape(profile.input, profile.max)}"] if profile.dynamic else []
    return [trtexec, f"--onnx={onnx_file}", f"--saveEngine={engine_file}",
            f"--timingCacheFile={timing_cache}", *typing_args(version, precision, tf32),
            *shapes, f"--memPoolSize=workspace:{workspace_mib}M", "--skipInference"]
