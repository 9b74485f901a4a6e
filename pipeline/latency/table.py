"""A latency table: measured per-layer rows on one target, and the whole-network model on top.

    rows = needed_rows(units, width_step)            # what a student's pruning can reach
    table = LatencyTable.build(key, overhead_ms, rows, time_probe, width_step)
    table.network_sum(units)                          # exact rows only (MissingRows otherwise)
    table.calibration = fit_calibration(sums, measured, table.overhead_ms)  # per batch size
    table.predict_ms(units, batch)                    # c0(batch) + alpha(batch) * sum of rows

Rows are keyed by `units.conv_key` / `units.add_key` and hold a probe's latency at the largest
batch size minus its baseline's (a lead-in conv, or the empty probe: one call, no work); the
per-call cost of each batch size is added back once per network. Grid widths (`grid_widths`) are
the only widths pruning decides between, so those lookups are measured, never interpolated;
`interpolate` (bilinear in (cin, cout) within one conv shape) serves the differentiable
estimate and the report of how far interpolation is off (measured on held-out rows: runtimes run
widths in blocks, e.g. 16 channels for ONNX Runtime's NCHWc kernels on AVX-512, which a linear
interpolation cannot see).
"""

import math
import statistics
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from pipeline.errors import PipelineError
from pipeline.latency.probes import conv_probe, lead_in_probe
from pipeline.latency.units import Unit, add_key, conv_key

FORMAT = "prune-deploy/latency-table/1"
SMALL_STEP = 4  # grid step below width_step: narrow groups have few channels to choose from
# A baseline (a lead-in conv) is subtracted from every row of its input shape, so its error
# would shift them all: it is timed this many times per pass, the fastest kept.
BASELINE_REPEATS = 2

# probe model -> ms at the table's row batch size; targets/latency_probe.py times it on a target
TimeProbe = Callable[[onnx.ModelProto], float]


class MissingRows(PipelineError):
    """A prediction needs rows the table has not measured."""

    def __init__(self, keys: list[str]):
        super().__init__(f"{len(keys)} latency table rows are not measured, e.g. {keys[:3]}")
        self.keys = keys


def grid_widths(width: int, step: int) -> list[int]:
    """Candidate widths of a group of `width` channels: multiples of `step` below it (of 4
    below `step`) and the width itself."""
    small = range(SMALL_STEP, min(step, width), SMALL_STEP)
    return sorted({*small, *range(step, width, step), width})


@dataclass(frozen=True)
class Row:
    """What to measure for one table key: the probe's time minus its baseline's (None: minus
    the empty probe's)."""

    key: str
    probe: Callable[[], onnx.ModelProto]
    baseline: "Row | None" = None


def lead_in_row(h: int, channels: int) -> Row:
    return Row(f"lead_in/h{h}/c{channels}", lambda: lead_in_probe(h, channels))


def conv_row(unit: Unit, cin: int, cout: int) -> Row:
    shaped = Unit(unit.h, cin, cout, unit.stride, unit.k, unit.groups)
    return Row(conv_key(unit.family(), cin, cout), lambda: conv_probe(shaped),
               lead_in_row(unit.h, cin))


def add_row(h: int, channels: int) -> Row:
    """The residual add + ReLU after a conv of `channels` -> `channels` at height h."""
    plain = Unit(h, channels, channels)
    return Row(add_key(h, channels), lambda: conv_probe(plain, residual=True),
               conv_row(plain, channels, channels))


def unit_rows(unit: Unit) -> list[Row]:
    """The rows one unit's latency is the sum of."""
    rows = [conv_row(unit, unit.cin, unit.cout)]
    if unit.epilogue == "add_relu":
        rows.append(add_row(unit.h_out, unit.cout))
    return rows


def needed_rows(units: Iterable[Unit], width_step: int) -> dict[str, Row]:
    """Every row a pruned version of these (unpruned) units can need at grid widths: each conv
    over grid(cin) x grid(cout), each residual add over grid(cout). Depthwise convs (groups ==
    cin == cout) keep their widths tied."""
    rows: dict[str, Row] = {}
    for unit in units:
        for cout in grid_widths(unit.cout, width_step):
            if unit.groups > 1:
                pairs = [(cout, cout)] if unit.groups == unit.cin == unit.cout else []
            else:
                pairs = [(cin, cout) for cin in grid_widths(unit.cin, width_step)]
            for cin, out in pairs:
                shaped = Unit(unit.h, cin, out, unit.stride, unit.k,
                              cin if unit.groups > 1 else 1, unit.epilogue)
                rows.update((row.key, row) for row in unit_rows(shaped))
    return rows


@dataclass
class Calibration:
    """prediction = c0 + alpha x sum of rows, per batch size (`fit_line`)."""

    c0: dict[int, float]  # ms per call that no row accounts for (call, pooling, reorders ...)
    alpha: dict[int, float]
    networks: dict[int, dict[str, dict[str, float]]]  # batch -> name -> sum/measured/predicted

    def as_dict(self) -> dict[str, Any]:
        return {"fit": "c0 + alpha * sum of rows (least relative error)",
                "c0_ms": {str(b): v for b, v in self.c0.items()},
                "alpha": {str(b): a for b, a in self.alpha.items()},
                "networks": {str(b): nets for b, nets in self.networks.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        return cls({int(b): v for b, v in data["c0_ms"].items()},
                   {int(b): a for b, a in data["alpha"].items()},
                   {int(b): nets for b, nets in data["networks"].items()})


def fit_line(sums: list[float], measured: list[float], overhead: float) -> tuple[float, float]:
    """(c0, alpha) minimising sum(((c0 + alpha * s - m) / m) ** 2). With fewer than three
    networks, or where the free fit would give a negative c0, c0 is the empty call's time
    (`overhead`) and only alpha is fitted. Measured here (ONNX Runtime CPU, 2 threads, six
    ResNet networks, leave-one-out): the free fit's median error was 6 % at batch 1 and 2 % at
    batch 64, against 17 % and 5 % with c0 fixed at the empty call."""
    s, m = np.asarray(sums, float), np.asarray(measured, float)
    if len(s) >= 3:
        design = np.stack([1 / m, s / m], axis=1)
        (c0, alpha), *_ = np.linalg.lstsq(design, np.ones_like(m), rcond=None)
        if c0 >= 0:
            return float(c0), float(alpha)
    den = float(np.sum(s * s / m ** 2))
    if den <= 0:
        raise PipelineError("cannot calibrate the latency model: every row sum is zero")
    return overhead, float(np.sum(s * (m - overhead) / m ** 2)) / den


def fit_calibration(sums: dict[int, dict[str, float]], measured: dict[int, dict[str, float]],
                    overhead: dict[int, float]) -> Calibration:
    """Fit (c0, alpha) per batch size on every network; each network's `loo_predicted_ms`
    comes from a fit on the others (leave-one-out), which is the error the report quotes."""
    c0, alpha, networks = {}, {}, {}
    for batch, by_name in sums.items():
        names = sorted(by_name)
        s = [by_name[n] for n in names]
        m = [measured[batch][n] for n in names]
        c0[batch], alpha[batch] = fit_line(s, m, overhead[batch])
        networks[batch] = {}
        for i, name in enumerate(names):
            others = [j for j in range(len(names)) if j != i]
            loo = (fit_line([s[j] for j in others], [m[j] for j in others], overhead[batch])
                   if others else (c0[batch], alpha[batch]))
            predicted = loo[0] + loo[1] * s[i]
            networks[batch][name] = {"sum_ms": s[i], "measured_ms": m[i],
                                     "loo_predicted_ms": predicted,
                                     "rel_err": (predicted - m[i]) / m[i]}
    return Calibration(c0, alpha, networks)


def error_summary(errors: Iterable[float]) -> dict[str, float | int]:
    values = [abs(e) for e in errors]
    if not values:
        return {"n": 0}
    return {"n": len(values), "median_abs_rel_err": statistics.median(values),
            "max_abs_rel_err": max(values)}


@dataclass
class LatencyTable:
    """Rows measured at one batch size (`row_batch`), and a model per predicted batch size.

    Rows are timed at the largest batch size only: at batch 1 a row is the difference of two
    probes of some 40 microseconds each, and on the 2-core VM those differences came out as
    noise (convs measured faster than nothing). Each batch size's latency is then predicted as
    c0(batch) + alpha(batch) x the sum of the rows, fitted on networks measured at that batch
    size (`fit_calibration`).
    """

    key: dict[str, Any]  # what the rows are valid for: target, runtime, machine, threads ...
    batch_sizes: list[int]  # batch sizes predicted (each has an overhead and, once fitted, alpha)
    row_batch: int  # the batch size rows are measured at
    width_step: int
    overhead_ms: dict[int, float]  # the empty probe per batch size: one call that does nothing
    rows: dict[str, float] = field(default_factory=dict)  # ms at row_batch, baseline removed
    calibration: Calibration | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # build time, holdout errors ...
    probe_ms: dict[str, float] = field(default_factory=dict)  # raw probe times at row_batch

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, key: dict[str, Any], overhead_ms: dict[int, float], rows: dict[str, Row],
              time_probe: TimeProbe, width_step: int, passes: int = 1) -> "LatencyTable":
        """Rows timed by `time_probe` (ms at the largest of overhead_ms's batch sizes)."""
        batches = sorted(overhead_ms)
        table = cls(key, batches, batches[-1], width_step, dict(overhead_ms))
        table.ensure(rows.values(), time_probe, passes)
        return table

    def ensure(self, rows: Iterable[Row], time_probe: TimeProbe, passes: int = 1) -> int:
        """Measure the rows not in the table yet; returns how many were measured.

        Every probe not timed yet (rows and their baselines) is timed once per pass, pass after
        pass through all of them, and keeps its fastest time: a slow spell of the machine then
        falls on different probes in different passes instead of on all timings of one probe.
        """
        todo = {row.key: row for row in rows if row.key not in self.rows}
        probes = {**{r.baseline.key: r.baseline for r in todo.values() if r.baseline}, **todo}
        probes = {key: row for key, row in probes.items() if key not in self.probe_ms}
        weight = {key: BASELINE_REPEATS if key not in todo else 1 for key in probes}
        for _ in range(passes):
            for key in sorted(probes):
                for _ in range(weight[key]):
                    ms = time_probe(probes[key].probe())
                    self.probe_ms[key] = min(ms, self.probe_ms.get(key, ms))
        for key in sorted(todo):
            row = todo[key]
            base = (self.probe_ms[row.baseline.key] if row.baseline
                    else self.overhead_ms[self.row_batch])
            self.rows[key] = max(0.0, self.probe_ms[key] - base)
        return len(todo)

    # ------------------------------------------------------------------ lookups
    def row_ms(self, key: str) -> float:
        if key not in self.rows:
            raise MissingRows([key])
        return self.rows[key]

    def unit_ms(self, unit: Unit) -> float:
        return sum(self.row_ms(row.key) for row in unit_rows(unit))

    def network_sum(self, units: Iterable[Unit]) -> float:
        """Sum of the exact rows of `units` (MissingRows names every row not measured)."""
        units = list(units)
        missing = sorted({row.key for unit in units for row in unit_rows(unit)} - set(self.rows))
        if missing:
            raise MissingRows(missing)
        return sum(self.unit_ms(unit) for unit in units)

    def scale(self, batch: int) -> tuple[float, float]:
        """(c0, alpha) of `batch`: prediction = c0 + alpha x sum of rows."""
        if self.calibration is None:
            raise PipelineError("the latency table has no calibration")
        if batch not in self.calibration.alpha:
            raise PipelineError(f"the latency table is calibrated for batch sizes "
                                f"{sorted(self.calibration.alpha)}, not {batch}")
        return self.calibration.c0[batch], self.calibration.alpha[batch]

    def predict_ms(self, units: Iterable[Unit], batch: int) -> float:
        c0, alpha = self.scale(batch)
        return c0 + alpha * self.network_sum(units)

    def conv_grid(self, family: tuple[int, int, int, int]
                  ) -> tuple[list[int], list[int], dict[tuple[int, int], float]]:
        """The measured grid of one conv shape: (cins, couts, ms by (cin, cout)), every pair
        of cins x couts measured. Rows off the width_step grid (exact rows of other networks)
        are left out, so that interpolation always has its four corners."""
        prefix = conv_key(family, 0, 0).rsplit("/", 1)[0] + "/c"
        points = {}
        for key, ms in self.rows.items():
            if key.startswith(prefix):
                cin, cout = key[len(prefix):].split("-")
                points[(int(cin), int(cout))] = ms
        if not points:
            raise MissingRows([conv_key(family, 0, 0)])
        cins = grid_widths(max(c for c, _ in points), self.width_step)
        couts = grid_widths(max(c for _, c in points), self.width_step)
        cins = [c for c in cins if all((c, o) in points for o in couts)]
        couts = [o for o in couts if all((c, o) in points for c in cins)]
        if not cins or not couts:
            raise MissingRows([conv_key(family, max(c for c, _ in points),
                                        max(o for _, o in points))])
        return cins, couts, {(c, o): points[(c, o)] for c in cins for o in couts}

    def interpolate_conv(self, unit: Unit) -> float:
        """The unit's conv row, interpolated between the measured grid rows of its conv shape
        where it is not measured itself."""
        exact = self.rows.get(unit.conv_key())
        return exact if exact is not None else self.interpolate(unit, unit.cin, unit.cout)

    def interpolate(self, unit: Unit, cin, cout):
        """Bilinear interpolation in (cin, cout) between the grid rows of the unit's conv shape.
        cin and cout may be tensors: the result then keeps their gradient."""
        cins, couts, points = self.conv_grid(unit.family())
        (i0, i1, wi), (o0, o1, wo) = _towards(cins, cin), _towards(couts, cout)
        return ((1 - wi) * (1 - wo) * points[(i0, o0)] + wi * (1 - wo) * points[(i1, o0)]
                + (1 - wi) * wo * points[(i0, o1)] + wi * wo * points[(i1, o1)])

    def interpolate_add(self, h: int, channels):
        """The residual add + ReLU row at height h, linear in the channels between its rows
        (channels may be a tensor, as in `interpolate`)."""
        prefix = add_key(h, 0)[:-1]
        points = {int(key[len(prefix):]): ms for key, ms in self.rows.items()
                  if key.startswith(prefix)}
        if not points:
            raise MissingRows([add_key(h, channels if isinstance(channels, int) else 0)])
        low, high, weight = _towards(sorted(points), channels)
        return (1 - weight) * points[low] + weight * points[high]

    def at_batch(self, batch: int) -> "LatencyTable":
        """The rows and one batch size's calibration: what pruning at that batch reads, so that
        re-measuring another batch size's networks changes nothing downstream of it."""
        if batch not in self.batch_sizes:
            raise PipelineError(f"the latency table has batch sizes {self.batch_sizes}, "
                                f"not {batch}")
        calibration = None
        if self.calibration is not None:
            calibration = Calibration({batch: self.calibration.c0[batch]},
                                      {batch: self.calibration.alpha[batch]},
                                      {batch: self.calibration.networks[batch]})
        return LatencyTable(self.key, [batch], self.row_batch, self.width_step,
                            {batch: self.overhead_ms[batch]}, dict(self.rows), calibration)

    # ------------------------------------------------------------------ storage
    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "key": self.key, "batch_sizes": self.batch_sizes,
                "row_batch": self.row_batch, "width_step": self.width_step,
                "overhead_ms": {str(b): v for b, v in self.overhead_ms.items()},
                "rows": dict(sorted(self.rows.items())),
                "calibration": self.calibration.as_dict() if self.calibration else None,
                "probe_ms": dict(sorted(self.probe_ms.items())), **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LatencyTable":
        if data.get("format") != FORMAT:
            raise PipelineError(f"not a latency table of format {FORMAT}: "
                                f"format {data.get('format')!r}")
        known = {"format", "key", "batch_sizes", "row_batch", "width_step", "overhead_ms",
                 "rows", "calibration", "probe_ms"}
        try:
            return cls._from_fields(data, known)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise PipelineError(f"malformed latency table ({type(err).__name__}: {err}); "
                                "re-measure it: dvc repro -f -s latency_table") from err

    @classmethod
    def _from_fields(cls, data: dict[str, Any], known: set[str]) -> "LatencyTable":
        calibration = data.get("calibration")
        return cls(data["key"], [int(b) for b in data["batch_sizes"]], int(data["row_batch"]),
                   int(data["width_step"]),
                   {int(b): v for b, v in data["overhead_ms"].items()}, dict(data["rows"]),
                   Calibration.from_dict(calibration) if calibration else None,
                   {k: v for k, v in data.items() if k not in known},
                   dict(data.get("probe_ms", {})))


def bracket(grid: list[int], x: float) -> tuple[int, int, float]:
    """The grid neighbours of x and x's weight towards the upper one (linear; extrapolates
    beyond the ends, so a gradient exists everywhere)."""
    if len(grid) == 1:
        return grid[0], grid[0], 0.0
    j = min(max(bisect_left(grid, x), 1), len(grid) - 1)
    low, high = grid[j - 1], grid[j]
    return low, high, (x - low) / (high - low)


def _towards(grid: list[int], x) -> tuple[int, int, Any]:
    """`bracket` for a number or a tensor x; the weight is computed from x itself, so a tensor
    keeps its gradient."""
    at = float(x.detach()) if hasattr(x, "detach") else float(x)
    low, high, _ = bracket(grid, at)
    return low, high, ((x - low) / (high - low) if high != low else x * 0)


def holdout_widths(grid: list[int], count: int) -> list[int]:
    """Up to `count` widths between grid points (midpoints rounded down), for measuring how
    far interpolation is off."""
    middles = [(a + b) // 2 for a, b in zip(grid, grid[1:], strict=False) if b - a > 1]
    if len(middles) <= count:
        return middles
    step = len(middles) / count
    return [middles[math.floor(i * step)] for i in range(count)]
