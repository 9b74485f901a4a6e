"""Names of the files the pipeline ships, built in one place.

    artifacts/<model>.<precision>.onnx                        ONNX (fp32: the simplified export)
    artifacts/<model>.<precision>.<flavor>.onnx               the same precision made for one
                                                              runtime (int8.trt: INT8 Q/DQ that
                                                              TensorRT takes)
    artifacts/openvino/<model>/<model>.<precision>.xml        OpenVINO IR (+ its .bin weights)
    artifacts/executorch/<model>/<model>.<precision>.b<batch>.pte
                                                              ExecuTorch program (XNNPACK), one
                                                              per batch size: its batch is fixed
    engines/<target>/<precision>/                             what one engine stage writes:
        <model>.<precision>.<target>.engine                     an engine built for one target
        timing.cache                                            TensorRT's timing cache, reused
                                                                by rebuilds
    <artifact stem>.card.json                                 the card beside each shipped file

`<model>` is a reference model (benchmark.models: teacher, student_dense) or a pruning method's
student, `student_final_<method>` (no dots); `<precision>` one of PRECISIONS. The OpenVINO and
ExecuTorch files live in one folder per model because each folder is one DVC output of the
stage that writes it (an empty one when the runtime is not installed).
"""

import os
from dataclasses import dataclass
from pathlib import Path

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# TensorRT's ONNX parser takes only symmetric signed INT8 Q/DQ with float biases; ONNX
# Runtime's fast CPU file (U8S8, int32 biases) is refused, so INT8 ships a second file for it.
TENSORRT_FLAVOR = "trt"
ENGINES = "engines"  # the folder (beside artifacts/) that holds the engine stages' outputs
TIMING_CACHE = "timing.cache"


@dataclass(frozen=True)
class FileFormat:
    folder: str  # sub-folder of the artifacts folder, one per model inside it ("" = none)
    suffix: str  # how the main file's name ends
    sidecars: tuple[str, ...] = ()  # suffixes of files that belong to the main file
    per_batch: bool = False  # one file per batch size (the batch is fixed in the file)


# format -> how its files are named; `Target.source` names one of these (or "checkpoint")
FORMATS = {
    "onnx": FileFormat("", ".onnx", sidecars=(".onnx.data",)),
    "openvino": FileFormat("openvino", ".xml", sidecars=(".bin",)),
    "executorch": FileFormat("executorch", ".pte", per_batch=True),
}


def _check_name(what: str, value: str) -> None:
    if not value or "." in value or "/" in value:
        raise ValueError(f"{what} {value!r} must be non-empty and contain no dot or slash")


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} unknown; expected one of {PRECISIONS}")


def model_folder(folder: str | os.PathLike, model: str, fmt: str) -> Path:
    """The folder a format's files of one model are written to (the stage's DVC output)."""
    if fmt not in FORMATS:
        raise ValueError(f"file format {fmt!r} unknown; expected one of {list(FORMATS)}")
    sub = FORMATS[fmt].folder
    return Path(folder) / sub / model if sub else Path(folder)


def artifact_path(folder: str | os.PathLike, model: str, precision: str,
                  target: str | None = None, flavor: str | None = None, *, fmt: str = "onnx",
                  batch: int | None = None) -> Path:
    """The shipped file of `model` at `precision` in format `fmt` (see the module docstring):
    `.<flavor>.onnx` for a runtime-specific ONNX file, `.<target>.engine` for an engine
    (engines have no flavor: the target says what they are); `batch` is required exactly for
    formats whose files have a fixed batch."""
    _check_name("model name", model)
    _check_precision(precision)
    if target is not None and flavor is not None:
        raise ValueError("an engine is named by its target; give target or flavor, not both")
    if target is not None:
        _check_name("target name", target)
        return Path(folder) / f"{model}.{precision}.{target}.engine"
    if flavor is not None:
        _check_name("flavor", flavor)
        if flavor in PRECISIONS:
            raise ValueError(f"flavor {flavor!r} would read as a precision")
        if fmt != "onnx":
            raise ValueError(f"flavors name ONNX files, not {fmt} files")
        return Path(folder) / f"{model}.{precision}.{flavor}.onnx"
    per_batch = FORMATS[fmt].per_batch if fmt in FORMATS else False
    if per_batch != (batch is not None):
        raise ValueError(f"{fmt} files {'need' if per_batch else 'take no'} batch size "
                         f"(got {batch!r})")
    if batch is not None and batch < 1:
        raise ValueError(f"batch size must be >= 1, got {batch}")
    tag = f".b{batch}" if batch is not None else ""
    return model_folder(folder, model, fmt) / f"{model}.{precision}{tag}{FORMATS[fmt].suffix}"


def engine_folder(root: str | os.PathLike, target: str, precision: str) -> Path:
    """The folder one engine stage (target x precision) owns: <root>/engines/<t>/<p>. It is
    not under artifacts/, because the engine stages read that folder."""
    _check_name("target name", target)
    _check_precision(precision)
    return Path(root) / ENGINES / target / precision


def timing_cache_path(folder: str | os.PathLike) -> Path:
    """TensorRT's timing cache, kept beside the engines it helped build, so a rebuild on the
    same GPU and TensorRT version reuses the measured tactics (faster and stable)."""
    return Path(folder) / TIMING_CACHE


def card_path(artifact: str | os.PathLike) -> Path:
    """The card beside a shipped file: `teacher.int8.onnx` -> `teacher.int8.card.json`."""
    return Path(artifact).with_suffix(".card.json")


def sidecar_files(artifact: str | os.PathLike) -> list[Path]:
    """The files that belong to a shipped file and exist beside it (ONNX external data, the
    OpenVINO IR's weights)."""
    artifact = Path(artifact)
    found = []
    for fmt in FORMATS.values():
        if artifact.name.endswith(fmt.suffix):
            stem = artifact.name[:-len(fmt.suffix)]
            found += [artifact.with_name(stem + suffix) for suffix in fmt.sidecars]
    return [path for path in found if path.is_file()]


def precision_of(path: str | os.PathLike) -> str:
    """The precision in a file's name (`m.fp16.onnx` -> fp16); fp32 when the name has none."""
    found = [part for part in Path(path).name.split(".")[1:] if part in PRECISIONS]
    return found[-1] if found else "fp32"


def model_of(path: str | os.PathLike) -> str:
    """The model in a shipped file's name: `teacher.int8.trt.onnx` -> teacher."""
    return Path(path).name.split(".")[0]


REFERENCE_MODELS = ("teacher", "student_dense")  # the unpruned models every method is compared to


def final_model(method: str) -> str:
    """The model a pruning method ships: `student_final_<method>` (stage student_final@<method>)."""
    return f"student_final_{method}"
