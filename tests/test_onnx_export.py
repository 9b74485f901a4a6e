"""ONNX export and simplification on a tiny zoo ResNet20 (width 4, option-A shortcuts)."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import pipeline
from pipeline.errors import ExportError
from pipeline.export.onnx_export import (
    check_interface,
    clone,
    export_onnx,
    node_counts,
    save_onnx,
    tensor_dims,
    verify_onnx,
)
from pipeline.export.simplify import SIMPLIFIERS, simplify
from pipeline.models import build_model
from pipeline.parity import FP32_TOLERANCE, check_parity, measure_parity

SHAPE = (3, 32, 32)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics, so BatchNorm folding is actually exercised."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)
    return model


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(build_model({"arch": "resnet20", "num_classes": 5,
                                            "base_width": 4})).eval()


@pytest.fixture(scope="module")
def exported(model) -> onnx.ModelProto:
    return export_onnx(model, SHAPE, opset=18)


def images(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *SHAPE)).astype(np.float32)


def ort_logits(proto: onnx.ModelProto, batch: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": batch})[0]


def torch_logits(model: nn.Module, batch: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(batch)).numpy()


def test_interface_is_named_batch_dynamic_and_at_the_requested_opset(exported):
    assert [v.name for v in exported.graph.input] == ["input"]
    assert [v.name for v in exported.graph.output] == ["logits"]
    assert tensor_dims(exported.graph.input[0]) == ["batch", 3, 32, 32]
    assert tensor_dims(exported.graph.output[0]) == ["batch", 5]
    assert {(o.domain, o.version) for o in exported.opset_import} == {("", 18)}
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in exported.graph.initializer)


def test_bn_is_folded_and_no_stray_ops_remain(exported):
    ops = node_counts(exported)["by_op"]
    assert "BatchNormalization" not in ops
    assert not {"Constant", "ConstantOfShape", "Cast", "Transpose", "Identity"} & set(ops)
    assert ops["Conv"] == 19 and ops["Gemm"] == 1


def test_trace_metadata_with_source_paths_is_stripped(exported):
    data = exported.SerializeToString()
    repo = str(Path(pipeline.__file__).resolve().parents[1]).encode()
    assert repo not in data
    assert all(len(node.metadata_props) == 0 for node in exported.graph.node)


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_exported_model_matches_torch_at_any_batch(model, exported, batch):
    x = images(batch)
    result = measure_parity(torch_logits(model, x), ort_logits(exported, x), "torch", "onnx",
                            batch)
    check_parity(result, FP32_TOLERANCE)
    assert result.rel_diff < 1e-5


def test_save_writes_one_self_contained_file(exported, tmp_path):
    path = save_onnx(exported, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert onnx.load(path) == exported


def test_opset_17_is_refused_not_silently_kept_at_18(model):
    with pytest.raises(ExportError, match="exported opset 18, expected 17"):
        export_onnx(model, SHAPE, opset=17)


def test_export_uses_running_stats_and_restores_training_mode(model, exported):
    model.train()
    try:
        again = export_onnx(model, SHAPE, opset=18)
        assert model.training
    finally:
        model.eval()
    x = images(4)
    np.testing.assert_allclose(ort_logits(again, x), ort_logits(exported, x), rtol=0, atol=1e-6)


def test_interface_check_names_what_is_wrong(exported):
    renamed = clone(exported)
    renamed.graph.input[0].name = "x"
    with pytest.raises(ExportError, match=r"graph inputs \['x'\]"):
        check_interface(renamed, SHAPE, 18)
    fixed_batch = clone(exported)
    fixed_batch.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    with pytest.raises(ExportError, match="graph input is 'input' float32"):
        check_interface(fixed_batch, SHAPE, 18)
    with pytest.raises(ExportError, match=r"expected float32\['batch', 3, 28, 28\]"):
        check_interface(exported, (3, 28, 28), 18)


def test_verify_rejects_a_broken_graph(exported):
    broken = clone(exported)
    broken.graph.node[0].input[0] = "nowhere"
    with pytest.raises(ExportError, match="checker"):
        verify_onnx(broken)


@pytest.mark.parametrize("simplifier", SIMPLIFIERS)
def test_simplifiers_shrink_the_graph_and_keep_its_function(exported, simplifier):
    simplified, report = simplify(exported, simplifier)
    assert (report.nodes_before, report.nodes_after) == (58, 56)  # the two redundant Slices
    assert report.ops_before["Slice"] == 4 and report.ops_after["Slice"] == 2
    assert tensor_dims(simplified.graph.input[0]) == ["batch", 3, 32, 32]
    assert tensor_dims(simplified.graph.output[0]) == ["batch", 5]
    assert len(simplified.graph.value_info) > 0  # shape inference ran
    assert list(simplified.metadata_props) == []  # onnxsim's bookkeeping is not shipped
    x = images(8)
    check_parity(measure_parity(ort_logits(exported, x), ort_logits(simplified, x), "onnx",
                                simplifier, 8), FP32_TOLERANCE)


def test_unknown_simplifier_is_an_export_error(exported):
    with pytest.raises(ExportError, match="unknown simplifier 'polygraphy'"):
        simplify(exported, "polygraphy")


class BranchOnValues(nn.Module):
    """A Python `if` on a tensor value: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            return y.mean((2, 3))
        return y.amax((2, 3))


def test_an_export_failure_says_what_and_where_in_one_line():
    with pytest.raises(ExportError) as caught:
        export_onnx(BranchOnValues(), (3, 8, 8), 18)
    message = str(caught.value)
    assert message.startswith("cannot export BranchOnValues to ONNX (torch.export, opset 18): ")
    assert "data-dependent" in message and "in forward: if y.sum() > 0:" in message
    assert "\n" not in message and "\x1b" not in message and "Next steps" not in message
    assert len(message) < 700


def test_exporter_failure_keeps_the_summary_and_drops_the_advice():
    from pipeline.export.onnx_export import exporter_failure

    text = ("Failed to convert. \x1b[96mThis is step 3/3\x1b[0m. Next steps:\n- a\n- b\n\n"
            "## Exception summary\n\n<class 'torch.onnx._internal.exporter._errors."
            "DispatchError'>: No ONNX function found for aten.foo\n\n(Refer to the trace.)")
    assert exporter_failure(RuntimeError(text)) == ("DispatchError: No ONNX function found for "
                                                    "aten.foo")
    assert exporter_failure(ValueError("short\nsecond line")) == "ValueError: short"
    assert exporter_failure(ValueError("x" * 1000)).endswith("...")
