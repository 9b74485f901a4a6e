"""Names of shipped files: one function builds them, one reads the precision back."""

from pathlib import Path

import pytest

from pipeline.artifacts import (
    artifact_path,
    card_path,
    engine_folder,
    final_model,
    model_folder,
    model_of,
    precision_of,
    sidecar_files,
    timing_cache_path,
)


def test_onnx_engine_and_card_names():
    onnx = artifact_path("artifacts", "teacher", "int8")
    assert onnx == Path("artifacts/teacher.int8.onnx")
    assert card_path(onnx) == Path("artifacts/teacher.int8.card.json")
    engine = artifact_path("artifacts", "student_final_pdd", "fp16", target="ssh-tensorrt")
    assert engine == Path("artifacts/student_final_pdd.fp16.ssh-tensorrt.engine")
    assert card_path(engine) == Path("artifacts/student_final_pdd.fp16.ssh-tensorrt.card.json")


def test_openvino_and_executorch_names_live_in_one_folder_per_model():
    ir = artifact_path("artifacts", "teacher", "fp32", fmt="openvino")
    assert ir == Path("artifacts/openvino/teacher/teacher.fp32.xml")
    assert card_path(ir) == Path("artifacts/openvino/teacher/teacher.fp32.card.json")
    assert ir.parent == model_folder("artifacts", "teacher", "openvino")
    pte = artifact_path("artifacts", "student_final", "int8", fmt="executorch", batch=64)
    assert pte == Path("artifacts/executorch/student_final/student_final.int8.b64.pte")
    assert card_path(pte).name == "student_final.int8.b64.card.json"
    assert model_folder("artifacts", "teacher", "onnx") == Path("artifacts")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"fmt": "executorch"}, "executorch files need batch size"),
    ({"fmt": "openvino", "batch": 1}, "openvino files take no batch size"),
    ({"fmt": "executorch", "batch": 0}, "batch size must be >= 1"),
    ({"fmt": "tflite"}, "file format 'tflite' unknown"),
])
def test_batch_sizes_only_where_the_format_fixes_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        artifact_path("artifacts", "teacher", "fp32", **kwargs)


@pytest.mark.parametrize(("model", "precision", "message"), [
    ("a.b", "fp32", "no dot"), ("", "fp32", "non-empty"), ("a/b", "fp32", "slash"),
    ("m", "int4", "precision 'int4'")])
def test_bad_names_are_refused(model, precision, message):
    with pytest.raises(ValueError, match=message):
        artifact_path("artifacts", model, precision)


def test_precision_from_a_file_name():
    assert precision_of("a/m.int8.onnx") == "int8"
    assert precision_of("m.fp16.ssh-tensorrt.engine") == "fp16"
    assert precision_of("m.onnx") == precision_of("model.pt") == "fp32"


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
    with pytest.raises(ValueError, match="precision 'fp8'"):
        engine_folder("artifacts", "tensorrt", "fp8")
    assert precision_of("m.int8.b64.pte") == "int8"
    assert all(precision_of(artifact_path(".", "m", p)) == p
               for p in ("fp32", "fp16", "bf16", "int8"))


def test_sidecars_are_the_files_that_exist_beside_the_main_one(tmp_path):
    ir = tmp_path / "m.fp32.xml"
    onnx = tmp_path / "m.fp32.onnx"
    for path in (ir, onnx, tmp_path / "m.fp32.bin"):
        path.write_text("x")
    assert sidecar_files(ir) == [tmp_path / "m.fp32.bin"]
    assert sidecar_files(onnx) == []  # no external data written
    (tmp_path / "m.fp32.onnx.data").write_text("x")
    assert sidecar_files(onnx) == [tmp_path / "m.fp32.onnx.data"]


def test_a_methods_model_name():
    assert final_model("netslim") == "student_final_netslim"
    assert artifact_path(".", final_model("prune_then_kd"), "int8").name == \
        "student_final_prune_then_kd.int8.onnx"
