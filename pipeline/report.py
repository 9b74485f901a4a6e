"""The comparison report: the method comparison (pipeline.comparison: one row per pruning method
and reference, Performance Efficiency, top-1 against latency), one table of every benchmark row,
two charts, and sentences generated from the numbers saying where each method's pruning paid off
in measured latency and where it did not, and the fastest runtime per model, precision and
batch size.

Input rows are the benchmark stage's (metrics/benchmark_<target>.json "results"). Speedups compare
rows of the same target, precision and batch size: measured = p50 of the reference model / p50
of the row's model; predicted = MACs of the reference / MACs of the row's model.
"""

import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.artifacts import final_model
from pipeline.comparison import PRECISION_ORDER, comparison_section
from pipeline.comparison import measured as _ok
from pipeline.config import ReportConfig
from pipeline.errors import PipelineError
from pipeline.io import atomic_output, atomic_write_text


class ReportError(PipelineError):
    """Benchmark results are missing or not in the benchmark stage's format."""


def load_rows(files: Iterable[Path]) -> list[dict[str, Any]]:
    rows = []
    for path in files:
        try:
            results = json.loads(Path(path).read_text())["results"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ReportError(f"{path}: not a benchmark results file ({err}); run the benchmark "
                              "stage for this target") from err
        rows.extend(results.values())
    return rows


def _group(row: dict) -> tuple:
    return row["target"], row["precision"], row["batch_size"]


def speedup(rows_by_key: dict[tuple, dict], row: dict, reference_model: str) -> tuple:
    """(measured, MACs-predicted) speedup of `row` over the reference model in its group."""
    reference = rows_by_key.get((reference_model, *_group(row)))
    if reference is None:
        return None, None
    predicted = (reference["macs"] / row["macs"]) if reference.get("macs") and row.get("macs") \
        else None
    measured = reference["p50_ms"] / row["p50_ms"] if _ok(reference) and _ok(row) else None
    return measured, predicted


def sort_rows(rows: Sequence[dict], model_order: Sequence[str]) -> list[dict]:
    rank = {model: i for i, model in enumerate(model_order)}
    return sorted(rows, key=lambda r: (rank.get(r["model"], len(rank)), r["model"], r["target"],
                                       PRECISION_ORDER.get(r["precision"], 9), r["batch_size"]))


def with_speedups(rows: Sequence[dict], baseline_model: str) -> list[dict]:
    by_key = {(r["model"], *_group(r)): r for r in rows}
    out = []
    for row in rows:
        measured, predicted = speedup(by_key, row, baseline_model)
        out.append(row | {"speedup": measured, "macs_speedup": predicted})
    return out


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{fmt}}{suffix}"


def markdown_table(rows: Sequence[dict], baseline_model: str) -> str:
    """The results table; a skipped/failed row's reason becomes a numbered note below it."""
    header = ["model", "target", "precision", "batch", "status", "size MB", "top-1 %", "p50 ms",
              "p99 ms", "images/s", f"speedup vs {baseline_model}", "MACs-predicted"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes: list[str] = []
    for r in with_speedups(rows, baseline_model):
        status = r["status"]
        if status != "ok" and r.get("reason"):
            reason = " ".join(str(r["reason"]).split())  # one line, whatever the error said
            if reason not in notes:
                notes.append(reason)
            status += f" [{notes.index(reason) + 1}]"
        top1 = None if r.get("top1") is None else 100 * r["top1"]
        cells = [r["model"], r["target"], r["precision"], str(r["batch_size"]), status,
                 _num(r.get("size_mb"), ".2f"), _num(top1, ".2f"), _num(r.get("p50_ms"), ".3f"),
                 _num(r.get("p99_ms"), ".3f"), _num(r.get("images_per_s"), ",.0f"),
                 _num(r["speedup"], ".2f", "x"), _num(r["macs_speedup"], ".2f", "x")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *[f"[{i}] {note}" for i, note in enumerate(notes, 1)]]
    return "\n".join(lines).rstrip() + "\n"


def fastest_table(rows: Sequence[dict], model_order: Sequence[str]) -> str:
    """Per model, precision and batch size: the target with the lowest measured p50, and the
    runner-up (compare within one run: absolute latencies move between runs)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if _ok(row):
            groups.setdefault((row["model"], row["precision"], row["batch_size"]), []).append(row)
    rank = {model: i for i, model in enumerate(model_order)}
    order = sorted(groups, key=lambda g: (rank.get(g[0], len(rank)), g[0],
                                          PRECISION_ORDER.get(g[1], 9), g[2]))
    if not groups:
        return "No target measured anything.\n"
    lines = ["| model | precision | batch | fastest | p50 ms | runner-up | p50 ms | ratio |",
             "|" + "---|" * 8]
    for model, precision, batch in order:
        first, *rest = sorted(groups[(model, precision, batch)], key=lambda r: r["p50_ms"])
        runner_up = rest[0]["p50_ms"] if rest else None
        cells = [model, precision, str(batch), first["target"], f"{first['p50_ms']:.3f}",
                 rest[0]["target"] if rest else "—", _num(runner_up, ".3f"),
                 _num(runner_up and runner_up / first["p50_ms"], ".2f", "x")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _where(row: dict) -> str:
    return f"{row['target']} {row['precision']} batch {row['batch_size']}"


def pruning_findings(rows: Sequence[dict], settings: ReportConfig, pruned: str) -> list[str]:
    """Sentences on one pruned student vs the dense one, from every group where both were
    measured."""
    dense = settings.dense_model
    by_key = {(r["model"], *_group(r)): r for r in rows}
    compared = []
    for row in rows:
        if row["model"] == pruned:
            measured, predicted = speedup(by_key, row, dense)
            if measured is not None and predicted is not None:
                compared.append((row, measured, predicted))
    if not compared:
        return [f"No target measured both {dense} and {pruned}, so whether pruning paid off in "
                "latency cannot be said from these results."]
    paid = [c for c in compared if c[1] >= settings.paid_off_speedup]
    unpaid = [c for c in compared if c[1] < settings.paid_off_speedup]

    def listing(items: list[tuple]) -> str:
        return "; ".join(f"{_where(r)} ({m:.2f}x measured vs {p:.2f}x predicted by MACs)"
                         for r, m, p in items)

    sentences = []
    if paid:
        sentences.append(f"Pruning paid off ({pruned} at least {settings.paid_off_speedup:.2f}x "
                         f"faster than {dense}) on {listing(paid)}.")
    if unpaid:
        slower = [r for r, m, _ in unpaid if m < 1]
        sentences.append(f"It did not pay off on {listing(unpaid)}"
                         + (f"; {pruned} was even slower on "
                            f"{', '.join(_where(r) for r in slower)}." if slower else "."))
    realised = statistics.median(m / p for _, m, p in compared)
    sentences.append(f"Across the {len(compared)} comparable configurations, the measured speedup "
                     f"was a median {realised:.0%} of what the MACs reduction predicts.")
    return sentences


def accuracy_findings(rows: Sequence[dict]) -> list[str]:
    """top-1 of each model on the first runtime that measured it, and what failed to run."""
    sentences = []
    first = {}
    for row in rows:
        if _ok(row) and row.get("top1") is not None:
            first.setdefault(row["model"], row)
    if first:
        parts = [f"{m} {100 * r['top1']:.2f}% ({r['target']} {r['precision']})"
                 for m, r in first.items()]
        sentences.append("Top-1 on the test images: " + ", ".join(parts) + ".")
    skipped = sorted({r["target"] for r in rows if r["status"] == "skipped"})
    failed = sorted({f"{r['target']}/{r['model']}/{r['precision']}" for r in rows
                     if r["status"] == "failed"})
    if skipped:
        sentences.append(f"Skipped (not available where the benchmark ran): {', '.join(skipped)}.")
    if failed:
        sentences.append(f"Failed: {', '.join(failed)} (reasons in the notes under the table).")
    return sentences


def _save_figure(figure, path: Path) -> None:
    """PNG written atomically, like every other output."""
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def latency_chart(rows: Sequence[dict], models: Sequence[str], path: Path) -> None:
    """p50 latency (bar) to p99 (whisker) per target/precision, one bar per model, one panel per
    batch size. Built on a bare Figure (Agg canvas), so no pyplot global state is touched."""
    from matplotlib.figure import Figure

    measured = [r for r in rows if _ok(r)]
    batches = sorted({r["batch_size"] for r in measured}) or [1]
    widest = max([len({(r["target"], r["precision"]) for r in measured
                       if r["batch_size"] == batch}) for batch in batches])
    figure = Figure(figsize=(max(6.0, 1.7 * widest), 3.6 * len(batches)),  # 1.7 in per group
                    layout="constrained")
    for panel, batch in enumerate(batches, 1):
        axes = figure.add_subplot(len(batches), 1, panel)
        group_rows = [r for r in measured if r["batch_size"] == batch]
        groups = sorted({(r["target"], r["precision"]) for r in group_rows},
                        key=lambda g: (g[0], PRECISION_ORDER.get(g[1], 9)))
        width = 0.8 / max(1, len(models))
        for index, model in enumerate(models):
            by_group = {(r["target"], r["precision"]): r for r in group_rows if r["model"] == model}
            xs = [g for g, key in enumerate(groups) if key in by_group]
            p50 = [by_group[groups[g]]["p50_ms"] for g in xs]
            p99 = [by_group[groups[g]]["p99_ms"] - by_group[groups[g]]["p50_ms"] for g in xs]
            axes.bar([x + index * width for x in xs], p50, width, label=model,
                     yerr=[[0] * len(p99), p99], capsize=2)
        axes.set_xticks([g + width * (len(models) - 1) / 2 for g in range(len(groups))],
                        [f"{t}\n{p}" for t, p in groups], fontsize=8)
        if group_rows:  # targets differ by orders of magnitude
            axes.set_yscale("log")
        axes.set_ylabel("latency ms (p50, whisker p99; log)")
        axes.set_title(f"batch {batch}")
        axes.legend(fontsize=8)
    _save_figure(figure, path)


def accuracy_chart(rows: Sequence[dict], models: Sequence[str], path: Path) -> None:
    """top-1 vs p50 latency at the smallest batch size: colour = model, marker = target."""
    from matplotlib.figure import Figure

    measured = [r for r in rows if _ok(r) and r.get("top1") is not None]
    batch = min((r["batch_size"] for r in measured), default=1)
    measured = [r for r in measured if r["batch_size"] == batch]
    targets = sorted({r["target"] for r in measured})
    markers = dict(zip(targets, "osD^v<>pX*h", strict=False))
    colours = {model: f"C{i}" for i, model in enumerate(models)}
    figure = Figure(figsize=(7.5, 5.0))
    axes = figure.add_subplot()
    for r in measured:
        axes.scatter(r["p50_ms"], 100 * r["top1"], color=colours.get(r["model"], "grey"),
                     marker=markers.get(r["target"], "o"), s=40)
        axes.annotate(r["precision"], (r["p50_ms"], 100 * r["top1"]), fontsize=7,
                      xytext=(3, 3), textcoords="offset points")
    for model, colour in colours.items():
        axes.scatter([], [], color=colour, label=model)
    for target, marker in markers.items():
        axes.scatter([], [], color="black", marker=marker, label=target)
    if measured:  # a log axis needs positive data
        from matplotlib.ticker import FuncFormatter

        axes.set_xscale("log")
        latencies = [r["p50_ms"] for r in measured]
        formatters = [axes.xaxis.set_major_formatter]
        if max(latencies) < 10 * min(latencies):  # within a decade: label the minor ticks too
            formatters.append(axes.xaxis.set_minor_formatter)
        for axis_formatter in formatters:
            axis_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    else:
        axes.text(0.5, 0.5, "no measured rows", transform=axes.transAxes, ha="center")
    axes.set_xlabel(f"p50 latency ms (batch {batch}, log scale)")
    axes.set_ylabel("top-1 %")
    axes.legend(fontsize=7)
    _save_figure(figure, path)


def _threads_text(threads: object) -> str:
    return "runtime's default threads" if threads == 0 else f"{threads} threads"


def _provenance_lines(rows: Sequence[dict]) -> list[str]:
    """Where the measured rows ran; skipped and failed rows measured nothing, so they add none."""
    lines, seen = [], set()
    for row in rows:
        if row.get("status") != "ok":
            continue
        prov = row.get("provenance") or {}
        gpu = prov.get("gpu") or {}
        device = prov.get("device") or {}
        runtime = prov.get("runtime")
        named = f" ({runtime})" if runtime and runtime != row["target"] else ""
        line = (f"- {row['target']}{named}: {prov.get('cpu_model')} ({prov.get('cpu_cores')} "
                f"cores, "
                f"{_threads_text(prov.get('threads'))})"
                + (f", GPU {gpu.get('name')} (cc {gpu.get('compute_capability')}, driver "
                   f"{gpu.get('driver')})" if gpu else "")
                + (f", device {device.get('ssh_host')}: {device.get('cpu_model')}, onnxruntime "
                   f"{device.get('onnxruntime')}, TensorRT {device.get('tensorrt')}"
                   if device else "")
                + f"; git {prov.get('git_revision')}; {prov.get('timestamp')}")
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return lines or ["- no target measured anything (every row was skipped or failed)"]


def render(rows: Sequence[dict], settings: ReportConfig, methods: Sequence[str],
           chart_names: tuple[str, str], comparison: list[str],
           models: Sequence[str] = ()) -> str:
    """The whole report.md text for rows already sorted."""
    if not rows:
        raise ReportError("no benchmark rows to report")
    findings = [s for method in methods
                for s in pruning_findings(rows, settings, final_model(method))]
    findings += accuracy_findings(rows)
    return "\n".join([
        "# Benchmark report", "",
        f"Speedups in the results table compare the same target, precision and batch size; "
        f"measured = p50 of {settings.baseline_model} / p50 of the model, MACs-predicted = MACs "
        f"of {settings.baseline_model} / MACs of the model.", "",
        *comparison,
        "## Findings", "", *[f"- {s}" for s in findings], "",
        "## Results", "", markdown_table(rows, settings.baseline_model),
        "## Fastest runtime", "", "Per model, precision and batch size, from the rows above.",
        "", fastest_table(rows, models),
        "## Charts", "", f"![latency per target]({chart_names[0]})", "",
        f"![accuracy vs latency]({chart_names[1]})", "",
        "## Provenance", "", *_provenance_lines(rows), ""])


def _pct(value: float) -> str:
    return f"{100 * value:+.1f} %"


def latency_model_section(result: dict[str, Any] | None) -> list[str]:
    """Predicted vs measured latency per model (metrics/latency_model.json), and each pruned
    student's speed-up over the dense student: predicted by MACs, by the table, measured."""
    if not result:
        return []
    title = "## Latency model"
    if result.get("status") != "ok":
        return [title, "", f"Not measured on {result.get('target')}: {result.get('reason')}", ""]
    lines = [title, "", f"Target {result['target']}, {result['precision']}: predicted = the "
             "fitted constant + alpha x the sum of the model's per-layer table rows; measured = "
             "the fastest of several fresh sessions' medians of the exported file. Calibration "
             "networks (random weights) are predicted leave-one-out.", ""]
    for batch, part in result["batch"].items():
        lines += [f"### Batch {batch}", "", "| model | predicted ms | measured ms | error |",
                  "|---|---|---|---|"]
        named = {**part["models"], **{f"{n} (calibration)": v
                                      for n, v in part["calibration_networks_loo"].items()}}
        for name, row in named.items():
            predicted = row.get("predicted_ms", row.get("loo_predicted_ms"))
            lines.append(f"| {name} | {predicted:.3f} | {row['measured_ms']:.3f} | "
                         f"{_pct(row['rel_err'])} |")
        interp = part["interpolation"]
        lines += ["", f"Median absolute error {100 * part['median_abs_rel_err']:.1f} % (max "
                  f"{100 * part['max_abs_rel_err']:.1f} %) over {part['networks']} networks."
                  + (f" Interpolating between grid rows is off by a median "
                     f"{100 * interp['median_abs_rel_err']:.0f} % on {interp['n']} held-out rows:"
                     " pruning only picks measured grid widths." if interp.get("n") else ""), ""]
        lines += ["| method | speed-up predicted by MACs | by the table | measured |",
                  "|---|---|---|---|"]
        lines += [f"| {method} | {s['macs']:.2f}x | {s['table']:.2f}x | {s['measured']:.2f}x |"
                  for method, s in part["speedup_over_dense"].items()]
        lines.append("")
    budget = result.get("budget") or {}
    if "latency_ms" in budget:
        lines += [f"Latency budget {budget['latency_ms']:.3f} ms at batch {budget['batch']}: "
                  + "; ".join(f"{m} measured {v['measured_ms']:.3f} ms "
                              f"({100 * v['measured_over_budget']:.0f} % of the budget)"
                              for m, v in budget["methods"].items()), ""]
    return lines


def write_report(rows: Sequence[dict], settings: ReportConfig, models: Sequence[str],
                 out_dir: Path, methods: Sequence[str] = (),
                 target_macs: float | None = None,
                 latency_model: dict[str, Any] | None = None) -> dict[str, Path]:
    """reports/report.md + latency.png + accuracy_vs_latency.png + methods.png in `out_dir`."""
    if not rows:
        raise ReportError("no benchmark rows to report")
    ordered = sort_rows(rows, models)
    paths = {"report": out_dir / "report.md", "latency": out_dir / "latency.png",
             "accuracy": out_dir / "accuracy_vs_latency.png",
             "methods": out_dir / "methods.png"}
    latency_chart(ordered, models, paths["latency"])
    accuracy_chart(ordered, models, paths["accuracy"])
    comparison = comparison_section(ordered, settings, methods, target_macs, paths["methods"])
    comparison = [*comparison, *latency_model_section(latency_model)]
    text = render(ordered, settings, methods, (paths["latency"].name, paths["accuracy"].name),
                  comparison, models)
    atomic_write_text(paths["report"], text)
    return paths
