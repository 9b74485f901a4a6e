"""Typed configuration: params.yaml -> frozen dataclasses, validated as a whole.

params.yaml has one section per stage plus shared ones, a `profile` key choosing a schedule
(`smoke`, `quick`, `paper`) and a `profiles` table whose entries override section keys.
Unknown keys, missing keys, wrong types and out-of-range values are `ConfigError`s that name the
key and the file. Every stage validates the whole file, so a typo anywhere stops the pipeline
before any output is touched.
"""

import copy
import os
import re
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

from pipeline.errors import ConfigError

PROFILES = ("smoke", "quick", "paper")
DATA_ROOT_ENV = "PIPELINE_DATA_ROOT"
_STRICT = ConfigDict(extra="forbid", strict=True)

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
UnitFloat = Annotated[float, Field(ge=0, lt=1)]  # a fraction in [0, 1)


@dataclass(frozen=True, config=_STRICT)
class CommonConfig:
    seed: NonNegativeInt  # base seed for every random number generator, all stages
    device: Literal["auto", "cpu", "cuda"]  # training/eval device; auto = cuda if present
    threads: NonNegativeInt  # torch intra-op threads on CPU; 0 = torch's default (all cores)


@dataclass(frozen=True, config=_STRICT)
class DataConfig:
    dataset: Literal["cifar10", "cifar100", "synthetic", "imagefolder"]  # which data source
    root: str  # folder holding the dataset (cifar-10-batches-py/ ...); env PIPELINE_DATA_ROOT wins
    download: bool  # fetch CIFAR from its official URL when missing (needs network)
    train_limit: NonNegativeInt  # keep N training images, balanced over classes; 0 = all
    test_limit: NonNegativeInt  # keep N test images, balanced over classes; 0 = all
    synthetic_train: PositiveInt  # synthetic only: training images generated
    synthetic_test: PositiveInt  # synthetic only: test images generated
    synthetic_classes: Annotated[int, Field(ge=2)]  # synthetic only: number of classes
    val_fraction: UnitFloat  # imagefolder only: share of each class held out as test split
    image_size: Annotated[int, Field(ge=8)]  # imagefolder only: images resized to this (pixels)


@dataclass(frozen=True, config=_STRICT)
class TrainConfig:
    """An SGD training schedule; shared by every stage that trains."""

    epochs: PositiveInt  # passes over the training set
    batch_size: PositiveInt  # images per optimiser step
    eval_batch_size: PositiveInt  # images per forward pass during evaluation
    lr: PositiveFloat  # peak learning rate
    momentum: UnitFloat  # SGD momentum
    nesterov: bool  # Nesterov momentum
    weight_decay: NonNegativeFloat  # L2 penalty on weights (SGD weight_decay)
    schedule: Literal["multistep", "cosine"]  # learning-rate decay after warm-up
    milestones: tuple[PositiveInt, ...]  # multistep: epochs at which lr is multiplied by gamma
    gamma: Annotated[float, Field(gt=0, le=1)]  # multistep: decay factor
    warmup_epochs: NonNegativeInt  # linear warm-up from lr/10 to lr over these epochs
    label_smoothing: UnitFloat  # cross-entropy label smoothing
    amp: Literal["off", "bf16", "fp16"]  # autocast precision; applies on CUDA only
    channels_last: bool  # NHWC memory format (faster convolutions on CUDA and on oneDNN CPUs)

    @model_validator(mode="after")
    def _milestones_inside_schedule(self):
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError(f"milestones must be strictly increasing, got {list(self.milestones)}")
        if self.milestones and self.milestones[-1] >= self.epochs:
            raise ValueError(f"milestone {self.milestones[-1]} is not before epochs={self.epochs}")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be < epochs={self.epochs}")
        return self


@dataclass(frozen=True, config=_STRICT)
class TrainTeacherConfig(TrainConfig):
    arch: str = Field(default=...)  # model zoo name, e.g. resnet56 (see pipeline/models)

    @field_validator("arch")
    @classmethod
    def _arch_in_zoo(cls, arch: str) -> str:
        return check_arch(arch)


def check_arch(arch: str) -> str:
    """Reject an unknown architecture when the config loads, not halfway through a stage."""
    from pipeline.models import known_architectures

    if arch not in known_architectures():
        known = ", ".join(known_architectures())
        raise ValueError(f"unknown architecture {arch!r}; known: {known}")
    return arch


# --- export (issue 4) ---


@dataclass(frozen=True, config=_STRICT)
class OnnxRuntimeCpuConfig:
    """Session settings of the ONNX Runtime CPU target (targets/onnxruntime_cpu.py)."""

    graph_optimization: Literal["disable", "basic", "extended", "all"]  # ORT graph optimisation
    intra_op_threads: NonNegativeInt  # threads inside one operator; 0 = ORT's default (all cores)
    inter_op_threads: NonNegativeInt  # threads across operators; 0 = ORT's default
    # Execution providers, most preferred first; every one must be present (never dropped).
    providers: Annotated[tuple[str, ...], Field(min_length=1)]


@dataclass(frozen=True, config=_STRICT)
class ParityTolerance:
    """How far a reduced-precision ONNX file may drift from the PyTorch model's logits."""

    max_rel_diff: PositiveFloat  # max|a - b| / max|a| over all compared logits
    min_top1_agreement: Annotated[float, Field(gt=0, le=1)]  # share of images with equal top-1


@dataclass(frozen=True, config=_STRICT)
class QuantizeConfig:
    """Static INT8 (QDQ, per-channel weights) quantisation with ONNX Runtime."""

    calibration_images: Annotated[int, Field(ge=512)]  # training images used for calibration
    calibration_batch: PositiveInt  # images per calibration forward pass
    calibration_method: Literal["minmax", "entropy", "percentile"]  # activation range estimate
    activation_type: Literal["uint8", "int8"]  # uint8 = U8S8 (fully fused on ORT CPU, faster)
    reduce_range: bool  # 7-bit weights: avoids U8S8 overflow on x86 without VNNI; less precise
    max_top1_drop: NonNegativeFloat  # top-1 points (percent) INT8 may lose vs FP32, else error


@dataclass(frozen=True, config=_STRICT)
class ExportConfig:
    """The export stage: ONNX export, simplification, FP16/INT8 variants and their parity gates."""

    opset: Annotated[int, Field(ge=18)]  # ONNX opset; 17 fails for our ResNets (docs/export.md)
    simplifier: Literal["onnxsim", "onnxslim"]  # graph simplifier run after export
    parity_images: PositiveInt  # first N test images compared across representations
    parity_batch: Annotated[int, Field(ge=2)]  # the large parity batch (the small one is 1)
    eval_batch: PositiveInt  # batch size for accuracy runs over the whole test set
    fp16: ParityTolerance  # FP16 file vs PyTorch (FP32 files must match within 1e-4, 100% top-1)
    int8: ParityTolerance  # INT8 file vs PyTorch
    quantize: QuantizeConfig  # how the INT8 file is calibrated and how much it may lose
    runtime: OnnxRuntimeCpuConfig  # ONNX Runtime session used for parity and accuracy

    @model_validator(mode="after")
    def _large_batch_fits_parity_images(self):
        if self.parity_images < self.parity_batch:
            raise ValueError(f"parity_images={self.parity_images} must be >= parity_batch="
                             f"{self.parity_batch}, or no batch of that size is ever compared")
        return self


# --- benchmark/report (issue 5) ---

Precision = Literal["fp32", "fp16", "int8"]


@dataclass(frozen=True, config=_STRICT)
class TimingConfig:
    """How each latency is measured (pipeline.timing.TimingPlan)."""

    warmup_iters: NonNegativeInt  # throw-away calls before timing, at least this many ...
    warmup_seconds: NonNegativeFloat  # ... and for at least this long (seconds)
    min_iters: PositiveInt  # timed calls: at least this many ...
    min_seconds: NonNegativeFloat  # ... and for at least this long in total (seconds)


@dataclass(frozen=True, config=_STRICT)
class SshDeviceConfig:
    """The edge device of the ssh-* targets (targets/ssh.py). host "" = none: rows are skipped."""

    host: str  # user@host of the device; "" = no device configured
    port: Annotated[int, Field(ge=1, le=65535)]  # sshd port on the device
    key_file: str  # private key file; "" = ssh's default identities
    known_hosts: str  # known_hosts file holding the device's host key (verified, never skipped)
    ssh_config: str  # passed as `ssh -F`: a config file, or "none" to ignore ~/.ssh/config
    remote_python: Annotated[tuple[str, ...], Field(min_length=1)]  # device Python + numpy + ORT
    remote_tmp: str  # device folder under which a temp folder is made and removed again
    providers: Annotated[tuple[str, ...], Field(min_length=1)]  # ORT providers on the device
    trtexec: str  # trtexec command on the device (ssh-tensorrt)
    threads: NonNegativeInt  # ORT intra-op threads on the device; 0 = ORT's default
    connect_timeout_s: PositiveFloat  # seconds allowed to connect
    command_timeout_s: PositiveFloat  # seconds allowed for any one remote command or copy


@dataclass(frozen=True, config=_STRICT)
class BenchmarkConfig:
    """The benchmark stage, run once per target (DVC foreach over `targets`)."""

    # target name -> precisions benchmarked there (checked against what the target supports)
    targets: dict[str, Annotated[tuple[Precision, ...], Field(min_length=1)]]
    models: Annotated[tuple[str, ...], Field(min_length=1)]  # models/<m>.pt, artifacts/<m>.*.onnx
    batch_sizes: Annotated[tuple[PositiveInt, ...], Field(min_length=1)]  # images per call
    eval_images: NonNegativeInt  # test images for top-1 through each runtime; 0 = all
    timing: TimingConfig
    torch_threads: NonNegativeInt  # torch-cpu intra-op threads; 0 = torch's default
    onnxruntime: OnnxRuntimeCpuConfig  # onnxruntime-cpu session settings
    ssh: SshDeviceConfig

    @model_validator(mode="after")
    def _targets_support_their_precisions(self):
        from targets import TARGETS

        for name, precisions in self.targets.items():
            if name not in TARGETS:
                raise ValueError(f"unknown target {name!r}; known: {', '.join(sorted(TARGETS))}")
            unsupported = sorted(set(precisions) - set(TARGETS[name].precisions))
            if unsupported:
                raise ValueError(f"target {name!r} does not support {unsupported}; it supports "
                                 f"{list(TARGETS[name].precisions)}")
        return self


@dataclass(frozen=True, config=_STRICT)
class ReportConfig:
    """The comparison report (stages/report.py)."""

    baseline_model: str  # speedups are measured against this model (the teacher)
    dense_model: str  # the unpruned student
    pruned_model: str  # the slimmed student: "did pruning pay off" compares it with dense_model
    paid_off_speedup: Annotated[float, Field(gt=1)]  # measured speedup that counts as paying off


# --- PDD, slimming, fine-tuning (issue 3) ---


@dataclass(frozen=True, config=_STRICT)
class DistillConfig:
    """Hinton KD as every student stage uses it: (1-alpha)*CE + alpha*T^2*KL(t||s)."""

    temperature: PositiveFloat  # softmax temperature T of the KD term (reference: 3)
    alpha: Annotated[float, Field(ge=0, le=1)]  # weight of the KD term (reference: 0.6)


@dataclass(frozen=True, config=_STRICT)
class DistillPruneConfig(TrainConfig):
    arch: str = Field(default=...)  # student architecture (zoo name), e.g. resnet20
    gate_lr: PositiveFloat = Field(default=...)  # SGD lr of the gate logits (no weight decay)
    flops_target: Annotated[float, Field(ge=0, le=1)] = Field(default=...)  # kept-MACs fraction
    # the budget penalty drives towards; 0 = no budget (the paper's default)
    flops_weight: NonNegativeFloat = Field(default=...)  # weight of the budget penalty

    @field_validator("arch")
    @classmethod
    def _arch_in_zoo(cls, arch: str) -> str:
        return check_arch(arch)

    @model_validator(mode="after")
    def _budget_needs_a_weight(self):
        if (self.flops_target > 0) != (self.flops_weight > 0):
            raise ValueError("flops_target and flops_weight switch the MACs budget on together: "
                             f"both > 0 or both 0 (got {self.flops_target}, {self.flops_weight})")
        return self


@dataclass(frozen=True, config=_STRICT)
class SlimConfig:
    round_to: PositiveInt  # keep every group's width a multiple of this (1 = exact gate widths)
    check_images: PositiveInt  # test images on which slimmed and gated logits are compared
    tolerance: PositiveFloat  # max allowed max|gated - slim| / max|gated| (exactness gate)


# --- sections added by later issues go above this line, and into Params below ---


@dataclass(frozen=True, config=_STRICT)
class Params:
    """The whole params.yaml after the profile has been applied."""

    profile: Literal["smoke", "quick", "paper"]  # schedule preset in force
    common: CommonConfig
    data: DataConfig
    train_teacher: TrainTeacherConfig
    distill: DistillConfig
    student_dense: TrainConfig  # the unpruned student (arch of distill_prune), same KD recipe
    distill_prune: DistillPruneConfig
    slim: SlimConfig
    finetune: TrainConfig
    export: ExportConfig  # ONNX export, simplification, FP16/INT8 variants and parity gates
    benchmark: BenchmarkConfig  # latency and accuracy per target
    report: ReportConfig  # the comparison report

    @model_validator(mode="after")
    def _dense_student_gets_the_same_epoch_budget(self):
        budget = self.distill_prune.epochs + self.finetune.epochs
        if self.student_dense.epochs != budget:
            raise ValueError(
                f"student_dense.epochs ({self.student_dense.epochs}) must equal "
                f"distill_prune.epochs + finetune.epochs ({budget}): pruned and unpruned "
                "students are compared at the same training budget")
        return self


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads `5e-4` as a string (YAML 1.1); DVC reads it as a float (YAML 1.2). Match DVC."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    # Numbers with an exponent, signed or not (PyYAML 1.1 wants a dot and a signed exponent).
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read params file ({err.strerror})") from err
    try:
        raw = yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return raw


def _apply_profile(raw: dict[str, Any], path: Path) -> tuple[dict[str, Any], set[str]]:
    """Merge profiles[profile] into the sections; return the merged dict and the keys it set."""
    profile = raw.get("profile")
    profiles = raw.get("profiles", {})
    if profile not in PROFILES:
        raise ConfigError(f"{path}: profile: expected one of {', '.join(PROFILES)}, "
                          f"got {profile!r}")
    if not isinstance(profiles, dict) or set(profiles) - set(PROFILES):
        unknown = sorted(set(profiles) - set(PROFILES)) if isinstance(profiles, dict) else profiles
        raise ConfigError(f"{path}: profiles: unknown profile(s) {unknown}; known: {PROFILES}")
    merged = {k: copy.deepcopy(v) for k, v in raw.items() if k != "profiles"}
    overridden: set[str] = set()
    for section, values in (profiles.get(profile) or {}).items():
        where = f"profiles.{profile}.{section}"
        if not isinstance(merged.get(section), dict) or not isinstance(values, dict):
            raise ConfigError(f"{path}: {where}: no such section to override")
        for key, value in values.items():
            if key not in merged[section]:
                raise ConfigError(f"{path}: {where}.{key}: unknown key (not in section {section})")
            merged[section][key] = value
            overridden.add(f"{section}.{key}")
    return merged, overridden


def _describe(error: dict[str, Any], overridden: set[str], profile: str) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = {
        "missing": "missing key",
        "unexpected_keyword_argument": "unknown key",
    }.get(error["type"], error["msg"])
    if error["type"] not in ("missing", "unexpected_keyword_argument") and "input" in error:
        message += f" (got {error['input']!r})"
    if key in overridden:
        message += f" [set by profiles.{profile}]"
    return f"{key}: {message}"


class _SectionErrors(Exception):
    """Validation errors of one section, each with its full key path."""

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__(errors)
        self.errors = errors


def _construct(cls: type, values: dict[str, Any], where: tuple[str, ...]) -> Any:
    """Build dataclass `cls` from a mapping, nested sections first (strict mode wants instances)."""
    hints = typing.get_type_hints(cls)
    built, problems = {}, []
    for key, value in values.items():
        nested = hints.get(key)
        if isinstance(value, dict) and is_dataclass(nested):
            try:
                value = _construct(nested, value, (*where, key))
            except _SectionErrors as err:
                problems += err.errors
        built[key] = value
    if problems:
        raise _SectionErrors(problems)
    try:
        return cls(**built)
    except ValidationError as err:
        raise _SectionErrors([{**e, "loc": (*where, *e["loc"])} for e in err.errors()]) from None


def _build_section(name: str, cls: type, values: Any, overridden: set[str], profile: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{name}: expected a mapping of keys, got {type(values).__name__}")
    try:
        return _construct(cls, _lists_to_tuples(values), (name,))
    except _SectionErrors as err:
        problems = [_describe(e, overridden, profile) for e in err.errors]
        raise ValueError("\n  ".join(problems)) from None


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Read, profile-merge and validate params.yaml; raise ConfigError naming every bad key."""
    path = Path(path)
    merged, overridden = _apply_profile(_read_yaml(path), path)
    sections = {f.name: f.type for f in fields(Params) if f.name != "profile"}
    problems = [f"{key}: unknown section" for key in merged if key not in (*sections, "profile")]
    problems += [f"{key}: missing section" for key in sections if key not in merged]
    built: dict[str, Any] = {"profile": merged["profile"]}
    for name, cls in sections.items():
        if name in merged:
            try:
                built[name] = _build_section(name, cls, merged[name], overridden, merged["profile"])
            except ValueError as err:
                problems.append(str(err))
    if problems:
        raise ConfigError(f"{path}: invalid parameters:\n  " + "\n  ".join(problems))
    try:
        return Params(**built)
    except ValidationError as err:  # cross-section rules
        problems = [e["msg"].removeprefix("Value error, ") for e in err.errors()]
        raise ConfigError(f"{path}: invalid parameters:\n  " + "\n  ".join(problems)) from None


def _lists_to_tuples(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists_to_tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_lists_to_tuples(v) for v in value)
    return value


def data_root(cfg: DataConfig) -> Path:
    """The dataset folder: $PIPELINE_DATA_ROOT if set, else data.root from params."""
    return Path(os.environ.get(DATA_ROOT_ENV) or cfg.root)


def as_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON-able data (tuples become lists), e.g. for metrics files."""
    if is_dataclass(config):
        return {f.name: as_dict(getattr(config, f.name)) for f in fields(config)}
    if isinstance(config, tuple):
        return [as_dict(v) for v in config]
    return config
