"""Parsing trtexec's --exportTimes / --exportProfile JSON and console log; its command line."""

import json

import pytest

from pipeline.errors import ConfigError, PipelineError
from pipeline.timing import TimingPlan
from targets.engines import ShapeProfile
from targets.trtexec import (
    TrtexecOutputError,
    banner_version,
    benchmark_command,
    build_command,
    parse_log,
    parse_times,
    probed_version,
    times_stats,
    typing_args,
    version_probe,
)

# As trtexec (TensorRT 8.x-10.x, sampleReporting.cpp exportJSONTrace) writes it: one object per
# inference, warm-up included, all times in ms.
TIMES_JSON = """[
  { "startEnqMs" : 0.10, "endEnqMs" : 0.20, "startH2dMs" : 0.20, "endH2dMs" : 0.30,
    "startComputeMs" : 0.30, "endComputeMs" : 5.30, "startD2hMs" : 5.30, "endD2hMs" : 5.40,
    "h2dMs" : 0.10, "computeMs" : 5.00, "d2hMs" : 0.10, "latencyMs" : 5.20, "endToEndMs" : 5.30 }
, { "startEnqMs" : 200.0, "endEnqMs" : 200.1, "startH2dMs" : 200.1, "endH2dMs" : 200.3,
    "startComputeMs" : 200.3, "endComputeMs" : 201.3, "startD2hMs" : 201.3, "endD2hMs" : 201.4,
    "h2dMs" : 0.20, "computeMs" : 1.00, "d2hMs" : 0.10, "latencyMs" : 1.30, "endToEndMs" : 1.30 }
, { "startEnqMs" : 201.5, "endEnqMs" : 201.6, "startH2dMs" : 201.6, "endH2dMs" : 201.7,
    "startComputeMs" : 201.7, "endComputeMs" : 203.7, "startD2hMs" : 203.7, "endD2hMs" : 203.9,
    "h2dMs" : 0.10, "computeMs" : 2.00, "d2hMs" : 0.20, "latencyMs" : 2.30, "endToEndMs" : 2.40 }
, { "startEnqMs" : 204.0, "endEnqMs" : 204.1, "startH2dMs" : 204.1, "endH2dMs" : 204.2,
    "startComputeMs" : 204.2, "endComputeMs" : 205.7, "startD2hMs" : 205.7, "endD2hMs" : 205.8,
    "h2dMs" : 0.10, "computeMs" : 1.50, "d2hMs" : 0.10, "latencyMs" : 1.70, "endToEndMs" : 1.70 }
]
"""

# TensorRT 7 named the copies "in"/"out".
TIMES_JSON_TRT7 = json.dumps([
    {"startInMs": 0.0, "startComputeMs": 0.2, "inMs": 0.2, "computeMs": 1.0, "outMs": 0.3,
     "latencyMs": 1.5, "endToEndMs": 1.5}])

LOG = """&&&& RUNNING TensorRT.trtexec [TensorRT v8601] # trtexec --onnx=m.onnx
[11/01/2024-10:32:46] [I] === Device Information ===
[11/01/2024-10:32:46] [I] Selected Device: Orin
[11/01/2024-10:32:46] [I] Compute Capability: 8.7
"""


def test_times_drop_warmup_and_convert_to_seconds():
    samples = parse_times(TIMES_JSON, warmup_ms=200.0)
    assert len(samples) == 3
    assert samples[0] == pytest.approx({"h2d": 0.0002, "compute": 0.001, "d2h": 0.0001})
    assert len(parse_times(TIMES_JSON)) == 4


def test_times_stats_match_trtexec_latency_definition():
    stats = times_stats(TIMES_JSON, batch_size=8, warmup_ms=200.0)
    assert stats.n == 3 and stats.clock == "trtexec"
    assert stats.p50_ms == pytest.approx(1.7)  # latencies 1.3, 2.3, 1.7 = h2d + compute + d2h
    assert stats.phase_p50_ms == pytest.approx({"h2d": 0.1, "compute": 1.5, "d2h": 0.1})
    assert stats.throughput == pytest.approx(8 / 0.0017)


def test_tensorrt7_key_names_are_read():
    (sample,) = parse_times(TIMES_JSON_TRT7)
    assert sample == pytest.approx({"h2d": 0.0002, "compute": 0.001, "d2h": 0.0003})


@pytest.mark.parametrize("text, message", [
    ("not json", "not JSON"),
    ('{"a": 1}', "expected a JSON array"),
    ('[{"startComputeMs": 1, "computeMs": 1}]', "no numeric h2dMs or inMs"),
    ("[]", "no inference after"),
])
def test_malformed_times_are_errors(text, message):
    with pytest.raises(TrtexecOutputError, match=message):
        parse_times(text)
    assert issubclass(TrtexecOutputError, PipelineError)


def test_log_gives_version_and_device():
    assert parse_log(LOG) == {"tensorrt": "8.6.1", "gpu": "Orin", "compute_capability": "8.7",
                              "build_seconds": None}
    assert parse_log("[TensorRT v100300]")["tensorrt"] == "10.3.0"
    assert parse_log("[I] TensorRT version: 10.8.0")["tensorrt"] == "10.8.0"
    assert parse_log("") == {"tensorrt": None, "gpu": None, "compute_capability": None,
                             "build_seconds": None}


# Excerpts of public trtexec logs (quoted in the research note): the banner of TensorRT 10.8.0
# on Windows (NVIDIA/TensorRT#4658), the device block and version line of 10.16.2 on a Jetson
# Orin (OE4T/meta-tegra#2243), and the build lines of a 10.9.0 build on an RTX 3070.
PUBLIC_BUILD_LOG = "\n".join([
    r"&&&& RUNNING TensorRT.trtexec [TensorRT v100800] [b43] # C:\trt\trtexec.exe --onnx=m.onnx "
    "--saveEngine=fp32.engine",
    "[12/04/2025-16:45:32] [I] TF32 is enabled by default. Add --noTF32 flag to further improve "
    "accuracy with some performance cost.",
    "[01/01/1970-03:47:30] [I] === Device Information ===",
    "[01/01/1970-03:47:30] [I] Available Devices: ",
    '[01/01/1970-03:47:30] [I]   Device 0: "Orin" UUID: GPU-f5507ee1-b6b1-556b-8350-83af993dbffd',
    "[01/01/1970-03:47:30] [I] Selected Device: Orin",
    "[01/01/1970-03:47:30] [I] Selected Device ID: 0",
    "[01/01/1970-03:47:30] [I] Selected Device UUID: GPU-f5507ee1-b6b1-556b-8350-83af993dbffd",
    "[01/01/1970-03:47:30] [I] Compute Capability: 8.7",
    "[01/01/1970-03:47:30] [I] SMs: 8",
    "[01/01/1970-03:47:30] [I] TensorRT version: 10.16.2",
    "[04/07/2025-23:59:46] [I] [TRT] Engine generation completed in 10.6392 seconds.",
    "[04/07/2025-23:59:46] [I] Engine built in 10.7204 sec.",
    "[04/07/2025-23:59:46] [I] Created engine with size: 101.811 MiB", ""])


def test_public_log_excerpts_parse():
    assert parse_log(PUBLIC_BUILD_LOG) == {"tensorrt": "10.16.2", "gpu": "Orin",
                                           "compute_capability": "8.7", "build_seconds": 10.7204}
    without_version_line = PUBLIC_BUILD_LOG.replace("TensorRT version: 10.16.2", "")
    assert parse_log(without_version_line)["tensorrt"] == "10.8.0"  # from the banner


@pytest.mark.parametrize(("line", "version"), [
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec --help", (10, 3, 0)),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v100900] [b34] # trtexec --onnx=a.onnx", (10, 9, 0)),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v110100] [b106] # trtexec", (11, 1, 0)),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v8601] # trtexec", (8, 6, 1)),
    ("usage: something else", None)])
def test_banner_gives_the_version(line, version):
    assert banner_version(line) == version


def test_version_probe_is_shell_free_and_refuses_what_is_not_trtexec():
    assert version_probe("/usr/src/tensorrt/bin/trtexec")[-1] == "/usr/src/tensorrt/bin/trtexec"
    assert probed_version("&&&& RUNNING TensorRT.trtexec [TensorRT v110100] [b106] # x", "t") \
        == (11, 1, 0)
    with pytest.raises(TrtexecOutputError, match="printed 'sh: 1: trtexec: not found', not "):
        probed_version("sh: 1: trtexec: not found\n", "trtexec")


@pytest.mark.parametrize(("version", "precision", "tf32", "expected"), [
    ((10, 3, 0), "fp16", False, ["--stronglyTyped", "--noTF32"]),
    ((10, 16, 2), "int8", True, ["--stronglyTyped"]),
    ((11, 1, 0), "int8", False, ["--noTF32"]),
    ((11, 4, 0), "fp16", True, []),
    ((8, 6, 1), "int8", False, ["--int8", "--noTF32"]),
    ((8, 6, 1), "fp32", True, [])])
def test_typing_arguments_follow_the_tensorrt_version(version, precision, tf32, expected):
    assert typing_args(version, precision, tf32) == expected


PLAN = TimingPlan(warmup_iters=5, warmup_seconds=0.2, min_iters=100, min_seconds=1.5)


def test_benchmark_command_on_tensorrt_10():
    command = benchmark_command("trtexec", "/tmp/x/m.fp16.onnx", "input", (64, 3, 32, 32), "fp16",
                                PLAN, "/tmp/x/t.json", (10, 3, 0))
    assert command[:4] == ["trtexec", "--onnx=/tmp/x/m.fp16.onnx", "--stronglyTyped", "--noTF32"]
    assert {"--warmUp=200", "--iterations=100", "--duration=2", "--exportTimes=/tmp/x/t.json",
            "--shapes=input:64x3x32x32"} <= set(command)
    assert not {"--fp16", "--int8", "--includeDataTransfers"} & set(command)
    static = benchmark_command("trtexec", "m.onnx", "input", None, "fp32", PLAN, "t.json",
                               (10, 3, 0))
    assert not any(arg.startswith("--shapes") for arg in static)
    with pytest.raises(ConfigError, match="precision 'bf8'"):
        benchmark_command("trtexec", "m.onnx", "input", None, "bf8", PLAN, "t.json", (10, 3, 0))


def test_benchmark_command_on_tensorrt_11_times_the_copies_without_removed_flags():
    command = benchmark_command("trtexec", "m.int8.trt.onnx", "input", (8, 3, 32, 32), "int8",
                                PLAN, "t.json", (11, 1, 0))
    assert "--includeDataTransfers" in command and "--noTF32" in command
    assert not {"--fp16", "--int8", "--stronglyTyped"} & set(command)


PROFILE = ShapeProfile("input", (1, 3, 32, 32), (16, 3, 32, 32), (64, 3, 32, 32))


@pytest.mark.parametrize(("version", "typing"), [((10, 3, 0), ["--stronglyTyped", "--noTF32"]),
                                                  ((11, 1, 0), ["--noTF32"])])
def test_build_command_saves_the_engine_with_the_profile_and_timing_cache(version, typing):
    command = build_command("/opt/trtexec", "/d/m.fp16.onnx", "/d/m.engine", "/d/timing.cache",
                            PROFILE, "fp16", 512, version)
    assert command == ["/opt/trtexec", "--onnx=/d/m.fp16.onnx", "--saveEngine=/d/m.engine",
                       "--timingCacheFile=/d/timing.cache", *typing,
                       "--minShapes=input:1x3x32x32", "--optShapes=input:16x3x32x32",
                       "--maxShapes=input:64x3x32x32", "--memPoolSize=workspace:512M",
                       "--skipInference"]


def test_build_command_gives_a_static_input_no_shapes():
    static = ShapeProfile("input", *([(4, 3, 32, 32)] * 3), dynamic=False)
    command = build_command("trtexec", "m.onnx", "m.engine", "c", static, "fp32", 64, (10, 3, 0))
    assert not any(arg.startswith(("--minShapes", "--optShapes", "--maxShapes"))
                   for arg in command)
