"""Pruning against a latency table: what a keep decision costs in milliseconds on a target.

    cost = LatencyCost(gated, table, batch)   # the gated model's units, priced by the table
    cost.predict(widths)                      # ms of the network with these group widths
    cost.expected_ms()                        # ms the current gates describe, differentiable
    latency_penalty(cost, budget_ms)          # relu(expected / budget - 1), like macs_penalty
    select_at_latency(cost, scores, budget_ms, fixed)   # greedy knapsack over grid widths
    fastest_widths(cost, kept)                # per group the fastest grid width >= kept
    select_at_target_by_table(cost, scores, macs, fixed)   # a MACs target at those widths

Decisions and width choices only ever consider grid widths (`table.grid_widths`), whose rows
are measured, so the latency they are priced at is the table's own, not an interpolation. The
differentiable estimate interpolates between grid rows: a smooth guide for gradient descent.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.errors import PruneError
from pipeline.io import read_json
from pipeline.latency.table import LatencyTable, MissingRows, grid_widths, needed_rows
from pipeline.latency.units import Unit, named_units
from pipeline.prune.budget import Decision, Scores, macs_fraction, select_at_target, top_mask
from pipeline.prune.gates import GatedModel, _kept

Widths = dict[str, int]


@dataclass(frozen=True)
class LatencyPlan:
    """A latency budget and the table it is priced with (latency/budget.json)."""

    table: LatencyTable
    budget_ms: float
    batch: int


PLAN_FORMAT = "prune-deploy/latency-plan/1"


def plan_document(table: LatencyTable | None, batch: int | None, **fields: Any) -> dict:
    """What the latency_plan stage writes: `fields` and the table at one batch (or none)."""
    return {"format": PLAN_FORMAT, **fields, "batch": batch,
            "table": table.at_batch(batch).as_dict() if table is not None else None}


def read_plan(path: Path) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        raise PruneError(f"{path} is not a latency plan ({PLAN_FORMAT}); run the latency_plan "
                         "stage (dvc repro latency_plan)")
    return data


def read_budget_plan(path: Path) -> LatencyPlan:
    """latency/budget.json as a LatencyPlan (it must hold a latency budget)."""
    data = read_plan(path)
    budget = data.get("budget") or {}
    if "latency_ms" not in budget or data.get("table") is None:
        raise PruneError(f"{path} holds no latency budget ({budget}); the resolved settings ask "
                         "for one: run dvc repro latency_plan")
    return LatencyPlan(LatencyTable.from_dict(data["table"]), float(budget["latency_ms"]),
                       int(data["batch"]))


@dataclass(frozen=True)
class WidthTable:
    """The table that chooses group widths (student_slim.widths: table), at one batch size."""

    table: LatencyTable
    batch: int


def read_width_table(path: Path) -> WidthTable | None:
    """The width table of a plan file (latency/slim.json for slimming; latency/budget.json
    when a MACs decision is priced at the table's widths), or None when widths are rounded."""
    data = read_plan(path)
    if data.get("widths") != "table":
        return None
    return WidthTable(LatencyTable.from_dict(data["table"]), int(data["batch"]))


class LatencyCost:
    """The latency table's price of a gated model's possible keep decisions at one batch."""

    def __init__(self, gated: GatedModel, table: LatencyTable, batch: int):
        if batch not in table.batch_sizes:
            raise PruneError(f"the latency table has batch sizes {table.batch_sizes}, not {batch}")
        self.gated, self.table, self.batch = gated, table, batch
        self.units = named_units(gated.plain_copy(), gated.plan.input_shape)
        self.widths = gated.group_widths()

    def candidates(self, key: str) -> list[int]:
        return grid_widths(self.widths[key], self.table.width_step)

    def _shaped_units(self, vectors: dict[str, torch.Tensor]) -> list[tuple[Unit, object, object]]:
        """(dense unit, kept inputs, kept outputs) per conv; counts are tensors when gated."""
        plan = self.gated.plan
        return [(unit, _kept(plan.in_spans, name, unit.cin, vectors),
                 _kept(plan.out_spans, name, unit.cout, vectors)) for name, unit in self.units]

    def units_at(self, widths: Widths) -> list[Unit]:
        """The units of the network with `widths[key]` channels kept in each group."""
        vectors = {key: torch.cat([torch.ones(w), torch.zeros(self.widths[key] - w)])
                   for key, w in widths.items()}
        shaped = []
        for unit, cin, cout in self._shaped_units(vectors):
            cin, cout = round(float(cin)), round(float(cout))
            groups = cin if unit.groups > 1 else 1
            shaped.append(Unit(unit.h, cin, cout, unit.stride, unit.k, groups, unit.epilogue))
        return shaped

    def predict(self, widths: Widths) -> float:
        """Calibrated ms of the network with these group widths (exact table rows)."""
        return self.table.predict_ms(self.units_at(widths), self.batch)

    def expected_ms(self) -> torch.Tensor:
        """Calibrated ms of the network the current gates describe, differentiable in the gate
        logits (straight-through): each conv's row interpolated at its kept (cin, cout)."""
        total = torch.zeros(())
        for unit, cin, cout in self._shaped_units(self.gated.gate_vectors()):
            cin, cout = (torch.as_tensor(c, dtype=torch.float32).cpu() for c in (cin, cout))
            total = total + self.table.interpolate(unit, cin, cout)
            if unit.epilogue == "add_relu":
                total = total + self.table.interpolate_add(unit.h_out, cout)
        c0, alpha = self.table.scale(self.batch)
        return c0 + alpha * total


def require_priced(student: torch.nn.Module, input_shape: tuple[int, ...],
                   table: LatencyTable) -> None:
    """Raise MissingRows (naming them) unless the table holds every row a decision can reach
    for this student (any grid widths): checked before training starts, not after it."""
    units = [unit for _, unit in named_units(student, input_shape)]
    missing = sorted(set(needed_rows(units, table.width_step)) - set(table.rows))
    if missing:
        raise MissingRows(missing)


def latency_penalty(cost: LatencyCost, budget_ms: float) -> torch.Tensor:
    """max(0, expected / budget - 1): zero once the table says the budget is met."""
    return F.relu(cost.expected_ms() / budget_ms - 1.0)


@dataclass(frozen=True)
class LatencyDecision:
    masks: dict[str, torch.Tensor]
    widths: Widths
    predicted_ms: float
    steps: int  # grid steps the knapsack took (down and up)


def _values(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cumulative saliency of keeping the top-w channels of each group (scores shifted to >= 0
    over all groups, so every kept channel adds value)."""
    low = min(float(s.min()) for s in scores.values())
    return {key: torch.cumsum(torch.sort(s.float() - low + 1e-6, descending=True).values, 0)
            for key, s in scores.items()}


def select_at_latency(cost: LatencyCost, scores: dict[str, torch.Tensor], budget_ms: float,
                      fixed: frozenset[str] = frozenset()) -> LatencyDecision:
    """The keep decision at grid widths with the most saliency whose predicted latency is at
    most `budget_ms` (HALP-style greedy knapsack: narrow the group whose move to any narrower
    grid width loses the least saliency per ms saved until the budget holds, then widen the
    one that gains the most per ms added while it still does). Groups in `fixed` keep every
    channel."""
    value = _values(scores)
    worth = lambda key, w: float(value[key][w - 1])  # noqa: E731 - read as a formula
    widths = dict(cost.widths)
    current, steps = cost.predict(widths), 0
    free = [key for key in widths if key not in fixed]
    while current > budget_ms:  # narrow: least saliency lost per ms saved
        best = None
        for key in free:
            for width in (c for c in cost.candidates(key) if c < widths[key]):
                trial = cost.predict({**widths, key: width})
                if trial < current:  # a staircase step may save nothing: look further down
                    ratio = (worth(key, widths[key]) - worth(key, width)) / (current - trial)
                    if best is None or ratio < best[0]:
                        best = (ratio, key, width, trial)
        if best is None:
            raise PruneError(f"latency budget {budget_ms:.4f} ms is below the fastest network "
                             f"the grid allows ({current:.4f} ms predicted at widths {widths})")
        _, key, widths[key], current = best
        steps += 1
    while True:  # widen: most saliency gained per ms added, while the budget holds
        best = None
        for key in free:
            for width in (c for c in cost.candidates(key) if c > widths[key]):
                trial = cost.predict({**widths, key: width})
                if trial <= budget_ms:
                    ratio = (worth(key, width) - worth(key, widths[key])) / max(
                        trial - current, 1e-9)
                    if best is None or ratio > best[0]:
                        best = (ratio, key, width, trial)
        if best is None:
            masks = {key: top_mask(s, widths[key]) for key, s in scores.items()}
            return LatencyDecision(masks, widths, current, steps)
        _, key, widths[key], current = best
        steps += 1


def fastest_widths(cost: LatencyCost, kept: Widths, tie: float = 0.01) -> Widths:
    """Per group, the grid width at or above `kept` that the table predicts fastest, by
    coordinate descent over the groups. Widths within `tie` x (network ms / groups) of the
    fastest count as equal, and the widest of them wins: channels that cost nothing.

    The answer is a fixed point (`fastest_widths(cost, answer) == answer`): the descent is
    restarted from its own answer until nothing moves, so a decision made at these widths
    (`select_at_target_by_table`) is not widened again by the slim stage. Widths only grow,
    so this ends."""
    widths = dict(kept)
    while True:
        moved = _descend(cost, widths, tie)
        if moved == widths:
            return widths
        widths = moved


def _descend(cost: LatencyCost, kept: Widths, tie: float) -> Widths:
    """Two rounds of coordinate descent over grid widths at or above `kept`."""
    widths = {key: next(c for c in cost.candidates(key) if c >= kept[key]) for key in kept}
    for _ in range(2):
        for key in kept:
            options = [c for c in cost.candidates(key) if c >= kept[key]]
            timed = [(cost.predict({**widths, key: c}), c) for c in options]
            fastest = min(ms for ms, _ in timed)
            slack = tie * fastest / max(len(kept), 1)
            widths[key] = max(c for ms, c in timed if ms <= fastest + slack)
    return widths


@dataclass(frozen=True)
class TableDecision:
    decision: Decision  # the shipped masks, at the table's widths, and their MACs
    widths: Widths
    predicted_ms: float
    inner_target: float  # the MACs target of the round_to-1 decision that was widened


def select_at_target_by_table(cost: LatencyCost, scores: Scores, target: float,
                              fixed: frozenset[str] = frozenset(),
                              iterations: int = 16) -> TableDecision:
    """The largest network at the table's widths whose MACs are at most `target`: a decision
    at exact channel counts (round_to 1) for an inner target, widened to `fastest_widths`, with
    the inner target found by bisection so that the widened network fits. Like `round_to`
    inside `select_at_target`, the widening is priced inside the decision: the network priced
    is the network that ships."""
    if not 0.0 < target <= 1.0:  # checked here: below, a PruneError means "search higher"
        raise PruneError(f"MACs target must be in (0, 1], got {target}")
    gated = cost.gated

    def shipped(inner: float) -> tuple[Decision, Widths]:
        exact = select_at_target(gated, scores, inner, 1, fixed)
        widths = fastest_widths(cost, exact.kept())
        masks = {key: top_mask(s, widths[key]) for key, s in scores.items()}
        return Decision(masks, macs_fraction(gated, masks), exact.threshold,
                        exact.top_up_blocks), widths

    low, high, inner, best = 0.0, target, target, None
    for _ in range(iterations):
        try:
            decision, widths = shipped(inner)
        except PruneError:  # below the smallest network this method may build: search higher
            low = inner
        else:
            if decision.macs_fraction <= target + 1e-12:
                if best is None or decision.macs_fraction > best[0].macs_fraction:
                    best = (decision, widths, inner)
                if inner == target:
                    break  # widening at the target itself fits: nothing larger can
                low = inner
            else:
                high = inner
        inner = (low + high) / 2
    if best is None:
        raise PruneError(f"MACs target {target} cannot be met at the latency table's widths: "
                         "every network tried was larger once widened to its fastest grid "
                         "widths")
    decision, widths, inner = best
    return TableDecision(decision, widths, cost.predict(widths), inner)

