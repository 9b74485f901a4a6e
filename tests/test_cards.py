"""Model cards: contents, embedding in metadata_props, and the verified loader's refusals."""

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pipeline.checkpoint import load_model, save_model
from pipeline.errors import ArtifactIntegrityError, CheckpointError
from pipeline.export.cards import (
    CARD_KEY,
    FILE_FIELDS,
    card_path,
    describe_source,
    embed_card,
    embedded_card,
    load_verified_onnx,
    make_card,
    provenance,
    read_onnx,
    verified_card,
    write_card,
)
from pipeline.export.onnx_export import save_onnx
from pipeline.io import file_sha256
from pipeline.models import build_model

META = {"classes": ["cat", "dog", "eel"], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.25],
        "input_shape": [3, 32, 32], "dataset": "synthetic", "params": 1234, "macs": 56789,
        "top1": 0.75, "pruning": {"kept_macs": 0.6}}


def pooling_model() -> onnx.ModelProto:
    """A valid graph with our interface, built by hand (no export needed)."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["logits"])]
    graph = helper.make_graph(nodes, "pool", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                             ir_version=10)  # ONNX Runtime 1.31 reads IR <= 13


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("model") / "student_final_pdd.pt"
    save_model(path, build_model({"arch": "resnet20", "num_classes": 3, "base_width": 4}),
               {"arch": "resnet20", "num_classes": 3, "base_width": 4}, META)
    return describe_source(load_model(path), path, "student_final_pdd")


@pytest.fixture
def shipped(source, tmp_path) -> Path:
    """A file and its card, as the export stage leaves them."""
    card = make_card(source, "fp32", 18, {"exporter": "test"}, {"git_revision": "abc",
                                                                "tools": {"onnx": "1"}})
    proto = pooling_model()
    embed_card(proto, card)
    path = save_onnx(proto, tmp_path / "student_final_pdd.fp32.onnx")
    write_card(path, card, {"onnxruntime_top1": 0.5})
    return path


def test_card_path_sits_beside_the_file():
    assert card_path("artifacts/teacher.onnx") == Path("artifacts/teacher.card.json")
    assert card_path("artifacts/teacher.int8.onnx") == Path("artifacts/teacher.int8.card.json")


def test_card_holds_everything_a_consumer_needs(shipped, source):
    card = json.loads(card_path(shipped).read_text())
    assert card["sha256"] == file_sha256(shipped)
    assert card["size_bytes"] == shipped.stat().st_size
    assert card["file"] == "student_final_pdd.fp32.onnx"
    assert card["input"] == {"name": "input", "shape": ["batch", 3, 32, 32], "dtype": "float32",
                             "layout": "NCHW, RGB",
                             "preprocessing": "(uint8 pixels / 255 - mean) / std, per channel"}
    assert card["output"]["name"] == "logits" and card["output"]["shape"] == ["batch", 3]
    assert (card["mean"], card["std"], card["classes"]) == (META["mean"], META["std"],
                                                           META["classes"])
    assert (card["opset"], card["precision"], card["params"], card["macs"]) == (18, "fp32",
                                                                              1234, 56789)
    assert card["pruning"] == {"kept_macs": 0.6}
    assert card["source_model"]["sha256"] == file_sha256(card["source_model"]["path"])
    assert card["provenance"] == {"git_revision": "abc", "tools": {"onnx": "1"}}
    assert card["metrics"] == {"onnxruntime_top1": 0.5}


def test_the_onnx_file_carries_its_card_without_file_fields(shipped):
    embedded = embedded_card(onnx.load(shipped))
    card = json.loads(card_path(shipped).read_text())
    assert embedded == {k: v for k, v in card.items() if k not in FILE_FIELDS}
    assert not set(FILE_FIELDS) & set(embedded)


def test_verified_loader_accepts_a_matching_file(shipped):
    verified = load_verified_onnx(shipped)
    assert verified.card["sha256"] == file_sha256(shipped)
    assert [v.name for v in verified.model.graph.input] == ["input"]


def test_one_changed_byte_is_refused(shipped):
    data = bytearray(shipped.read_bytes())
    data[-1] ^= 0x01
    shipped.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match="does not match its card's"):
        load_verified_onnx(shipped)


def test_truncated_file_is_refused_and_is_a_format_error_on_its_own(shipped):
    shipped.write_bytes(shipped.read_bytes()[:-40])
    with pytest.raises(ArtifactIntegrityError, match="changed or truncated"):
        load_verified_onnx(shipped)
    with pytest.raises(ArtifactIntegrityError, match="not a valid ONNX model"):
        read_onnx(shipped)


def test_garbage_with_a_matching_card_is_a_format_error(shipped, source):
    shipped.write_bytes(b"\x00\xffthis is not a protobuf\x07" * 10)
    write_card(shipped, make_card(source, "fp32", 18, {}, {}))
    with pytest.raises(ArtifactIntegrityError, match="not a valid ONNX model"):
        load_verified_onnx(shipped)


def test_missing_or_broken_card_is_refused(shipped):
    card = card_path(shipped)
    card.write_text("{not json")
    with pytest.raises(ArtifactIntegrityError, match="unreadable model card"):
        load_verified_onnx(shipped)
    card.write_text(json.dumps({"format": "something/else", "sha256": "0"}))
    with pytest.raises(ArtifactIntegrityError, match="not a prune-deploy/card/1 card"):
        load_verified_onnx(shipped)
    card.unlink()
    with pytest.raises(ArtifactIntegrityError, match="model card not found"):
        load_verified_onnx(shipped)


def test_embedded_card_that_disagrees_with_the_card_file_is_refused(shipped, source):
    proto = onnx.load(shipped)
    embed_card(proto, make_card(source, "int8", 18, {}, {}))  # claims another precision
    save_onnx(proto, shipped)
    write_card(shipped, make_card(source, "fp32", 18, {}, {}))
    with pytest.raises(ArtifactIntegrityError, match="embedded in metadata_props differs"):
        load_verified_onnx(shipped)


def test_embedding_replaces_an_older_card_and_keeps_other_metadata():
    proto = pooling_model()
    proto.metadata_props.add(key="author", value="me")
    embed_card(proto, {"precision": "fp32"})
    embed_card(proto, {"precision": "fp16", "sha256": "not embedded"})
    assert [p.key for p in proto.metadata_props] == ["author", CARD_KEY]
    assert embedded_card(proto) == {"precision": "fp16"}


def test_model_without_required_metadata_cannot_get_a_card(tmp_path):
    path = tmp_path / "m.pt"
    meta = {k: v for k, v in META.items() if k not in ("macs", "std")}
    save_model(path, build_model({"arch": "resnet20", "base_width": 4}),
               {"arch": "resnet20", "base_width": 4}, meta)
    with pytest.raises(CheckpointError, match=r"lacks \['std', 'macs'\]"):
        describe_source(load_model(path), path, "m")


def test_provenance_records_revision_and_tool_versions():
    record = provenance()
    assert isinstance(record["git_revision"], str) and record["git_revision"]
    assert record["tools"]["onnx"] == onnx.__version__
    assert set(record["tools"]) == {"torch", "onnx", "onnxruntime", "onnxscript", "onnxsim",
                                    "onnxslim"}


def test_a_file_with_external_data_is_refused_even_with_a_matching_card(source, tmp_path):
    from onnx import numpy_helper
    from onnx.external_data_helper import set_external_data

    proto = pooling_model()
    tensor = numpy_helper.from_array(np.ones(3, np.float32), "unused")
    set_external_data(tensor, location="unused.bin", offset=0, length=len(tensor.raw_data))
    tensor.ClearField("raw_data")
    proto.graph.initializer.append(tensor)
    (tmp_path / "unused.bin").write_bytes(np.ones(3, np.float32).tobytes())
    card = make_card(source, "fp32", 18, {}, {})
    embed_card(proto, card)
    path = save_onnx(proto, tmp_path / "student_final.fp32.onnx")
    write_card(path, card)
    with pytest.raises(ArtifactIntegrityError, match=r"tensor 'unused' keeps its data in "
                                                     r"'unused.bin'.*sha256 covers them"):
        load_verified_onnx(path)
def test_a_card_hashes_the_files_that_belong_to_its_file(source, tmp_path):
    """An OpenVINO IR is two files: a changed or missing .bin is refused like the .xml."""
    xml, weights = tmp_path / "m.fp32.xml", tmp_path / "m.fp32.bin"
    xml.write_text("<net/>")
    weights.write_bytes(b"\x00" * 64)
    write_card(xml, make_card(source, "fp32", 18, {}, {}))
    card = verified_card(xml)
    assert card["sidecars"] == [{"file": "m.fp32.bin", "sha256": file_sha256(weights),
                                 "size_bytes": 64}]
    weights.write_bytes(b"\x01" * 64)
    with pytest.raises(ArtifactIntegrityError, match=r"m.fp32.bin: sha256 .* does not match"):
        verified_card(xml)
    weights.unlink()
    with pytest.raises(ArtifactIntegrityError, match=r"m.fp32.bin: file not found \(its card"):
        verified_card(xml)


@pytest.mark.parametrize("name", ["../secret.bin", "/etc/hostname", "..", "link.bin", 7])
def test_a_card_cannot_point_a_sidecar_outside_its_folder(source, tmp_path, name):
    """The card is input too: a sidecar name that climbs out, is absolute, is a symbolic link
    or is not a name at all is refused, naming the sidecar, before anything reads it."""
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"secret")
    (folder / "link.bin").symlink_to(tmp_path / "secret.bin")
    xml = folder / "m.fp32.xml"
    xml.write_text("<net/>")
    card = make_card(source, "fp32", 18, {}, {})
    write_card(xml, card)
    written = json.loads(card_path(xml).read_text())
    written["sidecars"] = [{"file": name, "sha256": file_sha256(tmp_path / "secret.bin"),
                            "size_bytes": 6}]
    card_path(xml).write_text(json.dumps(written))
    with pytest.raises(ArtifactIntegrityError, match=rf"sidecar {re.escape(repr(name))}, which "
                                                     r"(is not a plain file name|is a symbolic)"):
        verified_card(xml)
