"""The dense student and several pruned students (one per width rule) timed in one run.

Run from a workspace where the pipeline has run (its resolved/, latency/table.json, models/ and
artifacts/ give the target, the table and the dense student). Each DIR holds one variant's
student_final_pdd.fp32.onnx, student_slim_pdd.pt, metrics/student_slim_pdd.json and
student_final_pdd.json (copied there after its run), and the params.yaml it ran with:

    python benchmarks/widths_one_run.py OUT.json DIR...

Every file is timed in each of 7 passes (one ONNX Runtime session per file per pass) and the
fastest of the 7 medians is kept, as the latency_model stage does, so the speed-ups compare
files measured side by side rather than in different runs.
"""
import json
import platform
import sys
from pathlib import Path

import onnxruntime
import torch

from pipeline.config import LatencyConfig, as_dict, load_section
from pipeline.io import read_json
from pipeline.latency.table import LatencyTable, MissingRows
from stages._targets import load_target
from stages.latency_model import model_units
from targets.latency_probe import time_in_passes

out, dirs = Path(sys.argv[1]), [Path(d) for d in sys.argv[2:]]
cfg = load_section(LatencyConfig, Path("resolved/latency.json"))
table = LatencyTable.from_dict(read_json(Path("latency/table.json")))
target = load_target(cfg.target, Path("resolved"))
files = {"student_dense": Path("artifacts/student_dense.fp32.onnx"),
         **{d.name: d / "student_final_pdd.fp32.onnx" for d in dirs}}
pts = {"student_dense": Path("models/student_dense.pt"),
       **{d.name: d / "student_slim_pdd.pt" for d in dirs}}
variants = {d.name: d for d in dirs}
measured, _ = time_in_passes(target, files, cfg.batch_sizes, cfg.timing, 7)
def cpu_flags() -> list[str]:
    """The ISA flags that decide which kernels ONNX Runtime runs."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))


def settings_of(params: Path) -> list[str]:
    """The params lines that tell the variants apart (prune.budget, student_slim)."""
    keys = ("  budget:", "  round_to:", "  widths:")
    return [line.strip() for line in params.read_text().splitlines() if line.startswith(keys)]


def predicted(units, b):
    try:
        return table.predict_ms(units, b)
    except MissingRows:  # widths off the table's grid (round_to 1)
        return None


rows = {}
for name in files:
    units, loaded = model_units(pts[name])
    rows[name] = {"macs": loaded.meta["macs"], "params": loaded.meta["params"],
                  "batch": {str(b): {"measured_ms": measured[b][name],
                                     "predicted_ms": predicted(units, b)}
                            for b in cfg.batch_sizes}}
    if name != "student_dense":
        final = read_json(variants[name] / "student_final_pdd.json")
        slim = read_json(variants[name] / "student_slim_pdd.json")
        rows[name].update(top1=final["top1"], params=slim["params_after"],
                          macs=slim["macs_after"], group_widths=slim.get("group_widths"),
                          settings=settings_of(variants[name] / "params.yaml"))
for row in rows.values():
    for b, cell in row["batch"].items():
        d = rows["student_dense"]["batch"][b]
        cell["speedup_measured"] = d["measured_ms"] / cell["measured_ms"]
        cell["speedup_predicted"] = (d["predicted_ms"] / cell["predicted_ms"]
                                     if cell["predicted_ms"] else None)
    row["speedup_macs"] = rows["student_dense"]["macs"] / row["macs"]
result = {"what": "dense and pruned students timed in one run: 7 passes, one session per file "
                  "per pass, the fastest of the 7 medians", "timing": as_dict(cfg.timing),
          "table_key": read_json(Path("latency/table.json"))["key"], "cpu_flags": cpu_flags(),
          "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
          "python": platform.python_version(), "models": rows}
out.write_text(json.dumps(result, indent=1, default=str))
for name, row in rows.items():
    speed = {b: (round(c["measured_ms"], 3), round(c["speedup_measured"], 2),
                 c["speedup_predicted"] and round(c["speedup_predicted"], 2))
             for b, c in row["batch"].items()}
    print(name, row.get("top1"), row["macs"], speed, round(row["speedup_macs"], 2))
