"""code_closure / code_hash on a small project tree: what a stage runs, and nothing else."""

import ast
from pathlib import Path

import pytest

from pipeline.codebase import code_closure, code_hash, module_of


@pytest.fixture()
def tree(tmp_path):
    files = {
        "stages/__init__.py": "",
        "stages/train.py": "from pipeline import loss\n\ndef main():\n    import pipeline.lazy\n",
        "pipeline/__init__.py": "",
        "pipeline/loss.py": "from .util import helper\n",
        "pipeline/util.py": "import numpy\nhelper = 1\n",
        "pipeline/lazy.py": "REGISTRY = {'x': 'targets.ort:Ort'}\n",
        "pipeline/report.py": "import matplotlib\n",
        "targets/__init__.py": "",
        "targets/ort.py": "class Ort: ...\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_closure_follows_relative_and_lazy_imports_not_strings(tree):
    found = {str(path.relative_to(tree)) for path in code_closure("stages.train", tree)}
    assert found == {"stages/__init__.py", "stages/train.py", "pipeline/__init__.py",
                     "pipeline/loss.py", "pipeline/util.py", "pipeline/lazy.py"}


def test_modules_imported_by_name_are_added_by_the_caller(tree):
    found = {str(path.relative_to(tree))
             for path in code_closure("stages.train", tree, extra=("targets.ort",))}
    assert {"targets/__init__.py", "targets/ort.py"} <= found
    with pytest.raises(ValueError, match="'targets.gpu' is not a module"):
        code_closure("stages.train", tree, extra=("targets.gpu",))


def test_hash_changes_with_code_the_stage_runs_only(tree):
    before = code_hash("stages.train", tree)
    (tree / "pipeline/report.py").write_text("import matplotlib  # edited\n")
    assert code_hash("stages.train", tree) == before
    (tree / "pipeline/util.py").write_text("import numpy\nhelper = 2\n")
    assert code_hash("stages.train", tree) != before


def test_module_of_names_a_file_as_python_imports_it(tree):
    assert module_of(tree / "stages" / "train.py", tree) == "stages.train"


def test_unknown_module_is_an_error(tree):
    with pytest.raises(ValueError, match="not a module of this project"):
        code_closure("stages.missing", tree)


def test_test_helpers_are_imported_as_top_level_modules():
    # tests/ is not a package: pytest puts it on sys.path, so `from latency_fakes import ...`
    # works from any directory, while `from tests.latency_fakes import ...` only works when
    # the checkout root happens to be on sys.path too (`python -m pytest`, not `pytest`).
    offenders = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [])
            offenders += [f"{path.name}:{node.lineno} {name}" for name in names
                          if name == "tests" or name.startswith("tests.")]
    assert offenders == []
