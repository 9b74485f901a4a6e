"""The engine stage on the export stage's real output (a tiny ResNet20, synthetic data): skipped
rows where TensorRT is absent, the build -> card -> parity path with a test-scaffolding target,
and ssh-tensorrt's build mode through the loopback sshd with the trtexec stand-in."""

import importlib.util
import json
import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnxruntime as ort
import pytest
import torch
from sshd_fixture import install_trtexec_standin, serve_sshd, settings_for
from test_stage_export import RUNTIME, export_config

import stages.export as export_stage
from pipeline.checkpoint import save_model
from pipeline.config import EngineConfig, EngineParityLimits, PruneConfig
from pipeline.data import make_synthetic, save_prepared
from pipeline.errors import BuildError, ParityError
from pipeline.export.cards import load_verified_engine, read_card, write_engine_card
from pipeline.flops import model_cost
from pipeline.models import build_model
from stages.engine import EnginePaths, Settings, engine_logits, parity_gate, run
from targets.base import EngineBuilder, Runner, Target, TensorSpec
from targets.engines import TensorRtSettings, engine_card, engine_source
from targets.onnxruntime_cpu import OnnxRuntimeRunner
from targets.registry import make_target

BUILD = TensorRtSettings(device=0, min_batch=1, opt_batch=16, max_batch=16, workspace_mib=64,
                         tf32=False)
LIMITS = EngineConfig(models=(), parity_images=48, fp32_max_rel_diff=1e-3,
                      fp16=EngineParityLimits(min_top1_agreement=0.9, max_top1_drop=10.0),
                      int8=EngineParityLimits(min_top1_agreement=0.5, max_top1_drop=50.0))
SETTINGS = Settings(LIMITS, PruneConfig(methods=("pdd",), budget=None), BUILD, RUNTIME)
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A workspace with data/prepared.npz and the export stage's artifacts (with cards)."""
    root = tmp_path_factory.mktemp("engine")
    dataset = make_synthetic(512, 64, 4, seed=0)
    save_prepared(dataset, root / "data" / "prepared.npz")
    torch.manual_seed(0)
    spec = {"arch": "resnet20", "num_classes": 4, "base_width": 4}
    model = build_model(spec).eval()
    cost = model_cost(model)
    meta = {"classes": list(dataset.classes), "mean": list(dataset.mean),
            "std": list(dataset.std), "input_shape": [3, 32, 32], "dataset": dataset.name,
            "params": cost.params, "macs": cost.macs, "top1": 0.25}
    save_model(root / "models" / "student_final_pdd.pt", model, spec, meta)
    export_stage.run(export_config(), RUNTIME, root / "models" / "student_final_pdd.pt",
                     root / "data" / "prepared.npz", root / "artifacts")
    return root


def workspace(exported: Path, tmp_path: Path) -> EnginePaths:
    for folder in ("data", "artifacts"):
        shutil.copytree(exported / folder, tmp_path / folder)
    return EnginePaths(tmp_path / "metrics" / "engine.json", tmp_path / "artifacts",
                       tmp_path / "data" / "prepared.npz", tmp_path)


class LogitsRunner(Runner):
    """ONNX Runtime's outputs, optionally perturbed."""

    def __init__(self, inner: OnnxRuntimeRunner, noise: float) -> None:
        self.inner, self.noise = inner, noise

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.inner.inputs

    def infer(self, feeds):
        out = self.inner.infer(feeds)
        return {k: v + self.noise * np.abs(v).max() * np.sin(np.arange(v.size)).reshape(v.shape)
                for k, v in out.items()}


class OnnxAsEngine(Target, EngineBuilder):
    """TEST SCAFFOLDING, not TensorRT: its "engine" is the ONNX file's bytes, carded like an
    engine and run by ONNX Runtime (outputs perturbed by `noise`), so the engine stage's card and
    parity path runs on a machine without TensorRT."""

    name: ClassVar[str] = "onnx-as-engine"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8")
    dynamic_batch: ClassVar[bool] = True
    settings_key: ClassVar[str] = "tensorrt"
    Settings: ClassVar[type] = TensorRtSettings
    onnx_flavors: ClassVar[dict[str, str]] = {"int8": "trt"}
    engines_run_here: ClassVar[bool] = True

    def __init__(self, settings, noise: float = 0.0) -> None:
        super().__init__(settings)
        self.noise = noise

    def available(self):
        return True, ""

    def build(self, onnx_path, out_dir):
        return self.build_engine(onnx_path, out_dir, self.settings)

    def build_engine(self, onnx_path, out_dir, build):
        source = engine_source(onnx_path)
        engine = source.engine_path(Path(out_dir), self.name)
        engine.write_bytes(source.path.read_bytes())
        facts = {"tensorrt": "0.0.0", "gpu": "none", "compute_capability": "0.0",
                 "platform": "test", "profile": {}, "workspace_bytes": 0, "tf32": False,
                 "build_seconds": 0.0, "built_with": "test scaffolding"}
        write_engine_card(engine, engine_card(source, self.name, facts))
        return engine

    def load(self, artifact):
        data, card = load_verified_engine(artifact)
        options = ort.SessionOptions()
        if card["precision"] == "int8":  # as TensorRT computes it: the QDQ file as written
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        return LogitsRunner(OnnxRuntimeRunner(session, Path(artifact)), self.noise)


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here: nothing is skipped")
def test_without_tensorrt_every_row_is_skipped_and_the_folder_kept_empty(exported, tmp_path):
    paths = workspace(exported, tmp_path)
    folder = paths.root / "engines" / "tensorrt" / "fp16"
    folder.mkdir(parents=True)
    (folder / "timing.cache").write_bytes(b"tactics")  # kept: DVC persists the folder for it
    (folder / "old.fp16.tensorrt.engine").write_bytes(b"stale")
    result = run(SETTINGS, make_target("tensorrt", BUILD), "fp16", paths)
    row = result["models"]["student_final_pdd"]
    assert row["status"] == "skipped" and "TensorRT Python bindings are not importable" in \
        row["reason"] and not result["available"]
    assert sorted(p.name for p in folder.iterdir()) == ["timing.cache"]
    assert json.loads(paths.metrics.read_text()) == result


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engines_that_match_onnx_runtime_pass_with_their_card(exported, tmp_path, precision):
    paths = workspace(exported, tmp_path)
    result = run(SETTINGS, OnnxAsEngine(BUILD), precision, paths)
    row = result["models"]["student_final_pdd"]
    engine = paths.root / "engines" / "onnx-as-engine" / precision / \
        f"student_final_pdd.{precision}.onnx-as-engine.engine"
    assert row["status"] == "ok" and row["engine"] == str(engine)
    assert row["onnx"].endswith("student_final_pdd.int8.trt.onnx" if precision == "int8"
                                else f"student_final_pdd.{precision}.onnx")
    _, card = load_verified_engine(engine)
    source = read_card(Path(row["onnx"]).with_suffix(".card.json"))
    assert card["classes"] == source["classes"] and card["mean"] == source["mean"]
    assert card["source_onnx_sha256"] == source["sha256"] and card["precision"] == precision
    parity = row["parity"]
    assert parity["status"] == "ok" and parity["images"] == 48 and parity["rel_diff"] == 0.0
    assert parity["top1_agreement"] == 1.0 and parity["top1_drop_points"] == 0.0


def test_an_engine_outside_the_limit_is_refused_and_removed(exported, tmp_path):
    paths = workspace(exported, tmp_path)
    with pytest.raises(ParityError, match=r"student_final_pdd.fp32.onnx-as-engine.engine vs "
                                          r"onnxruntime-cpu on 48 test images: relative diff "
                                          r".* exceeds the allowed 1\.000e-03"):
        run(SETTINGS, OnnxAsEngine(BUILD, noise=0.01), "fp32", paths)
    folder = paths.root / "engines" / "onnx-as-engine" / "fp32"
    assert list(folder.iterdir()) == []  # neither the engine nor its card remains
    row = json.loads(paths.metrics.read_text())["models"]["student_final_pdd"]
    assert row["status"] == "failed" and "ParityError" in row["reason"]


def test_parity_gate_names_every_limit_it_breaks():
    result = {"engine": "m.int8.tensorrt.engine", "images": 100, "rel_diff": 0.3,
              "top1_agreement": 0.4, "top1_drop_points": 60.0}
    with pytest.raises(ParityError, match=r"top-1 agreement 40.00% is below the required "
                                          r"50.00% \(engine.int8\); top-1 60.00 points below"):
        parity_gate(result, "int8", LIMITS)
    parity_gate({**result, "top1_agreement": 0.6, "top1_drop_points": 1.0}, "int8", LIMITS)
    with pytest.raises(ParityError, match="relative diff 3.000e-01 exceeds"):
        parity_gate(result, "fp32", LIMITS)


def test_engine_logits_cover_every_image_within_the_profile():
    class Echo(Runner):
        seen: list[int] = []

        @property
        def inputs(self):
            return (TensorSpec("input", np.dtype(np.float32), (None, 2)),)

        def infer(self, feeds):
            Echo.seen.append(len(feeds["input"]))
            return {"logits": feeds["input"] * 2}

    images = np.arange(38, dtype=np.float32).reshape(19, 2)
    build = TensorRtSettings(device=0, min_batch=4, opt_batch=8, max_batch=8, workspace_mib=1,
                             tf32=False)
    np.testing.assert_array_equal(engine_logits(Echo(), images, build), images * 2)
    assert Echo.seen == [8, 8, 4]  # the tail of 3 padded up to min_batch


def test_a_missing_source_file_fails_the_stage_with_the_row_written(exported, tmp_path):
    paths = workspace(exported, tmp_path)
    (paths.artifacts / "student_final_pdd.int8.trt.onnx").unlink()
    with pytest.raises(BuildError, match="student_final_pdd.int8.trt.onnx: expected an existing"):
        run(SETTINGS, OnnxAsEngine(BUILD), "int8", paths)
    rows = json.loads(paths.metrics.read_text())["models"]
    assert rows["student_final_pdd"]["status"] == "failed"


# --- ssh-tensorrt's build mode, device = the loopback sshd with the trtexec stand-in ---

@pytest.fixture(scope="module")
def sshd_server(tmp_path_factory):
    yield from serve_sshd(tmp_path_factory)


@pytest.mark.edge
def test_ssh_engines_are_built_on_the_device_and_carded(exported, tmp_path, sshd_server):
    paths = workspace(exported, tmp_path)
    standin = install_trtexec_standin(sshd_server.folder, "100300")
    target = make_target("ssh-tensorrt", settings_for(sshd_server, trtexec=str(standin)))
    result = run(SETTINGS, target, "int8", paths)
    row = result["models"]["student_final_pdd"]
    assert row["status"] == "ok" and row["onnx"].endswith("student_final_pdd.int8.trt.onnx")
    assert (row["tensorrt"], row["gpu"], row["compute_capability"]) == ("10.3.0", "Orin", "8.7")
    assert row["parity"]["status"] == "not checked" and "on the device" in row["parity"]["reason"]
    folder = paths.root / "engines" / "ssh-tensorrt" / "int8"
    assert sorted(p.name for p in folder.iterdir()) == [
        "student_final_pdd.int8.ssh-tensorrt.card.json",
        "student_final_pdd.int8.ssh-tensorrt.engine",
        "timing.cache"]
    _, card = load_verified_engine(folder / "student_final_pdd.int8.ssh-tensorrt.engine")
    assert card["engine_sha256"] == row["engine_sha256"]
    assert card["source_card"]["sha256"] == card["source_onnx_sha256"]
    assert card["profile"]["max"] == [16, 3, 32, 32] and card["mean"] == card["source_card"]["mean"]


@pytest.mark.edge
def test_a_device_without_trtexec_gives_skipped_rows(exported, tmp_path, sshd_server):
    paths = workspace(exported, tmp_path)
    target = make_target("ssh-tensorrt", settings_for(sshd_server, trtexec="/nonexistent/trt"))
    row = run(SETTINGS, target, "fp16", paths)["models"]["student_final_pdd"]
    assert row["status"] == "skipped" and "'/nonexistent/trt' not found on the device" in \
        row["reason"]
    assert not list((paths.root / "engines" / "ssh-tensorrt" / "fp16").iterdir())


def test_settings_are_read_from_the_resolved_files(tmp_path, monkeypatch):
    from pipeline.config import as_dict
    from pipeline.io import write_json
    from stages import engine as engine_stage

    calls = {}
    monkeypatch.setattr(engine_stage, "run", lambda s, t, p, paths: calls.update(
        settings=s, target=t.name, precision=p, metrics=paths.metrics))
    for stem, content in {"engine": as_dict(LIMITS), "prune": as_dict(SETTINGS.prune),
                          "targets/tensorrt": as_dict(BUILD),
                          "targets/onnxruntime-cpu": as_dict(RUNTIME)}.items():
        write_json(tmp_path / "resolved" / f"{stem}.json", content)
    monkeypatch.chdir(tmp_path)
    engine_stage.main(["--target", "tensorrt", "--precision", "fp16"])
    assert calls == {"settings": SETTINGS, "target": "tensorrt", "precision": "fp16",
                     "metrics": Path("metrics/engine_tensorrt-fp16.json")}
