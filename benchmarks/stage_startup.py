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

With --pythons (one interpreter per tree, e.g. two environments that differ in one package,
the same tree given twice) each variant runs with its own interpreter, and every repeat also
times `import onnx` alone in each.

    python benchmarks/stage_startup.py --workspace RUN --trees . . \
        --pythons ENV_A/bin/python ENV_B/bin/python --out ...
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
from dataclasses import dataclass
from pathlib import Path

from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the project's packages

from pipeline import cpu  # noqa: E402
from pipeline.io import write_json  # noqa: E402
from pipeline.provenance import cpu_model, git_revision, package_versions  # noqa: E402

# The stages a machine without TensorRT, OpenVINO, ExecuTorch or an SSH device skips (dvc.yaml).
SKIPPING_STAGES = ("engine@", "export_openvino", "export_executorch")
# What each interpreter's environment is recorded by (--pythons).
ENVIRONMENT_PACKAGES = ("torch", "onnx", "ml_dtypes", "onnxruntime", "numpy", "pydantic")
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


@dataclass(frozen=True)
class Variant:
    """One code tree run by one interpreter (its environment)."""

    tree: Path
    python: str | None  # None: this interpreter (trees compared in one environment)

    @property
    def interpreter(self) -> str:
        return self.python or sys.executable

    @property
    def label(self) -> str:
        return str(self.tree) if self.python is None else f"{self.tree} | {self.python}"


def run_once(variant: Variant, command: list[str], workspace: Path, metrics: str
             ) -> tuple[float, bool, str]:
    """(seconds, torch imported, sha256 of the metrics file) of one launch."""
    tree = variant.tree
    start = time.perf_counter()
    done = subprocess.run([variant.interpreter, "-c", LAUNCHER, str(tree), *command],
                          cwd=workspace, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or f"STAGES_FROM {tree / 'stages'}" not in done.stderr:
        raise SystemExit(f"{' '.join(command)} with {tree} exited {done.returncode}:\n"
                         f"{done.stderr[-2000:]}")
    digest = hashlib.sha256((workspace / metrics).read_bytes()).hexdigest()
    return seconds, "TORCH_IMPORTED True" in done.stderr, digest


def import_onnx_seconds(python: str) -> float:
    """Wall time of a process that only imports onnx (and with it ml_dtypes)."""
    start = time.perf_counter()
    subprocess.run([python, "-c", "import onnx"], check=True)
    return time.perf_counter() - start


def environment(python: str) -> dict:
    """The versions that decide start-up, as `python` finds them (pipeline.provenance's
    package_versions, run in that interpreter)."""
    code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r})\n"
            "from pipeline.provenance import package_versions\n"
            f"print(json.dumps(package_versions({ENVIRONMENT_PACKAGES!r})))")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def measure(variants: list[Variant], workspace: Path, repeats: int, time_imports: bool) -> dict:
    commands = stage_commands(workspace)
    samples = {v.label: {stage: [] for stage in commands} for v in variants}
    imports: dict[str, list[float]] = {v.label: [] for v in variants}
    torch_imported: dict[str, dict[str, bool]] = {v.label: {} for v in variants}
    digests: dict[str, set[str]] = {stage: set() for stage in commands}
    for repeat in range(repeats + 1):  # round 0 warms the file cache and the .pyc files
        for stage, (command, metrics) in commands.items():
            for variant in variants:
                seconds, imported, digest = run_once(variant, command, workspace, metrics)
                digests[stage].add(digest)
                torch_imported[variant.label][stage] = imported
                if repeat:
                    samples[variant.label][stage].append(round(seconds, 4))
        for variant in variants if time_imports else ():
            seconds = import_onnx_seconds(variant.interpreter)
            if repeat:
                imports[variant.label].append(round(seconds, 4))
    differing = [stage for stage, found in digests.items() if len(found) != 1]
    if differing:
        raise SystemExit(f"the variants wrote different metrics for {differing}")
    results = {}
    for v in variants:
        results[v.label] = {
            "stages": {stage: {"samples_s": runs, "median_s": statistics.median(runs),
                               "torch_imported": torch_imported[v.label][stage]}
                       for stage, runs in samples[v.label].items()},
            "sum_of_medians_s": round(sum(statistics.median(runs)
                                          for runs in samples[v.label].values()), 3)}
        if time_imports:
            results[v.label]["import_onnx_s"] = {
                "samples_s": imports[v.label], "median_s": statistics.median(imports[v.label])}
            results[v.label]["environment"] = environment(v.interpreter)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True,
                        help="a checkout where `dvc repro` has run (resolved/, models/, ...)")
    parser.add_argument("--trees", type=Path, nargs="+", required=True,
                        help="code trees (checkouts) whose stages/, pipeline/, targets/ run")
    parser.add_argument("--pythons", nargs="+",
                        help="one interpreter per tree (default: this one for all); each "
                             "variant's environment is recorded and `import onnx` timed in it")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.trees]
    pythons = args.pythons or [None] * len(trees)
    if len(pythons) != len(trees):
        parser.error(f"--pythons names {len(pythons)} interpreters for {len(trees)} trees")
    variants = [Variant(tree, python) for tree, python in zip(trees, pythons, strict=True)]
    if len({v.label for v in variants}) != len(variants):
        parser.error("two variants have the same tree and interpreter")
    load_before = os.getloadavg()
    results = measure(variants, args.workspace.resolve(), args.repeats, bool(args.pythons))
    first, last = (results[v.label]["sum_of_medians_s"] for v in (variants[0], variants[-1]))
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
