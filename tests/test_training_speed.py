"""The faster training paths: bf16 where the CPU has it natively, the frozen teacher in ONNX
Runtime, and that both keep a run deterministic on one machine."""

import logging

import numpy as np
import pytest
import torch
from test_training import schedule

from pipeline import cpu
from pipeline.config import DistillConfig
from pipeline.data import make_synthetic
from pipeline.distill import FrozenTeacher
from pipeline.errors import ConfigError, ParityError
from pipeline.models import build_model
from pipeline.students import distillation_loss_fn, freeze_teacher, teacher_runtime
from pipeline.teacher_onnx import OnnxRuntimeTeacher
from pipeline.training import TrainingRun, effective_amp, fit, make_loaders

CPU = torch.device("cpu")
SMALL = {"arch": "resnet20", "num_classes": 4, "base_width": 4}
DISTILL = DistillConfig(student_arch="resnet20", temperature=3.0, alpha=0.6,
                        teacher_runtime="auto", teacher_cache=False)
BF16_FLAGS = frozenset({"avx2", "avx512f", "avx512_bf16"})


@pytest.fixture
def avx512_dispatch(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)


def test_native_bf16_needs_the_instructions(avx512_dispatch):
    assert cpu.native_bf16(BF16_FLAGS)
    assert cpu.native_bf16(frozenset({"avx2", "amx_bf16"}))
    assert not cpu.native_bf16(frozenset({"avx2", "avx512f", "avx512_vnni"}))
    assert not cpu.native_bf16(frozenset())


@pytest.mark.parametrize("cap", ["AVX2", "avx512_core", "AVX512_CORE_VNNI"])
def test_a_onednn_cap_below_bf16_turns_it_off(avx512_dispatch, monkeypatch, cap):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert not cpu.native_bf16(BF16_FLAGS)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert cpu.native_bf16(BF16_FLAGS)


def test_aten_dispatch_below_avx512_turns_it_off(avx512_dispatch, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not cpu.native_bf16(BF16_FLAGS)


def test_describe_names_flags_caps_and_the_answer(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    described = cpu.describe()
    assert described["isa_caps"]["ATEN_CPU_CAPABILITY"] == "avx2"
    assert set(described["isa_flags"]) <= set(cpu.ISA_FLAGS)
    assert isinstance(described["native_bf16"], bool)


@pytest.mark.parametrize("native, requested, expected", [
    (True, "auto", "bf16"), (False, "auto", "off"), (True, "bf16", "bf16"),
    (False, "bf16", "off"), (True, "fp16", "off"), (True, "off", "off")])
def test_cpu_precision_follows_the_hardware(monkeypatch, native, requested, expected):
    monkeypatch.setattr(cpu, "native_bf16", lambda: native)
    assert effective_amp(CPU, requested) == expected


def test_a_precision_the_cpu_cannot_run_is_logged(monkeypatch, caplog):
    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert effective_amp(CPU, "bf16") == "off"
    assert "native bf16" in caplog.text and "fp32" in caplog.text


def test_the_teacher_runtime_follows_device_and_precision():
    assert teacher_runtime("auto", CPU, "off") == "onnxruntime"
    assert teacher_runtime("auto", CPU, "bf16") == "torch"  # the teacher runs bf16 too
    assert teacher_runtime("auto", torch.device("cuda"), "off") == "torch"
    assert teacher_runtime("torch", CPU, "off") == "torch"
    with pytest.raises(ConfigError, match="runs on the CPU"):
        teacher_runtime("onnxruntime", torch.device("cuda"), "off")


def small_teacher() -> torch.nn.Module:
    torch.manual_seed(3)
    return build_model(SMALL).eval()


def test_the_onnxruntime_teacher_gives_the_torch_logits():
    model = small_teacher()
    teacher = freeze_teacher(model, CPU, schedule(amp="off", channels_last=True), "auto",
                             (3, 32, 32))
    assert isinstance(teacher, OnnxRuntimeTeacher) and teacher.runtime == "onnxruntime"
    images = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    logits = teacher(images)
    with torch.no_grad():
        reference = model(images)
    assert teacher.checked and logits.dtype == torch.float32 and not logits.requires_grad
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    teacher.train()
    assert not teacher.teacher.training  # stays frozen inside a training student


def test_a_teacher_that_disagrees_with_torch_stops_training(monkeypatch):
    teacher = OnnxRuntimeTeacher(small_teacher(), (3, 32, 32), threads=1)
    honest = teacher._run
    monkeypatch.setattr(teacher, "_run", lambda images: honest(images) * 1.01)
    with pytest.raises(ParityError, match="teacher in onnxruntime"):
        teacher(torch.randn(4, 3, 32, 32))


def test_bf16_training_runs_the_torch_teacher(monkeypatch):
    monkeypatch.setattr(cpu, "native_bf16", lambda: True)
    teacher = freeze_teacher(small_teacher(), CPU, schedule(amp="auto"), "auto", (3, 32, 32))
    assert type(teacher) is FrozenTeacher


def kd_fit(tmp_path, teacher: FrozenTeacher, name: str, **changes) -> dict:
    cfg = schedule(epochs=2, **changes)
    dataset = make_synthetic(64, 32, 4, seed=0)
    train, test = make_loaders(dataset, cfg, CPU, seed=0)
    torch.manual_seed(0)
    student = build_model(SMALL)
    fit(student, TrainingRun(cfg=cfg, train_loader=train, test_loader=test,
                             loss_fn=distillation_loss_fn(teacher, DISTILL, 0.0),
                             checkpoint_path=tmp_path / f"{name}.pt", fingerprint=name))
    return student.state_dict()


def assert_same_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_kd_with_the_onnxruntime_teacher_is_deterministic(tmp_path):
    teacher = freeze_teacher(small_teacher(), CPU, schedule(), "onnxruntime", (3, 32, 32))
    first = kd_fit(tmp_path, teacher, "a")
    second = kd_fit(tmp_path, teacher, "b")
    assert_same_weights(first, second)
    # The same teacher as the eager one up to rounding, on every training batch. (Weights after
    # training are no measure: SGD amplifies rounding, and how far depends on the CPU and the
    # thread count - 0.019 apart with 1 thread on an AVX2 host.)
    eager = freeze_teacher(small_teacher(), CPU, schedule(), "torch", (3, 32, 32))
    train, _ = make_loaders(make_synthetic(64, 32, 4, seed=0), schedule(), CPU, seed=0)
    for images, _ in train:
        expected = eager(images)
        assert float((teacher(images) - expected).abs().max()) <= 1e-4 * float(
            expected.abs().max())


@pytest.mark.skipif(not cpu.native_bf16(), reason="this CPU has no native bf16")
def test_bf16_training_is_deterministic_and_really_bf16(tmp_path):
    teacher = freeze_teacher(small_teacher(), CPU, schedule(amp="bf16"), "auto", (3, 32, 32))
    first = kd_fit(tmp_path, teacher, "a", amp="bf16")
    assert_same_weights(first, kd_fit(tmp_path, teacher, "b", amp="bf16"))
    fp32 = kd_fit(tmp_path, teacher, "c", amp="off")
    assert any(not torch.equal(first[k], fp32[k]) for k in first)


def test_a_checkpoint_of_another_precision_is_not_resumed(tmp_path, monkeypatch):
    teacher = freeze_teacher(small_teacher(), CPU, schedule(), "torch", (3, 32, 32))
    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    kd_fit(tmp_path, teacher, "run", amp="auto")  # fp32 here: a finished 2-epoch checkpoint
    saved = torch.load(tmp_path / "run.pt", weights_only=True)
    assert saved["fingerprint"].endswith("|amp=off")
    monkeypatch.setattr(cpu, "native_bf16", lambda: True)
    cfg = schedule(epochs=2, amp="auto")
    train, test = make_loaders(make_synthetic(64, 32, 4, seed=0), cfg, CPU, seed=0)
    result = fit(build_model(SMALL), TrainingRun(
        cfg=cfg, train_loader=train, test_loader=test,
        loss_fn=distillation_loss_fn(teacher, DISTILL, 0.0),
        checkpoint_path=tmp_path / "run.pt", fingerprint="run"))
    assert result.resumed_from_epoch == 0 and result.amp == "bf16"


def test_parity_numbers_of_the_teacher_are_logged(caplog):
    teacher = OnnxRuntimeTeacher(small_teacher(), (3, 32, 32), threads=1)
    with caplog.at_level(logging.INFO, logger="pipeline.teacher_onnx"):
        teacher(torch.randn(4, 3, 32, 32))
    assert "relative diff" in caplog.text
    assert np.isfinite(float(caplog.text.split("relative diff")[-1].split()[0]))
