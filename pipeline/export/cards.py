"""Model cards: what a shipped file is, where it came from, and the hash that ties the two.

Every shipped file gets a card beside it (pipeline.artifacts.card_path): `teacher.fp32.onnx` ->
`teacher.fp32.card.json`; the card also hashes the files that belong to it (an OpenVINO IR's
.bin, ONNX external data). In ONNX files the same card, minus the fields that depend on the
file's own bytes (file, sha256, size_bytes, sidecars, metrics), is embedded in metadata_props
under `prune_deploy.card`, so a file separated from its card still says what it is.
`verified_card` refuses any shipped file whose bytes (or a sidecar's) do not hash to its card;
`load_verified_onnx` also refuses an ONNX file whose embedded card disagrees with the card file,
or that is not ONNX.

Engines (`teacher.fp16.tensorrt.engine`) get an engine card (`teacher.fp16.tensorrt.card.json`):
how and where the engine was built (TensorRT version, GPU and compute capability, platform,
optimisation profile, workspace, source ONNX sha256, build time) plus what it computes, copied
from its source ONNX card. `load_verified_engine` refuses bytes that do not hash to the card's
engine_sha256; whether the engine fits a runtime is checked by targets/engines.py.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import onnx

from pipeline.artifacts import card_path, sidecar_files
from pipeline.errors import ArtifactIntegrityError, CheckpointError
from pipeline.export.onnx_export import (
    BATCH_DIM,
    INPUT_NAME,
    OUTPUT_NAME,
    confined_file,
    external_data_locations,
)
from pipeline.io import file_sha256, write_json

if TYPE_CHECKING:  # pipeline.checkpoint imports torch, which a skipped stage does not need
    from pipeline.checkpoint import LoadedModel

CARD_FORMAT = "prune-deploy/card/1"
CARD_KEY = "prune_deploy.card"  # metadata_props key of the embedded card
FILE_FIELDS = ("file", "sha256", "size_bytes", "sidecars", "metrics")  # only in the .card.json
REQUIRED_META = ("classes", "mean", "std", "input_shape", "dataset", "params", "macs", "top1")
TOOL_PACKAGES = ("torch", "onnx", "onnxruntime", "onnxscript", "onnxsim", "onnxslim")


@dataclass(frozen=True)
class VerifiedOnnx:
    model: onnx.ModelProto  # parsed and passed onnx.checker
    card: dict[str, Any]  # the .card.json, whose sha256 matches the file


def provenance(tools: tuple[str, ...] = TOOL_PACKAGES) -> dict[str, Any]:
    """Git revision and versions of `tools`; runs `git`, so call it once per stage, not per
    file."""
    from pipeline.provenance import git_revision, package_versions

    return {"git_revision": git_revision(), "tools": package_versions(tools)}


def describe_source(loaded: "LoadedModel", model_path: str | os.PathLike,
                    model_name: str) -> dict[str, Any]:
    """The card fields every file exported from one model file shares."""
    meta, spec = loaded.meta, loaded.spec
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise CheckpointError(f"{model_path}: model metadata lacks {missing}; a model card needs "
                              f"{list(REQUIRED_META)} (written by the training stages)")
    input_shape = [int(v) for v in meta["input_shape"]]
    return {
        "model": model_name,
        "source_model": {"path": str(model_path), "sha256": file_sha256(model_path)},
        "architecture": {k: v for k, v in spec.items() if k != "pruning"},
        "pruned": "pruning" in spec,
        "pruning": meta.get("pruning"),  # the slimming stage's summary; None when unpruned
        "input": {"name": INPUT_NAME, "shape": [BATCH_DIM, *input_shape], "dtype": "float32",
                  "layout": "NCHW, RGB",
                  "preprocessing": "(uint8 pixels / 255 - mean) / std, per channel"},
        "output": {"name": OUTPUT_NAME, "shape": [BATCH_DIM, len(meta["classes"])],
                   "dtype": "float32", "meaning": "logits (softmax gives probabilities)"},
        "mean": list(meta["mean"]),
        "std": list(meta["std"]),
        "classes": list(meta["classes"]),
        "dataset": meta["dataset"],
        "params": meta["params"],
        "macs": meta["macs"],
        "checkpoint_top1": meta["top1"],
    }


def make_card(source: dict[str, Any], precision: str, opset: int | None, export: dict[str, Any],
              provenance_record: dict[str, Any]) -> dict[str, Any]:
    """A card for one file (without its hash: write_card adds that once the file exists);
    `opset` is the ONNX opset the file is or was converted from (None: not from ONNX)."""
    return {"format": CARD_FORMAT, **source, "precision": precision, "opset": opset,
            "export": export, "provenance": provenance_record}


def _embeddable(card: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in card.items() if k not in FILE_FIELDS}


def embed_card(proto: onnx.ModelProto, card: dict[str, Any]) -> None:
    """Put the card (without file-dependent fields) into the model's metadata_props."""
    text = json.dumps(_embeddable(card), sort_keys=True)
    kept = [p for p in proto.metadata_props if p.key != CARD_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=CARD_KEY, value=text)


def embedded_card(proto: onnx.ModelProto) -> dict[str, Any] | None:
    for prop in proto.metadata_props:
        if prop.key == CARD_KEY:
            try:
                return json.loads(prop.value)
            except json.JSONDecodeError as err:
                raise ArtifactIntegrityError(f"metadata_props[{CARD_KEY!r}] is not JSON "
                                             f"({err})") from err
    return None


def write_card(artifact: str | os.PathLike, card: dict[str, Any],
               metrics: dict[str, Any] | None = None) -> Path:
    """Write `<artifact>.card.json` with the name, size and sha256 of the file and of each
    file that belongs to it (atomically)."""
    artifact = Path(artifact)
    sidecars = [{"file": path.name, "sha256": file_sha256(path),
                 "size_bytes": path.stat().st_size} for path in sidecar_files(artifact)]
    full = {**card, "file": artifact.name, "sha256": file_sha256(artifact),
            "size_bytes": artifact.stat().st_size, "sidecars": sidecars,
            "metrics": metrics or {}}
    path = card_path(artifact)
    write_json(path, full)
    return path


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactIntegrityError(f"{path}: model card not found; every shipped file needs "
                                     "its card beside it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactIntegrityError(f"{path}: unreadable model card ({err})") from err
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT or "sha256" not in card:
        raise ArtifactIntegrityError(f"{path}: not a {CARD_FORMAT} card with a sha256")
    return card


def read_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse and check a single-file ONNX model; a truncated or garbage file, or one that keeps
    weights in other files (which no card's hash covers), is an ArtifactIntegrityError."""
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as err:
        raise ArtifactIntegrityError(f"{path}: not a valid ONNX model "
                                     f"({type(err).__name__}: {err})") from err
    external = external_data_locations(model)
    if external:
        tensor, location = external[0]
        raise ArtifactIntegrityError(f"{path}: tensor {tensor!r} keeps its data in {location!r}; "
                                     "a shipped file holds all its weights, so that its card's "
                                     "sha256 covers them")
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, RuntimeWarning, ValueError) as err:
        raise ArtifactIntegrityError(f"{path}: not a valid ONNX model "
                                     f"({type(err).__name__}: {err})") from err
    return model


def _check_hash(path: Path, expected: str, card: Path) -> None:
    if not path.is_file():
        raise ArtifactIntegrityError(f"{path}: file not found (its card {card} exists)")
    digest = file_sha256(path)
    if digest != expected:
        raise ArtifactIntegrityError(f"{path}: sha256 {digest} does not match its card's "
                                     f"{expected}; the file was changed or truncated")


def verified_card(path: str | os.PathLike) -> dict[str, Any]:
    """The card of a shipped file, after checking the file's and its sidecars' hashes."""
    path = Path(path)
    card = read_card(card_path(path))
    _check_hash(path, card["sha256"], card_path(path))
    for sidecar in card.get("sidecars", []):  # the card is input too: its names are confined
        name = sidecar.get("file") if isinstance(sidecar, dict) else None
        plain = isinstance(name, str) and name not in ("", ".", "..") \
            and PurePosixPath(name).name == name
        file = path.parent / name if plain and not os.path.lexists(path.parent / name) else \
            confined_file(path, name, f"{card_path(path)}: sidecar {name!r}, which", "a sidecar")
        _check_hash(file, sidecar["sha256"], card_path(path))  # a missing one: "not found"
    return card


def load_verified_onnx(path: str | os.PathLike) -> VerifiedOnnx:
    """The model and its card, after checking hash, embedded card and ONNX validity."""
    path = Path(path)
    card = verified_card(path)
    model = read_onnx(path)
    if embedded_card(model) != _embeddable(card):
        raise ArtifactIntegrityError(f"{path}: the card embedded in metadata_props differs from "
                                     f"{card_path(path).name}")
    return VerifiedOnnx(model, card)


# ------------------------------------------------------------------------------------ engines
ENGINE_CARD_FORMAT = "prune-deploy/engine-card/1"
# What an engine computes is its source ONNX file's: these fields are copied from that card.
INHERITED = ("model", "input", "output", "mean", "std", "classes", "dataset", "pruned", "params",
             "macs")
# What every engine card records about the build (targets/engines.py fills them).
ENGINE_FACTS = ("target", "precision", "tensorrt", "gpu", "compute_capability", "platform",
                "profile", "workspace_bytes", "tf32", "source_onnx", "source_onnx_sha256",
                "build_seconds", "built_with")


def make_engine_card(source_card: dict[str, Any] | None, facts: dict[str, Any]) -> dict[str, Any]:
    """An engine's card without its own hash (write_engine_card adds it): the build facts and,
    when the source ONNX file has a card, what the engine computes (inputs, mean/std, classes)."""
    missing = [key for key in ENGINE_FACTS if key not in facts]
    if missing:
        raise ArtifactIntegrityError(f"engine card facts lack {missing}; expected "
                                     f"{list(ENGINE_FACTS)}")
    inherited = {key: source_card[key] for key in INHERITED if source_card and key in source_card}
    return {"format": ENGINE_CARD_FORMAT, **inherited, **facts,
            "source_card": dict(source_card) if source_card else None}


def write_engine_card(engine: str | os.PathLike, card: dict[str, Any]) -> Path:
    """Write `<engine stem>.card.json` with the engine's name, size and sha256 (atomically)."""
    engine = Path(engine)
    full = {**card, "file": engine.name, "engine_sha256": file_sha256(engine),
            "size_bytes": engine.stat().st_size}
    path = card_path(engine)
    write_json(path, full)
    return path


def read_engine_card(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactIntegrityError(f"{path}: engine card not found; an engine is loaded only "
                                     "with the card its build wrote beside it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactIntegrityError(f"{path}: unreadable engine card ({err})") from err
    if not isinstance(card, dict) or card.get("format") != ENGINE_CARD_FORMAT:
        raise ArtifactIntegrityError(f"{path}: not a {ENGINE_CARD_FORMAT} card")
    missing = [key for key in (*ENGINE_FACTS, "engine_sha256") if key not in card]
    if missing:
        raise ArtifactIntegrityError(f"{path}: engine card lacks {missing}")
    return card


def load_verified_engine(path: str | os.PathLike) -> tuple[bytes, dict[str, Any]]:
    """The engine's bytes and its card, after checking that the bytes hash to the card's
    engine_sha256 (whether the engine fits this machine is the runtime's check)."""
    path = Path(path)
    card = read_engine_card(card_path(path))
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactIntegrityError(f"{path}: engine not found (its card {card_path(path)} "
                                     "exists)") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != card["engine_sha256"]:
        raise ArtifactIntegrityError(f"{path}: sha256 {digest} does not match its card's "
                                     f"engine_sha256 {card['engine_sha256']}; the engine was "
                                     "changed or truncated: rebuild it")
    return data, card
