"""The import graph points one way: stages -> targets -> pipeline (never back up)."""

from pathlib import Path

import pytest

from pipeline.codebase import PROJECT_ROOT, imported_names

LOWER_MAY_NOT_IMPORT = {"pipeline": ("targets", "stages"), "targets": ("stages",)}


def modules_of(package: str) -> list[Path]:
    return sorted((PROJECT_ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", list(LOWER_MAY_NOT_IMPORT))
def test_lower_layers_never_import_higher_ones(package):
    forbidden = LOWER_MAY_NOT_IMPORT[package]
    offenders = {}
    for path in modules_of(package):
        upward = sorted(name for name in imported_names(path)
                        if name.split(".")[0] in forbidden)
        if upward:
            offenders[str(path.relative_to(PROJECT_ROOT))] = upward
    assert not offenders, f"{package}/ imports {'/'.join(forbidden)}: {offenders}"


def test_the_check_sees_an_upward_import(tmp_path):
    module = tmp_path / "pipeline" / "bad.py"
    module.parent.mkdir()
    module.write_text("def f():\n    from targets.registry import make_target\n")
    assert "targets.registry" in imported_names(module, tmp_path)
