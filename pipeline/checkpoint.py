"""Model files: architecture spec + weights + metadata, loadable with `weights_only=True`.

No pickled classes: a file holds plain data and tensors only. The spec rebuilds the module
(`build_model`), and for a slimmed model its `pruning` entry replays the channel removal on the
fresh model before the weights are loaded, so the file alone restores the exact network.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import CheckpointError, PipelineError
from pipeline.io import atomic_output
from pipeline.models import build_model

FORMAT = "prune-deploy/model/1"


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module  # in eval mode, on the requested device
    spec: dict[str, Any]  # how to rebuild it (arch, settings, pruning history)
    meta: dict[str, Any]  # provenance: dataset, classes, mean/std, metrics, ...


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through pipeline.io.atomic_output: readers never see a half-written file."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def save_model(path: str | os.PathLike, model: nn.Module, spec: dict[str, Any],
               meta: dict[str, Any]) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save({"format": FORMAT, "spec": spec, "state_dict": state, "meta": meta}, path)


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """A fresh model for `spec`, with the recorded pruning (if any) replayed on it."""
    spec = dict(spec)
    pruning = spec.pop("pruning", None)
    model = build_model(spec)
    if pruning is not None:
        from pipeline.prune.slimming import (
            apply_pruning_spec,  # the slimming module owns the replay
        )

        model = apply_pruning_spec(model, pruning)
    return model


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt files
        raise CheckpointError(
            f"{path}: not a readable model file ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    return payload


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    payload = read_checkpoint(path)
    try:
        model = build_from_spec(payload["spec"])
        model.load_state_dict(payload["state_dict"])
    except PipelineError:
        raise
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(
            f"{path}: weights do not fit the spec {payload['spec']}: {err}") from err
    return LoadedModel(model.to(device).eval(), payload["spec"], payload["meta"])
