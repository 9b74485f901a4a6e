"""TensorRT engines, whichever machine builds them: the build settings (params
`runtimes.tensorrt`), the optimisation profile they give, the engine card, and the rules for
whether an engine may load on a runtime. Pure Python: nothing here imports TensorRT.

Engines are not portable. "By default, TensorRT engines are compatible only with the version of
TensorRT used to build them", and "without [hardware compatibility] mode, engines are not
portable across different GPU architectures"; platforms never mix (TensorRT 11.1.0 docs, Engine
Compatibility; 10.16.1 docs, Version Compatibility; 11.4.1 support matrix, Engine Portability).
TensorRT itself only logs an error and returns None from deserialize_cuda_engine, so the card is
checked first and the refusal says what differs and how to rebuild.
"""

import os
import platform
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import model_validator
from pydantic.dataclasses import dataclass as settings_dataclass

from pipeline.artifacts import TENSORRT_FLAVOR, artifact_path, card_path, model_of, precision_of
from pipeline.config import STRICT, NonNegativeInt, PositiveInt
from pipeline.errors import BuildError, EngineMismatchError
from pipeline.export.cards import load_verified_onnx, make_engine_card
from pipeline.export.qdq import audit, precision_problems
from pipeline.io import file_sha256
from targets.base import TensorSpec, onnx_inputs

MIB = 1 << 20
PLAN_MAGIC = b"ftrt"  # a serialized engine's first bytes (trtexec sampleEngines.cpp, 10.3/11.1)


@settings_dataclass(frozen=True, config=STRICT)
class TensorRtSettings:
    """How TensorRT engines are built (`runtimes.tensorrt`): by the tensorrt target, and by
    ssh-tensorrt in build mode on the device."""

    device: NonNegativeInt  # CUDA device index the tensorrt target builds and runs on
    min_batch: PositiveInt  # optimisation profile: smallest batch an engine accepts
    opt_batch: PositiveInt  # batch size TensorRT tunes its kernels for
    max_batch: PositiveInt  # largest batch an engine accepts (device buffers are sized for it)
    workspace_mib: PositiveInt  # builder workspace limit (MiB)
    tf32: bool  # allow TF32 math in FP32 layers (TensorRT's default; off keeps fp32 exact)

    @model_validator(mode="after")
    def _profile_in_order(self):
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need min_batch <= opt_batch <= max_batch, got {self.min_batch}, "
                             f"{self.opt_batch}, {self.max_batch}")
        return self


@dataclass(frozen=True)
class ShapeProfile:
    """One optimisation profile: the shapes one input may take (min <= opt <= max)."""

    input: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]
    dynamic: bool = True  # False: the ONNX input is static, and TensorRT takes no profile for it

    def as_dict(self) -> dict[str, Any]:
        return {"input": self.input, "min": list(self.min), "opt": list(self.opt),
                "max": list(self.max), "dynamic": self.dynamic}

    def allows(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.min) and all(
            low <= size <= high for size, low, high in zip(shape, self.min, self.max, strict=True))


def image_input(specs: tuple[TensorSpec, ...], source: Path) -> TensorSpec:
    """The one input of an image classifier; BuildError for anything else."""
    if len(specs) != 1:
        raise BuildError(f"{source}: expected one image input, found "
                         f"{[spec.name for spec in specs]}")
    return specs[0]


def batch_profile(spec: TensorSpec, settings: TensorRtSettings) -> ShapeProfile:
    """The profile of an image input: its batch axis from the settings, the others as fixed in
    the ONNX file. BuildError when another axis is dynamic or a fixed batch is out of range."""
    batch, *rest = spec.shape
    if any(not isinstance(size, int) for size in rest):
        raise BuildError(f"input {spec.name!r} has dynamic axes besides the batch {spec.shape}; "
                         "export it with a fixed image size")
    if isinstance(batch, int):  # a static input: the profile is its one shape
        return ShapeProfile(spec.name, *([(batch, *rest)] * 3), dynamic=False)
    sizes = (settings.min_batch, settings.opt_batch, settings.max_batch)
    return ShapeProfile(spec.name, *((size, *rest) for size in sizes))


# ------------------------------------------------------------------------- building from ONNX
@dataclass(frozen=True)
class EngineSource:
    """The ONNX file an engine is built from, checked: its card (when it has one), its hash."""

    path: Path
    model: str
    precision: str
    sha256: str
    card: dict[str, Any] | None  # the ONNX card; None for a file without one (a CLI build)
    input: TensorSpec  # its one image input

    def engine_path(self, out_dir: Path, target: str) -> Path:
        return artifact_path(out_dir, self.model, self.precision, target=target)


def engine_source(onnx_path: str | os.PathLike) -> EngineSource:
    """Check an ONNX file before spending a build on it: its card and hash (when it has a card)
    and that its content is the precision its name says, in a form TensorRT parses."""
    path = Path(onnx_path)
    if path.suffix != ".onnx" or not path.is_file():
        raise BuildError(f"{path}: expected an existing .onnx file")
    card = load_verified_onnx(path).card if card_path(path).is_file() else None
    model = card["model"] if card else model_of(path)
    precision = card["precision"] if card else precision_of(path)
    problems = precision_problems(audit(path), precision)
    if problems:
        hint = (f"; build INT8 engines from the {TENSORRT_FLAVOR} file "
                f"({artifact_path(path.parent, model, 'int8', flavor=TENSORRT_FLAVOR).name})"
                if precision == "int8" else "")
        raise BuildError(f"{path}: not a {precision} graph TensorRT can build: "
                         + "; ".join(problems) + hint)
    spec = image_input(onnx_inputs(path), path)
    return EngineSource(path, model, precision, file_sha256(path), card, spec)


def engine_card(source: EngineSource, target: str, facts: dict[str, Any]) -> dict[str, Any]:
    """The card of an engine built from `source` (facts: what the build learnt)."""
    return make_engine_card(source.card, {
        "target": target, "precision": source.precision, "source_onnx": source.path.name,
        "source_onnx_sha256": source.sha256, **facts})


# ------------------------------------------------------------------------------ loading checks
@dataclass(frozen=True)
class RuntimeFacts:
    """The TensorRT and GPU an engine is about to be loaded by."""

    tensorrt: str  # e.g. tensorrt.__version__ "10.3.0.30"
    compute_capability: str  # e.g. "8.7"
    gpu: str
    platform: str  # host_platform()


def host_platform() -> str:
    return f"{platform.system()}-{platform.machine()}"


def version_tuple(text: str) -> tuple[int, ...]:
    """'10.3.0.30' -> (10, 3, 0, 30); '10.3.0' -> (10, 3, 0)."""
    return tuple(int(part) for part in re.findall(r"\d+", str(text))[:4])


def _same_version(built: str, running: str) -> bool:
    """Equal on every part both name: trtexec prints 10.3.0, the Python module 10.3.0.30."""
    a, b = version_tuple(built), version_tuple(running)
    count = min(len(a), len(b))
    return count >= 3 and a[:count] == b[:count]


def engine_refusals(card: dict[str, Any], here: RuntimeFacts) -> list[str]:
    """Why the engine of `card` cannot load on `here`; [] when it can. Engines are built without
    TensorRT's version- and hardware-compatibility modes, so each must match exactly."""
    problems = []
    for key in ("tensorrt", "plan_version"):
        built = card.get(key)
        if built and not _same_version(built, here.tensorrt):
            problems.append(f"it was built with TensorRT {built}, this runtime is TensorRT "
                            f"{here.tensorrt}")
            break
    if card["compute_capability"] != here.compute_capability:
        problems.append(f"it was built for compute capability {card['compute_capability']} "
                        f"({card['gpu']}), this GPU ({here.gpu}) has {here.compute_capability}")
    if card["platform"] != here.platform:
        problems.append(f"it was built on {card['platform']}, this machine is {here.platform}")
    return problems


def check_engine_card(card: dict[str, Any], here: RuntimeFacts, engine: Path) -> None:
    """EngineMismatchError naming every difference and how to rebuild, or nothing."""
    problems = engine_refusals(card, here)
    if problems:
        raise EngineMismatchError(
            f"{engine} cannot run here: " + "; ".join(problems) + ". TensorRT engines run only "
            "where they were built: rebuild it on this machine (`prune-deploy build "
            f"{card.get('source_onnx', '<model>.onnx')} --target tensorrt`, or `dvc repro "
            f"engine@tensorrt-{card['precision']}`)")


def plan_header_version(blob: bytes) -> str | None:
    """The TensorRT version in a serialized engine's header, or None when unknown. Read as
    `trtexec --getPlanVersionOnly` does (samples/common/sampleEngines.cpp at v10.3.0 and v11.1:
    tag 'ftrt' at bytes 0-3, serialization version 0 at 4-7, version bytes 24-27); NVIDIA warns
    the offset "may depend on the serialization version", so None means unknown, never
    incompatible."""
    if len(blob) < 28 or blob[:4] != PLAN_MAGIC or struct.unpack_from("<I", blob, 4)[0] != 0:
        return None
    return ".".join(str(part) for part in blob[24:28])
