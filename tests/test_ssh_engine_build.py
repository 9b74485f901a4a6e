"""ssh-tensorrt's build mode end to end against a real sshd on 127.0.0.1, with the trtexec
stand-in (tests/trtexec_standin.sh, test scaffolding) as the device's trtexec: the engine is
built in a temp folder on the device, fetched, hash-checked, and carded; the timing cache goes
there and comes back."""

from pathlib import Path

import pytest
from sshd_fixture import (
    install_trtexec_standin,
    serve_sshd,
    settings_for,
    tiny_checkpoint,
    tiny_onnx,
)

from pipeline.errors import ArtifactIntegrityError, BuildError, TargetUnavailable
from pipeline.export.cards import load_verified_engine
from targets import ssh
from targets.engines import TensorRtSettings, host_platform
from targets.registry import make_target

pytestmark = pytest.mark.edge
BUILD = TensorRtSettings(device=0, min_batch=1, opt_batch=8, max_batch=32, workspace_mib=256,
                         tf32=False)


@pytest.fixture(scope="module")
def sshd_server(tmp_path_factory):
    yield from serve_sshd(tmp_path_factory)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    return tiny_onnx(tiny_checkpoint(folder / "m.pt"), folder / "student_final.fp32.onnx")


def target(server, standin: Path):
    return make_target("ssh-tensorrt", settings_for(server, trtexec=str(standin)))


def device_args(server) -> list[str]:
    return (server.folder / "trtexec_args.txt").read_text().splitlines()


def test_build_on_the_device_fetches_the_engine_and_writes_its_card(sshd_server, onnx_file,
                                                                    tmp_path):
    standin = install_trtexec_standin(sshd_server.folder, "100300")
    engine = target(sshd_server, standin).build_engine(onnx_file, tmp_path, BUILD)
    assert engine == tmp_path / "student_final.fp32.ssh-tensorrt.engine"
    data, card = load_verified_engine(engine)  # the card's engine_sha256 is the fetched file's
    assert data.startswith(b"ftrt") and b"stand-in engine for student_final.fp32.onnx" in data
    assert (card["tensorrt"], card["plan_version"]) == ("10.3.0", "10.3.0.30")
    assert (card["gpu"], card["compute_capability"]) == ("Orin", "8.7")
    assert card["platform"] == host_platform()  # the device's uname; here the same machine
    assert card["profile"] == {"input": "input", "min": [1, 3, 32, 32], "opt": [8, 3, 32, 32],
                               "max": [32, 3, 32, 32], "dynamic": True}
    assert card["workspace_bytes"] == 256 << 20 and card["tf32"] is False
    assert card["build_seconds"] == 0.5123 and card["precision"] == "fp32"
    assert card["source_onnx"] == onnx_file.name and card["timing_cache"]["state"] == "new"
    assert card["target"] == "ssh-tensorrt" and "trtexec (TensorRT 10.3.0)" in card["built_with"]
    args = device_args(sshd_server)
    assert {"--stronglyTyped", "--noTF32", "--skipInference", "--memPoolSize=workspace:256M",
            "--minShapes=input:1x3x32x32", "--optShapes=input:8x3x32x32",
            "--maxShapes=input:32x3x32x32"} <= set(args)
    assert any(arg.startswith("--saveEngine=") for arg in args)
    assert not list(sshd_server.folder.glob("prune-deploy.*"))  # the device folder is removed


def test_a_rebuild_sends_the_timing_cache_and_keeps_what_comes_back(sshd_server, onnx_file,
                                                                   tmp_path):
    standin = install_trtexec_standin(sshd_server.folder, "110100")
    builder = target(sshd_server, standin)
    builder.build_engine(onnx_file, tmp_path, BUILD)
    cache = tmp_path / "timing.cache"
    assert cache.read_text().splitlines() == ["stand-in tactics for student_final.fp32.onnx"]
    engine = builder.build_engine(onnx_file, tmp_path, BUILD)
    assert len(cache.read_text().splitlines()) == 2  # the device read the cache it was sent
    _, card = load_verified_engine(engine)
    assert card["timing_cache"]["state"] == "reused" and card["tensorrt"] == "11.1.0"
    args = device_args(sshd_server)
    assert "--stronglyTyped" not in args and "--noTF32" in args  # 11.x: strong typing only
    assert [a for a in args if a.startswith("--timingCacheFile=")][-1].endswith("/timing.cache")


def test_an_engine_that_breaks_on_the_way_back_is_refused(sshd_server, onnx_file, tmp_path,
                                                         monkeypatch):
    standin = install_trtexec_standin(sshd_server.folder, "100300")
    fetch = ssh._fetch
    monkeypatch.setattr(ssh, "_fetch", lambda client, remote: fetch(client, remote) + b"\0")
    with pytest.raises(ArtifactIntegrityError, match="does not hash to its sha256 there"):
        target(sshd_server, standin).build_engine(onnx_file, tmp_path, BUILD)
    assert not list(tmp_path.iterdir())  # nothing written, not even the timing cache


def test_a_device_without_trtexec_is_unavailable(sshd_server, onnx_file, tmp_path):
    with pytest.raises(TargetUnavailable, match="not found on the device"):
        target(sshd_server, Path("/nonexistent/trtexec")).build_engine(onnx_file, tmp_path,
                                                                       BUILD)


def test_a_log_without_the_device_block_cannot_make_a_card():
    result = ssh.DeviceBuild(b"ftrt", b"", {"tensorrt": "10.3.0", "gpu": None,
                                            "compute_capability": None, "build_seconds": None},
                             (10, 3, 0), "Linux-aarch64", 1.0)
    with pytest.raises(BuildError, match=r"names no \['gpu', 'compute_capability'\]"):
        ssh.device_build_facts(result, None, BUILD, "pi@jetson:22", "new")
