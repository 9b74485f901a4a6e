"""OpenVINO on the CPU: the project's ONNX files (FP32, and ONNX Runtime's QDQ INT8) as
OpenVINO IR, compiled with every precision-relevant property set explicitly.

`build` converts an ONNX file to IR (`<stem>.xml` + `<stem>.bin`); an .xml is used as it is. The
IR keeps FP32 weights: `ov.save_model` compresses them to FP16 by default, which gave 3e-4 to
2e-3 relative error against the FP32 ONNX, beyond the FP32 parity gate (1e-4).

`load` compiles for the CPU with
- INFERENCE_PRECISION_HINT always set: f32 for the fp32 and int8 rows (on a CPU with bf16
  instructions the plugin's default is bf16, measured at 6.7e-3 relative error: no FP32 parity),
  bf16 for the bf16 row, which runs the FP32 IR and is offered only where the CPU reports BF16
  among OpenVINO's OPTIMIZATION_CAPABILITIES. The applied hint is read back and checked.
- PERFORMANCE_HINT LATENCY and INFERENCE_NUM_THREADS from params (`runtimes.openvino`): one
  stream running each call on that many threads, which is what ONNX Runtime's intra-op threads
  with sequential calls compare with (THROUGHPUT splits the cores into streams that one
  synchronous call cannot use).
The batch axis stays dynamic: one compiled model serves every batch size.

Telemetry: `import openvino` starts Intel's usage telemetry (package openvino_telemetry, a Google
Analytics backend): it writes a client id under ~/intel and sends an "import" event unless
consent was declined or it runs in CI. `import_openvino` imports it with consent declined, through
the telemetry's own CI switch (the CI variable, set only while the import runs). Nothing here
calls `ov.convert_model`, which sends more events; `read_model` and `save_model` send none.
"""

import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
from pydantic.dataclasses import dataclass

from pipeline.artifacts import precision_of
from pipeline.config import STRICT, NonNegativeInt
from pipeline.errors import BuildError, TargetUnavailable
from pipeline.io import atomic_output
from targets.base import Runner, SourceKind, Target, TensorSpec, check_feeds

DEVICE = "CPU"
# row precision -> the INFERENCE_PRECISION_HINT it compiles with (element type names)
INFERENCE_PRECISION = {"fp32": "f32", "int8": "f32", "bf16": "bf16"}


@dataclass(frozen=True, config=STRICT)
class OpenVinoSettings:
    """Settings of the openvino-cpu target (`runtimes.openvino`)."""

    threads: NonNegativeInt  # INFERENCE_NUM_THREADS: threads for one call; 0 = OpenVINO's default


def import_openvino() -> ModuleType:
    """The openvino module, imported with its usage telemetry declined (see the docstring)."""
    if sys.modules.get("openvino") is not None:  # already imported: telemetry was set up then
        return sys.modules["openvino"]
    before = os.environ.get("CI")
    os.environ["CI"] = "true"  # openvino_telemetry declines consent when CI is "true"
    try:
        import openvino
    finally:
        if before is None:
            del os.environ["CI"]
        else:
            os.environ["CI"] = before
    return openvino


def save_ir(model: Any, xml_path: Path) -> Path:
    """Write an ov.Model as IR at `xml_path` (+ .bin), FP32 weights kept, each file atomically."""
    ov = import_openvino()
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=xml_path.parent, suffix=".tmp") as staging:
        staged = Path(staging) / xml_path.name
        ov.save_model(model, str(staged), compress_to_fp16=False)  # its default: FP16 weights
        for suffix in (".bin", ".xml"):  # weights first: no new .xml points at old weights
            with atomic_output(xml_path.with_suffix(suffix)) as out:
                os.replace(staged.with_suffix(suffix), out)
    return xml_path


def tensor_specs(ports: list[Any]) -> tuple[TensorSpec, ...]:
    """Compiled-model ports as TensorSpecs (dynamic dimensions as None)."""
    return tuple(
        TensorSpec(port.get_any_name(), np.dtype(port.get_element_type().to_dtype()),
                   tuple(dim.get_length() if dim.is_static else None
                         for dim in port.get_partial_shape()))
        for port in ports)


class OpenVinoRunner(Runner):
    """One compiled model and one infer request; `infer` checks the feeds first."""

    def __init__(self, compiled: Any, source: Path) -> None:
        self.source = source
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._inputs = tensor_specs(compiled.inputs)
        self._output_names = [port.get_any_name() for port in compiled.outputs]
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        self.runtime_info = {
            "inference_precision": hint.get_type_name(),
            "performance_hint": str(compiled.get_property("PERFORMANCE_HINT")),
            "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
            "streams": int(compiled.get_property("NUM_STREAMS"))}

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._request is None:
            raise BuildError(f"runner for {self.source} is closed")
        check_feeds(self._inputs, feeds)
        self._request.infer(feeds, share_inputs=True)
        # copies: the request reuses its output buffers on the next call
        return {name: self._request.get_output_tensor(index).data.copy()
                for index, name in enumerate(self._output_names)}

    def close(self) -> None:
        self._request = self._compiled = None


class OpenVinoCpuTarget(Target):
    """OpenVINO, CPU plugin; fp32 and int8 IR, and bf16 compiled from the fp32 IR."""

    name: ClassVar[str] = "openvino-cpu"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "bf16", "int8")
    dynamic_batch: ClassVar[bool] = True
    source: ClassVar[SourceKind] = "openvino"  # IR from the export_openvino stage; or an .onnx
    settings_key: ClassVar[str] = "openvino"
    Settings: ClassVar[type] = OpenVinoSettings
    runtime_package: ClassVar[str] = "openvino"

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self._core: Any = None

    def core(self) -> Any:
        """One ov.Core per target (raises ImportError without openvino)."""
        if self._core is None:
            self._core = import_openvino().Core()
        return self._core

    def available(self) -> tuple[bool, str]:
        try:
            devices = self.core().available_devices
        except (ImportError, OSError) as err:
            return False, (f"openvino is not installed ({err}); install the extra: "
                           "pip install -e '.[openvino]'")
        if DEVICE not in devices:
            return False, f"OpenVINO sees no {DEVICE} device (it has {devices})"
        return True, ""

    def precision_available(self, precision: str) -> tuple[bool, str]:
        ok, reason = super().precision_available(precision)
        if not ok or precision != "bf16":
            return ok, reason
        capabilities = list(self.core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))
        if "BF16" not in capabilities:
            return False, (f"this CPU ({self.core().get_property(DEVICE, 'FULL_DEVICE_NAME')}) "
                           f"has no bf16 support: OpenVINO's OPTIMIZATION_CAPABILITIES are "
                           f"{capabilities}")
        return True, ""

    def source_precision(self, precision: str) -> str:
        return "fp32" if precision == "bf16" else precision  # bf16 is compiled from the FP32 IR

    def _read(self, path: Path) -> Any:
        if not path.is_file():
            raise BuildError(f"{path}: model file not found")
        if path.suffix == ".xml" and not path.with_suffix(".bin").is_file():
            raise BuildError(f"{path}: its weights {path.with_suffix('.bin').name} are missing")
        try:
            return self.core().read_model(str(path))
        except RuntimeError as err:
            first = " ".join(str(err).split())[:300]
            raise BuildError(f"{path}: OpenVINO cannot read it: {first}") from err

    def build(self, source: Path, out_dir: Path) -> Path:
        """An .onnx file as IR `<out_dir>/<stem>.xml` (+ .bin); an .xml IR as it is."""
        source = Path(source)
        self.require_available()
        if source.suffix not in (".onnx", ".xml"):
            raise BuildError(f"{source}: openvino-cpu reads .onnx files or OpenVINO IR (.xml), "
                             f"not {source.suffix or 'extension-less'} files")
        model = self._read(source)
        if source.suffix == ".xml":
            return source
        return save_ir(model, Path(out_dir) / f"{source.stem}.xml")

    def _config(self, precision: str) -> dict[str, Any]:
        return {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": self.settings.threads,
                "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision]}

    def load(self, artifact: Path, precision: str | None = None) -> OpenVinoRunner:
        """The IR (or an .onnx) compiled for the CPU at `precision` (default: the file's)."""
        artifact = Path(artifact)
        self.require_available()
        precision = precision or precision_of(artifact)
        ok, reason = self.precision_available(precision)
        if not ok:
            raise TargetUnavailable(reason)
        model = self._read(artifact)
        try:
            compiled = self.core().compile_model(model, DEVICE, self._config(precision))
        except RuntimeError as err:
            raise BuildError(f"{artifact}: OpenVINO cannot compile it for the {DEVICE}: "
                             f"{' '.join(str(err).split())[:300]}") from err
        applied, wanted = (compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
                           INFERENCE_PRECISION[precision])
        if applied != wanted:  # never another precision's numbers under this one's name
            raise BuildError(f"{artifact}: OpenVINO compiled it at inference precision "
                             f"{applied}, expected {wanted} for {precision}")
        return OpenVinoRunner(compiled, artifact)
