"""PyTorch on a CUDA GPU, eager and replayed as CUDA graphs, timed on the device.

`benchmark` times every call with CUDA events and reports the host-to-device copy, the compute
and the device-to-host copy separately (pinned host buffers, one stream); the warm-up/stopping
rule is the same host-clock plan as on every other target. On a machine without a CUDA device
both targets report themselves unavailable with the reason, and the benchmark records a
`skipped` row - never a CPU number in their place.
"""

from pathlib import Path
from typing import ClassVar

import numpy as np

from pipeline.timing import LatencyStats, TimingPlan, measure_phases
from targets.base import Runner, Target, TensorSpec, check_feeds
from targets.torch_eager import (
    INPUT_NAME,
    OUTPUT_NAME,
    TorchSettings,
    checkpoint_source,
    input_spec,
)


def cuda_availability() -> tuple[bool, str]:
    try:
        import torch
    except ImportError as err:
        return False, f"PyTorch is not importable ({err})"
    if torch.version.cuda is None:
        return False, f"this PyTorch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        return False, (f"no CUDA device visible to PyTorch {torch.__version__} (CUDA "
                       f"{torch.version.cuda}): torch.cuda.is_available() is False")
    return True, ""


class TorchCudaRunner(Runner):
    """Eager forward passes on the GPU; `graphs=True` captures one CUDA graph per input shape."""

    def __init__(self, model, specs: tuple[TensorSpec, ...], graphs: bool) -> None:
        import torch

        self._torch, self._specs, self._graphs = torch, specs, graphs
        self._model = model.to("cuda")
        self._stream = torch.cuda.Stream()
        self._captured: dict[tuple[int, ...], tuple] = {}  # shape -> (graph, static in, out)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._specs

    def _capture(self, shape: tuple[int, ...]) -> tuple:
        """A CUDA graph of one forward pass on a static input buffer of `shape`."""
        torch = self._torch
        static_input = torch.zeros(shape, device="cuda")
        # Warm up on a side stream first, as CUDA graph capture requires (cuDNN picks kernels).
        with torch.cuda.stream(self._stream), torch.no_grad():
            for _ in range(3):
                self._model(static_input)
        torch.cuda.current_stream().wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            static_output = self._model(static_input)
        return graph, static_input, static_output

    def _forward(self, device_input):
        """The model's output for a device tensor (writes into the graph's buffer if captured)."""
        if not self._graphs:
            return self._model(device_input)
        shape = tuple(device_input.shape)
        if shape not in self._captured:
            self._captured[shape] = self._capture(shape)
        graph, static_input, static_output = self._captured[shape]
        static_input.copy_(device_input)
        graph.replay()
        return static_output

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self._specs, feeds)
        torch = self._torch
        with torch.no_grad():
            output = self._forward(torch.from_numpy(feeds[INPUT_NAME]).to("cuda"))
            return {OUTPUT_NAME: output.float().cpu().numpy()}

    def benchmark(self, feeds: dict[str, np.ndarray], plan: TimingPlan) -> LatencyStats:
        check_feeds(self._specs, feeds)
        torch = self._torch
        host_input = torch.from_numpy(feeds[INPUT_NAME]).pin_memory()
        device_input = host_input.to("cuda")
        with torch.no_grad():
            host_output = self._forward(device_input).to("cpu").pin_memory()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]

        def timed_call() -> dict[str, float]:
            with torch.no_grad():
                events[0].record()
                device_input.copy_(host_input, non_blocking=True)
                events[1].record()
                output = self._forward(device_input)
                events[2].record()
                host_output.copy_(output, non_blocking=True)
                events[3].record()
                events[3].synchronize()
            return {phase: events[i].elapsed_time(events[i + 1]) / 1e3
                    for i, phase in enumerate(("h2d", "compute", "d2h"))}

        return measure_phases(timed_call, plan, host_input.shape[0], "cuda-events")

    def close(self) -> None:
        self._captured.clear()
        self._torch.cuda.empty_cache()


class TorchCudaTarget(Target):
    """PyTorch eager, fp32, on the current CUDA device."""

    name: ClassVar[str] = "torch-cuda"
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    dynamic_batch: ClassVar[bool] = True
    source = "checkpoint"  # runs models/<m>.pt, not an ONNX file
    settings_key: ClassVar[str] = "torch"
    Settings: ClassVar[type] = TorchSettings
    runtime_package: ClassVar[str] = "torch"
    graphs: ClassVar[bool] = False

    def available(self) -> tuple[bool, str]:
        return cuda_availability()

    def build(self, onnx_path: Path, out_dir: Path) -> Path:
        return checkpoint_source(onnx_path)

    def load(self, artifact: Path, precision: str | None = None) -> TorchCudaRunner:
        from pipeline.checkpoint import load_model

        self.require_available()
        loaded = load_model(checkpoint_source(artifact), device="cuda")
        return TorchCudaRunner(loaded.model, input_spec(loaded.meta), graphs=self.graphs)


class TorchCudaGraphsTarget(TorchCudaTarget):
    """PyTorch fp32 on CUDA, each input shape captured once as a CUDA graph and replayed."""

    name: ClassVar[str] = "torch-cuda-graphs"
    graphs: ClassVar[bool] = True
