"""The OpenVINO CPU target: IR with FP32 weights, FP32 parity with ONNX Runtime, pinned inference
precision, bf16 only where the CPU has it, input checks, telemetry declined, absence = skipped."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from sshd_fixture import tiny_checkpoint, tiny_onnx

from pipeline.config import QuantizeConfig, TimingPlan
from pipeline.errors import BuildError, FeedError, ParityError
from pipeline.export.onnx_export import save_onnx
from pipeline.export.quantize import quantize_int8
from pipeline.parity import FP32_TOLERANCE, check_parity, measure_parity
from targets.measure import measure
from targets.onnxruntime_cpu import OnnxRuntimeCpuSettings, OnnxRuntimeCpuTarget
from targets.openvino_cpu import OpenVinoCpuTarget, OpenVinoSettings, import_openvino
from targets.registry import make_target

REPO = Path(__file__).resolve().parents[1]
TARGET = OpenVinoCpuTarget(OpenVinoSettings(threads=1))
needs_openvino = pytest.mark.skipif(not TARGET.available()[0],
                                    reason=f"openvino-cpu: {TARGET.available()[1]}")
PLAN = TimingPlan(warmup_iters=1, warmup_seconds=0.0, min_iters=2, min_seconds=0.0)


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 32, 32)).astype(np.float32)


def feeds(spec, batch):
    return {spec.name: images(batch)}


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory) -> dict[str, Path]:
    """A tiny ResNet's FP32 ONNX and its ONNX Runtime QDQ INT8 file, as the export stage makes."""
    folder = tmp_path_factory.mktemp("ov")
    fp32 = tiny_onnx(tiny_checkpoint(folder / "m.pt"), folder / "m.fp32.onnx")
    settings = QuantizeConfig(calibration_images=512, calibration_batch=128,
                              calibration_method="minmax", activation_type="uint8",
                              reduce_range=True, max_top1_drop=100.0)
    int8 = save_onnx(quantize_int8(onnx.load(fp32), images(512, seed=1), settings),
                     folder / "m.int8.onnx")
    return {"fp32": fp32, "int8": int8}


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    settings = OnnxRuntimeCpuSettings("all", 1, 1, ("CPUExecutionProvider",))
    with OnnxRuntimeCpuTarget(settings).load(path) as runner:
        return runner.infer({"input": x})["logits"]


def ov_logits(artifact: Path, x: np.ndarray, precision: str | None = None) -> np.ndarray:
    with TARGET.load(artifact, precision) as runner:
        return runner.infer({"input": x})["logits"]


def test_declares_what_it_supports_and_is_built_by_the_factory():
    target = make_target("openvino-cpu", {"threads": 2})
    assert isinstance(target, OpenVinoCpuTarget) and target.threads == 2
    assert target.precisions == ("fp32", "bf16", "int8") and target.dynamic_batch
    assert target.source == "openvino" and target.source_precision("bf16") == "fp32"


@needs_openvino
def test_build_writes_an_ir_whose_fp32_matches_onnx_runtime_within_the_fp32_gate(onnx_files,
                                                                                  tmp_path):
    ir = TARGET.build(onnx_files["fp32"], tmp_path)
    assert ir == tmp_path / "m.fp32.xml" and ir.with_suffix(".bin").is_file()
    assert not list(tmp_path.glob("*.tmp"))
    x = images(64)
    for batch in (1, 64):  # one compiled model serves both batch sizes
        ours = np.concatenate([ov_logits(ir, x[i:i + batch]) for i in range(0, 64, batch)])
        check_parity(measure_parity(ort_logits(onnx_files["fp32"], x), ours, "onnxruntime",
                                    ir.name, batch), FP32_TOLERANCE)
    assert TARGET.build(ir, tmp_path / "elsewhere") == ir  # an IR is used as it is


@needs_openvino
def test_the_fp32_gate_catches_weights_saved_in_fp16(onnx_files, tmp_path):
    """ov.save_model's default (compress_to_fp16=True) is what build must not use."""
    ov = import_openvino()
    compressed = tmp_path / "m.fp32.xml"
    ov.save_model(TARGET.core().read_model(str(onnx_files["fp32"])), str(compressed))
    x = images(64)
    result = measure_parity(ort_logits(onnx_files["fp32"], x), ov_logits(compressed, x),
                            "onnxruntime", compressed.name, 64)
    with pytest.raises(ParityError, match="relative diff .* exceeds the allowed 1.000e-04"):
        check_parity(result, FP32_TOLERANCE)
    built = TARGET.build(onnx_files["fp32"], tmp_path / "built")
    assert built.with_suffix(".bin").stat().st_size > 1.9 * compressed.with_suffix(
        ".bin").stat().st_size  # FP32 weights: twice the bytes


@needs_openvino
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_fp32_and_int8_rows_pin_inference_precision_and_threads(onnx_files, tmp_path, precision):
    ir = TARGET.build(onnx_files[precision], tmp_path)
    with TARGET.load(ir) as runner:
        assert runner.runtime_info == {"inference_precision": "f32",
                                       "performance_hint": "LATENCY", "threads": 1, "streams": 1}
        (spec,) = runner.inputs
        assert (spec.name, spec.dtype, spec.shape) == ("input", np.dtype(np.float32),
                                                       (None, 3, 32, 32))


@needs_openvino
def test_int8_ir_runs_the_qdq_file_close_to_onnx_runtime(onnx_files, tmp_path):
    ir = TARGET.build(onnx_files["int8"], tmp_path)
    x = images(64)
    reference = ort_logits(onnx_files["int8"], x)
    result = measure_parity(reference, ov_logits(ir, x), "onnxruntime int8", ir.name, 64)
    assert result.rel_diff < 0.1  # the same QDQ model, rounded at different points


@needs_openvino
def test_bf16_row_compiles_the_fp32_ir_in_bf16_where_the_cpu_has_it(onnx_files, tmp_path):
    if not TARGET.precision_available("bf16")[0]:
        pytest.skip(TARGET.precision_available("bf16")[1])
    ir = TARGET.build(onnx_files["fp32"], tmp_path)
    x = images(16)
    with TARGET.load(ir, "bf16") as runner:
        assert runner.runtime_info["inference_precision"] == "bf16"
        bf16 = runner.infer({"input": x})["logits"]
    rel = measure_parity(ov_logits(ir, x), bf16, "f32", "bf16", 16).rel_diff
    assert 1e-5 < rel < 5e-2  # really bf16, and still the same function


@needs_openvino
def test_a_cpu_without_bf16_gives_skipped_bf16_rows(onnx_files, tmp_path, monkeypatch):
    target = OpenVinoCpuTarget(OpenVinoSettings(threads=1))
    core = target.core()
    real = core.get_property

    class NoBf16Core:
        available_devices = core.available_devices

        def get_property(self, device, name):
            value = real(device, name)
            return [c for c in value if c != "BF16"] if name == "OPTIMIZATION_CAPABILITIES" \
                else value

        def __getattr__(self, name):
            return getattr(core, name)

    monkeypatch.setattr(target, "_core", NoBf16Core())
    ir = TARGET.build(onnx_files["fp32"], tmp_path)
    rows = measure(target, ir, (1, 4), PLAN, feeds, precision="bf16")
    assert {row["status"] for row in rows} == {"skipped"}
    assert "has no bf16 support: OpenVINO's OPTIMIZATION_CAPABILITIES are [" in rows[0]["reason"]
    assert [row["status"] for row in measure(target, ir, (1, 4), PLAN, feeds,
                                             precision="fp32")] == ["ok", "ok"]


@needs_openvino
@pytest.mark.parametrize(("feed", "message"), [
    ({"input": images(2).astype(np.float64)}, "has dtype float64, expected float32"),
    ({"image": images(2)}, r"inputs \['image'\] given, expected \['input'\]"),
    ({"input": images(2)[:, :, :28]}, r"has shape \(2, 3, 28, 32\)"),
])
def test_runner_checks_feeds_before_running(onnx_files, feed, message):
    with TARGET.load(onnx_files["fp32"]) as runner, pytest.raises(FeedError, match=message):
        runner.infer(feed)


@needs_openvino
def test_unreadable_or_incomplete_files_are_build_errors(onnx_files, tmp_path):
    garbage = tmp_path / "g.fp32.xml"
    garbage.write_text("not an IR")
    (tmp_path / "g.fp32.bin").write_bytes(b"")
    with pytest.raises(BuildError, match="OpenVINO cannot read it"):
        TARGET.load(garbage)
    ir = TARGET.build(onnx_files["fp32"], tmp_path / "ir")
    ir.with_suffix(".bin").unlink()
    with pytest.raises(BuildError, match=r"its weights m.fp32.bin are missing"):
        TARGET.load(ir)
    with pytest.raises(BuildError, match="reads .onnx files or OpenVINO IR"):
        TARGET.build(tmp_path / "m.pt", tmp_path)


@needs_openvino
def test_importing_openvino_through_the_target_declines_its_telemetry(tmp_path):
    """`import openvino` writes a telemetry client id under ~/intel; import_openvino must not."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}

    def home_after(code: str, home: Path) -> list[str]:
        home.mkdir()
        subprocess.run([sys.executable, "-c", code], env=env | {"HOME": str(home)}, cwd=REPO,
                       check=True, capture_output=True, timeout=120)
        return sorted(p.name for p in home.rglob("*"))

    plain = home_after("import openvino", tmp_path / "plain")
    assert "openvino_ga_cid" in plain  # the behaviour the guard is for (control)
    guarded = home_after("import os; from targets.openvino_cpu import import_openvino; "
                         "import_openvino(); assert 'CI' not in os.environ", tmp_path / "guarded")
    assert guarded == []


def test_without_openvino_the_target_is_unavailable_and_rows_are_skipped(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises
    target = OpenVinoCpuTarget(OpenVinoSettings(threads=1))
    ok, reason = target.available()
    assert not ok and "openvino is not installed" in reason and "[openvino]" in reason
    model = tmp_path / "m.fp32.xml"
    model.write_text("never read")
    rows = measure(target, model, (1, 64), PLAN, feeds, precision="fp32")
    assert [row["status"] for row in rows] == ["skipped", "skipped"]
    assert rows[0]["reason"].startswith("target 'openvino-cpu' is not available: openvino is not")
