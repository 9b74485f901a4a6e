"""Typed configuration: the schemas of params.yaml's sections and the rules for reading them.

params.yaml has one section per stage plus shared ones, a `profile` key choosing a schedule
(`smoke`, `quick`, `paper`) and a `profiles` table whose entries override section keys. It is
read exactly as DVC reads it (ruamel.yaml, YAML 1.2: `off` is a string, `5e-4` a float), because
`dvc exp run -S` rewrites the file and DVC must see the same values the stages see.

Every section is a frozen pydantic dataclass validated strictly (no "1" -> 1, no 1 -> True);
unknown keys, missing keys, wrong types and out-of-range values become one line each that names
the key. This module holds the schemas library code uses; each runtime target defines its own
settings schema (targets/), and stages/_params.py, the one place that sees both, composes the
whole file. Stages read their validated sections back from resolved/<section>.json
(`load_section`), written by the validate_params stage.
"""

import json
import os
import re
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass

from pipeline.errors import ConfigError

PROFILES = ("smoke", "quick", "paper")
DATA_ROOT_ENV = "PIPELINE_DATA_ROOT"
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # no inf or nan values
Schema = TypeVar("Schema")

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
UnitFloat = Annotated[float, Field(ge=0, lt=1)]  # a fraction in [0, 1)
Precision = Literal["fp32", "fp16", "bf16", "int8"]  # bf16: an inference precision (OpenVINO)


# --------------------------------------------------------------------------- shared sections
@dataclass(frozen=True, config=STRICT)
class DistributedConfig:
    """Data-parallel training (PyTorch DDP launched by torchrun; pipeline/distributed.py).

    1 process on 1 machine is plain single-process training. Per-machine values (which node a
    machine is) never go here, since every machine reads the same params.yaml: they come from
    the environment (PIPELINE_NODE_RANK).
    """

    nproc_per_node: NonNegativeInt  # training processes per machine; 0 = one per visible GPU
    nnodes: PositiveInt  # machines; > 1 needs rdzv_endpoint, and PIPELINE_NODE_RANK on each
    rdzv_endpoint: str  # host:port of node 0 (static rendezvous); "" on a single machine
    sync_batchnorm: bool  # BatchNorm statistics over all processes' shards (else per process)
    max_restarts: NonNegativeInt  # torchrun restarts after a failed process (each resumes)
    timeout_s: PositiveInt  # how long a collective waits for a missing process (seconds)

    @model_validator(mode="after")
    def _endpoint_for_several_nodes(self):
        if self.rdzv_endpoint:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"rdzv_endpoint must be host:port, got {self.rdzv_endpoint!r}")
        elif self.nnodes > 1:
            raise ValueError(f"nnodes={self.nnodes} needs rdzv_endpoint (host:port of node 0)")
        return self


@dataclass(frozen=True, config=STRICT)
class CommonConfig:
    seed: NonNegativeInt  # base seed for every random number generator, all stages
    device: Literal["auto", "cpu", "cuda"]  # training/eval device; auto = cuda if present
    threads: NonNegativeInt  # torch intra-op threads on CPU; 0 = torch's default (all cores)
    distributed: DistributedConfig  # training stages: processes and machines (DDP, torchrun)


@dataclass(frozen=True, config=STRICT)
class RunConfig(CommonConfig):
    """`common` as stages read it from resolved/common.json: the section plus the profile."""

    profile: Literal["smoke", "quick", "paper"] = Field(default=...)  # schedule preset in force


@dataclass(frozen=True, config=STRICT)
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


@dataclass(frozen=True, config=STRICT)
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
    # autocast precision: bf16 on CUDA and on CPUs with native bf16 (else fp32, logged); fp16 on
    # CUDA only; auto = bf16 where native, else off
    amp: Literal["off", "bf16", "fp16", "auto"]
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


def check_arch(arch: str) -> str:
    """Reject an unknown architecture when the config loads, not halfway through a stage."""
    from pipeline.models import known_architectures

    if arch not in known_architectures():
        known = ", ".join(known_architectures())
        raise ValueError(f"unknown architecture {arch!r}; known: {known}")
    return arch


Architecture = Annotated[str, Field(min_length=1)]


@dataclass(frozen=True, config=STRICT)
class TeacherConfig(TrainConfig):
    """The teacher stage: an architecture of the model zoo and its training schedule."""

    arch: Architecture = Field(default=...)  # model zoo name, e.g. resnet56 (see pipeline/models)

    @field_validator("arch")
    @classmethod
    def _arch_in_zoo(cls, arch: str) -> str:
        return check_arch(arch)


@dataclass(frozen=True, config=STRICT)
class DistillConfig:
    """The student and how every student stage is distilled from the teacher:
    (1-alpha)*CE + alpha*T^2*KL(t||s)."""

    student_arch: Architecture  # student architecture (zoo name) of every student stage
    temperature: PositiveFloat  # softmax temperature T of the KD term (reference: 3)
    alpha: Annotated[float, Field(ge=0, le=1)]  # weight of the KD term (reference: 0.6)
    # what runs the frozen teacher's forward pass: auto = ONNX Runtime when a student trains in
    # fp32 on a CPU, else PyTorch | torch | onnxruntime (CPU only)
    teacher_runtime: Literal["auto", "torch", "onnxruntime"]
    # run the teacher once over every training view the student stages see (teacher_logits
    # stage) and serve its logits from that table; false: every student stage runs it live
    teacher_cache: bool

    @field_validator("student_arch")
    @classmethod
    def _arch_in_zoo(cls, arch: str) -> str:
        return check_arch(arch)


# ------------------------------------------------------------- pruning methods, slimming
METHOD_NAMES = ("pdd", "kddp", "prune_then_kd", "sdap", "netslim", "weight")
MethodName = Literal["pdd", "kddp", "prune_then_kd", "sdap", "netslim", "weight"]
Normalization = Literal["none", "mean"]  # per-group score scaling before a global threshold
Fraction = Annotated[float, Field(gt=0, le=1)]  # a share in (0, 1]


@dataclass(frozen=True, config=STRICT)
class MacsBudget:
    """Kept MACs / the unpruned student's MACs."""

    macs: Fraction


@dataclass(frozen=True, config=STRICT)
class LatencyBudget:
    """A latency on a named target at a batch size, priced by its latency table (latency)."""

    latency_ms: PositiveFloat  # milliseconds per call of `batch` images
    target: str  # must be latency.target: the target whose table is built
    precision: Literal["fp32"]  # tables are measured in fp32
    batch: PositiveInt  # one of latency.batch_sizes


@dataclass(frozen=True, config=STRICT)
class PruneConfig:
    """Which pruning methods run (one chain each: student_pruned@m -> student_slim@m ->
    student_final@m) and the budget every structured method is driven to."""

    methods: Annotated[tuple[MethodName, ...], Field(min_length=1)]  # the methods compared
    budget: MacsBudget | LatencyBudget | None  # None = each method's own size

    @property
    def target_macs(self) -> float | None:
        """The kept-MACs target, when the budget is one."""
        return self.budget.macs if isinstance(self.budget, MacsBudget) else None

    @property
    def latency_budget(self) -> "LatencyBudget | None":
        return self.budget if isinstance(self.budget, LatencyBudget) else None

    @field_validator("methods")
    @classmethod
    def _each_method_once(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(methods)) != len(methods):
            raise ValueError(f"each method may be listed once, got {list(methods)}")
        return methods


@dataclass(frozen=True, config=STRICT)
class PddConfig:
    """PDD (seed 000): differentiable 0/1 gates trained with the weights under KD."""

    gate_lr: PositiveFloat  # SGD lr of the gate logits (no weight decay)
    flops_target: Annotated[float, Field(ge=0, le=1)]  # kept-MACs fraction the budget penalty
    # drives towards during training; 0 = no penalty (the paper's default)
    flops_weight: NonNegativeFloat  # weight of the budget penalty

    @model_validator(mode="after")
    def _budget_needs_a_weight(self):
        if (self.flops_target > 0) != (self.flops_weight > 0):
            raise ValueError("flops_target and flops_weight switch the MACs budget on together: "
                             f"both > 0 or both 0 (got {self.flops_target}, {self.flops_weight})")
        return self


@dataclass(frozen=True, config=STRICT)
class NetslimConfig:
    """Network slimming (Liu et al. 2017): L1 on BatchNorm scales, one global threshold."""

    l1: NonNegativeFloat  # weight of sum |gamma| in the loss (official: 1e-5 ResNet, 1e-4 VGG)
    percent: UnitFloat  # own size: share of channels below the global threshold (ResNet: 0.4)
    normalize: Normalization  # none: |gamma| compared as is (one L1 pressure on all BNs)


@dataclass(frozen=True, config=STRICT)
class KddpConfig:
    """KDDP (seed 001): KD plus an L1 penalty on channel activations; inactive channels go."""

    l1: NonNegativeFloat  # weight of the summed mean |activation| per channel in the loss
    tau: UnitFloat  # own size: inactive = mean activation < tau x its group's mean
    dynamic: bool  # close inactive channels at every epoch end (they may reopen) during training
    score_images: PositiveInt  # training images of the final activation pass
    normalize: Normalization  # mean: activations of different depths made comparable


@dataclass(frozen=True, config=STRICT)
class PruneThenKdConfig:
    """Prune a trained dense student by filter L1 norm (Li et al. 2017), recover it by KD
    (seed 002)."""

    ratio: UnitFloat  # own size: share of each block-internal group's filters removed (Li)
    keep_streams: bool  # never prune the residual streams (Li et al. prune only block convs)
    normalize: Normalization  # mean: filter norms of different layers made comparable
    recovery_teacher: Literal["teacher", "unpruned"]  # whom the fine-tuning distils from


@dataclass(frozen=True, config=STRICT)
class SdapConfig:
    """SDAP (seed 003): a trainable scale per channel, one global rate, the unpruned network as
    its own teacher."""

    pretrain_epochs: PositiveInt  # dense KD epochs from the teacher before self-distillation
    l1: NonNegativeFloat  # weight of sum |scale| in the loss
    scale_lr: PositiveFloat  # SGD lr of the channel scales (no weight decay)
    rate: UnitFloat  # own size: share of the MACs removed when no common target is set
    normalize: Normalization  # none: every scale starts at 1 under the same L1 pressure


@dataclass(frozen=True, config=STRICT)
class WeightConfig:
    """Unstructured global magnitude pruning under KD (seed 004); shapes stay dense."""

    sparsity: UnitFloat  # share of all conv/linear weights set to zero, in [0, 1)


METHOD_SCHEMAS: dict[str, type] = {"pdd": PddConfig, "kddp": KddpConfig,
                                   "prune_then_kd": PruneThenKdConfig, "sdap": SdapConfig,
                                   "netslim": NetslimConfig, "weight": WeightConfig}


@dataclass(frozen=True, config=STRICT)
class MethodBudget:
    """What a method's prune stage needs besides its own section (resolved/methods/<m>.json)."""

    target_macs: Fraction | None  # prune.budget.macs
    round_to: PositiveInt  # student_slim.round_to: decisions are made at the shipped widths
    latency_ms: PositiveFloat | None = None  # prune.budget.latency_ms (the table: latency/)


@dataclass(frozen=True, config=STRICT)
class SlimConfig:
    round_to: PositiveInt  # keep every group's width a multiple of this (1 = exact gate widths)
    widths: Literal["round_to", "table"]  # table: per group the latency table's fastest width
    # at or above the kept channels (latency.target at latency.select_batch); round_to: rounding
    check_images: PositiveInt  # test images on which slimmed and gated logits are compared
    tolerance: PositiveFloat  # max allowed max|gated - slim| / max|gated| (exactness gate)


# -------------------------------------------------------------------------------------- export
@dataclass(frozen=True, config=STRICT)
class ParityTolerance:
    """How far a reduced-precision ONNX file may drift from the PyTorch model's logits."""

    max_rel_diff: PositiveFloat  # max|a - b| / max|a| over all compared logits
    min_top1_agreement: Annotated[float, Field(gt=0, le=1)]  # share of images with equal top-1


@dataclass(frozen=True, config=STRICT)
class QuantizeConfig:
    """Static INT8 (QDQ, per-channel weights) quantisation with ONNX Runtime."""

    calibration_images: Annotated[int, Field(ge=512)]  # training images used for calibration
    calibration_batch: PositiveInt  # images per calibration forward pass
    calibration_method: Literal["minmax", "entropy", "percentile"]  # activation range estimate
    activation_type: Literal["uint8", "int8"]  # uint8 = U8S8 (fully fused on ORT CPU, faster)
    reduce_range: bool  # 7-bit weights: avoids U8S8 overflow on x86 without VNNI; less precise
    max_top1_drop: NonNegativeFloat  # top-1 points (percent) INT8 may lose vs FP32, else error


@dataclass(frozen=True, config=STRICT)
class ExportConfig:
    """The export stage: ONNX export, simplification, FP16/INT8 variants and their parity gates.
    Parity runs in ONNX Runtime with the onnxruntime-cpu target's settings (runtimes)."""

    opset: Annotated[int, Field(ge=18)]  # ONNX opset; 17 fails for our ResNets (docs/export.md)
    simplifier: Literal["onnxsim", "onnxslim"]  # graph simplifier run after export
    parity_images: PositiveInt  # first N test images compared across representations
    parity_batch: Annotated[int, Field(ge=2)]  # the large parity batch (the small one is 1)
    eval_batch: PositiveInt  # batch size for accuracy runs over the whole test set
    fp16: ParityTolerance  # FP16 file vs PyTorch (FP32 files must match within 1e-4, 100% top-1)
    int8: ParityTolerance  # INT8 file vs PyTorch
    quantize: QuantizeConfig  # how the INT8 file is calibrated and how much it may lose

    @model_validator(mode="after")
    def _large_batch_fits_parity_images(self):
        if self.parity_images < self.parity_batch:
            raise ValueError(f"parity_images={self.parity_images} must be >= parity_batch="
                             f"{self.parity_batch}, or no batch of that size is ever compared")
        return self


# --------------------------------------------------------------------------- benchmark/report
@dataclass(frozen=True, config=STRICT)
class TimingPlan:
    """How each latency is measured (pipeline.timing): warm-up, then timed repeats."""

    warmup_iters: NonNegativeInt  # throw-away calls before timing, at least this many ...
    warmup_seconds: NonNegativeFloat  # ... and for at least this long (seconds)
    min_iters: PositiveInt  # timed calls: at least this many ...
    min_seconds: NonNegativeFloat  # ... and for at least this long in total (seconds)


@dataclass(frozen=True, config=STRICT)
class BenchmarkConfig:
    """The benchmark stage, run once per target (DVC foreach over `targets`); each target's
    runtime settings are its own section under `runtimes` (targets/)."""

    # target name -> precisions benchmarked there (checked against what the target supports)
    targets: dict[str, Annotated[tuple[Precision, ...], Field(min_length=1)]]
    # reference models measured beside every method's student_final_<method> (from prune)
    models: Annotated[tuple[str, ...], Field(min_length=1)]
    batch_sizes: Annotated[tuple[PositiveInt, ...], Field(min_length=1)]  # images per call
    eval_images: NonNegativeInt  # test images for top-1 through each runtime; 0 = all
    timing: TimingPlan


@dataclass(frozen=True, config=STRICT)
class EngineParityLimits:
    """How far a reduced-precision engine may drift from ONNX Runtime CPU running its ONNX file."""

    min_top1_agreement: Annotated[float, Field(gt=0, le=1)]  # share of images with equal top-1
    max_top1_drop: NonNegativeFloat  # top-1 points (percent) the engine may lose vs ONNX Runtime


@dataclass(frozen=True, config=STRICT)
class EngineConfig:
    """The engine stages (engine@<target>-<precision>): TensorRT engines of the exported ONNX
    files, built on the machine that runs them (build settings: runtimes.tensorrt). Engines
    built on this machine are checked against ONNX Runtime CPU on real test images."""

    models: tuple[str, ...]  # reference models; every method's student_final_<m> is added
    parity_images: PositiveInt  # first N test images run through engine and ONNX Runtime
    fp32_max_rel_diff: PositiveFloat  # fp32 engines: max|ort - engine| / max|ort| allowed
    fp16: EngineParityLimits  # fp16 engines (strongly typed from the fp16 ONNX file)
    int8: EngineParityLimits  # int8 engines (from the symmetric int8.trt ONNX file)


@dataclass(frozen=True, config=STRICT)
class LatencyConfig:
    """Per-layer latency tables on one target (stages latency_table, latency_plan,
    latency_model): what latency budgets and slimming's width choice are priced with."""

    target: str  # an ONNX target (benchmark.targets); its settings come from `runtimes`
    batch_sizes: Annotated[tuple[PositiveInt, ...], Field(min_length=1)]  # rows per batch size
    select_batch: PositiveInt  # the batch size student_slim's width choice optimises for
    width_step: PositiveInt  # grid of candidate widths: multiples of this (of 4 below it)
    sweep_widths: tuple[PositiveInt, ...]  # student base widths measured whole (calibration)
    holdout: NonNegativeInt  # off-grid rows measured to report the interpolation error
    timing: TimingPlan  # per probe and per whole network, in each session
    probe_sessions: PositiveInt  # each probe: the fastest of this many sessions' medians, one
    # session per pass over all probes
    network_sessions: PositiveInt  # each whole network: the same, over the networks


@dataclass(frozen=True, config=STRICT)
class LatencyNetworks:
    """What the latency_table stage builds its rows from (resolved/latency_networks.json,
    derived by validate_params): the two architectures, the input shape and the export settings
    that shape the measured graphs. A file of its own, so that a new learning rate, temperature,
    data subset or parity limit does not re-measure the table (minutes on a small CPU)."""

    teacher_arch: str  # teacher.arch: exact rows, and a calibration network
    student_arch: str  # distill.student_arch: the grid of widths, and the sweep
    input_shape: tuple[PositiveInt, PositiveInt, PositiveInt]  # (C, H, W) the data gives
    opset: PositiveInt  # export.opset: graphs exported as the export stage does
    simplifier: Literal["onnxsim", "onnxslim"]  # export.simplifier


@dataclass(frozen=True, config=STRICT)
class ProgramBatches:
    """The batch sizes a fixed-batch format is built at (resolved/program_batches.json, from
    benchmark.batch_sizes, sorted, each once): the ExecuTorch export reads only this of the
    benchmark's settings, so new timing or eval settings rebuild no program (minutes)."""

    batch_sizes: Annotated[tuple[PositiveInt, ...], Field(min_length=1)]


@dataclass(frozen=True, config=STRICT)
class ViewSchedule:
    """How one student stage draws its training views and runs its teacher on them."""

    stage: str  # student_dense | student_pruned | student_final
    epochs: PositiveInt
    batch_size: PositiveInt
    amp: Literal["off", "bf16", "fp16", "auto"]
    channels_last: bool


@dataclass(frozen=True, config=STRICT)
class TeacherViews:
    """What the teacher_logits stage reads (resolved/teacher_views.json, derived by
    validate_params): which views the student stages will show their teacher, and how they
    run it. A file of its own, so that a new learning rate or temperature recomputes no
    logits."""

    enabled: bool  # distill.teacher_cache
    teacher_runtime: Literal["auto", "torch", "onnxruntime"]  # distill.teacher_runtime
    schedules: tuple[ViewSchedule, ...]  # every student stage that distils from the teacher


def input_shape(data: DataConfig) -> tuple[int, int, int]:
    """(C, H, W) of the images `data` gives: CIFAR and synthetic are 32x32, an image folder
    is resized to data.image_size."""
    size = data.image_size if data.dataset == "imagefolder" else 32
    return (3, size, size)


@dataclass(frozen=True, config=STRICT)
class ReportConfig:
    """The comparison report (pipeline/report.py)."""

    baseline_model: str  # speedups are measured against this model (the teacher)
    dense_model: str  # the unpruned student every method is compared with
    paid_off_speedup: Annotated[float, Field(gt=1)]  # measured speedup that counts as paying off
    chart_target: str  # the target whose latency the method chart plots (a benchmark target)
    chart_precision: Precision  # ... at this precision


# ---------------------------------------------------------------------------------- reading
def read_params_file(path: str | os.PathLike) -> dict[str, Any]:
    """params.yaml as DVC reads it (ruamel.yaml safe loader, YAML 1.2)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read params file ({err})") from err
    try:
        raw = YAML(typ="safe").load(text)
    except YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    _check_keys(raw, path, ())
    return raw


KEY_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _check_keys(node: Any, path: Path, where: tuple[str, ...]) -> None:
    """Every mapping key is a plain name, so every error can name it; YAML also allows
    numbers, lists (`? [a, b]`), empty or blank strings and control characters. Text that is
    not valid Unicode (a lone surrogate, written as an escape) is refused too."""
    children = node.items() if isinstance(node, dict) else \
        enumerate(node) if isinstance(node, list) else ()
    at = ".".join(where) or "the top level"
    for key, value in children:
        if isinstance(node, dict) and not (isinstance(key, str) and KEY_NAME.fullmatch(key)):
            raise ConfigError(f"{path}: {at}: key {key!r} is not a name; keys are made of "
                              "letters, digits, '_' and '-'")
        if isinstance(value, str) and not _valid_text(value):
            raise ConfigError(f"{path}: {'.'.join((*where, str(key)))}: {value!r} is not valid "
                              "text (a lone surrogate)")
        _check_keys(value, path, (*where, str(key)))


def _valid_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def apply_profile(raw: dict[str, Any], path: str | os.PathLike,
                  profile: str | None = None) -> tuple[dict[str, Any], set[str]]:
    """Merge profiles[profile] (default: the file's `profile`) into the sections.

    Returns the merged sections (without `profiles`) and the dotted keys the profile set.
    Override values replace whole keys; a nested mapping (e.g. export.int8) is replaced as a
    whole, so a profile states every key of what it overrides.
    """
    profile = raw.get("profile") if profile is None else profile
    if profile not in PROFILES:
        raise ConfigError(f"{path}: profile: expected one of {', '.join(PROFILES)}, "
                          f"got {profile!r}")
    overrides = _profile_overrides(raw.get("profiles", {}), profile, path)
    merged = json.loads(json.dumps({k: v for k, v in raw.items() if k != "profiles"},
                                   default=str))  # a deep copy in plain JSON types
    merged["profile"] = profile
    overridden: set[str] = set()
    for section, values in overrides.items():
        where = f"profiles.{profile}.{section}"
        if not isinstance(merged.get(section), dict):
            raise ConfigError(f"{path}: {where}: no such section to override")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: {where}: expected a mapping of the keys to override "
                              f"(got {type(values).__name__})")
        for key, value in values.items():
            if key not in merged[section]:
                raise ConfigError(f"{path}: {where}.{key}: unknown key (not in section {section})")
            merged[section][key] = json.loads(json.dumps(value, default=str))
            overridden.add(f"{section}.{key}")
    return merged, overridden


def _profile_overrides(profiles: Any, profile: str, path: str | os.PathLike) -> dict[str, Any]:
    """profiles[profile]: section -> the keys it overrides ({} when the profile sets none)."""
    if not isinstance(profiles, dict):
        raise ConfigError(f"{path}: profiles: expected a mapping of profile names to their "
                          f"overrides (got {type(profiles).__name__})")
    unknown = sorted(set(profiles) - set(PROFILES))
    if unknown:
        raise ConfigError(f"{path}: profiles: unknown profile(s) {unknown}; known: {PROFILES}")
    overrides = profiles.get(profile) or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{path}: profiles.{profile}: expected a mapping of sections to "
                          f"override (got {type(overrides).__name__})")
    return overrides


@cache
def _adapter(schema: type) -> TypeAdapter:
    return TypeAdapter(schema)


class SectionError(ValueError):
    """Validation problems of one section, each a line naming its dotted key."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"{key}: {message}" for key, message in problems))
        self.problems = problems  # (dotted key, what is wrong)


_MESSAGES = {"missing": "missing key", "unexpected_keyword_argument": "unknown key",
             "dataclass_type": "expected a mapping of keys", "dict_type": "expected a mapping",
             "dataclass_exact_type": "expected a mapping of keys"}


# Keys an older params.yaml may still hold, and what replaced them.
RENAMED = {"prune.target_macs": "replaced by prune.budget: {macs: <the same value>}"}


def _problem(error: dict[str, Any], section: str) -> tuple[str, str]:
    key = ".".join([section, *(str(part) for part in error["loc"])])
    kind = error["type"]
    message = _MESSAGES.get(kind) or error["msg"].removeprefix("Value error, ")
    if kind == "unexpected_keyword_argument" and key in RENAMED:
        message += f" ({RENAMED[key]})"
    if kind not in ("missing", "unexpected_keyword_argument", "value_error") and "input" in error:
        shown = error["input"]
        message += f" (got {type(shown).__name__})" if isinstance(shown, dict | list) else \
            f" (got {shown!r})"
    return key, message


def validate(schema: type[Schema], data: Any, section: str) -> Schema:
    """Strict validation of plain data (JSON types: lists for tuples, mappings for sections);
    raises SectionError with one (key, message) per problem."""
    try:
        text = json.dumps(data, default=str)
        return _adapter(schema).validate_json(text, strict=True)
    except ValidationError as err:
        problems = [_problem(e, section) for e in err.errors()]
        raise SectionError(_without_echoes(problems)) from None


def _without_echoes(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop a container's "too short" complaint when one of its items was the real problem."""
    keys = [key for key, _ in problems]
    return [(key, message) for key, message in problems
            if not (message.startswith(("List should have", "Tuple should have"))
                    and any(other.startswith(key + ".") for other in keys))]


def as_dict(config: Any) -> Any:
    """A config object as plain JSON-able data (tuples become lists)."""
    return _adapter(type(config)).dump_python(config, mode="json")


def load_section(schema: type[Schema], path: str | os.PathLike) -> Schema:
    """One resolved section (resolved/<section>.json, written by validate_params)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: resolved settings not found; run the validate_params stage "
                          "(`dvc repro validate_params`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: unreadable resolved settings ({err})") from err
    try:
        return validate(schema, data, path.stem)
    except SectionError as err:
        raise ConfigError(f"{path}: {err}; run the validate_params stage again") from None


def data_root(cfg: DataConfig) -> Path:
    """The dataset folder: $PIPELINE_DATA_ROOT if set, else data.root from params.

    A relative path is relative to the repository, which DVC names in $DVC_ROOT: a queued
    experiment (`dvc exp run --queue`) runs in a copy under .dvc/tmp/exps/, where the working
    directory is not the repository root. Without DVC (a stage run by hand) it is relative to
    the working directory.
    """
    root = Path(os.environ.get(DATA_ROOT_ENV) or cfg.root)
    return root if root.is_absolute() else Path(os.environ.get("DVC_ROOT") or ".") / root


def method_document(budget: MethodBudget, settings: Any) -> dict[str, Any]:
    """resolved/methods/<m>.json: the budget every method shares and the method's own section."""
    return {"budget": as_dict(budget), "settings": as_dict(settings)}


def load_method_settings(method: str, path: str | os.PathLike) -> tuple[MethodBudget, Any]:
    """One method's resolved settings (written by validate_params): (budget, its section)."""
    if method not in METHOD_SCHEMAS:
        raise ConfigError(f"unknown pruning method {method!r}; known: {', '.join(METHOD_NAMES)}")
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: resolved settings not found; run the validate_params stage "
                          "(`dvc repro validate_params`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: unreadable resolved settings ({err})") from err
    if not isinstance(data, dict) or set(data) != {"budget", "settings"}:
        raise ConfigError(f"{path}: expected keys budget and settings; run the validate_params "
                          "stage again")
    try:
        return (validate(MethodBudget, data["budget"], "budget"),
                validate(METHOD_SCHEMAS[method], data["settings"], method))
    except SectionError as err:
        raise ConfigError(f"{path}: {err}; run the validate_params stage again") from None
