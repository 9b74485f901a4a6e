"""Runtime targets by the name params.yaml uses.

Adding a target is one line in `_CLASSES`: "name": "module:Class". `TARGETS[name]` imports the
module on first use and returns the class, so `import targets` loads no target module (and no
runtime), and a broken optional target cannot stop the others from loading.
"""

from collections.abc import Iterator, Mapping
from importlib import import_module

_CLASSES: dict[str, str] = {
    "onnxruntime-cpu": "targets.onnxruntime_cpu:OnnxRuntimeCpuTarget",
    "torch-cpu": "targets.torch_eager:TorchCpuTarget",
    "torch-cuda": "targets.torch_cuda:TorchCudaTarget",
    "torch-cuda-graphs": "targets.torch_cuda:TorchCudaGraphsTarget",
    "ssh-onnxruntime": "targets.ssh:SshOnnxRuntimeTarget",
    "ssh-tensorrt": "targets.ssh:SshTensorRtTarget",
}


class _LazyTargets(Mapping):
    """A read-only dict name -> Target subclass that imports each class when first asked for."""

    def __init__(self, locations: dict[str, str]) -> None:
        self._locations = locations

    def __getitem__(self, name: str) -> type:
        module_name, class_name = self._locations[name].split(":")
        return getattr(import_module(module_name), class_name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._locations)

    def __len__(self) -> int:
        return len(self._locations)


TARGETS: Mapping[str, type] = _LazyTargets(_CLASSES)
