"""Parsing trtexec's --exportTimes / --exportProfile JSON and console log; its command line."""

import json

import pytest

from pipeline.errors import ConfigError, PipelineError
from pipeline.timing import TimingPlan
from targets.trtexec import (
    TrtexecOutputError,
    benchmark_command,
    parse_log,
    parse_times,
    times_stats,
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
    assert parse_log(LOG) == {"tensorrt": "8.6.1", "gpu": "Orin", "compute_capability": "8.7"}
    assert parse_log("[TensorRT v100300]")["tensorrt"] == "10.3.0"
    assert parse_log("[I] TensorRT version: 10.8.0")["tensorrt"] == "10.8.0"
    assert parse_log("") == {"tensorrt": None, "gpu": None, "compute_capability": None}


def test_benchmark_command_is_an_argument_list():
    plan = TimingPlan(warmup_iters=5, warmup_seconds=0.2, min_iters=100, min_seconds=1.5)
    command = benchmark_command("trtexec", "/tmp/x/m.fp16.onnx", "input", (64, 3, 32, 32), "fp16",
                                plan, "/tmp/x/t.json")
    assert command[:3] == ["trtexec", "--onnx=/tmp/x/m.fp16.onnx", "--fp16"]
    assert {"--warmUp=200", "--iterations=100", "--duration=2", "--exportTimes=/tmp/x/t.json",
            "--shapes=input:64x3x32x32"} <= set(command)
    static = benchmark_command("trtexec", "m.onnx", "input", None, "fp32", plan, "t.json")
    assert not any(arg.startswith(("--shapes", "--fp16", "--int8")) for arg in static)
    with pytest.raises(ConfigError, match="precision 'bf8'"):
        benchmark_command("trtexec", "m.onnx", "input", None, "bf8", plan, "t.json")
