"""Names of shipped files: one function builds them, one reads the precision back."""

from pathlib import Path

import pytest

from pipeline.artifacts import (
    artifact_path,
    card_path,
    engine_folder,
    model_of,
    precision_of,
    timing_cache_path,
)


def test_onnx_engine_and_card_names():
    onnx = artifact_path("artifacts", "teacher", "int8")
    assert onnx == Path("artifacts/teacher.int8.onnx")
    assert card_path(onnx) == Path("artifacts/teacher.int8.card.json")
    engine = artifact_path("artifacts", "student_final", "fp16", target="ssh-tensorrt")
    assert engine == Path("artifacts/student_final.fp16.ssh-tensorrt.engine")
    assert card_path(engine) == Path("artifacts/student_final.fp16.ssh-tensorrt.card.json")


@pytest.mark.parametrize(("model", "precision", "message"), [
    ("a.b", "fp32", "no dot"), ("", "fp32", "non-empty"), ("m", "bf16", "precision 'bf16'")])
def test_bad_names_are_refused(model, precision, message):
    with pytest.raises(ValueError, match=message):
        artifact_path("artifacts", model, precision)


def test_precision_from_a_file_name():
    assert precision_of("a/m.int8.onnx") == "int8"
    assert precision_of("m.fp16.ssh-tensorrt.engine") == "fp16"
    assert precision_of("m.onnx") == precision_of("model.pt") == "fp32"
    assert all(precision_of(artifact_path(".", "m", p)) == p for p in ("fp32", "fp16", "int8"))


def test_flavored_onnx_keeps_its_precision_and_card():
    trt = artifact_path("artifacts", "teacher", "int8", flavor="trt")
    assert trt == Path("artifacts/teacher.int8.trt.onnx")
    assert precision_of(trt) == "int8" and model_of(trt) == "teacher"
    assert card_path(trt) == Path("artifacts/teacher.int8.trt.card.json")
    assert card_path(trt) != card_path(artifact_path("artifacts", "teacher", "int8"))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"flavor": "a.b"}, "flavor 'a.b' must"), ({"flavor": ""}, "non-empty"),
    ({"flavor": "fp16"}, "read as a precision"), ({"target": "x/y"}, "slash"),
    ({"flavor": "trt", "target": "tensorrt"}, "not both")])
def test_bad_flavors_and_targets_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        artifact_path("artifacts", "m", "int8", **kwargs)


def test_engine_folder_and_timing_cache_sit_beside_the_engines():
    folder = engine_folder("artifacts", "ssh-tensorrt", "fp16")
    assert folder == Path("artifacts/engines/ssh-tensorrt/fp16")
    engine = artifact_path(folder, "teacher", "fp16", target="ssh-tensorrt")
    assert engine.parent == timing_cache_path(folder).parent == folder
    assert timing_cache_path(folder).name == "timing.cache"
    assert precision_of(engine) == "fp16" and model_of(engine) == "teacher"
    with pytest.raises(ValueError, match="precision 'bf16'"):
        engine_folder("artifacts", "tensorrt", "bf16")
