"""A deserialized TensorRT engine on one GPU, driven with pycuda (optional extra `pycuda`).

The calls are tagged with where their signature is documented:
[api10/11] the TensorRT Python API reference, 10.x and 11.x (name-based I/O since 10.0;
  docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/: Runtime, ICudaEngine,
  IExecutionContext), checked against the bindings' source at NVIDIA/TensorRT tags v10.3.0 and
  v11.1 (python/src/infer/pyCore.cpp, pyCoreDoc.h); the pycuda buffer idiom is the TensorRT 10.1
  migration guide's (docs.nvidia.com/deeplearning/tensorrt/archives/tensorrt-1010/);
[pycuda] pycuda 2026.1, doc/driver.rst (documen.tician.de/pycuda/driver.html); Stream.handle
  is in its source (src/wrapper/wrap_cudadrv.cpp), not in driver.rst.

CUDA context: TensorRT uses the CUDA runtime API, which works in the device's *primary* context.
pycuda.autoinit would create a second, private context; its maintainer's advice is to retain
and push the primary context instead (inducer/pycuda#242, #296, as pycuda/autoprimaryctx.py
does). Everything is freed, in order, while that context is current, and then it is popped:
the other order gives "context stack was not empty" (NVIDIA/TensorRT#1107, #2357).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import BuildError, FeedError, TargetUnavailable
from pipeline.timing import LatencyStats, TimingPlan, measure_phases
from targets.base import Runner, TensorSpec, check_feeds


def import_tensorrt() -> Any:
    """The tensorrt module, or TargetUnavailable saying how to install it."""
    try:
        import tensorrt  # pip `tensorrt` (desktop) or JetPack's apt python3-libnvinfer
    except ImportError as err:
        raise TargetUnavailable(
            f"the TensorRT Python bindings are not importable ({err}); desktop: pip install "
            "'prune-deploy[tensorrt]'; Jetson: JetPack's python3-libnvinfer in a venv made "
            "with --system-site-packages") from err
    return tensorrt


def import_pycuda() -> Any:
    """pycuda.driver, initialised, or TargetUnavailable saying how to install it."""
    try:
        import pycuda.driver as cuda  # [pycuda]
    except ImportError as err:
        raise TargetUnavailable(f"pycuda is not importable ({err}); pip install "
                                "'prune-deploy[pycuda]' (compiles against the CUDA toolkit: "
                                "nvcc on PATH)") from err
    try:
        cuda.init()  # [pycuda] "must be called before any other function in this module"
    except Exception as err:  # noqa: BLE001 - pycuda raises its own LogicError/RuntimeError
        raise TargetUnavailable(f"the CUDA driver is not usable: {type(err).__name__}: "
                                f"{err}") from err
    return cuda


def device_facts(cuda: Any, index: int) -> tuple[str, str]:
    """(GPU name, compute capability "8.7") of device `index`, without making a context."""
    if cuda.Device.count() <= index:  # [pycuda] Device.count()
        raise TargetUnavailable(f"CUDA device {index} requested, {cuda.Device.count()} visible")
    device = cuda.Device(index)
    major, minor = device.compute_capability()  # [pycuda] "Return a 2-tuple"
    return device.name(), f"{major}.{minor}"


@contextmanager
def primary_context(cuda: Any, index: int) -> Iterator[Any]:
    """Device `index`'s primary context, current on this thread while the block runs."""
    context = cuda.Device(index).retain_primary_context()  # [pycuda] >= 2020.1; not current
    context.push()  # [pycuda] Context.push()
    try:
        yield context
    finally:
        context.pop()  # [pycuda] then the reference is dropped, as autoprimaryctx.py does


def capturing_logger(trt: Any) -> Any:
    """A trt.ILogger that keeps warnings and errors, so that a None from the builder or the
    runtime can be explained (TensorRT reports those failures only to its logger).
    [api10/11] ILogger: subclass trt.ILogger, call its __init__, implement log()."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            # A custom ILogger gets every severity; INTERNAL_ERROR=0 < ERROR < WARNING < INFO.
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                name = getattr(severity, "name", str(severity).rsplit(".", 1)[-1])
                self.messages.append((name, msg))

        def errors(self) -> list[str]:
            return [msg for name, msg in self.messages if "ERROR" in name]

        def warnings(self) -> list[str]:
            return [msg for name, msg in self.messages if name == "WARNING"]

    return Logger()


@dataclass
class _Tensor:
    """One I/O tensor of the engine and its buffers (sized for the profile's largest shape)."""

    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple[int, ...]  # the engine's shape, -1 where dynamic
    low: tuple[int, ...] = ()  # inputs: the profile's min and max shapes
    high: tuple[int, ...] = ()
    host: Any = None  # page-locked flat ndarray
    device: Any = None  # pycuda DeviceAllocation


def _discover(trt: Any, engine: Any) -> dict[str, _Tensor]:
    """The engine's I/O tensors by name ([api10/11] ICudaEngine.num_io_tensors,
    get_tensor_name/mode/dtype/shape, get_tensor_profile_shape(name, profile) -> [min, opt,
    max]; trt.nptype(DataType) -> numpy type)."""
    tensors = {}
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))  # TypeError for bf16/fp8
        tensor = _Tensor(name, is_input, dtype, tuple(engine.get_tensor_shape(name)))
        if is_input and any(size < 0 for size in tensor.shape):
            low, _, high = engine.get_tensor_profile_shape(name, 0)
            tensor.low, tensor.high = tuple(low), tuple(high)
        elif is_input:
            tensor.low = tensor.high = tensor.shape
        tensors[name] = tensor
    return tensors


class TensorRtRunner(Runner):
    """One engine on one GPU: page-locked host buffers, device buffers and one stream, all
    allocated once for the profile's largest shapes; a context manager that frees them."""

    def __init__(self, engine_bytes: bytes, device: int = 0) -> None:
        self._trt, self._cuda = import_tensorrt(), import_pycuda()
        self._tensors: dict[str, _Tensor] = {}
        self._events: list[Any] = []
        self._stream = self._context = self._engine = self._runtime = None
        self._primary = self._cuda.Device(device).retain_primary_context()
        self._primary.push()  # current on this thread until close()
        try:
            self._load(engine_bytes)
        except BaseException:
            self.close()
            raise

    def _load(self, engine_bytes: bytes) -> None:
        trt, cuda = self._trt, self._cuda
        self._logger = capturing_logger(trt)
        self._runtime = trt.Runtime(self._logger)  # [api10/11] Runtime(logger)
        # [api10/11] deserialize_cuda_engine: "The ICudaEngine, or None if it could not be
        # deserialized": a version or GPU mismatch is a logged error, not an exception.
        self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self._engine is None:
            raise BuildError(f"TensorRT {trt.__version__} could not deserialize the engine: "
                             + ("; ".join(self._logger.errors()) or "no error logged"))
        self._context = self._engine.create_execution_context()  # [api10/11]
        if self._context is None:
            raise BuildError("create_execution_context returned None (out of device memory?)")
        self._tensors = _discover(trt, self._engine)
        self._allocate()
        # A stream of our own: with the default stream execute_async_v3 adds synchronisations
        # ([api10/11] "Using default stream may lead to performance issues").
        self._stream = cuda.Stream()  # [pycuda] Stream(flags=0)
        self._events = [cuda.Event() for _ in range(4)]  # [pycuda] Event(flags=0): timing on

    def _allocate(self) -> None:
        cuda, context = self._cuda, self._context
        for tensor in self._tensors.values():  # the largest inputs give the largest outputs
            # [api10/11] set_input_shape(name, shape) -> bool
            if tensor.is_input and not context.set_input_shape(tensor.name, tensor.high):
                raise BuildError(f"set_input_shape({tensor.name}, {tensor.high}) failed")
        for tensor in self._tensors.values():
            shape = tensor.high if tensor.is_input else tuple(context.get_tensor_shape(tensor.name))
            if any(size < 0 for size in shape):
                raise BuildError(f"output {tensor.name} has a data-dependent shape {shape}; "
                                 "this runner has no IOutputAllocator")
            count = max(1, int(np.prod(shape)))
            tensor.host = cuda.pagelocked_empty(count, tensor.dtype)  # [pycuda]
            tensor.device = cuda.mem_alloc(count * tensor.dtype.itemsize)  # [pycuda] bytes
            # [api10/11] set_tensor_address(name, int) -> bool; [pycuda] a DeviceAllocation
            # "can be cast to int", and its memory has the 256-byte alignment TensorRT needs.
            if not context.set_tensor_address(tensor.name, int(tensor.device)):
                raise BuildError(f"set_tensor_address({tensor.name}) failed")

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t.name, t.dtype, tuple(None if size < 0 else size
                                                       for size in t.shape))
                     for t in self._tensors.values() if t.is_input)

    @property
    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """Input name -> (smallest, largest) shape the engine accepts."""
        return {t.name: (t.low, t.high) for t in self._tensors.values() if t.is_input}

    def _check(self, feeds: dict[str, np.ndarray]) -> None:
        if self._context is None:
            raise BuildError("this TensorRT runner is closed")
        check_feeds(self.inputs, feeds)
        for name, array in feeds.items():
            low, high = self.profile[name]
            if any(not lo <= size <= hi for size, lo, hi in zip(array.shape, low, high,
                                                                strict=True)):
                raise FeedError(f"input {name!r} has shape {array.shape}, outside the engine's "
                                f"optimisation profile {low} .. {high}; rebuild it with "
                                "runtimes.tensorrt min_batch/max_batch covering it")

    def _enqueue(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy in, run and copy out on the stream, with an event between the phases; returns
        views of the host buffers, valid after the last event has completed."""
        cuda, context, stream = self._cuda, self._context, self._stream
        start, copied_in, computed, copied_out = self._events
        staged = {}
        for name, array in feeds.items():
            if not context.set_input_shape(name, array.shape):
                raise FeedError(f"TensorRT refused shape {array.shape} for input {name!r}")
            view = self._tensors[name].host[:array.size].reshape(array.shape)
            np.copyto(view, array)  # async copies need page-locked memory on the host side
            staged[name] = view
        start.record(stream)  # [pycuda] Event.record(stream)
        for name, view in staged.items():  # [pycuda] memcpy_htod_async: the size of its source
            cuda.memcpy_htod_async(self._tensors[name].device, view, stream)
        copied_in.record(stream)
        # [api10/11] execute_async_v3(stream_handle: int) -> bool; [pycuda] Stream.handle
        if not context.execute_async_v3(stream.handle):
            raise BuildError("execute_async_v3 returned False: "
                             + ("; ".join(self._logger.errors()[-3:]) or "no error logged"))
        computed.record(stream)
        outputs = {}
        for tensor in self._tensors.values():
            if not tensor.is_input:  # output shapes are known once every input shape is set
                shape = tuple(context.get_tensor_shape(tensor.name))
                view = tensor.host[:int(np.prod(shape))].reshape(shape)
                cuda.memcpy_dtoh_async(view, tensor.device, stream)  # [pycuda] size of target
                outputs[tensor.name] = view
        copied_out.record(stream)
        copied_out.synchronize()  # [pycuda] Event.synchronize()
        return outputs

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check(feeds)
        return {name: np.array(view) for name, view in self._enqueue(feeds).items()}

    def _timed_call(self, feeds: dict[str, np.ndarray]) -> dict[str, float]:
        self._enqueue(feeds)
        start, copied_in, computed, copied_out = self._events
        # [pycuda] end.time_since(start): milliseconds between two completed events
        return {"h2d": copied_in.time_since(start) / 1e3,
                "compute": computed.time_since(copied_in) / 1e3,
                "d2h": copied_out.time_since(computed) / 1e3}

    def benchmark(self, feeds: dict[str, np.ndarray], plan: TimingPlan) -> LatencyStats:
        """CUDA-event device time per phase; the plan's stopping rule on the host clock."""
        self._check(feeds)
        batch = next(iter(feeds.values())).shape[0]
        return measure_phases(lambda: self._timed_call(feeds), plan, batch, "cuda-events")

    def close(self) -> None:
        """Idempotent: finish the stream, free the buffers, drop the execution context, engine
        and runtime (in that order) while the CUDA context is current, then pop it."""
        if self._primary is None:
            return
        try:
            if self._stream is not None:
                self._stream.synchronize()  # [pycuda]
            for tensor in self._tensors.values():
                if tensor.device is not None:
                    tensor.device.free()  # [pycuda] DeviceAllocation.free()
                allocation = getattr(tensor.host, "base", None)  # pagelocked_empty's memory
                if hasattr(allocation, "free"):
                    allocation.free()  # [pycuda] HostAllocation.free()
                tensor.device = tensor.host = None
            self._events = []
            self._stream = self._context = self._engine = self._runtime = None
        finally:
            primary, self._primary = self._primary, None
            primary.pop()
