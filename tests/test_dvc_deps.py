"""dvc.yaml lists, for every stage, all project code the stage runs.

A missing code dependency is a silent staleness bug: the code changes, `dvc repro` reports the
stage up to date and keeps outputs made by the old code. This test follows each stage's imports
(pipeline.codebase.code_closure: also those inside functions, and the target registry's
"module:Class" strings) and checks that dvc.yaml names every file reached, or a folder holding it.
"""

import re
from pathlib import Path

import pytest
import yaml

from pipeline.codebase import PROJECT_ROOT as ROOT
from pipeline.codebase import code_closure

STAGE_MODULE = re.compile(r"python -m (stages\.\w+)")


def stages_with_code() -> list[tuple[str, str, list[str]]]:
    """(stage name, module its cmd runs, its deps) for every stage of dvc.yaml."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    found = []
    for name, stage in stages.items():
        body = stage.get("do", stage)  # foreach stages keep cmd and deps under `do`
        match = STAGE_MODULE.search(body["cmd"])
        assert match, f"stage {name}: cmd {body['cmd']!r} does not run a stages.* module"
        found.append((name, match.group(1), list(body.get("deps", []))))
    return found


def uncovered(files: set[Path], deps: list[str]) -> list[str]:
    listed = [ROOT / dep for dep in deps]
    return sorted(str(file.relative_to(ROOT)) for file in files
                  if not any(file == dep or dep in file.parents for dep in listed))


def test_closure_follows_lazy_and_registry_imports():
    files = {str(path.relative_to(ROOT)) for path in code_closure("stages.benchmark")}
    assert {"stages/__init__.py", "stages/benchmark.py", "pipeline/timing.py"} <= files
    assert "targets/ssh.py" in files  # only named by the registry as "targets.ssh:..."
    assert "pipeline/onnx_export.py" not in files  # export code is not the benchmark's


def test_uncovered_names_files_outside_every_dep():
    files = {ROOT / "pipeline" / "io.py", ROOT / "stages" / "report.py"}
    assert uncovered(files, ["pipeline"]) == ["stages/report.py"]
    assert uncovered(files, ["stages/report.py", "pipeline/io.py"]) == []


@pytest.mark.parametrize(("stage", "module", "deps"),
                         [pytest.param(*stage, id=stage[0]) for stage in stages_with_code()])
def test_every_stage_depends_on_all_code_it_runs(stage, module, deps):
    missing = uncovered(code_closure(module), deps)
    assert not missing, f"dvc.yaml stage {stage!r} runs {module} but does not list: {missing}"
