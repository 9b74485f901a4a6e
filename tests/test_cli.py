"""`prune-deploy targets` and `prune-deploy bench` (targets/cli.py), in process: rows, the
checks before a file is loaded, argument validation, exit status and one-line errors."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sshd_fixture import tamper, tiny_checkpoint, tiny_onnx, with_card

import targets.cli as cli
from pipeline.io import file_sha256
from targets.cli import main
from targets.registry import target_names

FAST = ["--warmup-iters", "1", "--warmup-seconds", "0", "--min-iters", "3", "--min-seconds", "0",
        "--threads", "1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cli")
    checkpoint = tiny_checkpoint(folder / "m.pt")
    return checkpoint, with_card(tiny_onnx(checkpoint, folder / "m.int8.onnx"))


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
    assert rows[0]["verified_by"] == "model card m.int8.card.json"
    assert rows[0]["sha256"] == file_sha256(files[1])


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


def test_bench_broken_file_is_refused_before_loading(tmp_path, capsys):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    assert main(["bench", str(broken), "--target", "onnxruntime-cpu", "--batch", "1", "--no-card",
                 *FAST]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("prune-deploy: ArtifactIntegrityError: ") and "not a valid ONNX" in err


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
                     "--remote-tmp", str(server.folder)]) == 2  # no card, no --no-card
        assert "no model card (m.fp32.card.json)" in capsys.readouterr().err
        with_card(onnx_file)
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


# --- what is checked before a file is loaded ---

def bench_one(path, *extra) -> list[str]:
    return ["bench", str(path), "--target", "onnxruntime-cpu", "--batch", "1", *FAST, *extra]


def test_an_onnx_file_without_a_card_needs_no_card_to_be_said(files, tmp_path, capsys):
    own = tmp_path / "own.onnx"
    own.write_bytes(files[1].read_bytes())
    assert main(bench_one(own)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no model card (own.card.json)" in err and "--no-card" in err
    out = tmp_path / "rows.json"
    assert main(bench_one(own, "--no-card", "--json", str(out))) == 0
    (row,) = json.loads(out.read_text())
    assert row["verified_by"] == "nothing (--no-card)" and row["sha256"] == file_sha256(own)


def test_a_file_that_does_not_match_its_card_is_refused(files, tmp_path, capsys):
    copy = tmp_path / "m.int8.onnx"
    copy.write_bytes(files[1].read_bytes())
    (tmp_path / "m.int8.card.json").write_bytes(files[1].with_suffix(".card.json").read_bytes())
    tamper(copy)
    assert main(bench_one(copy, "--no-card")) == 1  # --no-card does not override a card
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "m.int8.onnx: sha256" in err and "does not match its card's" in err


def test_a_model_file_runs_through_a_weights_only_load(files, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["bench", str(files[0]), "--target", "torch-cpu", "--batch", "1", *FAST,
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())[0]["verified_by"] == "weights-only load (no code runs)"


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_model_file_that_would_run_code_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "prune-deploy/model/1", "payload": _RunsCode(marker)}, evil)
    assert main(["bench", str(evil), "--target", "torch-cpu", "--batch", "1", *FAST]) == 1
    assert not marker.exists()
    assert "not a readable model file" in capsys.readouterr().err


# --- arguments: checked by the parser, one line, exit status 2 ---

@pytest.mark.parametrize(("arguments", "message"), [
    (["--batch", "0"], "argument --batch: expected a whole number >= 1, got '0'"),
    (["--batch", "-1"], "argument --batch: expected a whole number >= 1, got '-1'"),
    (["--batch", "two"], "argument --batch: expected a whole number >= 1, got 'two'"),
    (["--threads", "-1"], "argument --threads: expected a whole number >= 0, got '-1'"),
    (["--min-iters", "0"], "argument --min-iters: expected a whole number >= 1"),
    (["--warmup-seconds", "nan"], "argument --warmup-seconds: expected a number >= 0"),
    (["--port", "70000"], "argument --port: expected a whole number >= 1 and <= 65535"),
    (["--connect-timeout", "0"], "argument --connect-timeout: expected a number > 0"),
    (["--remote-python", ""], "argument --remote-python: expected a command"),
])
def test_bad_arguments_are_one_line_and_exit_2(files, capsys, arguments, message):
    with pytest.raises(SystemExit) as caught:
        main(["bench", str(files[1]), "--target", "onnxruntime-cpu", *arguments])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "usage:" not in err


def test_a_missing_model_file_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["bench", str(tmp_path / "nope.onnx"), "--target", "onnxruntime-cpu"])
    assert caught.value.code == 2
    assert "argument model: " in capsys.readouterr().err


def test_a_batch_that_cannot_fit_in_memory_is_refused(files, capsys, monkeypatch):
    monkeypatch.setattr(cli, "available_memory", lambda: 1_000_000_000)
    per_image = 3 * 32 * 32 * 4
    largest = 1_000_000_000 // (per_image * cli.MEMORY_FACTOR)
    assert main(bench_one(files[1], "--batch", "1", str(largest + 1))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"--batch {largest + 1}: its float32[3, 32, 32] inputs take" in err
    assert f"1.0 GB available, enough for batch sizes up to {largest}" in err
    assert main(["bench", str(files[0]), "--target", "torch-cpu", "--batch", "100000",
                 *FAST]) == 2  # a model file's input shape comes from its metadata


def test_an_unexpected_failure_is_one_line_unless_debug(files, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "measure", broken)
    assert main(bench_one(files[1])) == 1
    assert capsys.readouterr().err == ("prune-deploy: unexpected RuntimeError: boom (rerun with "
                                       "--debug for the traceback)\n")
    with pytest.raises(RuntimeError, match="boom"):
        main(bench_one(files[1], "--debug"))


def test_the_installed_command_prints_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "targets.cli", "bench", str(tmp_path / "x.onnx"),
                           "--target", "onnxruntime-cpu", "--batch", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
