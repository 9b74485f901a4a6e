"""TEST SCAFFOLDING, not TensorRT: stand-in `tensorrt` and `pycuda.driver` modules with the names
and signatures of the TensorRT 10.x/11.x Python API and pycuda that targets/tensorrt_build.py
and targets/tensorrt_runner.py call, recording every call. They prove the plumbing (what is
called, with which arguments, in which order; errors mapped; resources freed) on a machine
without a GPU; what TensorRT does with those calls is checked by the `tensorrt`/`gpu` tests.

The "engine" computes logits = 2 * mean over H, W of the input, per channel (so outputs can
be checked); it accepts any batch within the profile it was built with.
"""

import enum
import itertools
import struct
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Knobs:
    version: str = "10.3.0.30"
    compute_capability: tuple[int, int] = (8, 7)
    gpu: str = "Orin"
    parse_errors: list[tuple[int, str, str, str]] = field(default_factory=list)
    build_fails: bool = False
    cache_accepted: bool = True
    calls: list[tuple] = field(default_factory=list)


def tensorrt_module(knobs: Knobs) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = knobs.version
    record = knobs.calls.append

    class Severity(enum.IntEnum):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    class ILogger:
        def __init__(self):
            record(("ILogger.__init__",))

    ILogger.Severity = Severity

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        STRONGLY_TYPED = 1

    class MemoryPoolType(enum.IntEnum):
        WORKSPACE = 0

    class BuilderFlag(enum.IntEnum):
        TF32 = 6

    class TensorIOMode(enum.IntEnum):
        NONE, INPUT, OUTPUT = range(3)

    class ParserError:
        def __init__(self, node, name, operator, desc):
            self._values = node, name, operator, desc

        def node(self):
            return self._values[0]

        def node_name(self):
            return self._values[1]

        def node_operator(self):
            return self._values[2]

        def code(self):
            return "ErrorCode.UNSUPPORTED_NODE"

        def desc(self):
            return self._values[3]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.logger = network, logger

        @property
        def num_errors(self):
            return len(knobs.parse_errors)

        def get_error(self, index):
            return ParserError(*knobs.parse_errors[index])

        def parse_from_file(self, path):
            record(("parse_from_file", path))
            return not knobs.parse_errors

    class Cache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+tactics"

    class Config:
        def __init__(self):
            self.cache, self.profiles = None, []

        def set_memory_pool_limit(self, pool, size):
            record(("set_memory_pool_limit", pool, size))

        def clear_flag(self, flag):
            record(("clear_flag", flag))

        def create_timing_cache(self, data):
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            record(("set_timing_cache", cache.data, ignore_mismatch))
            accepted = knobs.cache_accepted or not cache.data
            self.cache = cache if accepted else self.cache
            return accepted

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            record(("add_optimization_profile", profile.shapes))
            self.profiles.append(profile.shapes)
            return len(self.profiles) - 1

    class Profile:
        def set_shape(self, name, low, opt, high):
            self.shapes = (name, tuple(low), tuple(opt), tuple(high))

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            record(("create_network", flags))
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            self.logger.log(Severity.VERBOSE, "tactic chatter")
            if knobs.build_fails:
                self.logger.log(Severity.ERROR, "Myelin: could not infer output types")
                return None
            name, low, _, high = config.profiles[0]
            version = [int(p) for p in knobs.version.split(".")]
            header = b"ftrt" + struct.pack("<I", 0) + bytes(16) + bytes(version)
            return header + struct.pack("<8i", *low, *high)

    class Engine:
        def __init__(self, low, high):
            self.low, self.high = low, high
            self.num_io_tensors = 2

        def get_tensor_name(self, index):
            return ("input", "logits")[index]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name == "input" else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return "float32"

        def get_tensor_shape(self, name):
            return (-1, *self.low[1:]) if name == "input" else (-1, self.low[1])

        def get_tensor_profile_shape(self, name, profile):
            return [self.low, self.low, self.high]

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.shape, self.addresses = engine, None, {}

        def set_input_shape(self, name, shape):
            self.shape = tuple(shape)
            return all(lo <= s <= hi for s, lo, hi in zip(shape, self.engine.low,
                                                          self.engine.high, strict=True))

        def get_tensor_shape(self, name):
            return self.shape if name == "input" else (self.shape[0], self.shape[1])

        def set_tensor_address(self, name, address):
            assert isinstance(address, int)
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream_handle):
            assert isinstance(stream_handle, int)
            record(("execute_async_v3",))
            source = _DEVICE[self.addresses["input"]]
            count = int(np.prod(self.shape))
            images = np.frombuffer(source, np.float32, count).reshape(self.shape)
            logits = 2 * images.mean(axis=(2, 3))
            _DEVICE[self.addresses["logits"]][:logits.nbytes] = logits.tobytes()
            return True

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            record(("deserialize_cuda_engine",))
            if data[:4] != b"ftrt":
                self.logger.log(Severity.ERROR, "Error Code 4: Internal Error (Engine "
                                "deserialization failed.)")
                return None
            shapes = struct.unpack_from("<8i", data, 28)
            return Engine(shapes[:4], shapes[4:])

    for value in (ILogger, NetworkDefinitionCreationFlag, MemoryPoolType, BuilderFlag,
                  TensorIOMode, OnnxParser, Builder, Runtime):
        setattr(trt, value.__name__, value)
    trt.nptype = np.dtype
    return trt


_DEVICE: dict[int, bytearray] = {}  # address -> device memory
_ADDRESSES = itertools.count(0x1000, 0x1000)


def pycuda_module(knobs: Knobs) -> types.ModuleType:
    cuda = types.ModuleType("pycuda.driver")
    record = knobs.calls.append

    class Context:
        def push(self):
            record(("push",))

        @staticmethod
        def pop():
            record(("pop",))

    class Device:
        def __init__(self, index):
            self.index = index

        @staticmethod
        def count():
            return 1

        def name(self):
            return knobs.gpu

        def compute_capability(self):
            return knobs.compute_capability

        def retain_primary_context(self):
            return Context()

    class Allocation:
        def __init__(self, size):
            self.address = next(_ADDRESSES)
            _DEVICE[self.address] = bytearray(size)

        def __int__(self):
            return self.address

        def free(self):
            record(("free", self.address))
            _DEVICE.pop(self.address)

    class Stream:
        handle = 0xBEEF

        def synchronize(self):
            record(("synchronize",))

    class Event:
        clock = 0.0

        def record(self, stream=None):
            Event.clock += 0.25
            self.at = Event.clock

        def synchronize(self):
            pass

        def time_since(self, start):
            return self.at - start.at

    def memcpy_htod_async(dest, source, stream=None):
        _DEVICE[int(dest)][:source.nbytes] = source.tobytes()

    def memcpy_dtoh_async(dest, source, stream=None):
        dest[...] = np.frombuffer(_DEVICE[int(source)], dest.dtype, dest.size).reshape(dest.shape)

    cuda.init = lambda: record(("init",))
    cuda.Device, cuda.Stream, cuda.Event = Device, Stream, Event
    cuda.pagelocked_empty = lambda count, dtype: np.zeros(count, dtype)
    cuda.mem_alloc = Allocation
    cuda.memcpy_htod_async, cuda.memcpy_dtoh_async = memcpy_htod_async, memcpy_dtoh_async
    return cuda


def install(monkeypatch: Any, knobs: Knobs | None = None) -> Knobs:
    """Put the stand-in modules where `import tensorrt` / `import pycuda.driver` find them."""
    knobs = knobs or Knobs()
    driver = pycuda_module(knobs)
    package = types.ModuleType("pycuda")
    package.driver = driver
    for name, module in (("tensorrt", tensorrt_module(knobs)), ("pycuda", package),
                         ("pycuda.driver", driver)):
        monkeypatch.setitem(sys.modules, name, module)
    return knobs
