"""The whole params.yaml, validated at once: the library's sections (pipeline.config), each
runtime target's settings (its `Settings` schema, under `runtimes`), and the rules that span
sections. It sees both layers, so it lives here, above them; only the validate_params stage
loads it. Every other stage reads its sections back from resolved/ (stages/_cli.py), so a
stage's code closure holds the schemas it uses and no runtime it does not.
"""

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pipeline.config import (
    BenchmarkConfig,
    CommonConfig,
    DataConfig,
    DistillConfig,
    EngineConfig,
    ExportConfig,
    ReportConfig,
    SectionError,
    SlimConfig,
    StudentGatedConfig,
    TeacherConfig,
    TrainConfig,
    apply_profile,
    read_params_file,
    validate,
)
from pipeline.errors import ConfigError
from targets.registry import target_class, target_names

RUNTIMES = "runtimes"


@dataclass(frozen=True)
class Params:
    """The whole params.yaml after the profile has been applied, every section validated."""

    profile: str  # schedule preset in force
    common: CommonConfig
    data: DataConfig
    teacher: TeacherConfig
    distill: DistillConfig
    student_dense: TrainConfig  # the unpruned student, same KD recipe and epoch budget
    student_gated: StudentGatedConfig
    student_slim: SlimConfig
    student_final: TrainConfig
    export: ExportConfig
    engine: EngineConfig
    benchmark: BenchmarkConfig
    report: ReportConfig
    runtimes: dict[str, Any]  # settings key -> settings of the targets that share it

    def target_settings(self, name: str) -> Any:
        """The settings object target `name` is built with."""
        return self.runtimes[target_class(name).settings_key]


SECTIONS: dict[str, type] = {f.name: f.type for f in fields(Params)
                             if f.name not in ("profile", RUNTIMES)}


def runtime_schemas() -> dict[str, type]:
    """Settings key -> schema, over every registered target (targets may share a key)."""
    schemas: dict[str, type] = {}
    for name in target_names():
        cls = target_class(name)
        schemas.setdefault(cls.settings_key, cls.Settings)
    return schemas


def _describe(problems: list[tuple[str, str]], overridden: set[str], profile: str) -> list[str]:
    lines = []
    for key, message in problems:
        set_by = next((o for o in overridden if key == o or key.startswith(o + ".")), None)
        lines.append(f"{key}: {message}" + (f" [set by profiles.{profile}]" if set_by else ""))
    return lines


def _shape_problems(merged: dict[str, Any], runtimes: dict[str, type]) -> list[tuple[str, str]]:
    """Unknown and missing sections (top level and under `runtimes`)."""
    known = {*SECTIONS, "profile", RUNTIMES}
    problems = [(key, "unknown section") for key in merged if key not in known]
    problems += [(key, "missing section") for key in [*SECTIONS, RUNTIMES] if key not in merged]
    given = merged.get(RUNTIMES)
    if isinstance(given, dict):
        problems += [(f"{RUNTIMES}.{key}", f"unknown runtime; known: {', '.join(runtimes)}")
                     for key in given if key not in runtimes]
        problems += [(f"{RUNTIMES}.{key}", "missing section") for key in runtimes
                     if key not in given]
    elif RUNTIMES in merged:
        problems.append((RUNTIMES, "expected a mapping of runtime settings"))
    return problems


def _build(merged: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Each section validated on its own, so one run reports every bad key."""
    runtimes = runtime_schemas()
    problems = _shape_problems(merged, runtimes)
    built: dict[str, Any] = {RUNTIMES: {}}
    given_runtimes = merged.get(RUNTIMES) if isinstance(merged.get(RUNTIMES), dict) else {}
    todo = [(name, schema, merged[name], built, name) for name, schema in SECTIONS.items()
            if name in merged]
    todo += [(f"{RUNTIMES}.{key}", schema, given_runtimes[key], built[RUNTIMES], key)
             for key, schema in runtimes.items() if key in given_runtimes]
    for where, schema, values, into, slot in todo:
        try:
            into[slot] = validate(schema, values, where)
        except SectionError as err:
            problems += err.problems
    return built, problems


def _epoch_budget(p: Params) -> list[tuple[str, str]]:
    budget = p.student_gated.epochs + p.student_final.epochs
    if p.student_dense.epochs == budget:
        return []
    return [("student_dense.epochs", f"({p.student_dense.epochs}) must equal student_gated.epochs "
             f"+ student_final.epochs ({budget}): pruned and unpruned students are compared at "
             "the same training budget")]


def _targets_support_their_precisions(p: Params) -> list[tuple[str, str]]:
    problems = []
    for name, precisions in p.benchmark.targets.items():
        key = f"benchmark.targets.{name}"
        if name not in target_names():
            problems.append((key, f"unknown target; known: {', '.join(target_names())}"))
            continue
        supported = target_class(name).precisions
        unsupported = [precision for precision in precisions if precision not in supported]
        if unsupported:
            problems.append((key, f"target does not support {unsupported}; it supports "
                             f"{list(supported)}"))
    return problems


def _benchmarked_batches_fit_the_engine_profile(p: Params) -> list[tuple[str, str]]:
    """Engines built with runtimes.tensorrt accept only batches within its profile."""
    build = p.runtimes.get("tensorrt")
    if "tensorrt" not in p.benchmark.targets or build is None:
        return []
    outside = [b for b in p.benchmark.batch_sizes if not build.min_batch <= b <= build.max_batch]
    if not outside:
        return []
    return [("benchmark.batch_sizes", f"{outside} outside the TensorRT engines' profile "
             f"{build.min_batch}..{build.max_batch} (runtimes.tensorrt min_batch/max_batch)")]


def _batches_split_over_processes(p: Params) -> list[tuple[str, str]]:
    """Every training section's batch (the global batch) splits evenly over the processes of
    data-parallel training. nproc_per_node 0 (one per GPU) is checked when the stage starts."""
    dist = p.common.distributed
    processes = dist.nproc_per_node * dist.nnodes
    if processes <= 1:
        return []
    return [(f"{f.name}.batch_size", f"({section.batch_size}) must be a multiple of the "
             f"{processes} training processes (common.distributed: nnodes x nproc_per_node)")
            for f in fields(p) if isinstance(section := getattr(p, f.name), TrainConfig)
            and section.batch_size % processes]


CROSS_SECTION_RULES = (_epoch_budget, _targets_support_their_precisions,
                       _benchmarked_batches_fit_the_engine_profile, _batches_split_over_processes)


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Read, profile-merge and validate params.yaml; ConfigError naming every bad key."""
    path = Path(path)
    merged, overridden = apply_profile(read_params_file(path), path)
    built, problems = _build(merged)
    params = None
    if not problems:
        params = Params(profile=merged["profile"], **built)
        problems = [problem for rule in CROSS_SECTION_RULES for problem in rule(params)]
    if problems:
        lines = _describe(problems, overridden, merged["profile"])
        raise ConfigError(f"{path}: invalid parameters:\n  " + "\n  ".join(lines))
    return params
