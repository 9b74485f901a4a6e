"""`prune-deploy targets` and `prune-deploy bench` (targets/cli.py), in process."""

import json
from pathlib import Path

import pytest
import torch
from sshd_fixture import tiny_checkpoint, tiny_onnx

from targets.cli import main
from targets.registry import target_names

FAST = ["--warmup-iters", "1", "--warmup-seconds", "0", "--min-iters", "3", "--min-seconds", "0",
        "--threads", "1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cli")
    checkpoint = tiny_checkpoint(folder / "m.pt")
    return checkpoint, tiny_onnx(checkpoint, folder / "m.int8.onnx")


def test_targets_lists_every_target_with_availability(capsys):
    assert main(["targets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["target", "available"]
    listed = {line.split()[0]: line for line in lines[1:]}
    assert set(listed) == set(target_names())
    assert listed["onnxruntime-cpu"].split()[1] == "yes"
    assert listed["openvino-cpu"].split()[2] == "fp32,bf16,int8"
    assert listed["executorch-xnnpack"].split()[3] == "no"  # one program per batch size
    assert listed["ssh-onnxruntime"].split()[1] == "no"
    assert "no edge device configured" in listed["ssh-onnxruntime"]


def test_bench_onnx_writes_rows_with_provenance(files, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["bench", str(files[1]), "--target", "onnxruntime-cpu", "--batch", "1", "2",
                 *FAST, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime-cpu int8 batch    2: p50" in printed
    rows = json.loads(out.read_text())
    assert [(r["batch_size"], r["status"], r["n"]) for r in rows] == [(1, "ok", 3), (2, "ok", 3)]
    assert rows[0]["precision"] == "int8" and rows[0]["provenance"]["threads"] == 1


def test_bench_model_file_on_torch_cpu(files, capsys):
    assert main(["bench", str(files[0]), "--target", "torch-cpu", "--batch", "2", *FAST]) == 0
    assert "torch-cpu fp32 batch    2: p50" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_bench_on_an_unavailable_target_is_a_skipped_row(files, capsys):
    assert main(["bench", str(files[0]), "--target", "torch-cuda", "--batch", "1", *FAST]) == 1
    assert "torch-cuda fp32 batch    1: skipped: target 'torch-cuda' is not available: no CUDA" \
        in capsys.readouterr().out


def test_bench_unknown_target_is_a_usage_error(files, capsys):
    assert main(["bench", str(files[1]), "--target", "tpu"]) == 2
    assert "unknown target 'tpu'" in capsys.readouterr().err


def test_bench_reports_the_same_rows_as_the_stage_measuring_path(files, tmp_path, monkeypatch):
    """The CLI measures through targets.measure, the path the benchmark stage uses."""
    import targets.cli as cli

    calls = []
    real = cli.measure

    def spy(target, source, batch_sizes, plan, feeds, accuracy=None, missing_hint="",
            precision=None):
        calls.append((target.name, Path(source), tuple(batch_sizes), plan.min_iters, precision))
        return real(target, source, batch_sizes, plan, feeds, accuracy, missing_hint, precision)

    monkeypatch.setattr(cli, "measure", spy)
    assert main(["bench", str(files[1]), "--target", "onnxruntime-cpu", "--batch", "1",
                 *FAST]) == 0
    assert calls == [("onnxruntime-cpu", files[1], (1,), 3, "int8")]  # from the file name


def test_bench_broken_file_is_a_failed_row(tmp_path, capsys):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    assert main(["bench", str(broken), "--target", "onnxruntime-cpu", "--batch", "1", *FAST]) == 1
    assert "batch    1: failed: BuildError" in capsys.readouterr().out
