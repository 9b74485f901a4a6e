"""Latency measurement: throw-away warm-up, then timed repeats until both a minimum count and a
minimum duration are reached; distributions (p50/p90/p99, mean, std), not single numbers."""

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TimingPlan:
    warmup_iters: int  # throw-away calls before timing (at least this many)
    warmup_seconds: float  # ... and at least this long
    min_iters: int  # timed calls: at least this many
    min_seconds: float  # ... and at least this long in total


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

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def percentile(sorted_samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of already sorted samples, q in [0, 100]."""
    if not sorted_samples:
        raise ValueError("percentile of no samples")
    position = (len(sorted_samples) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    weight = position - low
    return sorted_samples[low] * (1 - weight) + sorted_samples[high] * weight


def summarize(samples_s: Sequence[float], batch_size: int) -> LatencyStats:
    """Statistics of per-call latencies given in seconds."""
    ordered = sorted(samples_s)
    p50 = percentile(ordered, 50)
    return LatencyStats(
        n=len(ordered),
        p50_ms=1e3 * p50,
        p90_ms=1e3 * percentile(ordered, 90),
        p99_ms=1e3 * percentile(ordered, 99),
        mean_ms=1e3 * statistics.fmean(ordered),
        std_ms=1e3 * statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
        batch_size=batch_size,
        throughput=batch_size / p50 if p50 > 0 else math.inf,
    )


def measure_latency(call: Callable[[], object], plan: TimingPlan, batch_size: int,
                    clock: Callable[[], float] = time.perf_counter) -> LatencyStats:
    """Time `call` (which must block until its result is ready) with host wall-clock time."""
    started = clock()
    done = 0
    while done < plan.warmup_iters or clock() - started < plan.warmup_seconds:
        call()
        done += 1
    samples: list[float] = []
    started = clock()
    while len(samples) < plan.min_iters or clock() - started < plan.min_seconds:
        begin = clock()
        call()
        samples.append(clock() - begin)
    return summarize(samples, batch_size)
