"""The SSH edge target: settings checks, an unreachable host, and (marked `edge`) a real sshd
on 127.0.0.1 standing in for the device, with this venv's Python as the device's Python."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from sshd_fixture import (
    NEEDS_SSH_CLIENT,
    free_port,
    install_trtexec_standin,
    serve_sshd,
    settings_for,
    tamper,
    tiny_checkpoint,
    tiny_onnx,
    unconfigured_ssh,
    with_card,
)

from pipeline.errors import ArtifactIntegrityError, TargetUnavailable
from pipeline.timing import TimingPlan, run_plan
from targets import remote_runner
from targets.ssh import (
    SshClient,
    SshError,
    SshOnnxRuntimeTarget,
    SshTensorRtTarget,
    UnsupportedOperation,
)

PLAN = TimingPlan(warmup_iters=1, warmup_seconds=0.0, min_iters=3, min_seconds=0.0)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sshd_server(tmp_path_factory):
    yield from serve_sshd(tmp_path_factory)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    return tiny_onnx(tiny_checkpoint(folder / "m.pt"), folder / "m.fp32.onnx")


def images(count: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((count, 3, 32, 32)).astype(np.float32)


def local_logits(onnx_path: Path, batch: np.ndarray) -> np.ndarray:
    return onnxruntime.InferenceSession(str(onnx_path)).run(None, {"input": batch})[0]


# --- without a server ---

@NEEDS_SSH_CLIENT
def test_availability_names_what_is_missing(tmp_path):
    ok, reason = SshOnnxRuntimeTarget(unconfigured_ssh()).available()
    assert not ok and reason.startswith("no edge device configured (empty ssh host")
    ok, reason = SshOnnxRuntimeTarget(unconfigured_ssh(host="a@b", known_hosts=str(tmp_path / "kh"))
                                      ).available()
    assert not ok and "known_hosts" in reason and "never accepted unverified" in reason
    (tmp_path / "kh").write_text("")
    ok, reason = SshOnnxRuntimeTarget(unconfigured_ssh(host="a@b", known_hosts=str(tmp_path / "kh"),
                                                  key_file=str(tmp_path / "nokey"))).available()
    assert not ok and "nokey" in reason
    assert SshTensorRtTarget(unconfigured_ssh(host="a@b", known_hosts=str(tmp_path / "kh"))
                             ).available() == (True, "")


@NEEDS_SSH_CLIENT
def test_unreachable_host_fails_fast_with_a_clear_message(tmp_path, onnx_file):
    (tmp_path / "known_hosts").write_text("")
    settings = unconfigured_ssh(host="nobody@127.0.0.1", port=free_port(), ssh_config="none",
                           known_hosts=str(tmp_path / "known_hosts"), connect_timeout_s=3.0,
                           command_timeout_s=10.0)
    started = time.monotonic()
    with pytest.raises(SshError, match=r"cannot reach nobody@127\.0\.0\.1:\d+ over ssh: .*refused"):
        SshOnnxRuntimeTarget(settings).load(onnx_file)
    assert time.monotonic() - started < settings.command_timeout_s


def test_remote_runner_times_with_the_same_rule_as_the_pipeline():
    def fake(step):
        state = {"now": 0.0}

        def clock():
            return state["now"]

        def call():
            state["now"] += step
            return step

        return clock, call

    plan = TimingPlan(warmup_iters=3, warmup_seconds=0.25, min_iters=4, min_seconds=0.75)
    clock, call = fake(0.125)  # exact in binary floating point
    local = run_plan(call, plan, clock)
    clock, call = fake(0.125)
    remote = remote_runner.run_plan(call, plan.__dict__, clock)
    assert remote == local and len(local) == 6


def test_remote_runner_commands_in_process(tmp_path, onnx_file, capsys):
    batch = images(5)
    np.savez(tmp_path / "feeds.npz", input=batch)
    np.savez(tmp_path / "images.npz", images=batch)
    plan = json.dumps(PLAN.__dict__)
    assert remote_runner.main(["bench", "--model", str(onnx_file), "--feeds",
                               str(tmp_path / "feeds.npz"), "--plan", plan]) == 0
    assert remote_runner.main(["predict", "--model", str(onnx_file), "--images",
                               str(tmp_path / "images.npz"), "--batch", "2"]) == 0
    lines = [json.loads(ln.split(" ", 1)[1]) for ln in capsys.readouterr().out.splitlines()]
    assert len(lines[0]["samples_s"]) == 3
    assert lines[1]["labels"] == local_logits(onnx_file, batch).argmax(1).tolist()


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_remote_runner_refuses_a_provider_fallback(onnx_file, capsys):
    status = remote_runner.main(["probe"])
    assert status == 0
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA provider present: no fallback to provoke")
    status = remote_runner.main(["predict", "--model", str(onnx_file), "--images", "x.npz",
                                 "--providers", "CUDAExecutionProvider"])
    result = json.loads(capsys.readouterr().out.splitlines()[-1].split(" ", 1)[1])
    assert status == 3 and "requested execution provider CUDAExecutionProvider" in result["error"]


# --- through a real sshd ---

def leftover_folders(server) -> list[Path]:
    return sorted(server.folder.glob("prune-deploy.*"))


@pytest.mark.edge
def test_onnxruntime_over_ssh_matches_local_and_cleans_up(sshd_server, onnx_file):
    target = SshOnnxRuntimeTarget(settings_for(sshd_server))
    assert target.available() == (True, "")
    batch = images(4)
    with target.load(target.build(onnx_file, Path("unused"))) as runner:
        assert leftover_folders(sshd_server), "the model was not copied to a temp folder"
        assert runner.device_info["onnxruntime"] == onnxruntime.__version__
        assert runner.inputs[0].name == "input" and runner.inputs[0].shape[1:] == (3, 32, 32)
        np.testing.assert_allclose(runner.infer({"input": batch})["logits"],
                                   local_logits(onnx_file, batch), rtol=1e-5, atol=1e-6)
        stats = runner.benchmark({"input": batch}, PLAN)
        assert stats.n == 3 and stats.batch_size == 4 and stats.p50_ms > 0
        labels = runner.predict_classes(images(7), batch_size=3)
        assert labels.tolist() == local_logits(onnx_file, images(7)).argmax(1).tolist()
    assert leftover_folders(sshd_server) == []


@pytest.mark.edge
def test_remote_words_are_quoted_not_interpreted(sshd_server):
    client = SshClient(settings_for(sshd_server))
    words = ["a; echo injected", "$HOME", "`id`", "it's"]
    assert client.run(["printf", "%s\\n", *words], "echo").splitlines() == words


@pytest.mark.edge
def test_command_timeout_is_a_clear_failure(sshd_server):
    client = SshClient(settings_for(sshd_server))
    started = time.monotonic()
    with pytest.raises(SshError, match=r"sleeping on \S+@127\.0\.0\.1:\d+ timed out after 1 s"):
        client.run(["sleep", "20"], "sleeping", timeout=1)
    assert time.monotonic() - started < 5


@pytest.mark.edge
def test_changed_host_key_is_refused(sshd_server, tmp_path, onnx_file):
    other = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{sshd_server.port} ssh-ed25519 {other}\n")
    settings = settings_for(sshd_server, known_hosts=str(tmp_path / "known_hosts"))
    with pytest.raises(SshError, match="Host key verification failed|HOST IDENTIFICATION"):
        SshOnnxRuntimeTarget(settings).load(onnx_file)


@pytest.mark.edge
def test_device_without_onnxruntime_is_unavailable(sshd_server, onnx_file):
    # `python -S` skips site-packages: numpy and onnxruntime cannot be imported on the "device".
    settings = settings_for(sshd_server, remote_python=(sys.executable, "-S"))
    with pytest.raises(TargetUnavailable, match="cannot import numpy on the device"):
        SshOnnxRuntimeTarget(settings).load(onnx_file)
    assert leftover_folders(sshd_server) == []


@pytest.mark.edge
def test_device_without_trtexec_is_unavailable(sshd_server, onnx_file):
    settings = settings_for(sshd_server, trtexec="/nonexistent/trtexec")
    with pytest.raises(TargetUnavailable, match="not found on the device"):
        SshTensorRtTarget(settings).load(onnx_file)


@pytest.mark.edge
@pytest.mark.parametrize(("code", "version", "typing", "absent"), [
    ("100300", "10.3.0", ["--stronglyTyped", "--noTF32"], ["--int8", "--includeDataTransfers"]),
    ("110100", "11.1.0", ["--noTF32", "--includeDataTransfers"], ["--int8", "--stronglyTyped"])])
def test_trtexec_over_ssh_parses_times_and_device(sshd_server, onnx_file, tmp_path, code,
                                                  version, typing, absent):
    fake = install_trtexec_standin(sshd_server.folder, code)
    plan = TimingPlan(warmup_iters=1, warmup_seconds=0.01, min_iters=2, min_seconds=0.0)
    int8 = tmp_path / "m.int8.onnx"
    int8.write_bytes(onnx_file.read_bytes())
    target = SshTensorRtTarget(settings_for(sshd_server, trtexec=str(fake)))
    with target.load(int8) as runner:
        stats = runner.benchmark({"input": images(2)}, plan)
        with pytest.raises(UnsupportedOperation, match="ssh-onnxruntime"):
            runner.infer({"input": images(2)})
        assert runner.device_info["tensorrt"] == version
        assert runner.device_info["gpu"] == "Orin"
    assert stats.n == 2 and stats.clock == "trtexec"  # the 1 ms warm-up entry is dropped
    assert stats.p50_ms == pytest.approx((2.3 + 3.3) / 2)
    assert stats.phase_p50_ms["compute"] == pytest.approx(2.5)
    args = (sshd_server.folder / "trtexec_args.txt").read_text().splitlines()
    assert "--help" in args  # the version probe
    assert {*typing, "--shapes=input:2x3x32x32", "--warmUp=10"} <= set(args)
    assert not set(absent) & set(args)
    assert leftover_folders(sshd_server) == []


# --- nothing leaves the machine unasked, and nothing stays on the device ---

def files_holding(folder: Path, content: bytes) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and content in p.read_bytes()]


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "home" / ".ssh" / "id_ed25519"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY----- not for the device")
    return path


def model_naming(folder: Path, location: str) -> Path:
    """A valid ONNX model whose one initializer keeps its bytes in the file `location` names."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import set_external_data

    tensor = numpy_helper.from_array(np.ones(3, np.float32), "w")
    set_external_data(tensor, location=location, offset=0, length=12)
    tensor.ClearField("raw_data")
    graph = helper.make_graph(
        [helper.make_node("Add", ["input", "w"], ["logits"])], "add",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], [tensor])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.fp32.onnx"
    path.write_bytes(helper.make_model(graph, ir_version=10).SerializeToString())
    return path


@pytest.mark.edge
@pytest.mark.parametrize("kind", ["absolute", "parent", "symlink"])
def test_a_hostile_external_data_location_uploads_nothing(sshd_server, tmp_path, secret, kind):
    folder = tmp_path / "model"
    location = {"absolute": str(secret), "parent": "../home/.ssh/id_ed25519",
                "symlink": "w.data"}[kind]
    model = model_naming(folder, location)
    if kind == "symlink":
        (folder / "w.data").symlink_to(secret)
    for target_class in (SshOnnxRuntimeTarget, SshTensorRtTarget):
        with pytest.raises(ArtifactIntegrityError, match=r"tensor 'w' names external data"):
            target_class(settings_for(sshd_server)).load(model)
    assert leftover_folders(sshd_server) == []  # refused before a temp folder was even made
    assert files_holding(sshd_server.folder, secret.read_bytes()) == []


def cli_ssh(server, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "targets.cli", "bench", str(model), "--target",
            "ssh-onnxruntime", "--host", server.host, "--port", str(server.port), "--key",
            str(server.key_file), "--known-hosts", str(server.known_hosts), "--remote-python",
            sys.executable, "--remote-tmp", str(server.folder), "--threads", "1", "--batch", "2",
            "--warmup-iters", "0", "--warmup-seconds", "0", "--min-iters", "2",
            "--min-seconds", "0", *extra]


def carded_copy(onnx_file: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / "m.fp32.onnx"
    copy.write_bytes(onnx_file.read_bytes())
    return with_card(copy)


@pytest.mark.edge
def test_cli_refuses_a_mismatched_or_uncarded_file_before_uploading(sshd_server, onnx_file,
                                                                     tmp_path):
    model = carded_copy(onnx_file, tmp_path / "a")
    tamper(model)
    done = subprocess.run(cli_ssh(sshd_server, model), capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 1 and "does not match its card's" in done.stderr
    uncarded = tmp_path / "b" / "m.fp32.onnx"
    uncarded.parent.mkdir()
    uncarded.write_bytes(onnx_file.read_bytes())
    done = subprocess.run(cli_ssh(sshd_server, uncarded), capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 2 and "--no-card" in done.stderr
    assert leftover_folders(sshd_server) == []


def device_python(folder: Path, on_bench: str) -> Path:
    """The device's Python, except that `bench` runs the shell command `on_bench` instead."""
    wrapper = folder / "device_python"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = bench ] && {{ {on_bench}; }}; done\n'
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@pytest.mark.edge
def test_a_failed_run_removes_the_remote_folder(sshd_server, onnx_file, tmp_path):
    model = carded_copy(onnx_file, tmp_path / "m")
    python = device_python(tmp_path, "echo 'benchmark broke on purpose' >&2; exit 7")
    done = subprocess.run([*cli_ssh(sshd_server, model), "--remote-python", str(python)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 1
    assert "failed: SshError: benchmark failed on" in done.stdout
    assert "benchmark broke on purpose" in done.stdout
    assert leftover_folders(sshd_server) == []


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.edge
@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_removes_the_remote_folder(sshd_server, onnx_file, tmp_path,
                                                      signal_number):
    model = carded_copy(onnx_file, tmp_path / "m")
    python = device_python(tmp_path, "exec sleep 30")  # a benchmark that is still running
    # SIGINT at its default in the CLI, as for a command in a terminal: a test run started in
    # the background by a shell without job control inherits SIGINT ignored, which Python keeps
    process = subprocess.Popen([*cli_ssh(sshd_server, model), "--remote-python", str(python)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=REPO, preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 60
        while not list(sshd_server.folder.glob("prune-deploy.*/feeds.npz")):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the benchmark never started on the device"
            time.sleep(0.1)
        time.sleep(0.5)  # the remote benchmark command is running now
        process.send_signal(signal_number)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130 and err.strip().endswith("prune-deploy: interrupted"), err
    assert "Traceback" not in err
    assert leftover_folders(sshd_server) == []
