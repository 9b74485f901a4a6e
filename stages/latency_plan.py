"""latency_plan stage: what pruning reads from the latency table, and nothing more.

Writes latency/budget.json for every method's student_pruned stage: prune.budget, with the
table at the budget's batch size when the budget is a latency, or at latency.select_batch when a
MACs budget is decided at the widths the table ships (student_slim.widths: table). Writes
latency/slim.json for student_slim: student_slim.widths, with the table at latency.select_batch
when widths are chosen by table. A MACs budget and rounded widths leave those files unchanged
whatever the table measures, so a re-measured table retrains nothing that does not use it.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import LatencyConfig, PruneConfig, SlimConfig, as_dict
from pipeline.errors import PipelineError
from pipeline.io import read_json, write_json
from pipeline.latency.table import LatencyTable
from pipeline.prune.latency import plan_document
from stages._cli import stage_main


@dataclass(frozen=True)
class Settings:
    prune: PruneConfig
    student_slim: SlimConfig
    latency: LatencyConfig


@dataclass(frozen=True)
class Paths:
    table: Path = Path("latency/table.json")
    budget: Path = Path("latency/budget.json")
    slim: Path = Path("latency/slim.json")


def load_table(path: Path, why: str) -> LatencyTable:
    data = read_json(path)
    if data.get("status") != "ok":
        raise PipelineError(f"{why} needs the latency table, but it was not measured on "
                            f"{data.get('target')}: {data.get('reason')}")
    return LatencyTable.from_dict(data)


def run(s: Settings, paths: Paths) -> dict[str, Any]:
    budget = s.prune.latency_budget
    by_table = s.student_slim.widths == "table"
    table = (load_table(paths.table, "prune.budget.latency_ms" if budget else
                        "student_slim.widths: table") if budget or by_table else None)
    slim_doc = plan_document(table if by_table else None,
                             s.latency.select_batch if by_table else None,
                             widths=s.student_slim.widths)
    write_json(paths.budget, budget_document(s, table, by_table))
    write_json(paths.slim, slim_doc)
    return {"budget": as_dict(s.prune.budget), "widths": slim_doc["widths"]}


def budget_document(s: Settings, table: LatencyTable | None, by_table: bool) -> dict[str, Any]:
    """A latency budget with its table at the budget's batch; a MACs budget with the width
    table when the decision is made at the widths the table ships; else the budget alone."""
    budget = s.prune.latency_budget
    if budget:
        return plan_document(table, budget.batch, budget=as_dict(s.prune.budget))
    if by_table and s.prune.budget is not None:
        return plan_document(table, s.latency.select_batch, budget=as_dict(s.prune.budget),
                             widths="table")
    return plan_document(None, None, budget=as_dict(s.prune.budget))


def main() -> None:
    stage_main(__doc__, run, Settings, Paths())


if __name__ == "__main__":
    main()
