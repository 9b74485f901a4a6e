"""compression stage: the paper's table - teacher, unpruned student, pruned student.

Reads metrics/teacher.json, metrics/student_dense.json, metrics/student_final.json and writes
metrics/compression.json with top-1, params and MACs of each, and the reductions of the pruned
student relative to the unpruned one (as PDD reports them).
"""

import argparse
import json
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.io import write_json
from stages._cli import run_main

SOURCES = {"teacher": Path("metrics/teacher.json"),
           "student_dense": Path("metrics/student_dense.json"),
           "student_final": Path("metrics/student_final.json")}


def read_metrics(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PipelineError(f"{path}: cannot read metrics ({err})") from err


def compression_table(metrics: dict[str, dict]) -> dict:
    models = {name: {key: metrics[name][key] for key in ("top1", "params", "macs")}
              for name in SOURCES}
    dense, final = models["student_dense"], models["student_final"]
    return {"models": models,
            "student_final_vs_student_dense": {
                "flops_reduction": 1 - final["macs"] / dense["macs"],
                "params_reduction": 1 - final["params"] / dense["params"],
                "top1_delta": final["top1"] - dense["top1"]},
            "profile": metrics["student_final"].get("profile"),
            "dataset": metrics["student_final"].get("dataset"),
            "data_checksum": metrics["student_final"].get("data_checksum")}


def run(sources: dict[str, Path], out: Path) -> dict:
    table = compression_table({name: read_metrics(path) for name, path in sources.items()})
    write_json(out, table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("metrics/compression.json"))
    args = parser.parse_args()
    run_main(lambda: run(SOURCES, args.out))


if __name__ == "__main__":
    main()
