"""PyTorch model -> one self-contained ONNX file with a named, batch-dynamic input and output.

The exporter is torch.onnx's dynamo path (torch.export + onnxscript). On the zoo's ResNet20 it
gives 58 nodes against the TorchScript path's 106 (which adds Constant, ConstantOfShape, Cast,
Concat and Transpose around the option-A shortcuts), and TorchScript export is deprecated; the
measurements are in docs/export.md. Every exported graph is checked here for what the rest of the
pipeline relies on: input "input" (batch, C, H, W) float32, output "logits" (batch, classes),
the requested opset, and all weights inside the one file.
"""

import collections
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

if TYPE_CHECKING:
    import torch

from pipeline.errors import ArtifactIntegrityError, ExportError
from pipeline.io import atomic_write_bytes

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"  # the symbolic name of the dynamic batch axis
EXAMPLE_BATCH = 2  # torch.export specialises a batch of 1 into a constant, so trace with 2


def export_onnx(model: "torch.nn.Module", input_shape: tuple[int, ...],
                opset: int) -> onnx.ModelProto:
    """Export `model` in inference mode for inputs (batch, *input_shape); checked, in memory.
    torch is imported here, not at load: the model cards (pipeline.export.cards) import this
    module, and a skipped stage must not pay for torch (pipeline.io says why)."""
    import torch

    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    example = torch.zeros(EXAMPLE_BATCH, *input_shape, device=device)
    was_training = model.training
    model.eval()  # BatchNorm must use its running statistics (and be folded into the convs)
    try:
        program = torch.onnx.export(
            model, (example,), f=None, dynamo=True, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},), optimize=True, verbose=False)
    except Exception as err:  # noqa: BLE001 - torch.export/onnxscript raise many unrelated types
        raise ExportError(f"cannot export {type(model).__name__} to ONNX (torch.export, opset "
                          f"{opset}): {exporter_failure(err)}. The model must trace with "
                          "torch.export (no Python branches on tensor values) and use ops the "
                          "ONNX exporter supports; docs/export.md") from err
    finally:
        model.train(was_training)
    proto = program.model_proto
    strip_trace_metadata(proto)
    check_interface(proto, tuple(input_shape), opset)
    return proto


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SUMMARY_CLASS = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")


def exporter_failure(err: Exception, limit: int = 400) -> str:
    """The cause of an exporter failure in one line: its "Exception summary" (torch.onnx's
    errors open with a page of generic advice) and the model line that raised it, without
    terminal colours or multi-line graph dumps."""
    text = _ANSI.sub("", str(err))
    summary = text.partition("## Exception summary")[2].strip()
    cause = (summary or text).strip().splitlines()[0] if (summary or text).strip() else ""
    cause = _SUMMARY_CLASS.sub(r"\1", cause) if summary else f"{type(err).__name__}: {cause}"
    at = re.search(r"The following call raised this error:\s*\n\s*(File .*)\n\s*(.*)", text)
    where = f" ({at.group(1).strip()}: {at.group(2).strip()})" if at else ""
    line = " ".join(f"{cause}{where}".split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def strip_trace_metadata(proto: onnx.ModelProto) -> None:
    """Drop per-node stack traces and FX names the dynamo exporter records.

    They hold absolute source paths, so the same model exported from two checkouts would give
    two different files (and DVC hashes); they also add 6.9% to a ResNet20 file.
    """
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        del value.metadata_props[:]
    for tensor in proto.graph.initializer:
        del tensor.metadata_props[:]


def default_opset(proto: onnx.ModelProto) -> int:
    versions = [entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")]
    if len(versions) != 1:
        raise ExportError(f"model imports the default ONNX domain {len(versions)} times; "
                          "expected exactly once")
    return versions[0]


def tensor_dims(value: onnx.ValueInfoProto) -> list[int | str]:
    """A tensor's dims: ints for fixed axes, the symbol (or "?") for dynamic ones."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value.type.tensor_type.shape.dim]


def _describe(value: onnx.ValueInfoProto) -> str:
    dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
    return f"{value.name!r} {np.dtype(dtype).name}{tensor_dims(value)}"


def check_interface(proto: onnx.ModelProto, input_shape: tuple[int, ...], opset: int) -> None:
    """Raise ExportError unless the graph has the interface every consumer of our files expects."""
    found = default_opset(proto)
    if found != opset:
        raise ExportError(f"exported opset {found}, expected {opset}: torch's dynamo exporter "
                          "emits opset 18 and leaves the model unconverted when an op has no "
                          "version adapter (e.g. Pad 18 -> 17); choose export.opset >= 18")
    inputs, outputs = list(proto.graph.input), list(proto.graph.output)
    if [v.name for v in inputs] != [INPUT_NAME] or [v.name for v in outputs] != [OUTPUT_NAME]:
        raise ExportError(f"graph inputs {[v.name for v in inputs]} / outputs "
                          f"{[v.name for v in outputs]}, expected [{INPUT_NAME!r}] / "
                          f"[{OUTPUT_NAME!r}]")
    float32 = onnx.TensorProto.FLOAT
    in_dims, out_dims = tensor_dims(inputs[0]), tensor_dims(outputs[0])
    if (inputs[0].type.tensor_type.elem_type != float32 or len(in_dims) != 1 + len(input_shape)
            or isinstance(in_dims[0], int) or tuple(in_dims[1:]) != tuple(input_shape)):
        raise ExportError(f"graph input is {_describe(inputs[0])}, expected float32"
                          f"[{BATCH_DIM!r}, {', '.join(map(str, input_shape))}]")
    if (outputs[0].type.tensor_type.elem_type != float32 or len(out_dims) != 2
            or isinstance(out_dims[0], int)):
        raise ExportError(f"graph output is {_describe(outputs[0])}, expected float32"
                          f"[{BATCH_DIM!r}, classes]")
    external = [t.name for t in proto.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError(f"{len(external)} initializers point to external data (e.g. "
                          f"{external[0]!r}); expected every weight inside the one file")


def verify_onnx(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Full ONNX checker plus strict shape inference; returns the model with inferred shapes."""
    try:
        onnx.checker.check_model(proto, full_check=True)
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True,
                                                 data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(f"ONNX model fails the checker / shape inference: {err}") from err


def node_counts(proto: onnx.ModelProto) -> dict[str, Any]:
    """Top-level graph nodes: the total and the count per op type (most frequent first)."""
    by_op = collections.Counter(node.op_type for node in proto.graph.node)
    return {"total": len(proto.graph.node), "by_op": dict(by_op.most_common())}


def clone(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def save_onnx(proto: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Serialize into one file (weights inline), atomically: temp file, then rename."""
    path = Path(path)
    try:
        data = proto.SerializeToString()
    except ValueError as err:  # protobuf refuses messages over 2 GiB
        raise ExportError(f"{path}: model too large for a single-file ONNX ({err})") from err
    atomic_write_bytes(path, data)
    return path


# ------------------------------------------------------------------------------ external data
def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph holds: initializers, sparse ones, node attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        for sparse in [*([attribute.sparse_tensor] if attribute.HasField("sparse_tensor")
                         else []), *attribute.sparse_tensors]:
            yield from (sparse.values, sparse.indices)
        for graph in [*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs]:
            yield from _graph_tensors(graph)


def _model_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _graph_tensors(proto.graph)
    for function in proto.functions:
        for node in function.node:
            yield from _node_tensors(node)
    for info in proto.training_info:
        yield from _graph_tensors(info.initialization)
        yield from _graph_tensors(info.algorithm)


def external_data_locations(proto: onnx.ModelProto) -> list[tuple[str, str]]:
    """(tensor name, `location` field) of every tensor whose bytes live in another file."""
    found = []
    for tensor in _model_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            found.append((tensor.name, entries.get("location", "")))
    return found


def _read_proto(path: Path) -> onnx.ModelProto:
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(os.fspath(path), load_external_data=False)
    except (OSError, DecodeError, ValueError) as err:
        raise ArtifactIntegrityError(f"{path}: not a valid ONNX model "
                                     f"({type(err).__name__}: {err})") from err


def confined_file(owner: Path, name: str, where: str, kind: str) -> Path:
    """The file `name` names, if it is a regular file of its own in the folder of `owner` (the
    model file that names it); else ArtifactIntegrityError starting with `where` and saying what
    `kind` of name must be. Shared by ONNX external data and the files a card lists."""
    folder = owner.parent
    allowed = (f"{kind} must be the plain name of a regular file in the model's own folder "
               f"({folder})")
    if (not isinstance(name, str) or not name or name in (".", "..")
            or PurePosixPath(name).name != name or "\\" in name or "\0" in name):
        raise ArtifactIntegrityError(f"{where} is not a plain file name; {allowed}")
    path = folder / name
    try:
        mode = path.lstat().st_mode
    except OSError as err:
        raise ArtifactIntegrityError(f"{where} cannot be read ({err.strerror}); "
                                     f"{allowed}") from err
    if stat.S_ISLNK(mode):
        raise ArtifactIntegrityError(f"{where} is a symbolic link; {allowed}")
    if not stat.S_ISREG(mode):
        raise ArtifactIntegrityError(f"{where} is not a regular file; {allowed}")
    if path.resolve().parent != folder.resolve():
        raise ArtifactIntegrityError(f"{where} resolves outside {folder}; {allowed}")
    return path


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The files an ONNX file's tensors keep their bytes in, each checked before anything reads
    or copies it: a plain file name (no directory, no `..`, not absolute) of a regular file,
    not a symbolic link, in the model's own folder. A model that names anything else - e.g.
    `/home/u/.ssh/id_ed25519` or `../../secret` - is refused (ArtifactIntegrityError naming
    the tensor and the location), so no runtime reads, and no target uploads, a file the
    model's author chose outside its folder."""
    model = Path(path)
    files: list[Path] = []
    for tensor, location in external_data_locations(_read_proto(model)):
        file = confined_file(model, location, f"{model}: tensor {tensor!r} names external data "
                             f"{location!r}, which", "an external-data location")
        if file not in files:
            files.append(file)
    return files
