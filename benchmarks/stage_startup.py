"""Wall time of the stages that skip their target, from launch to exit, for one or more code trees.

On a machine without TensorRT, OpenVINO, ExecuTorch or an SSH device, most of a quick run's
engine and export stages only find their target missing and write `skipped` results; what they
cost is start-up. This runs each such stage's command as the workspace's dvc.lock records it
(`python -m stages.<s> ...`, in a workspace where `dvc repro` has run, so resolved/, models/
and artifacts/ are there) with
the code of each tree first on the path, repeats alternating between the trees so that machine
noise hits all alike, and records every sample, the medians, whether the stage imported torch,
the machine and the versions. Each stage's metrics file must come out byte-identical from every
tree (the result is the same; only the time may differ), or the run stops.

    python benchmarks/stage_startup.py --workspace RUN --trees OLD NEW \
        --out benchmarks/results/stage_startup_cpu_avx2.json
"""

import argparse
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the project's packages

from pipeline import cpu  # noqa: E402
from pipeline.io import write_json  # noqa: E402
from pipeline.provenance import cpu_model, git_revision, package_versions  # noqa: E402

# The stages a machine without TensorRT, OpenVINO, ExecuTorch or an SSH device skips (dvc.yaml).
SKIPPING_STAGES = ("engine@", "export_openvino", "export_executorch")
# Runs one stage module with `tree` first on the path, then says whether torch was imported.
LAUNCHER = ("import runpy, sys; tree = sys.argv.pop(1); sys.path.insert(0, tree); "
            "sys.argv[0] = 'stage'\n"
            "try:\n    runpy.run_module(sys.argv.pop(1), run_name='__main__')\n"
            "finally:\n    print('TORCH_IMPORTED', 'torch' in sys.modules, file=sys.stderr)\n"
            "    print('STAGES_FROM', sys.modules['stages'].__path__[0], file=sys.stderr)")


def stage_commands(workspace: Path) -> dict[str, tuple[list[str], str]]:
    """DVC stage name -> (module and arguments, the metrics file it writes), for every skipping
    stage as the workspace's dvc.lock records it (the commands DVC ran there)."""
    stages = YAML(typ="safe").load((workspace / "dvc.lock").read_text())["stages"]
    commands = {}
    for name, stage in stages.items():
        if not name.startswith(SKIPPING_STAGES):
            continue
        python, flag, *command = shlex.split(stage["cmd"])
        if (python, flag) != ("python", "-m"):
            raise SystemExit(f"{name}: cmd {stage['cmd']!r} is not `python -m stages.<s> ...`")
        metrics = [out["path"] for out in stage["outs"] if out["path"].startswith("metrics/")]
        commands[name] = (command, metrics[0])
    if not commands:
        raise SystemExit(f"{workspace / 'dvc.lock'} records none of the stages {SKIPPING_STAGES}")
    return commands


def run_once(tree: Path, command: list[str], workspace: Path, metrics: str
             ) -> tuple[float, bool, str]:
    """(seconds, torch imported, sha256 of the metrics file) of one launch."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LAUNCHER, str(tree), *command], cwd=workspace,
                          capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or f"STAGES_FROM {tree / 'stages'}" not in done.stderr:
        raise SystemExit(f"{' '.join(command)} with {tree} exited {done.returncode}:\n"
                         f"{done.stderr[-2000:]}")
    digest = hashlib.sha256((workspace / metrics).read_bytes()).hexdigest()
    return seconds, "TORCH_IMPORTED True" in done.stderr, digest


def measure(trees: list[Path], workspace: Path, repeats: int) -> dict:
    commands = stage_commands(workspace)
    samples = {str(tree): {stage: [] for stage in commands} for tree in trees}
    torch_imported: dict[str, dict[str, bool]] = {str(tree): {} for tree in trees}
    digests: dict[str, set[str]] = {stage: set() for stage in commands}
    for repeat in range(repeats + 1):  # round 0 warms the file cache and the .pyc files
        for stage, (command, metrics) in commands.items():
            for tree in trees:
                seconds, imported, digest = run_once(tree, command, workspace, metrics)
                digests[stage].add(digest)
                torch_imported[str(tree)][stage] = imported
                if repeat:
                    samples[str(tree)][stage].append(round(seconds, 4))
    differing = [stage for stage, found in digests.items() if len(found) != 1]
    if differing:
        raise SystemExit(f"the trees wrote different metrics for {differing}")
    return {str(tree): {
        "stages": {stage: {"samples_s": runs, "median_s": statistics.median(runs),
                           "torch_imported": torch_imported[str(tree)][stage]}
                   for stage, runs in samples[str(tree)].items()},
        "sum_of_medians_s": round(sum(statistics.median(runs)
                                      for runs in samples[str(tree)].values()), 3)}
        for tree in trees}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True,
                        help="a checkout where `dvc repro` has run (resolved/, models/, ...)")
    parser.add_argument("--trees", type=Path, nargs="+", required=True,
                        help="code trees (checkouts) whose stages/, pipeline/, targets/ run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.trees]
    load_before = os.getloadavg()
    results = measure(trees, args.workspace.resolve(), args.repeats)
    first, last = (results[str(tree)]["sum_of_medians_s"] for tree in (trees[0], trees[-1]))
    write_json(args.out, {
        "provenance": {"cpu_model": cpu_model(), "cpu_isa": cpu.describe(),
                       "cores": os.cpu_count(), "python": platform.python_version(),
                       "packages": package_versions(("torch", "onnx", "onnxruntime", "numpy",
                                                     "pydantic", "openvino", "executorch")),
                       "load_before": load_before, "load_after": os.getloadavg()},
        "note": args.note, "repeats": args.repeats,
        "trees": {str(tree): git_revision(tree) for tree in trees},
        "results": results,
        "ratio_first_to_last": round(first / last, 3)})
    print(json.dumps({tree: result["sum_of_medians_s"] for tree, result in results.items()}))


if __name__ == "__main__":
    main()
