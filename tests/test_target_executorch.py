"""ExecuTorch: programs lowered to XNNPACK per batch size (fp32 exact, PT2E int8 that loads),
the executorch-xnnpack runner (fixed batch, input checks, threadpool restored); absent = skipped."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sshd_fixture import tiny_checkpoint

from pipeline.checkpoint import load_model
from pipeline.config import TimingPlan
from pipeline.errors import BuildError, ExportError, FeedError
from pipeline.export.executorch import export_programs
from pipeline.parity import FP32_TOLERANCE, check_parity, measure_parity
from targets.executorch_xnnpack import ExecuTorchSettings, ExecuTorchXnnpackTarget, bindings
from targets.measure import measure
from targets.registry import make_target

TARGET = ExecuTorchXnnpackTarget(ExecuTorchSettings(threads=1))
needs_executorch = pytest.mark.skipif(not TARGET.available()[0],
                                      reason=f"executorch-xnnpack: {TARGET.available()[1]}")
PLAN = TimingPlan(warmup_iters=1, warmup_seconds=0.0, min_iters=2, min_seconds=0.0)
SHAPE = (3, 32, 32)


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *SHAPE)).astype(np.float32)


def feeds(spec, batch):
    return {spec.name: images(batch)}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> torch.nn.Module:
    return load_model(tiny_checkpoint(tmp_path_factory.mktemp("et") / "m.pt")).model


@pytest.fixture(scope="module")
def programs(model, tmp_path_factory) -> dict[str, Path]:
    """fp32 programs at batch 1 and 3, an int8 one at batch 2 (lowering takes seconds each)."""
    folder = tmp_path_factory.mktemp("pte")
    made = {f"fp32.b{b}": p for b, p in export_programs(model, "fp32", (1, 3), SHAPE).items()}
    made |= {f"int8.b{b}": p for b, p in export_programs(
        model, "int8", (2,), SHAPE, calibration=images(32, seed=1), calibration_batch=16).items()}
    paths = {}
    for key, program in made.items():
        paths[key] = folder / f"m.{key}.pte"
        paths[key].write_bytes(program.buffer)
        assert program.delegated_nodes > 0 and program.batch_size == int(key.split(".b")[1])
    return paths


def torch_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_declares_what_it_supports_and_is_built_by_the_factory():
    target = make_target("executorch-xnnpack", {"threads": 2})
    assert isinstance(target, ExecuTorchXnnpackTarget) and target.threads == 2
    assert target.precisions == ("fp32", "int8") and not target.dynamic_batch
    assert target.source == "executorch"


@pytest.mark.parametrize(("precision", "calibration", "message"), [
    ("fp16", None, "made in fp32 or int8, not fp16"),
    ("int8", None, "needs calibration images")])
def test_the_exporter_refuses_what_it_cannot_make(model, precision, calibration, message):
    with pytest.raises(ExportError, match=message):
        export_programs(model, precision, (1,), SHAPE, calibration)


@needs_executorch
@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
def test_fp32_programs_match_pytorch_within_the_fp32_gate(model, programs, batch):
    x = images(6)
    with TARGET.load(programs[f"fp32.b{batch}"]) as runner:
        (spec,) = runner.inputs
        assert (spec.name, spec.dtype, spec.shape) == ("input", np.dtype(np.float32),
                                                       (batch, *SHAPE))
        ours = np.concatenate([runner.infer({"input": x[i:i + batch]})["logits"]
                               for i in range(0, 6, batch)])
    check_parity(measure_parity(torch_logits(model, x), ours, "torch", "m.pte", batch),
                 FP32_TOLERANCE)


@needs_executorch
@pytest.mark.slow
def test_int8_program_loads_and_stays_close_to_pytorch(model, programs):
    """Lowered with the channel pad outside XNNPACK: with it inside, loading fails."""
    x = images(2)
    with TARGET.load(programs["int8.b2"]) as runner:
        logits = runner.infer({"input": x})["logits"]
    assert logits.shape == (2, 10)
    assert measure_parity(torch_logits(model, x), logits, "torch", "int8", 2).rel_diff < 0.2


@needs_executorch
@pytest.mark.slow
def test_a_program_runs_only_its_own_batch(programs):
    with TARGET.load(programs["fp32.b1"]) as runner, \
            pytest.raises(FeedError, match=r"has shape \(3, 3, 32, 32\), expected \(1, 3, 32"):
        runner.infer({"input": images(3)})
    rows = measure(TARGET, programs["fp32.b1"], (1, 3), PLAN, feeds, precision="fp32")
    assert [row["status"] for row in rows] == ["ok", "skipped"]
    assert rows[1]["reason"] == "the artifact's batch size is fixed at 1"
    assert rows[0]["runtime_info"] == {"threadpool_threads": 1}


@needs_executorch
@pytest.mark.slow
def test_the_threadpool_size_is_restored_when_the_runner_closes(programs):
    _, lib = bindings()
    before = lib._threadpool_get_thread_count()
    target = ExecuTorchXnnpackTarget(ExecuTorchSettings(threads=before + 1))
    with target.load(programs["fp32.b1"]) as runner:
        assert runner.runtime_info["threadpool_threads"] == before + 1
    assert lib._threadpool_get_thread_count() == before


@needs_executorch
def test_build_refuses_what_is_not_a_program(tmp_path):
    with pytest.raises(BuildError, match=r"runs .pte programs, made per batch size by the "
                                         "export_executorch stage"):
        TARGET.build(tmp_path / "m.pt", tmp_path)
    with pytest.raises(BuildError, match="program not found"):
        TARGET.load(tmp_path / "m.fp32.b1.pte")
    garbage = tmp_path / "g.fp32.b1.pte"
    garbage.write_bytes(b"not a program")
    with pytest.raises(BuildError, match="ExecuTorch cannot load it"):
        TARGET.load(garbage)


def test_without_executorch_the_target_is_unavailable_and_rows_are_skipped(monkeypatch,
                                                                           tmp_path):
    for name in [n for n in sys.modules if n == "executorch" or n.startswith("executorch.")]:
        monkeypatch.setitem(sys.modules, name, None)  # importing any of them now raises
    monkeypatch.setitem(sys.modules, "executorch", None)
    target = ExecuTorchXnnpackTarget(ExecuTorchSettings(threads=1))
    ok, reason = target.available()
    assert not ok and "executorch is not installed" in reason and "[executorch]" in reason
    program = tmp_path / "m.fp32.b1.pte"
    program.write_bytes(b"never read")
    rows = measure(target, program, (1,), PLAN, feeds, precision="fp32")
    assert rows[0]["status"] == "skipped"
    assert rows[0]["reason"].startswith("target 'executorch-xnnpack' is not available")
