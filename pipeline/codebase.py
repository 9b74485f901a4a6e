"""Which project source files a module can run, and one hash over them.

Two users: training stages put `code_hash(stage)` into their resume fingerprint, so a finished
checkpoint is reused only by the same code (a bug fix in the loss retrains; an edit to the
report code does not), and tests/test_dvc_deps.py checks that dvc.yaml lists exactly the files
each stage reaches. Imports are followed statically (ast), including those inside functions.
Modules imported by name at run time (the target registry's factory) are not visible here: the
caller adds them (`extra`), as the dvc deps test does for the benchmark stage's target.
"""

import ast
import hashlib
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "targets")


def module_file(name: str, root: Path = PROJECT_ROOT) -> Path | None:
    """The source file of a project module or package, or None for anything else."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = root.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def module_of(path: Path, root: Path = PROJECT_ROOT) -> str:
    """The import name of a project source file: stages/slim.py -> "stages.slim"."""
    return ".".join(Path(path).resolve().relative_to(root).with_suffix("").parts)


def _with_parents(name: str, root: Path) -> set[Path]:
    """A module and the packages Python imports on the way to it."""
    parts = name.split(".")
    found = (module_file(".".join(parts[:i]), root) for i in range(1, len(parts) + 1))
    return {path for path in found if path is not None}


def _absolute(node: ast.ImportFrom, path: Path, root: Path) -> str:
    if not node.level:
        return node.module or ""
    package = path.parent.relative_to(root).parts
    base = list(package[:len(package) - node.level + 1])
    return ".".join(base + ([node.module] if node.module else []))


def imported_names(path: Path, root: Path = PROJECT_ROOT) -> set[str]:
    """Every module name `path` may import: import statements anywhere in the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, path, root)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # submodule imports
    return names


def code_closure(module: str, root: Path = PROJECT_ROOT, extra: tuple[str, ...] = ()) -> set[Path]:
    """Project source files that running `python -m module` can execute; `extra`: modules it
    imports by name at run time."""
    for name in (module, *extra):
        if module_file(name, root) is None:
            raise ValueError(f"{name!r} is not a module of this project ({root})")
    todo = [path for name in (module, *extra) for path in _with_parents(name, root)]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(file for name in imported_names(path, root)
                        for file in _with_parents(name, root))
    return seen


def code_hash(module: str, root: Path = PROJECT_ROOT) -> str:
    """sha256 over the relative paths and contents of `code_closure(module)`."""
    digest = hashlib.sha256()
    for path in sorted(code_closure(module, root)):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
