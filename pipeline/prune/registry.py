"""The pruning methods by name. Each lives in its own module (pipeline/prune/<name>.py) with a
`Method` class implementing `pipeline.prune.method.PruneMethod`; it is imported by name when a
stage runs it, so a stage's code closure holds no method it does not run (the validate_params
stage records each method's code hash in resolved/methods/<name>.code for the dvc deps).
"""

import importlib
from typing import Any

from pipeline.config import METHOD_NAMES
from pipeline.errors import ConfigError

PACKAGE = "pipeline.prune"


def method_module(name: str) -> str:
    """The module that implements method `name`, e.g. pipeline.prune.netslim."""
    if name not in METHOD_NAMES:
        raise ConfigError(f"unknown pruning method {name!r}; known: {', '.join(METHOD_NAMES)}")
    return f"{PACKAGE}.{name}"


def make_method(name: str, settings: Any):
    """An instance of method `name` with its validated settings section."""
    module = importlib.import_module(method_module(name))
    method = module.Method(settings)
    assert method.name == name, (method.name, name)
    return method
