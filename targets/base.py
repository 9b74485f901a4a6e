"""The one protocol every runtime target implements (after Polygraphy: build apart from run).

    target = targets.registry.make_target(name, settings)   # settings: target.Settings
    ok, reason = target.available()              # never raises; reason says what is missing
    ok, reason = target.precision_available(p)   # e.g. bf16 needs a CPU that has it
    artifact = target.build(source, out_dir)     # offline: its source file -> runtime artifact
    with target.load(artifact, p) as runner:     # runner owns runtime/device resources
        outputs = runner.infer({"input": batch}) # checks names, dtypes and shapes first
        stats = runner.benchmark(feeds, plan)    # LatencyStats

`Target.source` says which shipped file a target starts from: an ONNX file, a PyTorch model
file, or a file another stage converted for that runtime (OpenVINO IR, ExecuTorch program;
names in pipeline.artifacts.FORMATS). Heavy runtimes are imported inside methods, so
`import targets` works on any machine.
"""

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from pipeline.artifacts import artifact_path
from pipeline.errors import FeedError, PipelineError, TargetUnavailable
from pipeline.provenance import package_versions
from pipeline.timing import LatencyStats, TimingPlan, measure_latency

# What `Target.build` starts from: "onnx" (artifacts/<m>.<p>.onnx), "checkpoint"
# (models/<m>.pt), or a format converted for one runtime (pipeline.artifacts.FORMATS).
SourceKind = Literal["onnx", "checkpoint", "openvino", "executorch"]


class UnsupportedOperation(PipelineError):
    """The runner cannot do this (e.g. return outputs from trtexec, which only times)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]  # str/None: a dynamic axis


def fixed_batch(spec: TensorSpec) -> int | None:
    """The batch size an input is fixed at, or None when the batch axis is dynamic."""
    return spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) else None


def check_feeds(specs: tuple[TensorSpec, ...], feeds: dict[str, np.ndarray]) -> None:
    """Raise FeedError unless `feeds` has exactly the spec's names, dtypes and fixed dims."""
    not_arrays = [name for name, value in feeds.items() if not isinstance(value, np.ndarray)]
    if not_arrays:
        raise FeedError(f"inputs {not_arrays} are not numpy arrays; expected np.ndarray")
    expected = {spec.name: spec for spec in specs}
    if set(feeds) != set(expected):
        raise FeedError(f"inputs {sorted(feeds)} given, expected {sorted(expected)}")
    for name, array in feeds.items():
        spec = expected[name]
        if array.dtype != spec.dtype:
            raise FeedError(f"input {name!r} has dtype {array.dtype}, expected {spec.dtype}")
        fixed = [(got, want) for got, want in zip(array.shape, spec.shape, strict=False)
                 if isinstance(want, int)]
        if array.ndim != len(spec.shape) or any(got != want for got, want in fixed):
            raise FeedError(f"input {name!r} has shape {array.shape}, expected {spec.shape} "
                            "(str/None = any size)")


def onnx_inputs(path: str | os.PathLike) -> tuple[TensorSpec, ...]:
    """The graph inputs of an ONNX file (initializers excluded), read without its weights."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    return tuple(
        TensorSpec(i.name, np.dtype(tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)),
                   tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                         for d in i.type.tensor_type.shape.dim))
        for i in graph.input if i.name not in weights)


class Runner(ABC):
    """Runs one built artifact. Use as a context manager: resources are freed on exit."""

    # What a runner learned about the device it runs on, for the results' provenance; local
    # runners leave it None (provenance.collect describes this machine), remote ones fill it.
    device_info: dict[str, Any] | None = None
    # What the runtime reports it runs with (e.g. inference precision, threads, streams), for
    # the results' provenance; None when it reports nothing beyond the target's settings.
    runtime_info: dict[str, Any] | None = None

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:  # noqa: B027 - optional hook; most runners own nothing to free
        """Free runtime resources (sessions, device buffers)."""

    @property
    @abstractmethod
    def inputs(self) -> tuple[TensorSpec, ...]:
        """What `infer` accepts."""

    @abstractmethod
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; block until the outputs are on the host."""

    def benchmark(self, feeds: dict[str, np.ndarray], plan: TimingPlan) -> LatencyStats:
        """Host wall-clock latency of `infer`; GPU targets override this with device timing."""
        batch = next(iter(feeds.values())).shape[0]
        return measure_latency(lambda: self.infer(feeds), plan, batch)

    def predict_classes(self, inputs: np.ndarray, batch: int) -> np.ndarray:
        """Top-1 class of every input, `batch` at a time (the tail padded when the artifact's
        batch is fixed). Remote runners override this to classify on the device at once."""
        spec = self.inputs[0]
        fixed = fixed_batch(spec)
        batch = fixed or batch
        labels = []
        for start in range(0, len(inputs), batch):
            chunk = inputs[start:start + batch]
            if fixed and len(chunk) < fixed:
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], fixed - len(chunk), 0)])
            logits = next(iter(self.infer({spec.name: chunk}).values()))
            labels.append(np.asarray(logits)[:min(batch, len(inputs) - start)].argmax(1))
        return np.concatenate(labels)


class Target(ABC):
    """A runtime on some device. Subclasses declare what they support, checked at config load,
    and the schema of their settings (their section `runtimes.<settings_key>` in params.yaml)."""

    name: ClassVar[str]  # as written in params.yaml
    precisions: ClassVar[tuple[str, ...]]  # e.g. ("fp32", "int8")
    dynamic_batch: ClassVar[bool]  # one artifact serves every batch size
    source: ClassVar[SourceKind] = "onnx"  # what `build` takes (see SourceKind)
    settings_key: ClassVar[str]  # its section under `runtimes` (targets may share one)
    Settings: ClassVar[type]  # pydantic dataclass of that section
    # precision -> flavor of the ONNX file it reads (pipeline.artifacts), where not the default
    onnx_flavors: ClassVar[dict[str, str]] = {}
    # The package whose version identifies the runtime in the results' provenance; None when
    # the runtime is not on this machine (a remote device reports its own versions).
    runtime_package: ClassVar[str | None] = None

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    @property
    def threads(self) -> int:
        """Intra-op threads the runtime is given (0 = its own default), for provenance."""
        return int(self.settings.threads)

    def runtime(self) -> str:
        """'<package> <version>' of the runtime, for the results' provenance."""
        if self.runtime_package is None:
            return self.name
        version = package_versions((self.runtime_package,))[self.runtime_package]
        return f"{self.runtime_package} {version or '(not installed)'}"

    @abstractmethod
    def available(self) -> tuple[bool, str]:
        """(True, "") or (False, why): a missing package, device, or host."""

    def precision_available(self, precision: str) -> tuple[bool, str]:
        """(True, "") or (False, why) for one precision on this machine; call it once the
        target is available. Targets whose precisions depend on the hardware override it."""
        if precision not in self.precisions:
            return False, (f"target {self.name!r} does not run {precision}; it runs "
                           f"{list(self.precisions)}")
        return True, ""

    def source_precision(self, precision: str) -> str:
        """The precision of the shipped file a `precision` row runs: the file's own precision,
        unless the runtime lowers it while compiling (OpenVINO's bf16 runs the fp32 IR)."""
        return precision

    @abstractmethod
    def build(self, source: Path, out_dir: Path) -> Path:
        """Turn a source file (kind `source`) into this target's artifact (may be the file
        itself)."""

    @abstractmethod
    def load(self, artifact: Path, precision: str | None = None) -> Runner:
        """A runner for a built artifact; `precision` is the row's precision, for runtimes that
        choose it when compiling (None: the precision the file was made in)."""

    def require_available(self) -> None:
        ok, reason = self.available()
        if not ok:
            raise TargetUnavailable(f"target {self.name!r} is not available: {reason}")

    @classmethod
    def onnx_source(cls, folder: Path, model: str, precision: str) -> Path:
        """The exported ONNX file this target builds `model` at `precision` from."""
        return artifact_path(folder, model, precision, flavor=cls.onnx_flavors.get(precision))


class EngineBuilder(ABC):
    """Mixin of targets whose artifact is a serialized engine, bound to the TensorRT version and
    GPU that built it (targets/engines.py): built where it runs, with an engine card beside it
    (pipeline.export.cards). The engine stage builds through `build_engine`."""

    # True: `load` runs the engine on this machine, so the engine stage checks its parity here.
    engines_run_here: ClassVar[bool]

    @abstractmethod
    def build_engine(self, onnx_path: Path, out_dir: Path, build: Any) -> Path:
        """Build `onnx_path` into out_dir/<model>.<precision>.<target>.engine (build: the
        targets.engines.TensorRtSettings), reusing and updating the timing cache in out_dir,
        and write the engine card; returns the engine's path."""
