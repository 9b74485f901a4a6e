"""Names of the files the pipeline ships, built in one place.

    artifacts/<model>.<precision>.onnx                 ONNX (fp32: the simplified export)
    artifacts/<model>.<precision>.<target>.engine      an engine built for one target
    <artifact stem>.card.json                          the model card beside each of them

`<model>` is a reference model (benchmark.models: teacher, student_dense) or a pruning method's
student, `student_final_<method>` (no dots); `<precision>` one of PRECISIONS.
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


REFERENCE_MODELS = ("teacher", "student_dense")  # the unpruned models every method is compared to


def final_model(method: str) -> str:
    """The model a pruning method ships: `student_final_<method>` (stage student_final@<method>)."""
    return f"student_final_{method}"

