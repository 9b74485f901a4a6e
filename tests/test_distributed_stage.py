"""Whole stages on several processes: a training stage under torchrun (re-launched by itself)
whose second process is killed with SIGKILL and which then resumes, and experiments run in
parallel from DVC's queue. End-to-end, so slow; both run in CI."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
PYTHON_ENV = {**os.environ, "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1",
              "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
EPOCHS = 4

pytestmark = pytest.mark.slow


def small_params(folder: Path, **distributed) -> None:
    """The smoke profile, smaller: ResNet20 teacher, 4 epochs of 8 steps on 256 images."""
    raw = YAML(typ="safe").load((REPO / "params.yaml").read_text())
    raw["profile"] = "smoke"
    raw["common"]["threads"] = 1
    raw["common"]["distributed"].update(distributed)
    smoke = raw["profiles"]["smoke"]
    smoke["data"].update(synthetic_train=256, synthetic_test=64)
    smoke["teacher"].update(arch="resnet20", epochs=EPOCHS, batch_size=32)
    YAML(typ="safe").dump(raw, folder / "params.yaml")


def run_stage(folder: Path, stage: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=folder, env=PYTHON_ENV,
                          capture_output=True, text=True, timeout=900)


def prepared(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    small_params(folder, nproc_per_node=2)
    for stage in ("validate_params", "prepare_data"):
        result = run_stage(folder, stage)
        assert result.returncode == 0, result.stderr
    return folder


def children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


def worker_of_rank(launcher: int, rank: int) -> int | None:
    """The torchrun worker process of `rank` started by `launcher`."""
    for pid in children(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "models" / "teacher.pt", weights_only=True)["state_dict"]


def test_a_killed_process_then_a_rerun_resumes_and_ends_as_an_uninterrupted_run(tmp_path):
    straight = prepared(tmp_path / "straight")
    killed = tmp_path / "killed"
    shutil.copytree(straight, killed)
    uninterrupted = run_stage(straight, "teacher")
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    assert "re-launching under torchrun" in uninterrupted.stderr

    checkpoint = killed / "checkpoints" / "teacher.pt"
    first = subprocess.Popen([sys.executable, "-m", "stages.teacher"], cwd=killed,
                             env=PYTHON_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = worker_of_rank(first.pid, 1)
    assert victim is not None, "no rank-1 worker found under torchrun"
    os.kill(victim, signal.SIGKILL)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode != 0, "torchrun should fail the stage when a process is killed"
    assert "Signal 9 (SIGKILL)" in stderr
    done = len(torch.load(checkpoint, weights_only=True)["history"])
    assert 1 <= done < EPOCHS, "kill came too late to test resuming"

    again = run_stage(killed, "teacher")
    assert again.returncode == 0, again.stderr
    assert f"resuming after epoch {done} of {EPOCHS}" in again.stderr
    for key, value in weights(straight).items():  # bit for bit
        assert torch.equal(value, weights(killed)[key]), key
    metrics = json.loads((killed / "metrics" / "teacher.json").read_text())
    assert metrics["world_size"] == 2 and metrics["processes"] == "cpu x2 (gloo)"
    assert len((killed / "plots" / "teacher.csv").read_text().splitlines()) == 1 + EPOCHS
    assert not list(killed.rglob("*.tmp"))


# --------------------------------------------------------------------------- dvc exp queue
def dvc(repo: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=repo,
                          env={**PYTHON_ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=900)


def image_folder(root: Path) -> None:
    """Two classes of ten 32x32 images: a data set outside the repository."""
    generator = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (root / label).mkdir(parents=True)
        for index in range(10):
            pixels = generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{index}.png")


def queue_repo(repo: Path) -> None:
    """The project reduced to validate_params -> prepare_data -> teacher, committed."""
    for name in ("pipeline", "stages", "targets", ".dvc/config", ".dvcignore", ".gitignore"):
        source, target = REPO / name, repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    yaml = YAML()
    pipeline = yaml.load((REPO / "dvc.yaml").read_text())
    pipeline["stages"] = {name: pipeline["stages"][name]
                          for name in ("validate_params", "prepare_data", "teacher")}
    pipeline["plots"] = [entry for entry in pipeline["plots"] if "plots/teacher.csv" in entry]
    with (repo / "dvc.yaml").open("w") as handle:
        yaml.dump(pipeline, handle)
    small_params(repo)
    raw = YAML(typ="safe").load((repo / "params.yaml").read_text())
    raw["profiles"]["smoke"]["data"]["dataset"] = "imagefolder"
    raw["profiles"]["smoke"]["teacher"].update(epochs=1, batch_size=8, eval_batch_size=8)
    YAML(typ="safe").dump(raw, repo / "params.yaml")
    for command in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t",
                                                    "commit", "-qm", "pipeline"]):
        subprocess.run(["git", *command], cwd=repo, check=True, capture_output=True)


def experiments(shown: object) -> dict[str, dict]:
    """Experiment name -> its `data` entry, from `dvc exp show --json`."""
    found: dict[str, dict] = {}
    if isinstance(shown, dict):
        if shown.get("name") and isinstance(shown.get("data"), dict):
            found[shown["name"]] = shown["data"]
        for value in shown.values():
            found.update(experiments(value))
    elif isinstance(shown, list):
        for value in shown:
            found.update(experiments(value))
    return found


def wait_for_queue(repo: Path, timeout: float = 1200) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = dvc(repo, "queue", "status").stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        time.sleep(5)
    raise AssertionError(f"queue not done after {timeout} s:\n{status}")


def test_queued_experiments_run_in_parallel_each_in_its_own_copy(tmp_path):
    image_folder(tmp_path / "images")
    repo = tmp_path / "repo"
    queue_repo(repo)
    for seed in (1, 2):
        queued = dvc(repo, "exp", "run", "--queue", "-S", f"common.seed={seed}", "-n",
                     f"seed{seed}")
        assert queued.returncode == 0, queued.stderr
    # The data root is relative, as README suggests: it must resolve against the repository,
    # not against the experiment's copy under .dvc/tmp/exps/.
    started = dvc(repo, "queue", "start", "-j", "2", env={"PIPELINE_DATA_ROOT": "../images"})
    assert started.returncode == 0, started.stderr
    try:
        status = wait_for_queue(repo)
    finally:
        dvc(repo, "queue", "stop")
    assert status.count("Success") == 2, status + dvc(repo, "queue", "logs", "seed1").stdout
    shown = dvc(repo, "exp", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    found = experiments(json.loads(shown.stdout))
    for seed in (1, 2):
        data = found[f"seed{seed}"]
        params = data["params"]["params.yaml"]["data"]
        metrics = data["metrics"]["metrics/teacher.json"]["data"]
        assert params["common"]["seed"] == seed
        assert metrics["dataset"] == "imagefolder" and metrics["train_images"] == 18
    assert not (repo / "models" / "teacher.pt").exists()  # the workspace is left alone
