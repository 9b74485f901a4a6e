"""Provenance records: every field present, git revision read from a real repository."""

import re
import shutil
import subprocess
from datetime import datetime

import pytest

from pipeline import provenance


def test_collect_records_machine_runtime_and_time():
    record = provenance.collect(threads=2, runtime="onnxruntime 1.31.1")
    assert record["threads"] == 2 and record["runtime"] == "onnxruntime 1.31.1"
    assert record["cpu_cores"] >= 1 and record["cpu_model"]
    assert record["packages"]["numpy"] and "tensorrt" in record["packages"]
    assert datetime.fromisoformat(record["timestamp"]).tzinfo is not None
    assert set(record) >= {"git_revision", "gpu", "os", "python", "host"}


def test_missing_package_is_none():
    assert provenance.package_versions(("numpy", "no-such-package-xyz")) == {
        "numpy": provenance.package_versions(("numpy",))["numpy"], "no-such-package-xyz": None}


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_revision_of_a_fresh_repository(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    assert provenance.git_revision(tmp_path).startswith("unknown (")
    git("init", "-q")
    (tmp_path / "a.txt").write_text("1")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    clean = provenance.git_revision(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", clean)
    (tmp_path / "a.txt").write_text("2")
    assert provenance.git_revision(tmp_path) == clean + "-dirty"


def test_flat_makes_csv_columns():
    row = provenance.flat({"threads": 1, "gpu": None, "packages": {"a": "1", "b": None}})
    assert row == {"prov_threads": 1, "prov_gpu": "", "prov_packages": "a=1"}
