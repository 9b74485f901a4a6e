"""The one measuring path (targets.measure) on a fake target: precision reaches the runtime,
a precision the machine lacks is a skipped row, the runtime's own report goes into each row."""

from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from pipeline.config import TimingPlan
from targets.base import Runner, Target, TensorSpec
from targets.measure import measure

PLAN = TimingPlan(warmup_iters=0, warmup_seconds=0.0, min_iters=2, min_seconds=0.0)
SPEC = TensorSpec("input", np.dtype(np.float32), ("batch", 3))


class FakeRunner(Runner):
    def __init__(self, precision: str | None) -> None:
        self.runtime_info = {"inference_precision": precision}

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (SPEC,)

    def infer(self, feeds):
        return {"logits": feeds["input"]}


class FakeTarget(Target):
    name: ClassVar[str] = "fake"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "bf16")
    dynamic_batch: ClassVar[bool] = True
    settings_key: ClassVar[str] = "fake"
    Settings: ClassVar[type] = dict
    has_bf16 = True

    def available(self):
        return True, ""

    def precision_available(self, precision):
        if precision == "bf16" and not self.has_bf16:
            return False, "this CPU has no bf16 instructions"
        return super().precision_available(precision)

    def build(self, source: Path, out_dir: Path) -> Path:
        return source

    def load(self, artifact: Path, precision: str | None = None) -> FakeRunner:
        return FakeRunner(precision)


def feeds(spec: TensorSpec, batch: int) -> dict[str, np.ndarray]:
    return {spec.name: np.zeros((batch, 3), np.float32)}


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "m.fp32.onnx"
    path.write_bytes(b"fake")
    return path


def test_the_rows_precision_reaches_the_runtime(model_file):
    rows = measure(FakeTarget({}), model_file, (1, 2), PLAN, feeds, precision="bf16")
    assert [(r["batch_size"], r["status"]) for r in rows] == [(1, "ok"), (2, "ok")]
    assert all(r["runtime_info"] == {"inference_precision": "bf16"} for r in rows)


def test_a_precision_this_machine_lacks_is_skipped_with_the_reason(model_file):
    target = FakeTarget({})
    target.has_bf16 = False
    rows = measure(target, model_file, (1, 2), PLAN, feeds, precision="bf16")
    assert {r["status"] for r in rows} == {"skipped"}
    assert rows[0]["reason"] == ("bf16 on target 'fake' is not available here: this CPU has no "
                                 "bf16 instructions")
    assert measure(target, model_file, (1,), PLAN, feeds, precision="fp32")[0]["status"] == "ok"


def test_a_precision_the_target_does_not_run_is_skipped(model_file):
    (row,) = measure(FakeTarget({}), model_file, (1,), PLAN, feeds, precision="int8")
    assert row["status"] == "skipped"
    assert "target 'fake' does not run int8; it runs ['fp32', 'bf16']" in row["reason"]
