"""dvc.yaml lists, for every stage, exactly the project code and resolved settings it reads.

A missing code dependency is a silent staleness bug (the code changes, `dvc repro` keeps outputs
made by the old code); a superfluous one re-runs stages that nothing changed (an edit of the
report retraining the teacher). This test recomputes each stage's import closure
(pipeline.codebase.code_closure: also imports inside functions) and its resolved settings files
(the stage's `Settings` dataclass) and compares them with dvc.yaml, both ways. The stages run per
pruning method read that method's settings and code through resolved/methods/<m>.{json,code};
the benchmark, which measures every method's model, depends on the models/ and artifacts/
folders, which hold exactly the models and ONNX files of the pipeline's stages (checked on the
pipeline as DVC resolves it from params).
"""

import importlib
import re
import shutil
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from pipeline.artifacts import final_model
from pipeline.codebase import PROJECT_ROOT as ROOT
from pipeline.codebase import code_closure, code_hash
from pipeline.config import METHOD_NAMES
from pipeline.prune.registry import method_module
from stages._cli import resolved_files
from stages._params import load_params
from stages.benchmark import BenchPaths
from stages.validate_params import code_hashes, resolved_documents
from targets.base import EngineBuilder
from targets.registry import make_target, target_class, target_module, target_names

STAGE_MODULE = re.compile(r"python -m (stages\.\w+)")
EVERY_TARGET_MODULE = tuple(sorted({target_module(name) for name in target_names()}))
EVERY_METHOD_MODULE = tuple(method_module(name) for name in METHOD_NAMES)


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
    module, and it hashes every pruning method's code (resolved/methods/<m>.code), so it reads
    every method module. The benchmark and engine stages import their target's module,
    student_pruned its method's; DVC cannot give each foreach item its own code list, so
    benchmark@<t> and engine@<t>-<p> depend on resolved/targets/<t>.code and student_pruned@<m>
    on resolved/methods/<m>.code instead (checked below), which validate_params writes from the
    same closures.
    """
    return EVERY_TARGET_MODULE + EVERY_METHOD_MODULE if stage == "validate_params" else ()


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
    if hasattr(module, "RUNS_TARGET"):  # a target named by a params key (e.g. latency.target)
        name = "${" + module.RUNS_TARGET + "}"
        expected |= {f"resolved/targets/{name}.json", f"resolved/targets/{name}.code"}
    if hasattr(module, "MethodSettings"):  # the method's settings and code, by name
        assert "--method ${item}" in body["cmd"], stage
        expected |= {"resolved/methods/${item}.json", "resolved/methods/${item}.code"}
    assert listed(body.get("deps", []), "resolved") == expected, stage


def test_validate_params_writes_exactly_the_resolved_files():
    documents = resolved_documents(load_params(ROOT / "params.yaml"))
    expected = {f"resolved/{stem}.json" for stem in documents}
    expected |= {f"resolved/{stem}.code" for stem in code_hashes()}
    outs = {next(iter(out)) if isinstance(out, dict) else out
            for out in dvc_stages()["validate_params"]["outs"]}
    assert outs == expected


def test_report_reads_the_results_of_every_benchmarked_target():
    targets = load_params(ROOT / "params.yaml").benchmark.targets
    deps = {dep for dep in dvc_stages()["report"]["deps"] if dep.startswith("metrics/")}
    assert deps == {f"metrics/benchmark_{target}.json" for target in targets} | {
        "metrics/latency_model.json"}


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
    for stage in ("prepare_data", "teacher", "student_dense", "student_pruned", "student_slim",
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


def test_no_stage_but_validate_params_depends_on_a_pruning_method():
    """Method modules are imported by name (pipeline.prune.registry), so an edit of one method
    re-runs validate_params (which hashes it) and that method's chain only (through
    resolved/methods/<m>.code)."""
    methods = {f"pipeline/prune/{name}.py" for name in METHOD_NAMES}
    for stage, body in dvc_stages().items():
        if stage == "validate_params":
            assert methods <= set(body["deps"])
        else:
            assert not methods & set(body.get("deps", [])), stage


def test_a_method_edit_changes_only_that_methods_code_hash(tmp_path):
    tree = copy_of_the_code(tmp_path)
    before = {name: code_hash(method_module(name), tree) for name in METHOD_NAMES}
    with (tree / "pipeline" / "prune" / "netslim.py").open("a") as handle:
        handle.write("# an edit\n")
    after = {name: code_hash(method_module(name), tree) for name in METHOD_NAMES}
    assert {name for name in METHOD_NAMES if before[name] != after[name]} == {"netslim"}


# ------------------------------------------------------ the pipeline as DVC resolves it
@pytest.fixture(scope="module")
def resolved_stages() -> dict[str, tuple[set[str], set[str]]]:
    """Stage address -> (outs, deps), every foreach item expanded from params.yaml."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return {stage.addressing: ({out.def_path for out in stage.outs},
                                   {dep.def_path for dep in stage.deps})
                for stage in repo.index.stages}


FILE_KINDS = ("models", "metrics", "plots", "checkpoints")


def test_every_stage_names_its_files_after_itself(resolved_stages):
    """Stage X writes <kind>/X.<ext>; a foreach stage X@item writes <kind>/X_item.<ext>."""
    for address, (outs, _) in resolved_stages.items():
        name = address.replace("@", "_")
        for out in outs:
            kind, _, file = out.partition("/")
            if kind in FILE_KINDS:
                assert file.split(".")[0] == name, (address, out)


def test_every_method_runs_its_whole_chain(resolved_stages):
    methods = load_params(ROOT / "params.yaml").prune.methods
    for method in methods:
        for stage in ("student_pruned", "student_slim", "student_final", "compression",
                      "export_student_final"):
            assert f"{stage}@{method}" in resolved_stages, (stage, method)
    chains = {address.split("@")[1] for address in resolved_stages
              if address.startswith("student_pruned@")}
    assert chains == set(methods)


def test_the_benchmark_folders_hold_exactly_the_pipelines_models_and_artifacts(resolved_stages):
    """benchmark@<t> and engine@<t>-<p> depend on models/ and artifacts/: everything they
    measure or build from is an output there, and only training stages write models/<stage>.pt
    and only export stages artifacts/<model>.*, so the folders change only when a model does
    (engines are written beside them, to engines/)."""
    params = load_params(ROOT / "params.yaml")
    models = (*params.benchmark.models, *map(final_model, params.prune.methods))
    outs = {out: address for address, (stage_outs, _) in resolved_stages.items()
            for out in stage_outs}
    for target, precisions in params.benchmark.targets.items():
        _, deps = resolved_stages[f"benchmark@{target}"]
        assert {"models", "artifacts"} <= deps
        assert not [dep for dep in deps if dep.startswith(("models/", "artifacts/"))]
        for model in models:
            assert f"models/{model}.pt" in outs, model
            for precision in precisions:
                for path, _ in BenchPaths.for_target(target).artifacts(
                        make_target(target, params.target_settings(target)), model, precision,
                        params.benchmark.batch_sizes):
                    assert any(str(path) == out or str(path).startswith(out + "/")
                               for out in outs), (target, path)
    for out, address in outs.items():
        if out.startswith("models/"):
            assert out == f"models/{address.replace('@', '_')}.pt", out
        if out.startswith("artifacts/"):
            assert address.startswith("export"), out
