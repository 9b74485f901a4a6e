"""The fine-tuning stage: a sparse student keeps its zeros, and prune_then_kd's recovery teacher
is the unpruned student (its prune stage's gated model with every gate open)."""

import pytest
import torch
from stage_settings import ONE_PROCESS

from pipeline.checkpoint import load_model, save_model
from pipeline.config import DistillConfig, RunConfig, TrainConfig
from pipeline.data import make_synthetic, save_prepared
from pipeline.errors import CheckpointError
from pipeline.flops import sparse_cost
from pipeline.models import build_model
from pipeline.prune.gates import attach_gates
from pipeline.prune.sparse import apply_masks, magnitude_masks
from stages import student_final as final_stage
from stages._common import TrainingPaths

SPEC = {"arch": "resnet20", "num_classes": 10, "base_width": 4}


def settings() -> final_stage.Settings:
    schedule = TrainConfig(epochs=1, batch_size=16, eval_batch_size=32, lr=0.05, momentum=0.9,
                           nesterov=True, weight_decay=5e-4, schedule="cosine", milestones=(),
                           gamma=0.1, warmup_epochs=0, label_smoothing=0.0, amp="off",
                           channels_last=False)
    return final_stage.Settings(common=RunConfig(seed=0, device="cpu", threads=0,
                                                 distributed=ONE_PROCESS, profile="smoke"),
                                distill=DistillConfig(student_arch="resnet20", temperature=3.0,
                                                      alpha=0.6, teacher_runtime="torch",
                                                      teacher_cache=False),
                                student_final=schedule)


def workspace(tmp_path, method: str, pruning: dict, model) -> TrainingPaths:
    dataset = make_synthetic(32, 16, 10, seed=0)
    save_prepared(dataset, tmp_path / "prepared.npz")
    meta = {"classes": list(dataset.classes), "mean": list(dataset.mean),
            "std": list(dataset.std), "input_shape": [3, 32, 32], "dataset": "synthetic",
            "top1": 0.1, "params": 1, "macs": 1}
    torch.manual_seed(1)
    save_model(tmp_path / "teacher.pt", build_model(SPEC), SPEC, meta)
    save_model(tmp_path / "slim.pt", model, SPEC, {**meta, "pruning": pruning})
    return TrainingPaths(f"student_final_{method}", dataset=tmp_path / "prepared.npz",
                         teacher=tmp_path / "teacher.pt", teacher_logits=None,
                         start=tmp_path / "slim.pt")


def test_a_sparse_student_keeps_every_zero(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = build_model(SPEC)
    apply_masks(model, magnitude_masks(model, 0.8))
    before = sparse_cost(model).sparsity
    paths = workspace(tmp_path, "weight", {"method": "weight", "structured": False}, model)
    metrics = final_stage.run(settings(), "weight", paths)
    tuned = load_model(paths.model).model
    assert metrics["sparsity"] == before == sparse_cost(tuned).sparsity
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(),
                                                      model.state_dict().values(), strict=True))


def test_the_unpruned_student_can_be_the_recovery_teacher(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    gated = attach_gates(build_model(SPEC), torch.zeros(1, 3, 32, 32)).open_all()
    closed = {key: torch.arange(w) < w // 2 for key, w in gated.group_widths().items()}
    gated.set_keep(closed)  # the pruned decision; the weights are the unpruned network's
    (tmp_path / "models").mkdir()
    save_model(tmp_path / "models" / "student_pruned_prune_then_kd.pt", gated, SPEC,
               {"input_shape": [3, 32, 32]})
    pruning = {"method": "prune_then_kd", "recovery_teacher": "unpruned"}
    paths = workspace(tmp_path, "prune_then_kd", pruning, build_model(SPEC))
    teacher, source = final_stage.recovery_teacher(pruning, "prune_then_kd", paths,
                                                   torch.device("cpu"), settings().student_final,
                                                   settings().distill)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(images), gated.plain_copy().eval()(images))
        assert not torch.allclose(teacher(images), gated.eval()(images))
    assert source == final_stage.unpruned_path("prune_then_kd")


def test_a_slim_file_of_another_method_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = workspace(tmp_path, "kddp", {"method": "netslim", "structured": True},
                      build_model(SPEC))
    with pytest.raises(CheckpointError, match="expected a student pruned by 'kddp'"):
        final_stage.run(settings(), "kddp", paths)
