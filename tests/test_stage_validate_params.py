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


def latency_networks_after(tmp_path: Path, old: str, new: str) -> bytes:
    """resolved/latency_networks.json for params.yaml with `old` replaced by `new` once."""
    params = tmp_path / f"params_{len(list(tmp_path.iterdir()))}.yaml"
    text = (REPO / "params.yaml").read_text()
    assert old in text, old
    params.write_text(text.replace(old, new, 1))
    out = tmp_path / f"resolved_{params.stem}"
    run(str(params), out)
    return (out / "latency_networks.json").read_bytes()


@pytest.mark.parametrize("old, new", [
    ("  temperature: 3.0", "  temperature: 4.0"),  # distill, not the student's architecture
    ("teacher_runtime: auto", "teacher_runtime: torch"),
    ("  lr: 0.1\n", "  lr: 0.05\n"),  # the teacher's schedule, not its architecture
    ("train_limit: 10000", "train_limit: 5000"),
    ("parity_images: 256", "parity_images: 128"),  # export, not how graphs are exported
])
def test_settings_the_latency_table_does_not_read_leave_its_file_unchanged(tmp_path, old, new):
    (tmp_path / "base").mkdir()
    base = latency_networks_after(tmp_path / "base", "profile: quick", "profile: quick")
    assert latency_networks_after(tmp_path, old, new) == base


@pytest.mark.parametrize("old, new", [
    ("arch: resnet56", "arch: resnet32"),
    ("student_arch: resnet20", "student_arch: resnet32"),
    ("simplifier: onnxsim", "simplifier: onnxslim"),
])
def test_what_the_latency_table_measures_changes_its_file(tmp_path, old, new):
    (tmp_path / "base").mkdir()
    base = latency_networks_after(tmp_path / "base", "profile: quick", "profile: quick")
    assert latency_networks_after(tmp_path, old, new) != base
