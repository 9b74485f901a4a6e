"""TensorRT on this machine's GPU: engines built here with the TensorRT Python API
(targets/tensorrt_build.py) and run with pycuda (targets/tensorrt_runner.py).

Both are optional extras (`tensorrt`, `pycuda`), imported only when the target is used: without
them, or without a CUDA device, `available()` says what is missing and every row is `skipped`.
An engine is loaded only with its card (pipeline.export.cards): its bytes must hash to the
card's engine_sha256, and the card's TensorRT version, compute capability and platform must be
this machine's (targets/engines.py) - otherwise the refusal says what differs and how to
rebuild, before TensorRT is asked to deserialize it.
"""

from pathlib import Path
from typing import ClassVar

from pipeline.artifacts import TENSORRT_FLAVOR, card_path, timing_cache_path
from pipeline.errors import PipelineError
from pipeline.export.cards import load_verified_engine, write_engine_card
from pipeline.io import atomic_write_bytes
from targets.base import EngineBuilder, Target
from targets.engines import (
    RuntimeFacts,
    TensorRtSettings,
    batch_profile,
    check_engine_card,
    engine_card,
    engine_source,
    host_platform,
)


def tensorrt_availability(device: int) -> tuple[bool, str]:
    """(True, "") when TensorRT, pycuda and CUDA device `device` are all usable; never raises."""
    from targets.tensorrt_runner import device_facts, import_pycuda, import_tensorrt

    try:
        trt = import_tensorrt()
        device_facts(import_pycuda(), device)
    except PipelineError as err:
        return False, str(err)
    if int(trt.__version__.split(".")[0]) < 10:
        return False, (f"TensorRT {trt.__version__} is installed; this target uses the 10.x/11.x "
                       "API (name-based I/O, strongly typed networks)")
    return True, ""


def runtime_facts(device: int) -> RuntimeFacts:
    """The TensorRT version and GPU an engine would be loaded by here."""
    from targets.tensorrt_runner import device_facts, import_pycuda, import_tensorrt

    gpu, capability = device_facts(import_pycuda(), device)
    return RuntimeFacts(import_tensorrt().__version__, capability, gpu, host_platform())


class TensorRtTarget(Target, EngineBuilder):
    """TensorRT on a local CUDA GPU; settings `runtimes.tensorrt` (profile, workspace, TF32)."""

    name: ClassVar[str] = "tensorrt"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8")
    dynamic_batch: ClassVar[bool] = True  # within the profile's min_batch .. max_batch
    settings_key: ClassVar[str] = "tensorrt"
    Settings: ClassVar[type] = TensorRtSettings
    onnx_flavors: ClassVar[dict[str, str]] = {"int8": TENSORRT_FLAVOR}
    engines_run_here: ClassVar[bool] = True

    @property
    def threads(self) -> int:
        return 0  # the GPU does the work

    def available(self) -> tuple[bool, str]:
        return tensorrt_availability(self.settings.device)

    def build(self, onnx_path: Path, out_dir: Path) -> Path:
        """An .engine (with its card) is used as it is; an .onnx file is built into out_dir."""
        if Path(onnx_path).suffix == ".engine":
            return Path(onnx_path)
        return self.build_engine(onnx_path, out_dir, self.settings)

    def build_engine(self, onnx_path: Path, out_dir: Path, build: TensorRtSettings) -> Path:
        from targets.tensorrt_build import build_serialized

        self.require_available()
        source = engine_source(onnx_path)
        cache = timing_cache_path(out_dir)
        data, facts = build_serialized(source, batch_profile(source.input, build), build, cache)
        engine = source.engine_path(Path(out_dir), self.name)
        card_path(engine).unlink(missing_ok=True)  # a stale card must not vouch for it
        atomic_write_bytes(engine, data)
        write_engine_card(engine, engine_card(source, self.name, facts))
        return engine

    def load(self, artifact: Path):
        """A pycuda runner for an engine, after its card's hash and fit are checked."""
        from targets.tensorrt_runner import TensorRtRunner

        self.require_available()
        data, card = load_verified_engine(artifact)
        check_engine_card(card, runtime_facts(self.settings.device), Path(artifact))
        return TensorRtRunner(data, self.settings.device)
