"""Runtime targets by the name params.yaml uses, and the one way to construct one.

Adding a target is one line in `_CLASSES` ("name": "module:Class"). A class is imported only when
its target is asked for, so looking a name up loads no runtime, and a broken optional target
cannot stop the others. `make_target` validates the target's settings (its section under
`runtimes` in params.yaml, schema `Target.Settings`) and constructs it; the benchmark stage,
the params validation and the `prune-deploy` CLI all build targets through it.
"""

from importlib import import_module
from typing import Any

from pipeline.config import SectionError, validate
from pipeline.errors import ConfigError
from targets.base import Target

_CLASSES: dict[str, str] = {
    "onnxruntime-cpu": "targets.onnxruntime_cpu:OnnxRuntimeCpuTarget",
    "torch-cpu": "targets.torch_eager:TorchCpuTarget",
    "torch-cuda": "targets.torch_cuda:TorchCudaTarget",
    "torch-cuda-graphs": "targets.torch_cuda:TorchCudaGraphsTarget",
    "openvino-cpu": "targets.openvino_cpu:OpenVinoCpuTarget",
    "executorch-xnnpack": "targets.executorch_xnnpack:ExecuTorchXnnpackTarget",
    "ssh-onnxruntime": "targets.ssh:SshOnnxRuntimeTarget",
    "ssh-tensorrt": "targets.ssh:SshTensorRtTarget",
    "tensorrt": "targets.tensorrt:TensorRtTarget",
}


def target_names() -> tuple[str, ...]:
    return tuple(_CLASSES)


def _location(name: str) -> tuple[str, str]:
    if name not in _CLASSES:
        raise ConfigError(f"unknown target {name!r}; known: {', '.join(_CLASSES)}")
    module, cls = _CLASSES[name].split(":")
    return module, cls


def target_module(name: str) -> str:
    """The module that implements target `name` (imported only when the target is used)."""
    return _location(name)[0]


def target_class(name: str) -> type[Target]:
    module, cls = _location(name)
    return getattr(import_module(module), cls)


def target_settings(name: str, data: Any) -> Any:
    """`data` (plain mapping or the settings object) validated against the target's schema."""
    cls = target_class(name)
    if isinstance(data, cls.Settings):
        return data
    try:
        return validate(cls.Settings, data, f"runtimes.{cls.settings_key}")
    except SectionError as err:
        raise ConfigError(f"settings of target {name!r}: {err}") from None


def make_target(name: str, settings: Any) -> Target:
    """Target `name`, constructed with its validated settings."""
    return target_class(name)(target_settings(name, settings))
