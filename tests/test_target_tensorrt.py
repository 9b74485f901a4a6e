"""The tensorrt target. Without TensorRT: its absence is a reason, never an import error; and its
build and runner code runs against stand-in modules (tests/tensorrt_stub.py, test scaffolding)
that record the TensorRT and pycuda calls. With TensorRT and a GPU (marked `tensorrt`, `gpu`):
engines of all three models at every precision are built, loaded and checked against ONNX
Runtime CPU by the engine stage."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorrt_stub
import torch
from sshd_fixture import tiny_checkpoint, tiny_onnx
from test_stage_export import RUNTIME, export_config

import stages.export as export_stage
from pipeline.checkpoint import save_model
from pipeline.config import EngineConfig, EngineParityLimits
from pipeline.data import make_synthetic, save_prepared
from pipeline.errors import BuildError, EngineMismatchError, FeedError
from pipeline.export.cards import load_verified_engine, write_engine_card
from pipeline.flops import model_cost
from pipeline.models import build_model
from pipeline.prune.gates import attach_gates
from pipeline.prune.slimming import slim
from pipeline.timing import TimingPlan
from stages.engine import EnginePaths, Settings, run
from targets.engines import TensorRtSettings
from targets.registry import make_target

BUILD = {"device": 0, "min_batch": 1, "opt_batch": 4, "max_batch": 8, "workspace_mib": 64,
         "tf32": False}
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_PYCUDA = importlib.util.find_spec("pycuda") is not None


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    return tiny_onnx(tiny_checkpoint(folder / "m.pt"), folder / "m.fp32.onnx")


def test_importing_the_registry_loads_no_tensorrt_or_pycuda():
    code = ("import sys, targets.registry as r; r.target_class('tensorrt'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'pycuda')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == "[]"


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_without_tensorrt_the_target_says_how_to_install_it():
    ok, reason = make_target("tensorrt", BUILD).available()
    assert not ok and "TensorRT Python bindings are not importable" in reason
    assert "prune-deploy[tensorrt]" in reason and "python3-libnvinfer" in reason


# --- the build and runner code against the stand-in modules (plumbing, not TensorRT) ---

def test_build_asks_for_a_strongly_typed_network_profile_workspace_and_timing_cache(
        monkeypatch, onnx_file, tmp_path):
    knobs = tensorrt_stub.install(monkeypatch)
    (tmp_path / "timing.cache").write_bytes(b"old")
    target = make_target("tensorrt", BUILD)
    assert target.available() == (True, "")
    engine = target.build(onnx_file, tmp_path)
    calls = knobs.calls
    assert ("create_network", 1 << 1) in calls  # 1 << STRONGLY_TYPED, nothing else
    assert ("clear_flag", 6) in calls  # BuilderFlag.TF32
    assert ("set_memory_pool_limit", 0, 64 << 20) in calls  # WORKSPACE, bytes
    assert ("add_optimization_profile", ("input", (1, 3, 32, 32), (4, 3, 32, 32),
                                         (8, 3, 32, 32))) in calls
    assert ("set_timing_cache", b"old", False) in calls
    assert (tmp_path / "timing.cache").read_bytes() == b"old+tactics"  # written back
    assert calls.index(("push",)) < calls.index(("create_network", 2)) < calls.index(("pop",))
    _, card = load_verified_engine(engine)
    assert (card["tensorrt"], card["plan_version"]) == ("10.3.0.30", "10.3.0.30")
    assert (card["gpu"], card["compute_capability"]) == ("Orin", "8.7")
    assert card["timing_cache"]["state"] == "reused" and card["strongly_typed"] is True


def test_tf32_stays_on_when_the_settings_allow_it(monkeypatch, onnx_file, tmp_path):
    knobs = tensorrt_stub.install(monkeypatch)
    make_target("tensorrt", {**BUILD, "tf32": True}).build(onnx_file, tmp_path)
    assert not [call for call in knobs.calls if call[0] == "clear_flag"]


def test_a_refused_timing_cache_is_replaced_and_said_so(monkeypatch, onnx_file, tmp_path):
    tensorrt_stub.install(monkeypatch, tensorrt_stub.Knobs(cache_accepted=False))
    (tmp_path / "timing.cache").write_bytes(b"from another gpu")
    _, card = load_verified_engine(make_target("tensorrt", BUILD).build(onnx_file, tmp_path))
    assert card["timing_cache"]["state"].startswith("replaced")
    assert (tmp_path / "timing.cache").read_bytes() == b"+tactics"


def test_parser_errors_name_the_failing_node(monkeypatch, onnx_file, tmp_path):
    tensorrt_stub.install(monkeypatch, tensorrt_stub.Knobs(parse_errors=[
        (7, "/layer1/Conv", "Conv", "Assertion failed: shiftIsAllZeros(zeroPoint)")]))
    with pytest.raises(BuildError, match=r"cannot parse m.fp32.onnx: node 7 '/layer1/Conv' "
                                         r"\(Conv\): ErrorCode.UNSUPPORTED_NODE: Assertion"):
        make_target("tensorrt", BUILD).build(onnx_file, tmp_path)
    assert not list(tmp_path.glob("*.engine"))


def test_a_failed_build_reports_what_the_logger_heard(monkeypatch, onnx_file, tmp_path):
    tensorrt_stub.install(monkeypatch, tensorrt_stub.Knobs(build_fails=True))
    with pytest.raises(BuildError, match="failed to build m.fp32.onnx: Myelin: could not infer"):
        make_target("tensorrt", BUILD).build(onnx_file, tmp_path)


def test_runner_validates_feeds_runs_by_name_and_frees_everything(monkeypatch, onnx_file,
                                                                 tmp_path):
    knobs = tensorrt_stub.install(monkeypatch)
    target = make_target("tensorrt", BUILD)
    engine = target.build(onnx_file, tmp_path)
    images = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    with target.load(engine) as runner:
        assert runner.inputs[0].shape == (None, 3, 32, 32)
        logits = runner.infer({"input": images})["logits"]
        np.testing.assert_allclose(logits, 2 * images.mean(axis=(2, 3)), rtol=1e-6)
        with pytest.raises(FeedError, match=r"outside the engine's optimisation profile"):
            runner.infer({"input": np.zeros((9, 3, 32, 32), np.float32)})
        with pytest.raises(FeedError, match="dtype float64"):
            runner.infer({"input": images.astype(np.float64)})
        stats = runner.benchmark({"input": images}, TimingPlan(1, 0.0, 3, 0.0))
        assert stats.clock == "cuda-events" and set(stats.phase_p50_ms) == {"h2d", "compute",
                                                                           "d2h"}
    frees = [call for call in knobs.calls if call[0] == "free"]
    assert len(frees) == 2 and knobs.calls[-1] == ("pop",)  # freed, then the context popped
    assert knobs.calls.count(("push",)) == knobs.calls.count(("pop",))


def test_a_card_for_another_gpu_is_refused_before_deserializing(monkeypatch, onnx_file,
                                                               tmp_path):
    knobs = tensorrt_stub.install(monkeypatch)
    engine = make_target("tensorrt", BUILD).build(onnx_file, tmp_path)
    knobs.compute_capability, knobs.gpu = (8, 6), "NVIDIA GeForce RTX 3070"
    with pytest.raises(EngineMismatchError, match=r"built for compute capability 8.7 \(Orin\), "
                                                  r"this GPU \(NVIDIA GeForce RTX 3070\) has "
                                                  r"8.6"):
        make_target("tensorrt", BUILD).load(engine)
    assert ("deserialize_cuda_engine",) not in knobs.calls


def test_bytes_tensorrt_cannot_deserialize_are_an_error_with_its_log(monkeypatch, onnx_file,
                                                                    tmp_path):
    knobs = tensorrt_stub.install(monkeypatch)
    engine = make_target("tensorrt", BUILD).build(onnx_file, tmp_path)
    _, card = load_verified_engine(engine)
    engine.write_bytes(b"garbage")
    write_engine_card(engine, {k: v for k, v in card.items()
                               if k not in ("file", "engine_sha256", "size_bytes")})
    with pytest.raises(BuildError, match="could not deserialize the engine: Error Code 4"):
        make_target("tensorrt", BUILD).load(engine)
    assert knobs.calls.count(("push",)) == knobs.calls.count(("pop",))


# --- on a GPU with TensorRT: all three models, every precision, parity with ONNX Runtime ---

GPU_REASON = ("needs TensorRT and pycuda (pip install 'prune-deploy[tensorrt,pycuda]') and a "
              "CUDA device")


def _gpu_ready() -> bool:
    if not (HAS_TENSORRT and HAS_PYCUDA):
        return False
    return make_target("tensorrt", BUILD).available()[0]


@pytest.fixture(scope="module")
def three_models(tmp_path_factory) -> Path:
    """A workspace with the export stage's files of a teacher (ResNet56), an unpruned student
    (ResNet20) and a pruned, slimmed student, trained on nothing (random weights)."""
    root = tmp_path_factory.mktemp("three")
    dataset = make_synthetic(512, 256, 10, seed=0)
    save_prepared(dataset, root / "data" / "prepared.npz")
    torch.manual_seed(0)
    teacher = {"arch": "resnet56", "num_classes": 10, "base_width": 8}
    student = {"arch": "resnet20", "num_classes": 10, "base_width": 8}
    models = {"teacher": (build_model(teacher).eval(), teacher),
              "student_dense": (build_model(student).eval(), student)}
    gated = attach_gates(build_model(student), torch.zeros(1, 3, 32, 32))
    with torch.no_grad():
        for index, key in enumerate(gated.group_keys):
            logits = gated.gate(key).logits
            logits.fill_(1.0)
            if index % 2:
                logits[: len(logits) // 2] = -1.0
    slimmed, pruning = slim(gated.eval(), round_to=1)
    models["student_final"] = (slimmed.eval(), {**student, "pruning": pruning})
    for name, (model, spec) in models.items():
        cost = model_cost(model)
        meta = {"classes": list(dataset.classes), "mean": list(dataset.mean),
                "std": list(dataset.std), "input_shape": [3, 32, 32], "dataset": dataset.name,
                "params": cost.params, "macs": cost.macs, "top1": 0.1}
        save_model(root / "models" / f"{name}.pt", model, spec, meta)
        export_stage.run(export_config(), RUNTIME, root / "models" / f"{name}.pt",
                         root / "data" / "prepared.npz", root / "artifacts", name)
    return root


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason=GPU_REASON)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engines_of_all_three_models_match_onnx_runtime(three_models, tmp_path, precision):
    # Random weights leave near-tied logits, so the top-1 limits are looser than params'; a
    # broken engine agrees with ONNX Runtime on about 1 image in 10.
    settings = Settings(EngineConfig(models=("teacher", "student_dense", "student_final"),
                                     parity_images=256, fp32_max_rel_diff=1e-3,
                                     fp16=EngineParityLimits(min_top1_agreement=0.9,
                                                             max_top1_drop=5.0),
                                     int8=EngineParityLimits(min_top1_agreement=0.8,
                                                             max_top1_drop=10.0)),
                        TensorRtSettings(**BUILD), RUNTIME)
    paths = EnginePaths(tmp_path / "engine.json", three_models / "artifacts",
                        three_models / "data" / "prepared.npz")
    result = run(settings, make_target("tensorrt", BUILD), precision, paths)
    for model, row in result["models"].items():
        assert row["status"] == "ok" and row["parity"]["status"] == "ok", model
        _, card = load_verified_engine(Path(row["engine"]))
        assert card["precision"] == precision and card["tf32"] is False
        assert card["profile"]["max"] == [8, 3, 32, 32]
    rebuilt = run(settings, make_target("tensorrt", BUILD), precision, paths)
    assert all(row["timing_cache"]["state"] == "reused" for row in rebuilt["models"].values())
