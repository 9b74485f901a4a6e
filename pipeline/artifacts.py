"""Names of the files the pipeline ships, built in one place.

    artifacts/<model>.<precision>.onnx                 ONNX (fp32: the simplified export)
    artifacts/<model>.<precision>.<flavor>.onnx        the same precision made for one runtime
                                                       (int8.trt: INT8 Q/DQ that TensorRT takes)
    artifacts/engines/<target>/<precision>/            what one engine stage writes:
        <model>.<precision>.<target>.engine              an engine built for one target
        timing.cache                                     TensorRT's timing cache, reused by rebuilds
    <artifact stem>.card.json                          the card beside each shipped file

`<model>` is a name from benchmark.models (no dots), `<precision>` one of PRECISIONS.
"""

import os
from pathlib import Path

PRECISIONS = ("fp32", "fp16", "int8")
# TensorRT's ONNX parser takes only symmetric signed INT8 Q/DQ with float biases; ONNX
# Runtime's fast CPU file (U8S8, int32 biases) is refused, so INT8 ships a second file for it.
TENSORRT_FLAVOR = "trt"
ENGINES = "engines"  # sub-folder of the artifacts folder that holds the engine stages' outputs
TIMING_CACHE = "timing.cache"


def _check_name(what: str, value: str) -> None:
    if not value or "." in value or "/" in value:
        raise ValueError(f"{what} {value!r} must be non-empty and contain no dot or slash")


def artifact_path(folder: str | os.PathLike, model: str, precision: str,
                  target: str | None = None, flavor: str | None = None) -> Path:
    """artifacts/<model>.<precision>.onnx; .<flavor>.onnx for a runtime-specific ONNX file;
    .<target>.engine for an engine (engines have no flavor: the target says what they are)."""
    _check_name("model name", model)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} unknown; expected one of {PRECISIONS}")
    if target is not None and flavor is not None:
        raise ValueError("an engine is named by its target; give target or flavor, not both")
    if flavor is not None:
        _check_name("flavor", flavor)
        if flavor in PRECISIONS:
            raise ValueError(f"flavor {flavor!r} would read as a precision")
        return Path(folder) / f"{model}.{precision}.{flavor}.onnx"
    if target is not None:
        _check_name("target name", target)
        return Path(folder) / f"{model}.{precision}.{target}.engine"
    return Path(folder) / f"{model}.{precision}.onnx"


def engine_folder(artifacts: str | os.PathLike, target: str, precision: str) -> Path:
    """The folder one engine stage (target x precision) owns: artifacts/engines/<t>/<p>."""
    _check_name("target name", target)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} unknown; expected one of {PRECISIONS}")
    return Path(artifacts) / ENGINES / target / precision


def timing_cache_path(folder: str | os.PathLike) -> Path:
    """TensorRT's timing cache, kept beside the engines it helped build, so a rebuild on the
    same GPU and TensorRT version reuses the measured tactics (faster and stable)."""
    return Path(folder) / TIMING_CACHE


def card_path(artifact: str | os.PathLike) -> Path:
    """The card beside a shipped file: `teacher.int8.onnx` -> `teacher.int8.card.json`."""
    return Path(artifact).with_suffix(".card.json")


def precision_of(path: str | os.PathLike) -> str:
    """The precision in a file's name (`m.fp16.onnx` -> fp16); fp32 when the name has none."""
    found = [part for part in Path(path).name.split(".")[1:] if part in PRECISIONS]
    return found[-1] if found else "fp32"


def model_of(path: str | os.PathLike) -> str:
    """The model in a shipped file's name: `teacher.int8.trt.onnx` -> teacher."""
    return Path(path).name.split(".")[0]
