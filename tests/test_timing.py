"""Latency statistics and the warm-up / stopping rule of pipeline.timing."""

import time

import numpy as np
import pytest

from pipeline.config import SectionError, validate
from pipeline.timing import (
    TimingPlan,
    measure_latency,
    measure_phases,
    phase_stats,
    run_plan,
    summarize,
)


class FakeClock:
    """A clock that moves only when the code under test 'works' for `step` seconds."""

    def __init__(self, step: float) -> None:
        self.now, self.step, self.calls = 0.0, step, 0

    def __call__(self) -> float:
        return self.now

    def work(self) -> None:
        self.calls += 1
        self.now += self.step


def test_percentiles_are_numpys_linear_rule():
    samples = [0.3, 7.0, 1.5, 2.25, 9.0, 4.0, 0.1]
    stats = summarize(samples, batch_size=1)
    assert stats.p50_ms == pytest.approx(1e3 * np.percentile(samples, 50))
    assert stats.p90_ms == pytest.approx(1e3 * np.percentile(samples, 90))
    assert stats.p99_ms == pytest.approx(1e3 * np.percentile(samples, 99))
    assert summarize([1.0, 2.0, 3.0, 4.0, 5.0], 1).p90_ms == pytest.approx(4600.0)


def test_statistics_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no samples"):
        summarize([], 1)


def test_summarize_reports_milliseconds_and_throughput():
    stats = summarize([0.004, 0.002, 0.001, 0.003], batch_size=8)
    assert stats.n == 4
    assert stats.p50_ms == pytest.approx(2.5)
    assert stats.mean_ms == pytest.approx(2.5)
    assert stats.std_ms == pytest.approx(1e3 * np.std([0.004, 0.002, 0.001, 0.003], ddof=1))
    assert stats.throughput == pytest.approx(8 / 0.0025)
    assert stats.clock == "host" and stats.phase_p50_ms == {}
    assert summarize([0.5], 1).std_ms == 0.0


def test_stopping_rule_waits_for_the_minimum_count():
    clock = FakeClock(step=0.1)
    plan = TimingPlan(warmup_iters=3, warmup_seconds=0.0, min_iters=7, min_seconds=0.2)
    stats = measure_latency(clock.work, plan, batch_size=1, clock=clock)
    assert stats.n == 7  # 0.2 s is reached after 2 calls; the count governs
    assert clock.calls == 3 + 7
    assert stats.p50_ms == pytest.approx(100.0)


def test_stopping_rule_waits_for_the_minimum_duration():
    clock = FakeClock(step=0.1)
    plan = TimingPlan(warmup_iters=1, warmup_seconds=0.5, min_iters=2, min_seconds=1.0)
    stats = measure_latency(clock.work, plan, batch_size=4, clock=clock)
    assert stats.n == 10  # 2 calls are not 1 s; the duration governs
    assert clock.calls == 5 + 10  # warm-up also lasts until 0.5 s
    assert stats.throughput == pytest.approx(40.0)


def test_warmup_samples_are_not_part_of_the_statistics():
    durations = iter([5.0, 5.0] + [1.0] * 4)  # two slow first calls
    clock = FakeClock(step=0.0)

    def call() -> None:
        clock.now += next(durations)

    plan = TimingPlan(warmup_iters=2, warmup_seconds=0.0, min_iters=4, min_seconds=0.0)
    stats = measure_latency(call, plan, batch_size=1, clock=clock)
    assert stats.n == 4 and stats.p99_ms == pytest.approx(1000.0)


def test_injected_delay_is_measured():
    delay = 0.005
    plan = TimingPlan(warmup_iters=1, warmup_seconds=0.0, min_iters=5, min_seconds=0.0)
    stats = measure_latency(lambda: time.sleep(delay), plan, batch_size=1)
    assert stats.n == 5
    assert stats.p50_ms >= 1e3 * delay
    assert stats.p50_ms <= 1.5 * 1e3 * delay


def test_phases_are_summed_and_their_medians_kept():
    samples = [{"h2d": 0.001, "compute": 0.004, "d2h": 0.001},
               {"h2d": 0.002, "compute": 0.006, "d2h": 0.001},
               {"h2d": 0.003, "compute": 0.005, "d2h": 0.002}]
    stats = phase_stats(samples, batch_size=2, clock_name="cuda-events")
    assert stats.p50_ms == pytest.approx(9.0)  # totals 6, 9, 10 ms
    assert stats.phase_p50_ms == pytest.approx({"h2d": 2.0, "compute": 5.0, "d2h": 1.0})
    assert stats.clock == "cuda-events"


def test_measure_phases_follows_the_plan():
    clock = FakeClock(step=0.01)

    def timed_call() -> dict[str, float]:
        clock.work()
        return {"compute": 0.002}

    plan = TimingPlan(warmup_iters=2, warmup_seconds=0.0, min_iters=3, min_seconds=0.05)
    stats = measure_phases(timed_call, plan, 1, "cuda-events", clock=clock)
    assert stats.n == 5 and stats.p50_ms == pytest.approx(2.0)
    assert run_plan(lambda: 1, TimingPlan(0, 0.0, 2, 0.0)) == [1, 1]


@pytest.mark.parametrize("kwargs", [dict(min_iters=0), dict(warmup_iters=-1),
                                    dict(min_seconds=-1.0)])
def test_impossible_plans_are_refused(kwargs):
    settings = dict(warmup_iters=1, warmup_seconds=0.0, min_iters=1, min_seconds=0.0) | kwargs
    with pytest.raises(SectionError, match=rf"timing\.{next(iter(kwargs))}: .*greater than"):
        validate(TimingPlan, settings, "timing")
