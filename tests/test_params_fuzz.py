"""params.yaml mutated at random (hypothesis) through the real validate_params entry point.

Every mutation - a value of another type or out of range, a missing or unknown key, a YAML
oddity written straight into the text - either validates or exits non-zero with a line that
names the key (or, for YAML that does not parse, the line), never with a traceback, and never
touches models/, artifacts/ or metrics/.
"""

import copy
import io
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from pipeline.config import KEY_NAME
from stages.validate_params import main

REPO = Path(__file__).resolve().parents[1]
SHIPPED = YAML().load((REPO / "params.yaml").read_text())  # round-trip: comments, flow style
RAW = "RAWTOKEN7"  # a placeholder dumped unquoted, then replaced by a raw YAML token
RAW_TOKENS = ["off", "on", "yes", "No", "~", "null", "0x1F", "0o17", "017", "1e3", "1_000",
              ".inf", "-.inf", ".nan", "2001-01-01", "12:30:00", "!!binary aGVsbG8=",
              "!!python/object/apply:os.system ['touch pwned']", "!!set {a, b}", "&a 1", "*nope",
              "[1, 2", "{a: 1", "'unterminated", "[[1], {a: 1}]", "{[1, 2]: 3}", "? x", "@x",
              "`x", "%x", "!custom 3", "<<: {a: 1}", "|\n  text", "\t1", "- 1"]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(min_size=1, max_size=5), st.integers(), max_size=2))


def paths(node, prefix=()) -> list[tuple]:
    """Every key path in the document (mappings and list items), parents before children."""
    found = []
    items = node.items() if isinstance(node, dict) else \
        enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        found.append((*prefix, key))
        found += paths(value, (*prefix, key))
    return found


def lookup(node, path):
    for key in path:
        node = node[key]
    return node


ALL_PATHS = paths(SHIPPED)
MAPPINGS = [()] + [p for p in ALL_PATHS if isinstance(lookup(SHIPPED, p), dict)]
MUTATIONS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(ALL_PATHS), VALUES),
    st.tuples(st.just("delete"), st.sampled_from(ALL_PATHS), st.none()),
    st.tuples(st.just("add"), st.sampled_from(MAPPINGS),
              st.tuples(st.text(min_size=1, max_size=8), VALUES)),
    st.tuples(st.just("raw"), st.sampled_from(ALL_PATHS), st.sampled_from(RAW_TOKENS)))


def mutated_text(mutation) -> tuple[str, tuple]:
    """The params text after one mutation, and the key path an error must name."""
    kind, path, argument = mutation
    document = copy.deepcopy(SHIPPED)
    parent = lookup(document, path[:-1]) if path else document
    if kind == "set":
        parent[path[-1]] = argument
    elif kind == "delete":
        del parent[path[-1]]
    elif kind == "add":
        key, value = argument
        lookup(document, path)[key] = value
        path = (*path, key)
    else:
        parent[path[-1]] = RAW
    buffer = io.StringIO()
    YAML().dump(document, buffer)
    text = buffer.getvalue()
    if kind == "raw":
        text = text.replace(RAW, argument, 1)
    if kind == "add":  # YAML may read the new key back differently (e.g. NEL as a space)
        path = (*path[:-1], key_as_read(text, path))
    return text, path


def key_as_read(text: str, path: tuple):
    """The key an "add" mutation put under path[:-1], as YAML reads the text back."""
    try:
        parent = lookup(YAML(typ="safe").load(text), path[:-1])
    except Exception:  # noqa: BLE001 - the stage reports text that does not load
        return path[-1]
    added = [key for key in parent if key not in lookup(SHIPPED, path[:-1])]
    return added[0] if len(added) == 1 else path[-1]


def names_the_key(message: str, path: tuple, text: str) -> bool:
    """Does the error name the mutated key (or, for YAML that does not parse, a line)?"""
    if "not valid YAML" in message:
        return re.search(r"line \d+", message) is not None
    keys = [part for part in path if not isinstance(part, int)]  # list items: their key
    if keys and not (isinstance(keys[-1], str) and KEY_NAME.fullmatch(keys[-1])):
        return repr(keys[-1]) in message  # refused as "key ' ' is not a name"
    keys = [str(key) for key in keys]
    if keys and keys[0] == "profiles":  # reported as the section key, with the profile named
        if len(keys) >= 2 and keys[1] not in message:
            return False
        keys = keys[2:]
    if not keys:
        return True
    dotted = ".".join(keys)
    return dotted in message or (keys[0] in message and keys[-1] in message)


def run_validate(params: Path, out_dir: Path) -> tuple[int, str]:
    """validate_params' main() in process: (exit status, what it logged)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("stage")
    logger.addHandler(handler)
    argv = ["validate_params", "--params", str(params), "--out-dir", str(out_dir)]
    try:
        with mock.patch.object(sys, "argv", argv):
            main()
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    finally:
        logger.removeHandler(handler)
    return status, stream.getvalue()


def outputs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for folder in ("models", "artifacts", "metrics") for p in (root / folder).rglob("*")
            if p.is_file()}


@settings(max_examples=80, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(MUTATIONS)
@example(("raw", ("runtimes",), "{[1, 2]: 3}"))  # a list as a mapping key
@example(("raw", ("teacher", "lr"), "!!python/object/apply:os.system ['touch pwned']"))
@example(("set", ("teacher", "amp"), "off"))  # YAML 1.1 would read an unquoted off as False
@example(("delete", ("benchmark",), None))
@example(("add", ("runtimes", "ssh"), ("colour", 1)))
@example(("add", ("common",), ("\x85", 1)))  # YAML reads a NEL in a key as a space
@example(("set", ("data", "root"), "\ud800"))  # not valid text
def test_every_mutation_validates_or_names_its_key(mutation):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for folder in ("models", "artifacts", "metrics"):
            (root / folder).mkdir()
            (root / folder / "kept.bin").write_bytes(folder.encode())
        text, path = mutated_text(mutation)
        (root / "params.yaml").write_text(text)
        before = outputs(root)
        status, logged = run_validate(root / "params.yaml", root / "resolved")
        assert outputs(root) == before
        assert "Traceback" not in logged
        if status == 0:
            assert (root / "resolved" / "common.json").is_file()
        else:
            assert status == 2, logged
            assert names_the_key(logged, path, text), (mutation, logged)
            assert not (root / "resolved").exists()  # nothing written before the file is valid
        assert not Path("pwned").exists()


def test_the_stage_as_a_process_prints_the_key_and_no_traceback(tmp_path):
    params = tmp_path / "params.yaml"
    text = (REPO / "params.yaml").read_text()
    line = text[:text.index("  seed: 0 ")].count("\n") + 1
    params.write_text(text.replace("  seed: 0 ", "  seed: !!python/object/apply:os.getcwd [] ", 1))
    done = subprocess.run([sys.executable, "-m", "stages.validate_params", "--params",
                           str(params), "--out-dir", str(tmp_path / "resolved")],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    (error,) = [ln for ln in done.stderr.splitlines() if "ConfigError" in ln]
    assert "not valid YAML" in error and f"line {line}" in error
    assert not (tmp_path / "resolved").exists()


@pytest.mark.parametrize(("token", "key"), [("1e400", "teacher.lr"), (".nan", "teacher.lr"),
                                            (".inf", "teacher.lr")])
def test_infinite_and_nan_numbers_are_refused(tmp_path, token, key):
    text = (REPO / "params.yaml").read_text().replace("  lr: 0.1\n", f"  lr: {token}\n", 1)
    (tmp_path / "params.yaml").write_text(text)
    status, logged = run_validate(tmp_path / "params.yaml", tmp_path / "resolved")
    assert status == 2 and key in logged
