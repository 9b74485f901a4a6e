"""`prune-deploy targets` and `prune-deploy bench` (targets/cli.py), in process."""

import importlib.util
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

    def spy(target, source, batch_sizes, plan, feeds, accuracy=None, missing_hint=""):
        calls.append((target.name, Path(source), tuple(batch_sizes), plan.min_iters))
        return real(target, source, batch_sizes, plan, feeds, accuracy, missing_hint)

    monkeypatch.setattr(cli, "measure", spy)
    assert main(["bench", str(files[1]), "--target", "onnxruntime-cpu", "--batch", "1",
                 *FAST]) == 0
    assert calls == [("onnxruntime-cpu", files[1], (1,), 3)]


def test_bench_broken_file_is_a_failed_row(tmp_path, capsys):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    assert main(["bench", str(broken), "--target", "onnxruntime-cpu", "--batch", "1", *FAST]) == 1
    assert "batch    1: failed: BuildError" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="TensorRT is installed here")
def test_build_without_tensorrt_says_why(files, tmp_path, capsys):
    assert main(["build", str(files[1]), "--target", "tensorrt", "--out-dir", str(tmp_path)]) == 1
    assert "tensorrt: skipped: the TensorRT Python bindings are not importable" in \
        capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_build_with_a_bad_profile_is_a_usage_error(files, tmp_path, capsys):
    assert main(["build", str(files[1]), "--target", "ssh-tensorrt", "--host", "a@b",
                 "--known-hosts", str(files[1]), "--min-batch", "8", "--max-batch", "4"]) == 2
    assert "min_batch <= opt_batch <= max_batch" in capsys.readouterr().err


@pytest.mark.edge
def test_build_on_the_device_over_ssh(tmp_path_factory, tmp_path, capsys):
    from sshd_fixture import install_trtexec_standin, serve_sshd

    servers = serve_sshd(tmp_path_factory)
    server = next(servers)
    try:
        standin = install_trtexec_standin(server.folder, "110100")
        onnx_file = tiny_onnx(tiny_checkpoint(tmp_path / "m.pt"), tmp_path / "m.fp32.onnx")
        assert main(["build", str(onnx_file), "--target", "ssh-tensorrt", "--host", server.host,
                     "--port", str(server.port), "--key", str(server.key_file),
                     "--known-hosts", str(server.known_hosts), "--trtexec", str(standin),
                     "--remote-tmp", str(server.folder), "--max-batch", "16",
                     "--out-dir", str(tmp_path / "engines")]) == 0
    finally:
        next(servers, None)
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "engines" / "m.fp32.ssh-tensorrt.engine"),
                       str(tmp_path / "engines" / "m.fp32.ssh-tensorrt.card.json")]
    card = json.loads(Path(printed[1]).read_text())
    assert card["tensorrt"] == "11.1.0" and card["profile"]["max"] == [16, 3, 32, 32]
