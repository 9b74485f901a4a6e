"""ONNX Runtime with its CPU execution provider: runs every ONNX precision we ship.

`build` loads the ONNX file with the configured session options and saves the graph ONNX Runtime
will actually run (SessionOptions.optimized_model_filepath) as the artifact. At optimisation
level "all" that graph holds NCHWc layout ops for this CPU's vector width, so an artifact belongs
to the machine that built it (ONNX Runtime warns about this when it saves one); ship the .onnx.
Requested execution providers are checked twice - before the session (installed?) and after it
(kept?) - because ONNX Runtime drops a provider that fails to start with only a log warning.
"""

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field
from pydantic.dataclasses import dataclass

from pipeline.config import STRICT, NonNegativeInt
from pipeline.errors import BuildError, TargetUnavailable
from pipeline.io import atomic_output
from targets.base import Runner, Target, TensorSpec, check_feeds

GRAPH_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(double)": np.float64, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
              "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


@dataclass(frozen=True, config=STRICT)
class OnnxRuntimeCpuSettings:
    """Session settings of the ONNX Runtime targets (`runtimes.onnxruntime`); the export stage's
    parity checks run with the same settings (the TensorRT INT8 file: see qdq_reference)."""

    graph_optimization: Literal["disable", "basic", "extended", "all"]  # ORT graph optimisation
    intra_op_threads: NonNegativeInt  # threads inside one operator; 0 = ORT's default (all cores)
    inter_op_threads: NonNegativeInt  # threads across operators; 0 = ORT's default
    # Execution providers, most preferred first; every one must be present (never dropped).
    providers: Annotated[tuple[str, ...], Field(min_length=1)]


def qdq_reference(settings: OnnxRuntimeCpuSettings) -> OnnxRuntimeCpuSettings:
    """`settings` with graph optimisation off: a QDQ file then runs as written (Dequantize,
    float operator, Quantize), the arithmetic TensorRT implements with int32 accumulation.

    The reference for the symmetric TensorRT INT8 file. With optimisation on, ONNX Runtime fuses
    its QDQ pairs into int8 kernels, and on a CPU without VNNI those sum pairs of 8-bit products
    in 16 bits, which saturates with full-range int8 weights: measured on a 2-core AVX2 AMD
    EPYC (no VNNI), a ResNet20's .int8.trt.onnx agreed with PyTorch on 84.0 % of top-1 fused
    and 95.3 % as written (the CPU .int8.onnx, 7-bit weights: 95.7 %)."""
    return replace(settings, graph_optimization="disable")


def tensor_specs(args: list[Any]) -> tuple[TensorSpec, ...]:
    """ONNX Runtime NodeArgs as TensorSpecs (symbolic or unknown axes stay str/None)."""
    specs = []
    for arg in args:
        if arg.type not in ORT_DTYPES:
            raise BuildError(f"tensor {arg.name!r} has type {arg.type}; this runner feeds only "
                             f"{sorted(ORT_DTYPES)}")
        specs.append(TensorSpec(arg.name, np.dtype(ORT_DTYPES[arg.type]), tuple(arg.shape)))
    return tuple(specs)


class OnnxRuntimeRunner(Runner):
    """One InferenceSession; `infer` checks names, dtypes and fixed dims before it runs."""

    def __init__(self, session: Any, source: Path) -> None:
        self._session = session
        self.source = source
        self._inputs = tensor_specs(session.get_inputs())
        self._output_names = [arg.name for arg in session.get_outputs()]

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise BuildError(f"runner for {self.source} is closed")
        check_feeds(self._inputs, feeds)
        outputs = self._session.run(self._output_names, feeds)
        return dict(zip(self._output_names, outputs, strict=True))

    def close(self) -> None:
        self._session = None


class OnnxRuntimeCpuTarget(Target):
    """ONNX Runtime, CPU provider; session settings from params (`runtimes.onnxruntime`)."""

    name: ClassVar[str] = "onnxruntime-cpu"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8")
    dynamic_batch: ClassVar[bool] = True
    settings_key: ClassVar[str] = "onnxruntime"
    Settings: ClassVar[type] = OnnxRuntimeCpuSettings
    runtime_package: ClassVar[str] = "onnxruntime"

    @property
    def threads(self) -> int:
        return self.settings.intra_op_threads

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime
        except ImportError as err:
            return False, f"onnxruntime is not importable ({err})"
        present = onnxruntime.get_available_providers()
        missing = [p for p in self.settings.providers if p not in present]
        if missing:
            return False, (f"execution provider(s) {missing} requested but not in this "
                           f"onnxruntime {onnxruntime.__version__} build (has {present})")
        return True, ""

    def _session_options(self, optimized_path: Path | None) -> Any:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        level = GRAPH_LEVELS[self.settings.graph_optimization]
        options.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel, level)
        options.intra_op_num_threads = self.settings.intra_op_threads
        options.inter_op_num_threads = self.settings.inter_op_threads
        if optimized_path is not None:
            options.optimized_model_filepath = str(optimized_path)
        return options

    def _session(self, model_path: Path, optimized_path: Path | None = None) -> Any:
        import onnxruntime

        from pipeline.export.onnx_export import external_data_files

        self.require_available()
        if not model_path.is_file():
            raise BuildError(f"{model_path}: ONNX file not found")
        external_data_files(model_path)  # ONNX Runtime would read any file the model names
        requested = list(self.settings.providers)
        try:
            session = onnxruntime.InferenceSession(
                str(model_path), self._session_options(optimized_path), providers=requested)
        except Exception as err:  # noqa: BLE001 - pybind raises Fail/InvalidGraph/... types
            raise BuildError(f"{model_path}: ONNX Runtime cannot load it: "
                             f"{type(err).__name__}: {err}") from err
        dropped = [p for p in requested if p not in session.get_providers()]
        if dropped:
            raise TargetUnavailable(f"ONNX Runtime dropped execution provider(s) {dropped} for "
                                    f"{model_path} (kept {session.get_providers()}); expected "
                                    f"all of {requested}")
        return session

    def build(self, onnx_path: Path, out_dir: Path) -> Path:
        """Save ONNX Runtime's optimised graph as `<out_dir>/<stem>.onnxruntime-cpu.onnx`."""
        onnx_path, out_dir = Path(onnx_path), Path(out_dir)
        artifact = out_dir / f"{onnx_path.stem}.{self.name}.onnx"
        with atomic_output(artifact) as tmp:
            self._session(onnx_path, optimized_path=tmp)
            if not tmp.is_file() or tmp.stat().st_size == 0:
                raise BuildError(f"ONNX Runtime wrote no optimised model for {onnx_path} "
                                 f"(expected {tmp})")
        return artifact

    def load(self, artifact: Path, precision: str | None = None) -> OnnxRuntimeRunner:
        """A runner for a built artifact or directly for any .onnx file (its precision is the
        file's)."""
        artifact = Path(artifact)
        return OnnxRuntimeRunner(self._session(artifact), artifact)
