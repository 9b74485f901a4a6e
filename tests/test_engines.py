"""Everything around a TensorRT engine that needs no TensorRT: the profile from params, the engine
card, the refusals a runtime applies to a card (TensorRT version, compute capability, platform,
hash), the plan header, and the ONNX checks before a build."""

import json
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from sshd_fixture import tiny_checkpoint, tiny_onnx

from pipeline.config import validate
from pipeline.errors import ArtifactIntegrityError, BuildError, EngineMismatchError
from pipeline.export.cards import (
    CARD_FORMAT,
    ENGINE_CARD_FORMAT,
    embed_card,
    load_verified_engine,
    make_engine_card,
    read_engine_card,
    write_card,
    write_engine_card,
)
from targets.base import TensorSpec
from targets.engines import (
    RuntimeFacts,
    ShapeProfile,
    TensorRtSettings,
    batch_profile,
    check_engine_card,
    engine_card,
    engine_refusals,
    engine_source,
    image_input,
    plan_header_version,
)

SETTINGS = TensorRtSettings(device=0, min_batch=1, opt_batch=16, max_batch=64, workspace_mib=256,
                            tf32=False)
ORIN = RuntimeFacts("10.3.0.30", "8.7", "Orin", "Linux-aarch64")


def card(**overrides) -> dict:
    facts = {"target": "tensorrt", "precision": "fp16", "tensorrt": "10.3.0.30",
             "plan_version": "10.3.0.30", "gpu": "Orin", "compute_capability": "8.7",
             "platform": "Linux-aarch64", "profile": {}, "workspace_bytes": 1 << 28, "tf32": False,
             "source_onnx": "teacher.fp16.onnx", "source_onnx_sha256": "0" * 64,
             "build_seconds": 1.0, "built_with": "test"}
    return {**make_engine_card(None, facts), **overrides}


# --- profile shapes from params ---

def test_profile_takes_the_batch_axis_from_params_and_the_rest_from_the_onnx_file():
    profile = batch_profile(TensorSpec("input", np.dtype(np.float32), ("batch", 3, 32, 32)),
                            SETTINGS)
    assert profile == ShapeProfile("input", (1, 3, 32, 32), (16, 3, 32, 32), (64, 3, 32, 32))
    assert profile.allows((64, 3, 32, 32)) and not profile.allows((65, 3, 32, 32))
    assert not profile.allows((8, 3, 32)) and profile.as_dict()["opt"] == [16, 3, 32, 32]


def test_a_static_input_gets_its_own_shape_and_no_profile():
    profile = batch_profile(TensorSpec("input", np.dtype(np.float32), (4, 3, 32, 32)), SETTINGS)
    assert profile.min == profile.opt == profile.max == (4, 3, 32, 32) and not profile.dynamic


def test_profiles_refuse_other_dynamic_axes_and_several_inputs():
    with pytest.raises(BuildError, match="dynamic axes besides the batch"):
        batch_profile(TensorSpec("input", np.dtype(np.float32), ("b", 3, "h", "w")), SETTINGS)
    specs = tuple(TensorSpec(n, np.dtype(np.float32), ("b", 3)) for n in ("a", "b"))
    with pytest.raises(BuildError, match=r"expected one image input, found \['a', 'b'\]"):
        image_input(specs, Path("m.onnx"))


def test_profile_settings_must_be_in_order():
    values = {"device": 0, "min_batch": 8, "opt_batch": 4, "max_batch": 64, "workspace_mib": 64,
              "tf32": False}
    with pytest.raises(ValueError, match=r"min_batch <= opt_batch <= max_batch, got 8, 4, 64"):
        validate(TensorRtSettings, values, "runtimes.tensorrt")
    with pytest.raises(ValueError, match="workspace_mib"):
        validate(TensorRtSettings, {**values, "min_batch": 1, "workspace_mib": 0},
                 "runtimes.tensorrt")


# --- refusals on card data ---

def test_a_card_that_matches_the_runtime_is_accepted():
    assert engine_refusals(card(), ORIN) == []
    # trtexec prints three parts (10.3.0), the Python module four (10.3.0.30): the same version.
    assert engine_refusals(card(tensorrt="10.3.0", plan_version=None), ORIN) == []


@pytest.mark.parametrize(("overrides", "here", "message"), [
    ({}, RuntimeFacts("10.3.0.26", "8.7", "Orin", "Linux-aarch64"),
     "built with TensorRT 10.3.0.30, this runtime is TensorRT 10.3.0.26"),
    ({"tensorrt": "10.3.0", "plan_version": "10.3.0.30"},
     RuntimeFacts("10.3.0.26", "8.7", "Orin", "Linux-aarch64"),
     "built with TensorRT 10.3.0.30, this runtime is TensorRT 10.3.0.26"),
    ({}, RuntimeFacts("11.1.0.106", "8.7", "Orin", "Linux-aarch64"), "this runtime is TensorRT 11"),
    ({}, RuntimeFacts("10.3.0.30", "8.6", "NVIDIA GeForce RTX 3070", "Linux-aarch64"),
     "built for compute capability 8.7 (Orin), this GPU (NVIDIA GeForce RTX 3070) has 8.6"),
    ({}, RuntimeFacts("10.3.0.30", "8.7", "Orin", "Linux-x86_64"),
     "built on Linux-aarch64, this machine is Linux-x86_64")])
def test_version_compute_capability_and_platform_differences_are_refused(overrides, here,
                                                                         message):
    problems = engine_refusals(card(**overrides), here)
    assert len(problems) == 1 and message in problems[0]
    with pytest.raises(EngineMismatchError, match="rebuild it on this machine .*"
                                                  r"engine@tensorrt-fp16"):
        check_engine_card(card(**overrides), here, Path("teacher.fp16.tensorrt.engine"))


def test_every_difference_is_named_at_once():
    here = RuntimeFacts("11.1.0.106", "9.0", "NVIDIA H100", "Linux-x86_64")
    assert len(engine_refusals(card(), here)) == 3


def test_plan_header_version_is_read_like_trtexec_does():
    header = b"ftrt" + struct.pack("<I", 0) + bytes(16) + bytes([10, 3, 0, 30]) + b"rest"
    assert plan_header_version(header) == "10.3.0.30"
    assert plan_header_version(b"xxxx" + bytes(40)) is None
    assert plan_header_version(b"ftrt" + struct.pack("<I", 7) + bytes(30)) is None  # unknown
    assert plan_header_version(b"ftrt") is None


# --- the engine card and its hash ---

def test_engine_card_round_trip_and_hash_refusal(tmp_path):
    engine = tmp_path / "teacher.fp16.tensorrt.engine"
    engine.write_bytes(b"ftrt engine bytes")
    path = write_engine_card(engine, card())
    assert path == tmp_path / "teacher.fp16.tensorrt.card.json"
    data, loaded = load_verified_engine(engine)
    assert data == b"ftrt engine bytes" and loaded["format"] == ENGINE_CARD_FORMAT
    assert loaded["size_bytes"] == len(data) and loaded["file"] == engine.name
    engine.write_bytes(b"ftrt engine bytes, changed")
    with pytest.raises(ArtifactIntegrityError, match="does not match its card's engine_sha256"):
        load_verified_engine(engine)
    path.unlink()
    with pytest.raises(ArtifactIntegrityError, match="engine card not found"):
        load_verified_engine(engine)


def test_engine_cards_need_every_fact(tmp_path):
    with pytest.raises(ArtifactIntegrityError, match=r"lack \['compute_capability'\]"):
        make_engine_card(None, {k: v for k, v in card().items() if k != "compute_capability"})
    (tmp_path / "x.card.json").write_text(json.dumps({"format": CARD_FORMAT}))
    with pytest.raises(ArtifactIntegrityError, match="not a prune-deploy/engine-card/1 card"):
        read_engine_card(tmp_path / "x.card.json")


# --- the ONNX file an engine is built from ---

@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sources")
    fp32 = tiny_onnx(tiny_checkpoint(folder / "m.pt"), folder / "teacher.fp32.onnx")
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    class Reader:
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"input": rng.standard_normal((2, 3, 32, 32), np.float32)}
                                 for _ in range(2)])

        def get_next(self):
            return next(self.batches, None)

    u8s8 = folder / "teacher.int8.onnx"
    quantize_static(fp32, u8s8, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return {"fp32": fp32, "int8": u8s8}


def with_card(path: Path, precision: str, model: str = "teacher") -> dict:
    proto = onnx.load(path)
    source = {"format": CARD_FORMAT, "model": model, "precision": precision, "mean": [0.5] * 3,
              "std": [0.25] * 3, "classes": [f"c{i}" for i in range(10)], "opset": 17}
    embed_card(proto, source)
    onnx.save(proto, path)
    write_card(path, source)
    return source


def test_engine_source_reads_the_card_and_names_the_engine(onnx_files, tmp_path):
    path = tmp_path / "teacher.fp32.onnx"
    path.write_bytes(onnx_files["fp32"].read_bytes())
    with_card(path, "fp32", model="teacher")
    source = engine_source(path)
    assert (source.model, source.precision, source.card["opset"]) == ("teacher", "fp32", 17)
    assert source.engine_path(tmp_path, "tensorrt") == tmp_path / "teacher.fp32.tensorrt.engine"
    facts = {k: v for k, v in card().items() if k in ("tensorrt", "plan_version", "gpu",
                                                       "compute_capability", "platform",
                                                       "profile", "workspace_bytes", "tf32",
                                                       "build_seconds", "built_with")}
    made = engine_card(source, "tensorrt", facts)
    assert made["classes"] == source.card["classes"] and made["mean"] == [0.5] * 3
    assert made["source_onnx"] == "teacher.fp32.onnx"
    assert made["source_onnx_sha256"] == source.sha256 == source.card["sha256"]
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ArtifactIntegrityError, match="does not match its card's"):
        engine_source(path)


def test_engine_source_without_a_card_is_named_from_the_file(onnx_files):
    source = engine_source(onnx_files["fp32"])
    assert (source.model, source.precision, source.card) == ("teacher", "fp32", None)


def test_the_cpu_int8_file_is_refused_before_any_build(onnx_files):
    with pytest.raises(BuildError, match=r"not a int8 graph TensorRT can build: .*UINT8.*"
                                         r"build INT8 engines from the trt file "
                                         r"\(teacher\.int8\.trt\.onnx\)"):
        engine_source(onnx_files["int8"])


def test_a_mislabelled_file_is_refused(onnx_files, tmp_path):
    fp16 = tmp_path / "teacher.fp16.onnx"
    fp16.write_bytes(onnx_files["fp32"].read_bytes())
    with pytest.raises(BuildError, match="labelled fp16 but holds no float16"):
        engine_source(fp16)
    with pytest.raises(BuildError, match="expected an existing .onnx file"):
        engine_source(tmp_path / "missing.onnx")
