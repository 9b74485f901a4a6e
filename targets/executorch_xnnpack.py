"""ExecuTorch with the XNNPACK backend on the CPU: runs the .pte programs the export_executorch
stage ships (pipeline/export/executorch.py makes them), through ExecuTorch's Python bindings.

A program's batch is fixed (`dynamic_batch = False`): the benchmark gives each batch size its
own program. The bindings take torch tensors only, so numpy feeds are wrapped without a copy
(torch.from_numpy). XNNPACK's threadpool is process-wide: `load` sets it to the configured size
(`runtimes.executorch.threads`) and the runner restores the previous size when it closes, as
the PyTorch CPU runner does with torch's thread count; `_unsafe_reset_threadpool` is the
bindings' (experimental) way to set it.
"""

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic.dataclasses import dataclass

from pipeline.config import STRICT, NonNegativeInt
from pipeline.errors import BuildError, TargetUnavailable
from targets.base import Runner, SourceKind, Target, TensorSpec, check_feeds

BACKEND = "XnnpackBackend"
INPUT_NAME = "input"  # programs have positional inputs; these are the names the project uses
OUTPUT_NAME = "logits"
# ExecuTorch ScalarType codes (MethodMeta dtype()) -> numpy dtypes
SCALAR_TYPES = {0: np.uint8, 1: np.int8, 3: np.int32, 4: np.int64, 5: np.float16,
                6: np.float32, 7: np.float64, 11: np.bool_}


@dataclass(frozen=True, config=STRICT)
class ExecuTorchSettings:
    """Settings of the executorch-xnnpack target (`runtimes.executorch`)."""

    threads: NonNegativeInt  # XNNPACK threadpool size (process-wide); 0 = ExecuTorch's default


def bindings() -> tuple[Any, Any]:
    """(executorch.runtime.Runtime singleton, the portable_lib bindings module)."""
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    return Runtime.get(), portable_lib


def input_specs(meta: Any) -> tuple[TensorSpec, ...]:
    """The program's inputs (fixed shapes) from its MethodMeta."""
    if meta.num_inputs() != 1:
        raise BuildError(f"expected a program with one image input, it has {meta.num_inputs()}")
    info = meta.input_tensor_meta(0)
    if info.dtype() not in SCALAR_TYPES:
        raise BuildError(f"program input has ExecuTorch scalar type {info.dtype()}; this runner "
                         f"feeds {sorted(SCALAR_TYPES)}")
    return (TensorSpec(INPUT_NAME, np.dtype(SCALAR_TYPES[info.dtype()]), tuple(info.sizes())),)


class ExecuTorchRunner(Runner):
    """One loaded method ("forward") of one program; `infer` checks the feeds first."""

    def __init__(self, program: Any, method: Any, source: Path, restore: Any) -> None:
        import torch

        self._torch, self._program, self._method = torch, program, method
        self._restore = restore  # puts the threadpool back as it was
        self.source = source
        self._inputs = input_specs(method.metadata)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._method is None:
            raise BuildError(f"runner for {self.source} is closed")
        check_feeds(self._inputs, feeds)
        tensor = self._torch.from_numpy(np.ascontiguousarray(feeds[INPUT_NAME]))
        (logits,) = self._method.execute([tensor])
        return {OUTPUT_NAME: logits.numpy()}

    def close(self) -> None:
        if self._method is not None:
            self._method = self._program = None
            self._restore()


class ExecuTorchXnnpackTarget(Target):
    """ExecuTorch programs lowered to XNNPACK, fp32 and int8 (PT2E), one per batch size."""

    name: ClassVar[str] = "executorch-xnnpack"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "int8")
    dynamic_batch: ClassVar[bool] = False
    source: ClassVar[SourceKind] = "executorch"  # the export_executorch stage's .pte files
    settings_key: ClassVar[str] = "executorch"
    Settings: ClassVar[type] = ExecuTorchSettings
    runtime_package: ClassVar[str] = "executorch"

    def available(self) -> tuple[bool, str]:
        try:
            runtime, _ = bindings()
        except (ImportError, OSError) as err:
            return False, (f"executorch is not installed ({err}); install the extra: "
                           "pip install -e '.[executorch]'")
        backends = list(runtime.backend_registry.registered_backend_names)
        if BACKEND not in backends:
            return False, f"this executorch build has no {BACKEND} (it has {backends})"
        return True, ""

    def build(self, source: Path, out_dir: Path) -> Path:
        """A .pte program is already built; anything else is refused with where to get one."""
        source = Path(source)
        if source.suffix != ".pte":
            raise BuildError(f"{source}: executorch-xnnpack runs .pte programs, made per batch "
                             "size by the export_executorch stage (pipeline/export/executorch.py)"
                             f", not {source.suffix or 'extension-less'} files")
        if not source.is_file():
            raise BuildError(f"{source}: program not found")
        return source

    def _threadpool(self, lib: Any) -> Any:
        """Set the threadpool size from the settings; returns what puts it back."""
        if not self.settings.threads:
            return lambda: None
        if not hasattr(lib, "_unsafe_reset_threadpool"):
            raise TargetUnavailable("this executorch cannot set its threadpool size; set "
                                    "runtimes.executorch.threads to 0 (its default)")
        before = lib._threadpool_get_thread_count()
        lib._unsafe_reset_threadpool(self.settings.threads)
        return lambda: lib._unsafe_reset_threadpool(before)

    def load(self, artifact: Path, precision: str | None = None) -> ExecuTorchRunner:
        """The program's forward method, loaded with the configured threadpool size."""
        self.require_available()
        artifact = self.build(Path(artifact), Path(artifact).parent)
        runtime, lib = bindings()
        restore = self._threadpool(lib)
        try:
            program = runtime.load_program(artifact)
            method = program.load_method("forward")
            runner = ExecuTorchRunner(program, method, artifact, restore)
        except BuildError:
            restore()
            raise
        except Exception as err:  # noqa: BLE001 - the bindings raise RuntimeError/ValueError
            restore()
            raise BuildError(f"{artifact}: ExecuTorch cannot load it: {type(err).__name__}: "
                             f"{' '.join(str(err).split())[:300]}") from err
        runner.runtime_info = {"threadpool_threads": lib._threadpool_get_thread_count()}
        return runner
