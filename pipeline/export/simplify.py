"""Graph simplification after export: onnxsim or onnxslim, then the full checker.

Both were measured on the zoo (docs/export.md): equal node counts on every ResNet (58 -> 56) and
bit-identical ONNX Runtime outputs; on VGG onnxsim also removes the no-op ReduceMean over the
1x1 map left by the last pool (24 -> 23 nodes, onnxslim keeps 24). So onnxsim is the default
and onnxslim stays selectable (`export.simplifier`).
"""

from dataclasses import asdict, dataclass
from typing import Any

import onnx

from pipeline.errors import ExportError
from pipeline.export.onnx_export import clone, node_counts, tensor_dims, verify_onnx

SIMPLIFIERS = ("onnxsim", "onnxslim")


@dataclass(frozen=True)
class SimplifyReport:
    simplifier: str  # onnxsim | onnxslim
    nodes_before: int
    nodes_after: int
    ops_before: dict[str, int]
    ops_after: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run_onnxsim(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    simplified, check_ok = onnxsim.simplify(proto)
    if not check_ok:
        raise ExportError("onnxsim reports that the simplified model's outputs differ from the "
                          "original's")
    return simplified


def _run_onnxslim(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(proto)


def _interface(proto: onnx.ModelProto) -> list[tuple[str, int, list]]:
    values = [*proto.graph.input, *proto.graph.output]
    return [(v.name, v.type.tensor_type.elem_type, tensor_dims(v)) for v in values]


def simplify(proto: onnx.ModelProto, simplifier: str) -> tuple[onnx.ModelProto, SimplifyReport]:
    """A simplified, checked copy of `proto` (with inferred shapes) and the node counts."""
    runners = {"onnxsim": _run_onnxsim, "onnxslim": _run_onnxslim}
    if simplifier not in runners:
        raise ExportError(f"unknown simplifier {simplifier!r}; expected one of {SIMPLIFIERS}")
    try:
        simplified = runners[simplifier](clone(proto))
    except ExportError:
        raise
    except Exception as err:  # noqa: BLE001 - both tools raise whatever their passes raise
        raise ExportError(f"{simplifier} failed: {type(err).__name__}: {err}") from err
    # onnxsim records its own bookkeeping (removed node lists) here; the model card goes in later.
    del simplified.metadata_props[:]
    simplified = verify_onnx(simplified)
    if _interface(simplified) != _interface(proto):
        raise ExportError(f"{simplifier} changed the model interface from {_interface(proto)} "
                          f"to {_interface(simplified)}")
    before, after = node_counts(proto), node_counts(simplified)
    report = SimplifyReport(simplifier, before["total"], after["total"], before["by_op"],
                            after["by_op"])
    return simplified, report
