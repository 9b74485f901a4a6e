"""Names of the files the pipeline ships, built in one place.

    artifacts/<model>.<precision>.onnx                 ONNX (fp32: the simplified export)
    artifacts/<model>.<precision>.<target>.engine      an engine built for one target
    <artifact stem>.card.json                          the model card beside each of them

`<model>` is a name from benchmark.models (no dots), `<precision>` one of PRECISIONS.
"""

import os
from pathlib import Path

PRECISIONS = ("fp32", "fp16", "int8")


def artifact_path(folder: str | os.PathLike, model: str, precision: str,
                  target: str | None = None) -> Path:
    """artifacts/<model>.<precision>.onnx, or .<target>.engine for an engine."""
    if "." in model or not model:
        raise ValueError(f"model name {model!r} must be non-empty and contain no dot")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} unknown; expected one of {PRECISIONS}")
    name = f"{model}.{precision}.{target}.engine" if target else f"{model}.{precision}.onnx"
    return Path(folder) / name


def card_path(artifact: str | os.PathLike) -> Path:
    """The card beside a shipped file: `teacher.int8.onnx` -> `teacher.int8.card.json`."""
    return Path(artifact).with_suffix(".card.json")


def precision_of(path: str | os.PathLike) -> str:
    """The precision in a file's name (`m.fp16.onnx` -> fp16); fp32 when the name has none."""
    found = [part for part in Path(path).name.split(".")[1:] if part in PRECISIONS]
    return found[-1] if found else "fp32"
