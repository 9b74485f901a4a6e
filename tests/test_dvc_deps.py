"""dvc.yaml lists, for every stage, exactly the project code and resolved settings it reads.

A missing code dependency is a silent staleness bug (the code changes, `dvc repro` keeps outputs
made by the old code); a superfluous one re-runs stages that nothing changed (an edit of the
report retraining the teacher). This test recomputes each stage's import closure
(pipeline.codebase.code_closure: also imports inside functions) and its resolved settings files
(the stage's `Settings` dataclass) and compares them with dvc.yaml, both ways.
"""

import importlib
import re
import shutil
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from pipeline.codebase import PROJECT_ROOT as ROOT
from pipeline.codebase import code_closure, code_hash
from stages._cli import resolved_files
from stages._params import load_params
from stages.validate_params import resolved_documents, target_code_hashes
from targets.base import EngineBuilder
from targets.registry import target_class, target_module, target_names

STAGE_MODULE = re.compile(r"python -m (stages\.\w+)")
EVERY_TARGET_MODULE = tuple(sorted({target_module(name) for name in target_names()}))


def dvc_stages() -> dict[str, dict]:
    """Stage name -> its body (a foreach stage's `do` part)."""
    stages = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def stage_module(body: dict) -> str:
    match = STAGE_MODULE.search(body["cmd"])
    assert match, f"cmd {body['cmd']!r} does not run a stages.* module"
    return match.group(1)


def by_name_imports(stage: str) -> tuple[str, ...]:
    """Modules a stage imports by name at run time (static analysis cannot see them).

    validate_params validates every registered target's settings, so it imports every target
    module. The benchmark and engine stages import their target's module; DVC cannot give each
    foreach item its own code list, so benchmark@<t> and engine@<t>-<p> depend on
    resolved/targets/<t>.code instead (checked below), which validate_params writes from the
    same closure.
    """
    return EVERY_TARGET_MODULE if stage == "validate_params" else ()


def listed(deps: list[str], kind: str) -> set[str]:
    if kind == "code":
        return {dep for dep in deps if dep.endswith(".py")}
    return {dep for dep in deps if dep.startswith("resolved/")}


@pytest.mark.parametrize("stage", list(dvc_stages()))
def test_code_deps_are_exactly_the_import_closure(stage):
    body = dvc_stages()[stage]
    closure = {str(path.relative_to(ROOT))
               for path in code_closure(stage_module(body), extra=by_name_imports(stage))}
    deps = listed(body.get("deps", []), "code")
    assert not closure - deps, f"dvc.yaml stage {stage!r} misses {sorted(closure - deps)}"
    assert not deps - closure, f"dvc.yaml stage {stage!r} lists {sorted(deps - closure)}, " \
                               "which it does not import"


@pytest.mark.parametrize("stage", list(dvc_stages()))
def test_resolved_deps_are_exactly_the_settings_the_stage_reads(stage):
    body = dvc_stages()[stage]
    module = importlib.import_module(stage_module(body))
    schema = getattr(module, "Settings", None)
    expected = {f"resolved/{stem}.json" for stem in resolved_files(schema).values()} \
        if schema is not None else set()
    for name in ("${key}", "${item.target}"):  # the target's settings and code, by name
        if f"--target {name}" in body["cmd"]:
            expected |= {f"resolved/targets/{name}.json", f"resolved/targets/{name}.code"}
    assert listed(body.get("deps", []), "resolved") == expected, stage


def test_validate_params_writes_exactly_the_resolved_files():
    documents = resolved_documents(load_params(ROOT / "params.yaml"))
    expected = {f"resolved/{stem}.json" for stem in documents}
    expected |= {f"resolved/{stem}.code" for stem in target_code_hashes()}
    outs = {next(iter(out)) if isinstance(out, dict) else out
            for out in dvc_stages()["validate_params"]["outs"]}
    assert outs == expected


def test_report_reads_the_results_of_every_benchmarked_target():
    targets = load_params(ROOT / "params.yaml").benchmark.targets
    deps = {dep for dep in dvc_stages()["report"]["deps"] if dep.startswith("metrics/")}
    assert deps == {f"metrics/benchmark_{target}.json" for target in targets}


def copy_of_the_code(folder: Path) -> Path:
    for package in ("pipeline", "stages", "targets"):
        shutil.copytree(ROOT / package, folder / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def test_a_target_edit_changes_only_the_code_hash_of_targets_that_run_it(tmp_path):
    tree = copy_of_the_code(tmp_path)
    before = {name: code_hash(target_module(name), tree) for name in target_names()}
    with (tree / "targets" / "ssh.py").open("a") as handle:
        handle.write("# an edit\n")
    after = {name: code_hash(target_module(name), tree) for name in target_names()}
    changed = {name for name in target_names() if before[name] != after[name]}
    assert changed == {"ssh-onnxruntime", "ssh-tensorrt"}


def test_a_report_edit_reaches_no_other_stage():
    report = ROOT / "pipeline" / "report.py"
    users = {stage for stage, body in dvc_stages().items()
             if str(report.relative_to(ROOT)) in body.get("deps", [])}
    assert users == {"report"}


def test_no_training_stage_depends_on_target_code():
    for stage in ("prepare_data", "teacher", "student_dense", "student_gated", "student_slim",
                  "student_final", "compression"):
        deps = dvc_stages()[stage].get("deps", [])
        assert not [dep for dep in deps if dep.startswith("targets/")], stage


def test_engine_items_build_from_the_file_their_target_reads():
    items = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"]["engine"]["foreach"]
    assert {item["target"] for item in items.values()} == {
        name for name in target_names() if issubclass(target_class(name), EngineBuilder)}
    for key, item in items.items():
        assert key == f"{item['target']}-{item['precision']}"
        expected = target_class(item["target"]).onnx_source(Path("artifacts"), "m",
                                                            item["precision"])
        assert expected == Path(f"artifacts/m.{item['onnx']}.onnx"), key
    deps = dvc_stages()["engine"]["deps"]
    models = load_params(ROOT / "params.yaml").engine.models
    assert {dep for dep in deps if dep.startswith("artifacts/")} == {
        f"artifacts/{m}.${{item.onnx}}.{ext}" for m in models for ext in ("onnx", "card.json")}
