"""The method comparison: one row per pruning method (and the references), from the benchmark
rows, with the project's Performance Efficiency, and a chart of top-1 against measured latency.

Inputs are benchmark rows (metrics/benchmark_<target>.json), which carry each model's cost,
sparsity, pruning method and PyTorch top-1 on the whole test split (`checkpoint_top1`).

Performance Efficiency (the project's definition; docs/methods.md): with chance = 1 / classes,

    R   = (top1 - chance) / (top1_dense - chance)       accuracy retained above chance
    C_x = 1 - x / x_dense                               share of cost x removed
    PE  = R * C_params_nonzero                          (the table's PE column)
    PE_latency = R * C_p50                              (measured latency on the chart target)

It is 0 when nothing was removed and 0 when the model kept nothing above chance, rises with
either, and compares across class counts. The references (teacher, dense student) get 0: they
are not compressions of the dense student.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts import final_model
from pipeline.config import ReportConfig
from pipeline.io import atomic_output

PRECISION_ORDER = {"fp32": 0, "fp16": 1, "bf16": 2, "int8": 3}


def measured(row: dict | None) -> bool:
    """A row with a latency: status ok and a p50."""
    return row is not None and row.get("status") == "ok" and bool(row.get("p50_ms"))


@dataclass(frozen=True)
class Compared:
    """One model of the comparison, its facts taken from its benchmark rows."""

    model: str
    method: str  # the pruning method, or "reference"
    facts: dict[str, Any]  # one of its rows: cost, sparsity, top-1
    latency: dict[tuple[str, str, int], float]  # (target, precision, batch) -> p50 ms

    @property
    def top1(self) -> float:
        return float(self.facts.get("checkpoint_top1") or 0.0)


def collect(rows: Sequence[dict], settings: ReportConfig,
            methods: Sequence[str]) -> list[Compared]:
    """The references and every method's pruned student that has benchmark rows."""
    order = [(settings.baseline_model, "reference"), (settings.dense_model, "reference"),
             *[(final_model(m), m) for m in methods]]
    compared = []
    for model, method in order:
        mine = [r for r in rows if r["model"] == model]
        if not mine:
            continue
        latency = {(r["target"], r["precision"], r["batch_size"]): r["p50_ms"]
                   for r in mine if measured(r)}
        compared.append(Compared(model, method, mine[0], latency))
    return compared


def measured_groups(compared: Sequence[Compared]) -> list[tuple[str, str]]:
    """(target, precision) pairs where something was measured, in a stable order."""
    groups = {key[:2] for c in compared for key in c.latency}
    return sorted(groups, key=lambda g: (g[0], PRECISION_ORDER.get(g[1], 9)))


def batch_sizes(compared: Sequence[Compared]) -> list[int]:
    return sorted({key[2] for c in compared for key in c.latency})


def retained(top1: float, dense_top1: float, classes: int) -> float:
    """Accuracy retained above chance, relative to the dense student."""
    chance = 1.0 / classes if classes else 0.0
    span = dense_top1 - chance
    return (top1 - chance) / span if span > 0 else 0.0


def efficiency(model: Compared, dense: Compared, settings: ReportConfig) -> tuple[float, float]:
    """(PE on non-zero params, PE on measured p50 at batch 1 on the chart target)."""
    if model.method == "reference":
        return 0.0, 0.0
    r = retained(model.top1, dense.top1, int(model.facts.get("num_classes") or 0))
    params = 1 - model.facts["params_nonzero"] / dense.facts["params_nonzero"]
    key = (settings.chart_target, settings.chart_precision, min(batch_sizes([dense]) or [1]))
    latency = (1 - model.latency[key] / dense.latency[key]
               if key in model.latency and key in dense.latency else 0.0)
    return r * params, r * latency


def _num(value: float, fmt: str) -> str:
    return f"{value:{fmt}}"


def cost_table(compared: Sequence[Compared], settings: ReportConfig) -> str:
    """Accuracy, size, cost and PE of every model (a number in every cell)."""
    dense = next(c for c in compared if c.model == settings.dense_model)
    header = ["model", "method", "top-1 %", "Δ top-1 vs dense (points)", "params",
              "params non-zero", "MACs (executed)", "MACs non-zero", "sparsity %",
              "MACs-predicted speed-up vs dense", "PE", "PE (latency)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in compared:
        f = c.facts
        pe, pe_latency = efficiency(c, dense, settings)
        cells = [c.model, c.method, _num(100 * c.top1, ".2f"),
                 _num(100 * (c.top1 - dense.top1), "+.2f"), _num(f["params"], ","),
                 _num(f["params_nonzero"], ","), _num(f["macs"], ","),
                 _num(f["macs_nonzero"], ","), _num(100 * float(f.get("sparsity") or 0), ".1f"),
                 _num(dense.facts["macs"] / f["macs"], ".2f") + "x",
                 _num(pe, ".3f"), _num(pe_latency, ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def latency_table(compared: Sequence[Compared], settings: ReportConfig) -> str:
    """p50 and measured speed-up vs the dense student, per target, precision and batch size."""
    dense = next(c for c in compared if c.model == settings.dense_model)
    columns = [(t, p, b) for t, p in measured_groups(compared) for b in batch_sizes(compared)]
    header = ["model"] + [f"{t} {p} b{b}: p50 ms (speed-up)" for t, p, b in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in compared:
        cells = [c.model]
        for key in columns:
            if key in c.latency and key in dense.latency:
                cells.append(f"{c.latency[key]:.3f} ({dense.latency[key] / c.latency[key]:.2f}x)")
            else:
                cells.append("— (not measured)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def notes(compared: Sequence[Compared], target: float | None) -> list[str]:
    sentences = [
        "Top-1: PyTorch on the whole test split. Params and MACs count the network as a dense "
        "runtime executes it; 'non-zero' counts what a sparse format or kernel could keep. "
        "Speed-ups compare with the dense student: MACs-predicted = its MACs / the model's, "
        "measured = its p50 / the model's. PE = accuracy retained above chance x share of "
        "non-zero parameters removed; PE (latency) uses the measured batch-1 p50 instead "
        "(docs/methods.md); 0 for the references.",
        "Structured methods were driven to a common kept-MACs target of "
        f"{target:.2f}." if target is not None else
        "No common MACs target was set: every method pruned to its own size."]
    if any(c.facts.get("structured") is False for c in compared):
        sentences.append(
            "weight: its zeros sit inside dense weight tensors, so dense runtimes execute every "
            "MAC (MACs-predicted speed-up 1.00x) and it is not faster; its saving is the "
            "non-zero parameters (and MACs for a sparse kernel this benchmark does not have).")
    return sentences


def method_chart(compared: Sequence[Compared], settings: ReportConfig, path: Path) -> None:
    """top-1 against measured p50 on the chart target: one point per method, the teacher and
    the dense student as references; one panel per batch size."""
    from matplotlib.figure import Figure

    batches = batch_sizes(compared) or [1]
    figure = Figure(figsize=(6.0 * len(batches), 4.5))
    for panel, batch in enumerate(batches, 1):
        axes = figure.add_subplot(1, len(batches), panel)
        key = (settings.chart_target, settings.chart_precision, batch)
        for index, c in enumerate(compared):
            if key not in c.latency:
                continue
            reference = c.method == "reference"
            axes.scatter(c.latency[key], 100 * c.top1, s=70 if reference else 50,
                         marker="*" if reference else "o",
                         color="black" if reference else f"C{index}")
            axes.annotate(c.model if reference else c.method, (c.latency[key], 100 * c.top1),
                          fontsize=8, xytext=(4, 3), textcoords="offset points")
        axes.set_xlabel(f"p50 latency ms ({settings.chart_target} {settings.chart_precision}, "
                        f"batch {batch})")
        axes.set_ylabel("top-1 % (test split)")
        axes.set_title(f"methods vs references, batch {batch}")
        axes.grid(alpha=0.3)
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def comparison_section(rows: Sequence[dict], settings: ReportConfig, methods: Sequence[str],
                       target: float | None, chart: Path) -> list[str]:
    """The report's method comparison (markdown lines); draws the chart into `chart`."""
    compared = collect(rows, settings, methods)
    method_chart(compared, settings, chart)
    if not any(c.model == settings.dense_model for c in compared):
        return ["No benchmark rows of the dense student: the methods cannot be compared."]
    missing = [m for m in methods if not any(c.method == m for c in compared)]
    return ["## Method comparison", "", *[f"- {s}" for s in notes(compared, target)],
            *([f"- No benchmark rows for: {', '.join(missing)}."] if missing else []), "",
            cost_table(compared, settings), latency_table(compared, settings),
            f"![top-1 vs measured latency]({chart.name})", ""]
