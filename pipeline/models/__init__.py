"""Model zoo: architectures are built from a plain-data spec, never unpickled.

A spec is a dict of JSON-able values, e.g. {"arch": "resnet20", "num_classes": 10}. It is saved
beside the weights so that `build_model(spec)` followed by `load_state_dict` restores a model
from a `weights_only=True` checkpoint.
"""

from pipeline.models.registry import ARCHITECTURES, build_model, known_architectures, register

__all__ = ["ARCHITECTURES", "build_model", "known_architectures", "register"]
