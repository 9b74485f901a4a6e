"""Latency measurement: throw-away warm-up, then timed repeats until both a minimum count and a
minimum duration are reached; distributions (p50/p90/p99, mean, std), not single numbers.

Host targets time each call with the host clock (`measure_latency`). Device targets time each
call on the device (CUDA events) and report its phases - host-to-device copy, compute,
device-to-host copy - separately (`measure_phases`); the stopping rule always runs on the host
clock, so a plan means the same wall-clock budget everywhere.
"""

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TypeVar

import numpy as np

from pipeline.config import TimingPlan

Sample = TypeVar("Sample")
__all__ = ["LatencyStats", "TimingPlan", "measure_latency", "measure_phases", "phase_stats",
           "run_plan", "summarize"]


@dataclass(frozen=True)
class LatencyStats:
    n: int  # timed calls
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float  # sample standard deviation (0 for a single sample)
    batch_size: int
    throughput: float  # images per second at the median latency
    clock: str = "host"  # what timed the calls: host | cuda-events | trtexec
    phase_p50_ms: dict[str, float] = field(default_factory=dict)  # e.g. h2d/compute/d2h medians

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(samples_s: Sequence[float], batch_size: int) -> LatencyStats:
    """Statistics of per-call latencies given in seconds (percentiles: numpy's linear rule)."""
    if not len(samples_s):
        raise ValueError("statistics of no samples")
    samples = np.asarray(samples_s, dtype=np.float64)
    p50, p90, p99 = (float(v) for v in np.percentile(samples, [50, 90, 99]))
    return LatencyStats(
        n=len(samples),
        p50_ms=1e3 * p50,
        p90_ms=1e3 * p90,
        p99_ms=1e3 * p99,
        mean_ms=1e3 * float(samples.mean()),
        std_ms=1e3 * float(samples.std(ddof=1)) if len(samples) > 1 else 0.0,
        batch_size=batch_size,
        throughput=batch_size / p50 if p50 > 0 else math.inf,
    )


def run_plan(timed_call: Callable[[], Sample], plan: TimingPlan,
             clock: Callable[[], float] = time.perf_counter) -> list[Sample]:
    """Warm up, then repeat `timed_call` until the plan's count and duration are both reached.

    `timed_call` returns one sample (a duration, or a dict of phase durations); warm-up samples
    are thrown away because first calls pay for allocation, JIT and cache misses.
    """
    started = clock()
    done = 0
    while done < plan.warmup_iters or clock() - started < plan.warmup_seconds:
        timed_call()
        done += 1
    samples: list[Sample] = []
    started = clock()
    while len(samples) < plan.min_iters or clock() - started < plan.min_seconds:
        samples.append(timed_call())
    return samples


def measure_latency(call: Callable[[], object], plan: TimingPlan, batch_size: int,
                    clock: Callable[[], float] = time.perf_counter) -> LatencyStats:
    """Time `call` (which must block until its result is ready) with host wall-clock time."""

    def timed_call() -> float:
        begin = clock()
        call()
        return clock() - begin

    return summarize(run_plan(timed_call, plan, clock), batch_size)


def measure_phases(timed_call: Callable[[], dict[str, float]], plan: TimingPlan, batch_size: int,
                   clock_name: str, clock: Callable[[], float] = time.perf_counter) -> LatencyStats:
    """Statistics of calls that time themselves phase by phase (seconds per phase, e.g. measured
    with CUDA events); the latency of a call is the sum of its phases."""
    samples = run_plan(timed_call, plan, clock)
    return phase_stats(samples, batch_size, clock_name)


def phase_stats(samples: Sequence[dict[str, float]], batch_size: int,
                clock_name: str) -> LatencyStats:
    """LatencyStats of the per-call phase sums, with each phase's median kept alongside."""
    if not samples:
        raise ValueError("phase statistics of no samples")
    totals = [sum(sample.values()) for sample in samples]
    medians = {phase: 1e3 * float(np.median([sample[phase] for sample in samples]))
               for phase in samples[0]}
    return replace(summarize(totals, batch_size), clock=clock_name, phase_p50_ms=medians)
