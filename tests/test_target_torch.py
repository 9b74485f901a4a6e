"""PyTorch targets: eager CPU on a tiny model file; the CUDA targets' availability (and, marked
`gpu`, their device timing when a GPU is present)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from sshd_fixture import tiny_checkpoint

from pipeline.checkpoint import load_model
from pipeline.errors import BuildError, FeedError, TargetUnavailable
from pipeline.timing import TimingPlan
from targets.torch_cuda import TorchCudaGraphsTarget, TorchCudaTarget
from targets.torch_eager import TorchCpuTarget, TorchSettings

PLAN = TimingPlan(warmup_iters=1, warmup_seconds=0.0, min_iters=3, min_seconds=0.0)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("m") / "student.pt")


def batch(count: int) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((count, 3, 32, 32)).astype(np.float32)


def test_cpu_runner_matches_the_model_and_restores_threads(model_file):
    target = TorchCpuTarget(TorchSettings(threads=1))
    assert target.available() == (True, "")
    before = torch.get_num_threads()
    expected = load_model(model_file).model(torch.from_numpy(batch(3))).detach().numpy()
    with target.load(target.build(model_file, Path("unused"))) as runner:
        assert torch.get_num_threads() == 1 and runner.threads == 1
        assert runner.inputs[0].shape == ("batch", 3, 32, 32)
        np.testing.assert_allclose(runner.infer({"input": batch(3)})["logits"], expected,
                                   rtol=1e-5, atol=1e-6)
        stats = runner.benchmark({"input": batch(2)}, PLAN)
    assert torch.get_num_threads() == before
    assert stats.n == 3 and stats.batch_size == 2 and stats.clock == "host"


@pytest.mark.parametrize("feeds, message", [
    ({"x": batch(1)}, r"inputs \['x'\] given, expected \['input'\]"),
    ({"input": batch(1).astype(np.float64)}, "dtype float64, expected float32"),
    ({"input": np.zeros((1, 3, 16, 16), np.float32)}, r"shape \(1, 3, 16, 16\)"),
    ({"input": torch.zeros(1, 3, 32, 32)}, "not numpy arrays"),
])
def test_cpu_runner_checks_its_inputs(model_file, feeds, message):
    target = TorchCpuTarget(TorchSettings(threads=0))
    with target.load(model_file) as runner, pytest.raises(FeedError, match=message):
        runner.infer(feeds)


def test_torch_targets_take_model_files_not_onnx(tmp_path):
    with pytest.raises(BuildError, match="not .onnx files"):
        TorchCpuTarget(TorchSettings(threads=0)).build(tmp_path / "m.fp32.onnx", tmp_path)
    with pytest.raises(BuildError, match="model file not found"):
        TorchCpuTarget(TorchSettings(threads=0)).build(tmp_path / "missing.pt", tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
@pytest.mark.parametrize("target_class", [TorchCudaTarget, TorchCudaGraphsTarget])
def test_cuda_targets_say_why_they_are_unavailable(target_class, model_file):
    ok, reason = target_class(TorchSettings(threads=0)).available()
    assert not ok and "CUDA" in reason
    with pytest.raises(TargetUnavailable, match=f"'{target_class.name}' is not available"):
        target_class(TorchSettings(threads=0)).load(model_file)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("target_class", [TorchCudaTarget, TorchCudaGraphsTarget])
def test_cuda_targets_time_phases_on_the_device(target_class, model_file):
    expected = load_model(model_file).model(torch.from_numpy(batch(4))).detach().numpy()
    with target_class(TorchSettings(threads=0)).load(model_file) as runner:
        np.testing.assert_allclose(runner.infer({"input": batch(4)})["logits"], expected,
                                   rtol=1e-3, atol=1e-4)
        stats = runner.benchmark({"input": batch(4)}, PLAN)
    assert stats.clock == "cuda-events" and set(stats.phase_p50_ms) == {"h2d", "compute", "d2h"}
    assert stats.p50_ms > 0 and stats.n == 3
