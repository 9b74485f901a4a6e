"""Names of shipped files: one function builds them, one reads the precision back."""

from pathlib import Path

import pytest

from pipeline.artifacts import artifact_path, card_path, final_model, precision_of


def test_onnx_engine_and_card_names():
    onnx = artifact_path("artifacts", "teacher", "int8")
    assert onnx == Path("artifacts/teacher.int8.onnx")
    assert card_path(onnx) == Path("artifacts/teacher.int8.card.json")
    engine = artifact_path("artifacts", "student_final_pdd", "fp16", target="ssh-tensorrt")
    assert engine == Path("artifacts/student_final_pdd.fp16.ssh-tensorrt.engine")
    assert card_path(engine) == Path("artifacts/student_final_pdd.fp16.ssh-tensorrt.card.json")


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


def test_a_methods_model_name():
    assert final_model("netslim") == "student_final_netslim"
    assert artifact_path(".", final_model("prune_then_kd"), "int8").name == \
        "student_final_prune_then_kd.int8.onnx"
