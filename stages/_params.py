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

from pipeline.artifacts import REFERENCE_MODELS, final_model
from pipeline.config import (
    METHOD_NAMES,
    PROFILES,
    BenchmarkConfig,
    CommonConfig,
    DataConfig,
    DistillConfig,
    EngineConfig,
    ExportConfig,
    KddpConfig,
    LatencyConfig,
    LatencyNetworks,
    MethodBudget,
    NetslimConfig,
    PddConfig,
    ProgramBatches,
    PruneConfig,
    PruneThenKdConfig,
    ReportConfig,
    SdapConfig,
    SectionError,
    SlimConfig,
    TeacherConfig,
    TeacherViews,
    TrainConfig,
    ViewSchedule,
    WeightConfig,
    apply_profile,
    input_shape,
    read_params_file,
    validate,
)
from pipeline.errors import ConfigError, ModelError
from pipeline.models import build_model
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
    prune: PruneConfig  # which methods run, and the common kept-MACs target
    student_pruned: TrainConfig  # every method's prune phase
    pdd: PddConfig
    kddp: KddpConfig
    prune_then_kd: PruneThenKdConfig
    sdap: SdapConfig
    netslim: NetslimConfig
    weight: WeightConfig
    student_slim: SlimConfig
    student_final: TrainConfig  # every method's fine-tuning
    latency: LatencyConfig  # per-layer latency tables: latency budgets, slimming's widths
    export: ExportConfig
    engine: EngineConfig
    benchmark: BenchmarkConfig
    report: ReportConfig
    runtimes: dict[str, Any]  # settings key -> settings of the targets that share it

    def target_settings(self, name: str) -> Any:
        """The settings object target `name` is built with."""
        return self.runtimes[target_class(name).settings_key]

    def latency_networks(self) -> LatencyNetworks:
        """What the latency_table stage measures (its resolved file: nothing else)."""
        return LatencyNetworks(teacher_arch=self.teacher.arch,
                               student_arch=self.distill.student_arch,
                               input_shape=input_shape(self.data), opset=self.export.opset,
                               simplifier=self.export.simplifier)

    def program_batches(self) -> ProgramBatches:
        """The batch sizes fixed-batch programs are built at (export_executorch reads only this)."""
        return ProgramBatches(tuple(sorted(set(self.benchmark.batch_sizes))))

    def teacher_views(self) -> TeacherViews:
        """What the teacher_logits stage computes (its resolved file: nothing else)."""
        schedules = tuple(ViewSchedule(stage, cfg.epochs, cfg.batch_size, cfg.amp,
                                       cfg.channels_last)
                          for stage, cfg in (("student_dense", self.student_dense),
                                             ("student_pruned", self.student_pruned),
                                             ("student_final", self.student_final)))
        return TeacherViews(self.distill.teacher_cache, self.distill.teacher_runtime, schedules)

    def method_settings(self, name: str) -> tuple[MethodBudget, Any]:
        """What method `name`'s prune stage reads: the common budget and its own section."""
        latency = self.prune.latency_budget
        budget = MethodBudget(target_macs=self.prune.target_macs,
                              round_to=self.student_slim.round_to,
                              latency_ms=latency.latency_ms if latency else None)
        return budget, getattr(self, name)


SECTIONS: dict[str, type] = {f.name: f.type for f in fields(Params)
                             if f.name not in ("profile", RUNTIMES)}
METHOD_SECTIONS = METHOD_NAMES  # one section per pruning method, named after it


def runtime_schemas() -> dict[str, type]:
    """Settings key -> schema, over every registered target (targets may share a key)."""
    schemas: dict[str, type] = {}
    for name in target_names():
        cls = target_class(name)
        schemas.setdefault(cls.settings_key, cls.Settings)
    return schemas


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
    budget = p.student_pruned.epochs + p.student_final.epochs
    problems = []
    if p.student_dense.epochs != budget:
        problems.append(("student_dense.epochs", f"({p.student_dense.epochs}) must equal "
                         f"student_pruned.epochs + student_final.epochs ({budget}): every method "
                         "and the unpruned student are compared at the same training budget"))
    if "sdap" in p.prune.methods and p.sdap.pretrain_epochs >= p.student_pruned.epochs:
        problems.append(("sdap.pretrain_epochs", f"({p.sdap.pretrain_epochs}) must be below "
                         f"student_pruned.epochs ({p.student_pruned.epochs}): sdap's "
                         "self-distillation runs in the prune phase's remaining epochs"))
    return problems


def _compared_models(p: Params) -> list[tuple[str, str]]:
    """benchmark.models lists the references; every method's student comes from prune.methods."""
    problems = []
    for model in p.benchmark.models:
        if model not in REFERENCE_MODELS:
            hint = (f"; the pruned students ({', '.join(map(final_model, p.prune.methods))}) "
                    "are benchmarked because prune.methods lists their methods"
                    if model.startswith(final_model("")) else "")
            problems.append(("benchmark.models", f"{model!r} is not a reference model; "
                             f"expected some of {list(REFERENCE_MODELS)}{hint}"))
    problems += [("benchmark.models", f"{model!r} is listed more than once")
                 for model in sorted({m for m in p.benchmark.models
                                      if p.benchmark.models.count(m) > 1})]
    for model in p.engine.models:
        if model not in REFERENCE_MODELS:
            problems.append(("engine.models", f"{model!r} is not a reference model; expected "
                             f"some of {list(REFERENCE_MODELS)} (every method's student gets "
                             "engines because prune.methods lists it)"))
    for key in ("baseline_model", "dense_model"):
        model = getattr(p.report, key)
        if model not in p.benchmark.models:
            problems.append((f"report.{key}", f"{model!r} is not benchmarked; expected one of "
                             f"benchmark.models {list(p.benchmark.models)}"))
    precisions = p.benchmark.targets.get(p.report.chart_target)
    if precisions is None:
        problems.append(("report.chart_target", f"{p.report.chart_target!r} is not benchmarked; "
                         f"expected one of benchmark.targets {list(p.benchmark.targets)}"))
    elif p.report.chart_precision not in precisions:
        problems.append(("report.chart_precision", f"{p.report.chart_precision!r} is not "
                         f"benchmarked on {p.report.chart_target} ({list(precisions)})"))
    return problems


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


def _latency_tables(p: Params) -> list[tuple[str, str]]:
    """The table's target runs ONNX files and is benchmarked at the table's batch sizes (the
    latency model compares with the benchmark's measurements); a latency budget names that
    target and one of those batch sizes."""
    lat, problems = p.latency, []
    if lat.target not in target_names():
        return [("latency.target", f"unknown target; known: {', '.join(target_names())}")]
    if target_class(lat.target).source != "onnx":
        problems.append(("latency.target", f"{lat.target!r} runs "
                         f"{target_class(lat.target).source} files; latency tables are measured "
                         "with ONNX probes, so it must be a target that runs ONNX files"))
    if "fp32" not in p.benchmark.targets.get(lat.target, ()):
        problems.append(("latency.target", f"{lat.target!r} must be benchmarked in fp32 "
                         "(benchmark.targets): the latency model is checked against those "
                         "measurements"))
    missing = [b for b in lat.batch_sizes if b not in p.benchmark.batch_sizes]
    if missing:
        problems.append(("latency.batch_sizes", f"{missing} not in benchmark.batch_sizes "
                         f"{list(p.benchmark.batch_sizes)}"))
    if lat.select_batch not in lat.batch_sizes:
        problems.append(("latency.select_batch", f"{lat.select_batch} is not one of "
                         f"latency.batch_sizes {list(lat.batch_sizes)}"))
    if lat.sweep_widths:
        try:  # the sweep builds the student at other base widths
            build_model({"arch": p.distill.student_arch, "base_width": lat.sweep_widths[0]})
        except ModelError as err:
            problems.append(("latency.sweep_widths", f"{p.distill.student_arch} cannot be built "
                             f"at another base width ({err}); set latency.sweep_widths: []"))
    budget = p.prune.latency_budget
    if budget is not None:
        if budget.target != lat.target:
            problems.append(("prune.budget.target", f"{budget.target!r}: tables are built for "
                             f"latency.target ({lat.target!r}); set both to the same target"))
        if p.student_slim.widths != "table":
            problems.append(("student_slim.widths", f"{p.student_slim.widths!r}: a latency budget "
                             "is met at the widths the table priced; set student_slim.widths: "
                             "table (rounding would change them)"))
        if budget.batch not in lat.batch_sizes:
            problems.append(("prune.budget.batch", f"{budget.batch} is not one of "
                             f"latency.batch_sizes {list(lat.batch_sizes)}"))
    return problems


CROSS_SECTION_RULES = (_epoch_budget, _compared_models, _targets_support_their_precisions,
                       _benchmarked_batches_fit_the_engine_profile, _batches_split_over_processes,
                       _latency_tables)


# Keys dvc.yaml expands into stages (foreach). DVC reads them from params.yaml as written, before
# any profile applies, so a profile may name them only with the value the file itself has.
STAGE_KEYS = (("prune", "methods"), ("benchmark", "models"), ("benchmark", "targets"),
              ("latency", "target"))


def _stage_keys_as_written(raw: dict[str, Any], merged: dict[str, Any], overridden: set[str],
                           profile: str) -> list[tuple[str, str]]:
    problems = []
    for section, key in STAGE_KEYS:
        dotted = f"{section}.{key}"
        if dotted not in overridden or not isinstance(raw.get(section), dict):
            continue  # a missing or malformed section is reported by its own validation
        written, wanted = raw[section].get(key), merged[section].get(key)
        if wanted != written:
            shown = "[" + ",".join(map(str, wanted)) + "]" if isinstance(wanted, list) else \
                wanted
            problems.append((dotted, f"profiles.{profile} sets {wanted}, but dvc.yaml builds its "
                             f"stages from the value written at the top of the file ({written}): "
                             "DVC reads it before any profile applies. Set both, e.g. "
                             f"dvc exp run -S profile={profile} -S '{dotted}={shown}'"))
    return problems


@dataclass(frozen=True)
class _Checked:
    """The file's sections with one profile applied (or none: the base sections), checked."""

    profile: str
    problems: list[tuple[str, str]]  # (dotted key, what is wrong)
    overridden: set[str]  # dotted keys the profile set
    params: Params | None  # None when there are problems


def _check(raw: dict[str, Any], path: Path, profile: str | None,
           active: bool = True) -> _Checked:
    """`active`: the profile in force, whose stage keys must also be the ones written (another
    profile's are checked when it is switched on, together with them)."""
    merged, overridden = apply_profile(raw, path, profile)
    built, problems = _build(merged)
    if active:
        problems += _stage_keys_as_written(raw, merged, overridden, merged["profile"])
    params = None
    if not problems:
        params = Params(profile=merged["profile"], **built)
        problems = [problem for rule in CROSS_SECTION_RULES for problem in rule(params)]
    return _Checked(merged["profile"], problems, overridden, params if not problems else None)


def _check_other(raw: dict[str, Any], path: Path, profile: str) -> _Checked:
    """Like _check, with a profile that cannot even be applied reported as one problem (the
    active profile's own such error is raised at once)."""
    try:
        return _check(raw, path, profile, active=False)
    except ConfigError as err:
        key, _, message = str(err).removeprefix(f"{path}: ").partition(": ")
        return _Checked(profile, [(key, message)], set(), None)


def _set_by(key: str, checked: _Checked) -> bool:
    return any(key == o or key.startswith(o + ".") for o in checked.overridden)


def _problem_lines(active: _Checked, base: _Checked, others: list[_Checked]) -> list[str]:
    """Every problem once: as the active profile sees it, then base values it overrides, then
    what only another profile would meet."""
    lines = [f"{key}: {message}" + (f" [set by profiles.{active.profile}]"
                                    if _set_by(key, active) else "")
             for key, message in active.problems]
    seen = set(active.problems)
    for key, message in base.problems:
        if (key, message) not in seen:
            seen.add((key, message))
            lines.append(f"{key}: {message} [base value; profiles.{active.profile} overrides it, "
                         "but every value in the file must be valid]")
    for other in others:
        for key, message in other.problems:
            if (key, message) not in seen:
                seen.add((key, message))
                where = "set by" if _set_by(key, other) else "with"
                tag = "" if key.startswith("profiles.") else f" [{where} profiles.{other.profile}]"
                lines.append(f"{key}: {message}{tag}")
    return lines


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Read and validate params.yaml; the Params of its active profile. The base sections and
    every profile are validated too, so a bad value cannot wait in the file for the day its
    profile is switched on. ConfigError naming every bad key."""
    path = Path(path)
    raw = read_params_file(path)
    active = _check(raw, path, None)  # the file's own profile (a malformed one raises here)
    base = _check({**raw, "profiles": {}}, path, active.profile)
    others = [_check_other(raw, path, name) for name in PROFILES if name != active.profile]
    lines = _problem_lines(active, base, others)
    if lines:
        raise ConfigError(f"{path}: invalid parameters:\n  " + "\n  ".join(lines))
    assert active.params is not None  # no problems: every section was built
    return active.params
