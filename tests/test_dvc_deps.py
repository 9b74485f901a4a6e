"""dvc.yaml lists, for every stage, all project code the stage runs.

A missing code dependency is a silent staleness bug: the code changes, `dvc repro` reports the
stage up to date and keeps outputs made by the old code. This test follows each stage's imports
(including those inside functions, and the target registry's "module:Class" strings) through
pipeline/, stages/ and targets/, and checks that dvc.yaml names every file reached, or a folder
holding it.
"""

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "targets")
STAGE_MODULE = re.compile(r"python -m (stages\.\w+)")


def module_file(name: str) -> Path | None:
    """The source file of a project module or package, or None for anything else."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _with_parents(name: str) -> set[Path]:
    """A module and the packages Python imports on the way to it."""
    parts = name.split(".")
    found = (module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1))
    return {path for path in found if path is not None}


def _absolute(node: ast.ImportFrom, path: Path) -> str:
    if not node.level:
        return node.module or ""
    package = path.parent.relative_to(ROOT).parts
    base = list(package[:len(package) - node.level + 1])
    return ".".join(base + ([node.module] if node.module else []))


def imported_names(path: Path) -> set[str]:
    """Every module name `path` may import: import statements anywhere, and registry strings."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, path)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # submodule imports
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value.split(":")[0])  # "targets.ssh:SshOnnxRuntimeTarget"
    return names


def code_closure(module: str) -> set[Path]:
    """Project source files that running `python -m module` can execute."""
    todo, seen = list(_with_parents(module)), set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(file for name in imported_names(path) for file in _with_parents(name))
    return seen


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


@pytest.mark.parametrize(("stage", "module", "deps"), stages_with_code(),
                         ids=[stage for stage, _, _ in stages_with_code()])
def test_every_stage_depends_on_all_code_it_runs(stage, module, deps):
    missing = uncovered(code_closure(module), deps)
    assert not missing, f"dvc.yaml stage {stage!r} runs {module} but does not list: {missing}"
