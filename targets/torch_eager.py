"""PyTorch eager on the CPU: the baseline a user has today, before any export.

It runs the PyTorch model files (models/<m>.pt, rebuilt by `pipeline.checkpoint.load_model`,
slimmed models included), not ONNX, so `build` accepts a checkpoint and returns it unchanged.
"""

from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic.dataclasses import dataclass

from pipeline.config import STRICT, NonNegativeInt
from pipeline.errors import BuildError
from targets.base import Runner, Target, TensorSpec, check_feeds

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass(frozen=True, config=STRICT)
class TorchSettings:
    """Settings of the PyTorch targets (`runtimes.torch`)."""

    threads: NonNegativeInt  # intra-op threads on the CPU (0 = torch's default); GPU targets
    # only record it: host threads do not change device timing


def checkpoint_source(path: Path) -> Path:
    """The PyTorch targets' 'build': the model file itself, after checking it is one."""
    path = Path(path)
    if path.suffix != ".pt":
        raise BuildError(f"{path}: PyTorch targets run model files (models/<name>.pt), not "
                         f"{path.suffix or 'extension-less'} files")
    if not path.is_file():
        raise BuildError(f"{path}: model file not found")
    return path


def input_spec(meta: dict) -> tuple[TensorSpec, ...]:
    """The image input a checkpoint expects (its recorded C, H, W; any size if not recorded)."""
    chw = tuple(meta.get("input_shape") or (None, None, None))
    return (TensorSpec(INPUT_NAME, np.dtype(np.float32), ("batch", *chw)),)


class TorchCpuRunner(Runner):
    """Eager forward passes on the CPU with a given intra-op thread count."""

    def __init__(self, model, specs: tuple[TensorSpec, ...], threads: int) -> None:
        import torch

        self._torch, self._model, self._specs = torch, model, specs
        # torch's thread count is process-wide: set it for this runner's life, then restore it.
        self._threads_before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._specs

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self._specs, feeds)
        with self._torch.inference_mode():
            logits = self._model(self._torch.from_numpy(feeds[INPUT_NAME]))
        return {OUTPUT_NAME: logits.numpy()}

    def close(self) -> None:
        self._torch.set_num_threads(self._threads_before)


class TorchCpuTarget(Target):
    """PyTorch eager, fp32, CPU."""

    name: ClassVar[str] = "torch-cpu"
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    dynamic_batch: ClassVar[bool] = True
    source = "checkpoint"  # runs models/<m>.pt, not an ONNX file
    settings_key: ClassVar[str] = "torch"
    Settings: ClassVar[type] = TorchSettings
    runtime_package: ClassVar[str] = "torch"

    def available(self) -> tuple[bool, str]:
        try:
            import torch  # noqa: F401 - the import is the check
        except ImportError as err:
            return False, f"PyTorch is not importable ({err})"
        return True, ""

    def build(self, onnx_path: Path, out_dir: Path) -> Path:
        return checkpoint_source(onnx_path)

    def load(self, artifact: Path, precision: str | None = None) -> TorchCpuRunner:
        from pipeline.checkpoint import load_model

        self.require_available()
        loaded = load_model(checkpoint_source(artifact), device="cpu")
        return TorchCpuRunner(loaded.model, input_spec(loaded.meta), self.settings.threads)
