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


# --- sections added by later issues go above this line, and into Params below ---


@dataclass(frozen=True, config=_STRICT)
class Params:
    """The whole params.yaml after the profile has been applied."""

    profile: Literal["smoke", "quick", "paper"]  # schedule preset in force
    common: CommonConfig
    data: DataConfig
    train_teacher: TrainTeacherConfig


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


def _build_section(name: str, cls: type, values: Any, overridden: set[str], profile: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{name}: expected a mapping of keys, got {type(values).__name__}")
    try:
        return cls(**_lists_to_tuples(values))
    except ValidationError as err:
        problems = [_describe({**e, "loc": (name, *e["loc"])}, overridden, profile)
                    for e in err.errors()]
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
    return Params(**built)


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
