"""compression stage: the paper's table for one method (DVC runs it once per method:
compression@<method>) - teacher, unpruned student, the method's pruned student.

Reads metrics/teacher.json, metrics/student_dense.json and metrics/student_final_<method>.json
and writes metrics/compression_<method>.json with top-1, params and MACs of each, and the
reductions of the pruned student relative to the unpruned one (as PDD reports them). For a
method with unstructured zeros (`weight`) the MACs are those a dense runtime executes; its
non-zero parameters and MACs are listed beside them.
"""

import argparse
import json
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.io import write_json
from stages._cli import run_main


def sources_for(method: str) -> dict[str, Path]:
    return {"teacher": Path("metrics/teacher.json"),
            "student_dense": Path("metrics/student_dense.json"),
            "student_final": Path(f"metrics/student_final_{method}.json")}


def read_metrics(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PipelineError(f"{path}: cannot read metrics ({err})") from err


def compression_table(metrics: dict[str, dict], method: str) -> dict:
    models = {name: {key: metrics[name][key] for key in ("top1", "params", "macs")}
              for name in ("teacher", "student_dense", "student_final")}
    final = metrics["student_final"]
    models["student_final"].update({key: final[key] for key in
                                    ("params_nonzero", "macs_nonzero", "sparsity")
                                    if key in final})
    dense, pruned = models["student_dense"], models["student_final"]
    return {"method": method, "models": models,
            "student_final_vs_student_dense": {
                "flops_reduction": 1 - pruned["macs"] / dense["macs"],
                "params_reduction": 1 - pruned["params"] / dense["params"],
                "nonzero_params_reduction":
                    1 - pruned.get("params_nonzero", pruned["params"]) / dense["params"],
                "top1_delta": pruned["top1"] - dense["top1"]},
            "profile": final.get("profile"), "dataset": final.get("dataset"),
            "data_checksum": final.get("data_checksum")}


def run(method: str, sources: dict[str, Path], out: Path) -> dict:
    table = compression_table({name: read_metrics(path) for name, path in sources.items()},
                              method)
    write_json(out, table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, help="a pruning method listed in prune.methods")
    parser.add_argument("--out", type=Path, help="default metrics/compression_<method>.json")
    args = parser.parse_args()
    out = args.out or Path(f"metrics/compression_{args.method}.json")
    run_main(lambda: run(args.method, sources_for(args.method), out))


if __name__ == "__main__":
    main()
