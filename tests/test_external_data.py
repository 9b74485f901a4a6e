"""ONNX external data: a model may keep weights only in regular files of its own folder.

A tensor's `location` names the file its bytes live in. Every place that reads or copies those
files (ONNX Runtime sessions, the SSH targets' upload, the INT8 quantiser, the verified loader)
first checks it with pipeline.export.onnx_export.external_data_files.
"""

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from pipeline.errors import ArtifactIntegrityError
from pipeline.export.onnx_export import external_data_files, external_data_locations
from targets.onnxruntime_cpu import OnnxRuntimeCpuSettings, OnnxRuntimeCpuTarget
from targets.ssh import SshError, distinct_names, model_files

WEIGHTS = np.array([1.0, 2.0, 3.0], dtype=np.float32)


def external_tensor(name: str, location: str) -> onnx.TensorProto:
    tensor = numpy_helper.from_array(WEIGHTS, name)
    set_external_data(tensor, location=location, offset=0, length=len(tensor.raw_data))
    tensor.ClearField("raw_data")
    return tensor


def add_model(path: Path, location: str, as_constant: bool = False) -> Path:
    """input + w, where w's three floats live in the file `location` names."""
    nodes = [helper.make_node("Add", ["input", "w"], ["logits"])]
    initializers = [external_tensor("w", location)]
    if as_constant:  # the tensor sits in a node attribute instead of the initializers
        nodes.insert(0, helper.make_node("Constant", [], ["w"], value=initializers.pop()))
    graph = helper.make_graph(
        nodes, "add", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside the model's folder that must never be read or sent anywhere."""
    path = tmp_path / "home" / ".ssh" / "id_ed25519"
    path.parent.mkdir(parents=True)
    path.write_bytes(WEIGHTS.tobytes())  # shaped like weights, so a runtime would take it
    return path


def ort_target() -> OnnxRuntimeCpuTarget:
    return OnnxRuntimeCpuTarget(OnnxRuntimeCpuSettings(
        graph_optimization="all", intra_op_threads=1, inter_op_threads=1,
        providers=("CPUExecutionProvider",)))


def test_a_data_file_beside_the_model_is_accepted_and_runs(tmp_path):
    model = add_model(tmp_path / "m" / "m.onnx", "m.weights")
    (tmp_path / "m" / "m.weights").write_bytes(WEIGHTS.tobytes())
    assert external_data_files(model) == [tmp_path / "m" / "m.weights"]
    assert model_files(model) == [model, tmp_path / "m" / "m.weights"]
    with ort_target().load(model) as runner:
        out = runner.infer({"input": np.zeros((1, 3), np.float32)})["logits"]
    assert out.tolist() == [[1.0, 2.0, 3.0]]


def test_a_model_without_external_data_needs_no_other_file(tmp_path):
    model = tmp_path / "m.onnx"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["logits"])], "id",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])])
    model.write_bytes(helper.make_model(graph).SerializeToString())
    assert external_data_files(model) == [] and model_files(model) == [model]


def hostile_locations(secret: Path, model_dir: Path) -> dict[str, str]:
    return {"absolute": str(secret),
            "parent": os.path.relpath(secret, model_dir),
            "sub-folder": "sub/w.data",
            "dot-slash": "./w.data",
            "empty": ""}


@pytest.mark.parametrize("kind", ["absolute", "parent", "sub-folder", "dot-slash", "empty"])
def test_locations_that_are_not_a_plain_file_name_are_refused(tmp_path, secret, kind):
    model_dir = tmp_path / "model"
    location = hostile_locations(secret, model_dir)[kind]
    model = add_model(model_dir / "m.onnx", location)
    message = rf"tensor 'w' names external data {location!r}.*not a plain file name"
    with pytest.raises(ArtifactIntegrityError, match=message):
        external_data_files(model)
    with pytest.raises(ArtifactIntegrityError, match=message):
        model_files(model)  # the SSH targets' upload list
    with pytest.raises(ArtifactIntegrityError, match=message):
        ort_target().load(model)


def test_a_symbolic_link_to_a_file_elsewhere_is_refused(tmp_path, secret):
    model = add_model(tmp_path / "model" / "m.onnx", "w.data")
    (tmp_path / "model" / "w.data").symlink_to(secret)
    with pytest.raises(ArtifactIntegrityError, match=r"'w.data', which is a symbolic link"):
        model_files(model)
    with pytest.raises(ArtifactIntegrityError, match="symbolic link"):
        ort_target().load(model)


def test_a_folder_a_fifo_or_a_missing_file_is_refused(tmp_path):
    model = add_model(tmp_path / "m.onnx", "w.data")
    with pytest.raises(ArtifactIntegrityError, match=r"'w.data', which cannot be read"):
        external_data_files(model)
    (tmp_path / "w.data").mkdir()
    with pytest.raises(ArtifactIntegrityError, match="is not a regular file"):
        external_data_files(model)
    (tmp_path / "w.data").rmdir()
    os.mkfifo(tmp_path / "w.data")  # reading it would block the benchmark forever
    with pytest.raises(ArtifactIntegrityError, match="is not a regular file"):
        external_data_files(model)


def test_tensors_in_node_attributes_are_checked_too(tmp_path, secret):
    model = add_model(tmp_path / "model" / "m.onnx", str(secret), as_constant=True)
    assert external_data_locations(onnx.load(model, load_external_data=False)) == [
        ("w", str(secret))]
    with pytest.raises(ArtifactIntegrityError, match="tensor 'w' names external data"):
        model_files(model)


def test_two_files_of_one_name_are_not_sent_to_one_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(SshError, match="would both be copied to the device as 'remote_runner.py'"):
        distinct_names([tmp_path / "a" / "remote_runner.py", tmp_path / "b" / "remote_runner.py"])


def test_an_unparsable_file_is_refused_before_a_runtime_sees_it(tmp_path):
    garbage = tmp_path / "g.onnx"
    garbage.write_bytes(b"not an onnx model at all")
    with pytest.raises(ArtifactIntegrityError, match="not a valid ONNX model"):
        external_data_files(garbage)
