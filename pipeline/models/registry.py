"""Name -> constructor registry, so specs stay plain data and new families plug in by name."""

from collections.abc import Callable
from typing import Any

from torch import nn

from pipeline.errors import ModelError

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a constructor under `name`; constructors take keyword settings only."""

    def add(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in ARCHITECTURES:
            raise ModelError(f"architecture {name!r} registered twice")
        ARCHITECTURES[name] = constructor
        return constructor

    return add


def known_architectures() -> tuple[str, ...]:
    # Importing the families here fills the registry without import cycles.
    from pipeline.models import resnet_cifar, vgg_cifar  # noqa: F401

    return tuple(sorted(ARCHITECTURES))


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Build a fresh model from a spec: {"arch": name, **constructor settings}."""
    known_architectures()
    if "arch" not in spec:
        raise ModelError(f"model spec has no 'arch' key: {spec!r}")
    settings = {k: v for k, v in spec.items() if k != "arch"}
    name = spec["arch"]
    if name not in ARCHITECTURES:
        known = ", ".join(known_architectures())
        raise ModelError(f"unknown architecture {name!r}; known: {known}")
    try:
        return ARCHITECTURES[name](**settings)
    except TypeError as err:
        raise ModelError(f"bad settings for architecture {name!r}: {err}") from err
