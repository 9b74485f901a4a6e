"""An ONNX file -> a serialized TensorRT engine, with the TensorRT Python API (10.x and 11.x).

One recipe for both majors. The calls are tagged with where their signature is documented:
[api10/11] the Python API reference, TensorRT 10.x and 11.x
  (docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/: Builder, IBuilderConfig,
  OnnxParser, ITimingCache), checked against the bindings' source at NVIDIA/TensorRT tags
  v10.3.0 and v11.1 (python/src/infer/pyCore.cpp, pyCoreDoc.h, python/src/parsers/pyOnnx.cpp);
[mig11] "Removed Python APIs and Replacements" and "Python Migration Patterns" (TensorRT 11.4.0
  and 11.4.1 docs, docs.nvidia.com/deeplearning/tensorrt/11.4.0/api/migration/).
- The network is strongly typed: layer precisions come from the ONNX file (FP16 casts, INT8
  Q/DQ), checked before the build (targets.engines.engine_source). 11.x removed
  BuilderFlag.FP16/INT8 and the INT8 calibrators ("explicit quantization with Q/DQ nodes");
  NetworkDefinitionCreationFlag.STRONGLY_TYPED exists from 10.0 and 11.x accepts it (deprecated,
  ignored: always strongly typed). EXPLICIT_BATCH is never named: ignored since 10.0, gone in 11.
- TF32 is on by default for FP32 layers on Ampere and newer; it is cleared unless the settings
  allow it, so an fp32 engine stays within the fp32 parity limit.
- One optimisation profile for the batch axis (min/opt/max from runtimes.tensorrt), the
  workspace limit from params, and a timing cache read from and written back beside the engine.
"""

import time
from pathlib import Path
from typing import Any

from pipeline.errors import BuildError
from pipeline.io import atomic_write_bytes
from targets.engines import (
    MIB,
    EngineSource,
    ShapeProfile,
    TensorRtSettings,
    host_platform,
    plan_header_version,
)
from targets.tensorrt_runner import (
    capturing_logger,
    device_facts,
    import_pycuda,
    import_tensorrt,
    primary_context,
)


def _parser_errors(parser: Any) -> str:
    """Every parser error with its node: ParserError.node() (index), node_name() and
    node_operator() (9.x+, in all 10.x and 11.x), code(), desc() (pyOnnx.cpp)."""
    errors = []
    for index in range(parser.num_errors):  # [api10/11] OnnxParser.num_errors, get_error(i)
        error = parser.get_error(index)
        node = error.node()
        where = (f"node {node} {error.node_name()!r} ({error.node_operator()})" if node >= 0
                 else "the model")
        errors.append(f"{where}: {error.code()}: {error.desc()}")
    return "; ".join(errors)


def _parse(trt: Any, builder: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    """(network, parser); the parser owns the weights, so it must live as long as the build."""
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # [api10/11][mig11]
    network = builder.create_network(flags)  # [api10/11] Builder.create_network(flags=0)
    parser = trt.OnnxParser(network, logger)  # [api10/11] OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # [api10/11] -> bool; reasons: get_error
        raise BuildError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: "
                         f"{_parser_errors(parser) or '; '.join(logger.errors())}")
    return network, parser


def _config(trt: Any, builder: Any, build: TensorRtSettings, profile: ShapeProfile) -> Any:
    config = builder.create_builder_config()  # [api10/11]
    # [api10/11] set_memory_pool_limit(pool, bytes); WORKSPACE "defaults to max device memory"
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, build.workspace_mib * MIB)
    if not build.tf32:  # [api10/11] BuilderFlag.TF32: "Enabled by default"; kept in 11.x
        config.clear_flag(trt.BuilderFlag.TF32)
    if profile.dynamic:
        shapes = builder.create_optimization_profile()  # [api10/11] IOptimizationProfile
        # set_shape raises (RuntimeError "Shape provided for min is inconsistent ...") rather
        # than returning False; add_optimization_profile returns the index, -1 when invalid.
        shapes.set_shape(profile.input, profile.min, profile.opt, profile.max)
        if config.add_optimization_profile(shapes) < 0:
            raise BuildError(f"TensorRT refused the optimisation profile {profile.as_dict()}")
    return config


def _attach_timing_cache(config: Any, path: Path) -> str:
    """Give the builder the cache kept at `path`; returns its state for the card. A cache made
    by another GPU or TensorRT version is refused by set_timing_cache(cache, ignore_mismatch=
    False) -> False ("A failure will be reported if the CUDA device property in the provided
    cache is different"); the build then starts from an empty one and overwrites the file."""
    data = path.read_bytes() if path.is_file() else b""
    # [api10/11] create_timing_cache(buffer) -> ITimingCache; set_timing_cache(cache,
    # ignore_mismatch) -> bool
    if config.set_timing_cache(config.create_timing_cache(data), False):
        return "reused" if data else "new"
    if not config.set_timing_cache(config.create_timing_cache(b""), False):
        raise BuildError("TensorRT refused an empty timing cache")
    return "replaced (made by another GPU or TensorRT version)"


def _serialize(trt: Any, builder: Any, network: Any, config: Any, logger: Any,
               name: str) -> bytes:
    # [api10/11] build_serialized_network(network, config) -> IHostMemory, or None with the
    # reason only in the logger (build_engine was removed in 10.0)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"TensorRT {trt.__version__} failed to build {name}: "
                         + ("; ".join(logger.errors()[-5:]) or "no error logged"))
    return bytes(plan)  # IHostMemory supports the buffer protocol


def build_serialized(source: EngineSource, profile: ShapeProfile, build: TensorRtSettings,
                     cache: Path) -> tuple[bytes, dict[str, Any]]:
    """The engine's bytes and the facts for its card; the timing cache at `cache` is read and
    written back. Builds on device `build.device` (its primary context made current)."""
    trt, cuda = import_tensorrt(), import_pycuda()
    gpu, capability = device_facts(cuda, build.device)
    logger = capturing_logger(trt)
    started = time.perf_counter()
    with primary_context(cuda, build.device):
        builder = trt.Builder(logger)  # [api10/11] Builder(logger)
        network, _parser = _parse(trt, builder, logger, source.path)
        config = _config(trt, builder, build, profile)
        cache_state = _attach_timing_cache(config, cache)
        engine = _serialize(trt, builder, network, config, logger, source.path.name)
        # [api10/11] get_timing_cache() -> ITimingCache; serialize() -> IHostMemory
        atomic_write_bytes(cache, bytes(config.get_timing_cache().serialize()))
    seconds = time.perf_counter() - started
    return engine, {
        "tensorrt": trt.__version__, "plan_version": plan_header_version(engine), "gpu": gpu,
        "compute_capability": capability, "platform": host_platform(),
        "profile": profile.as_dict(), "workspace_bytes": build.workspace_mib * MIB,
        "tf32": build.tf32, "strongly_typed": True, "build_seconds": round(seconds, 3),
        "built_with": f"TensorRT {trt.__version__} Python API",
        "timing_cache": {"file": cache.name, "state": cache_state},
        "builder_warnings": logger.warnings()[-20:]}
