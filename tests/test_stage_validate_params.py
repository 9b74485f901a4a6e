"""validate_params stage: a failed validation keeps the last valid resolved/ files.

DVC deletes a stage's outputs before it runs unless they are `persist: true`; the stage then
writes nothing until the whole file is valid, and each file atomically.
"""

from pathlib import Path

import pytest
from ruamel.yaml import YAML

from pipeline.errors import ConfigError
from stages.validate_params import run

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_a_failed_validation_leaves_the_previous_resolved_files(tmp_path):
    out = tmp_path / "resolved"
    run(str(REPO / "params.yaml"), out)
    before = snapshot(out)
    assert "teacher.json" in before and "targets/onnxruntime-cpu.json" in before
    bad = tmp_path / "params.yaml"
    bad.write_text((REPO / "params.yaml").read_text().replace("  lr: 0.1\n", "  lr: -0.1\n", 1))
    with pytest.raises(ConfigError, match=r"teacher\.lr"):
        run(str(bad), out)
    assert snapshot(out) == before
    assert not list(out.rglob("*.tmp"))


def test_dvc_keeps_the_resolved_files_while_validate_params_runs():
    stage = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())["stages"]["validate_params"]
    outs = stage["outs"]
    assert outs and all(isinstance(out, dict) for out in outs)
    not_persisted = [path for out in outs for path, flags in out.items()
                     if not flags.get("persist")]
    assert not_persisted == [], "DVC would delete these before validating"



def resolved_after(tmp_path: Path, stem: str, old: str, new: str) -> bytes:
    """resolved/<stem>.json for params.yaml with `old` replaced by `new` once."""
    params = tmp_path / f"params_{len(list(tmp_path.iterdir()))}.yaml"
    text = (REPO / "params.yaml").read_text()
    assert old in text, old
    params.write_text(text.replace(old, new, 1))
    out = tmp_path / f"resolved_{params.stem}"
    run(str(params), out)
    return (out / f"{stem}.json").read_bytes()


def unchanged_params(tmp_path: Path, stem: str) -> bytes:
    (tmp_path / "base").mkdir()
    return resolved_after(tmp_path / "base", stem, "profile: quick", "profile: quick")


# Derived files: a stage that reads a few keys of several sections depends on a file of just
# those keys, so that a change of any other key re-runs nothing that takes minutes.
UNREAD = [
    ("latency_networks", "  temperature: 3.0", "  temperature: 4.0"),  # not the student's arch
    ("latency_networks", "teacher_runtime: torch", "teacher_runtime: auto"),
    ("latency_networks", "  lr: 0.1\n", "  lr: 0.05\n"),  # the teacher's schedule
    ("latency_networks", "train_limit: 10000", "train_limit: 5000"),
    ("latency_networks", "parity_images: 256", "parity_images: 128"),  # not how graphs export
    ("program_batches", "eval_images: 2000", "eval_images: 1000"),
    ("program_batches", "min_iters: 20,", "min_iters: 25,"),  # the benchmark's timing
    ("program_batches", "batch_sizes: [1, 64]\n  eval", "batch_sizes: [64, 1, 1]\n  eval"),
]
READ = [
    ("latency_networks", "arch: resnet56", "arch: resnet32"),
    ("latency_networks", "student_arch: resnet20", "student_arch: resnet32"),
    ("latency_networks", "simplifier: onnxsim", "simplifier: onnxslim"),
    ("program_batches", "batch_sizes: [1, 64]\n  eval", "batch_sizes: [1, 32, 64]\n  eval"),
]


@pytest.mark.parametrize("stem, old, new", UNREAD)
def test_settings_a_derived_file_leaves_out_do_not_change_it(tmp_path, stem, old, new):
    assert resolved_after(tmp_path, stem, old, new) == unchanged_params(tmp_path, stem)


@pytest.mark.parametrize("stem, old, new", READ)
def test_settings_a_derived_file_holds_change_it(tmp_path, stem, old, new):
    assert resolved_after(tmp_path, stem, old, new) != unchanged_params(tmp_path, stem)
