"""The training engine: schedules, and resuming after an interruption."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ruamel.yaml import YAML
from torch import nn

from pipeline.config import TrainConfig
from pipeline.data import make_synthetic
from pipeline.training import TrainingRun, cross_entropy_loss, fit, lr_factor, make_loaders

REPO = Path(__file__).resolve().parents[1]


def schedule(**changes) -> TrainConfig:
    settings = dict(epochs=3, batch_size=16, eval_batch_size=32, lr=0.05, momentum=0.9,
                    nesterov=True, weight_decay=5e-4, schedule="cosine", milestones=(), gamma=0.1,
                    warmup_epochs=0, label_smoothing=0.0, amp="off", channels_last=False)
    return TrainConfig(**{**settings, **changes})


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))


def training_run(cfg, checkpoint, hook=None) -> TrainingRun:
    dataset = make_synthetic(64, 32, 4, seed=0)
    train, test = make_loaders(dataset, cfg, torch.device("cpu"), seed=0)
    return TrainingRun(cfg=cfg, train_loader=train, test_loader=test,
                       loss_fn=cross_entropy_loss(), checkpoint_path=checkpoint,
                       fingerprint="test", on_epoch_end=hook)


def test_multistep_and_warmup_factors():
    cfg = schedule(epochs=10, schedule="multistep", milestones=(4, 8), warmup_epochs=2)
    assert lr_factor(cfg, 0) == pytest.approx(0.1)
    assert lr_factor(cfg, 1) == pytest.approx(0.55)
    assert [lr_factor(cfg, e) for e in (3, 4, 8)] == pytest.approx([1.0, 0.1, 0.01])


def test_cosine_goes_from_one_to_zero():
    cfg = schedule(epochs=10)
    assert lr_factor(cfg, 0) == pytest.approx(1.0)
    assert lr_factor(cfg, 5) == pytest.approx(0.5)
    assert lr_factor(cfg, 10) == pytest.approx(0.0, abs=1e-12)


def test_training_lowers_the_loss(tmp_path):
    result = fit(tiny_cnn(), training_run(schedule(epochs=4), tmp_path / "ckpt.pt"))
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert len(result.history) == 4 and result.images_per_second > 0


def test_resume_continues_where_it_stopped_and_ends_identical(tmp_path):
    class Interrupted(Exception):
        pass

    def stop_in_second_epoch(epoch, _model):
        # Raised before epoch 2's checkpoint is written: the file still holds epoch 1.
        if epoch == 2:
            raise Interrupted
        return {}

    straight = tiny_cnn()
    fit(straight, training_run(schedule(), tmp_path / "a.pt"))

    resumed = tiny_cnn()
    with pytest.raises(Interrupted):
        fit(resumed, training_run(schedule(), tmp_path / "b.pt", hook=stop_in_second_epoch))
    assert torch.load(tmp_path / "b.pt", weights_only=True)["history"][-1]["epoch"] == 1
    fresh = tiny_cnn()  # a new process starts from a fresh model
    result = fit(fresh, training_run(schedule(), tmp_path / "b.pt"))
    assert result.resumed_from_epoch == 1
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    for a, b in zip(straight.state_dict().values(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_checkpoint_from_other_settings_is_not_resumed(tmp_path):
    fit(tiny_cnn(), training_run(schedule(epochs=2), tmp_path / "c.pt"))
    run = training_run(schedule(epochs=2), tmp_path / "c.pt")
    run.fingerprint = "other settings"
    assert fit(tiny_cnn(), run).resumed_from_epoch == 0


@pytest.mark.slow
def test_killed_stage_resumes_from_its_last_checkpoint(tmp_path):
    """A real process killed with SIGKILL mid-run, started again, continues after its checkpoint."""
    raw = YAML(typ="safe").load((REPO / "params.yaml").read_text())
    raw["profile"] = "smoke"
    raw["profiles"]["smoke"]["teacher"].update(arch="resnet20", epochs=6)
    raw["common"]["threads"] = 1
    YAML(typ="safe").dump(raw, tmp_path / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for setup in ("validate_params", "prepare_data"):
        subprocess.run([sys.executable, "-m", f"stages.{setup}"], cwd=tmp_path, env=env,
                       check=True, capture_output=True)
    checkpoint = tmp_path / "checkpoints" / "teacher.pt"
    stage = [sys.executable, "-m", "stages.teacher"]
    first = subprocess.Popen(stage, cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert checkpoint.exists(), "the first run never saved a checkpoint"
    done = len(torch.load(checkpoint, weights_only=True)["history"])
    assert 1 <= done < 6, "kill came too late to test resuming"
    second = subprocess.run(stage, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert f"resuming after epoch {done} of 6" in second.stderr
    curves = (tmp_path / "plots" / "teacher.csv").read_text().splitlines()
    assert len(curves) == 1 + 6
