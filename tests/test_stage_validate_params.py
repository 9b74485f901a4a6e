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
