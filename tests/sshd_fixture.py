"""Fixtures shared by the benchmark tests: a tiny model file, its ONNX export, and a throw-away
OpenSSH server on 127.0.0.1 (own host key, own user key, own known_hosts) to act as an edge device,
with a trtexec stand-in (test scaffolding) to put on it.

The server runs in the foreground (`sshd -D`) from a config in a temp folder and is stopped by
its process id. Tests that need it skip, with the reason, when sshd is absent or cannot start -
unless PRUNE_DEPLOY_REQUIRE_SSHD=1 (set by .ci/run), where they fail instead: CI must run them.
"""

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import save_model
from pipeline.models import build_model

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
REQUIRE_SSHD = "PRUNE_DEPLOY_REQUIRE_SSHD"


# Tests that need only the OpenSSH client; where an sshd is required, they run (and fail).
NEEDS_SSH_CLIENT = pytest.mark.skipif(
    (shutil.which("ssh") is None or shutil.which("scp") is None)
    and os.environ.get(REQUIRE_SSHD) != "1",
    reason="OpenSSH client not installed (apt-get install openssh-client)")


def _cannot_run(reason: str) -> None:
    """Skip the test, or fail it where an sshd is required (CI)."""
    if os.environ.get(REQUIRE_SSHD) == "1":
        pytest.fail(f"{reason} ({REQUIRE_SSHD}=1: the SSH tests must run here)")
    pytest.skip(reason)
TINY_SPEC = {"arch": "resnet20", "num_classes": 10, "base_width": 4}


def tiny_checkpoint(path: Path, base_width: int = 4, seed: int = 0) -> Path:
    """A ResNet20 with `base_width` channels, random weights, saved as a model file."""
    torch.manual_seed(seed)
    spec = {**TINY_SPEC, "base_width": base_width}
    model = build_model(spec).eval()
    meta = {"classes": [f"c{i}" for i in range(10)], "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25], "input_shape": [3, 32, 32]}
    save_model(path, model, spec, meta)
    return path


def tiny_onnx(checkpoint: Path, path: Path) -> Path:
    """The checkpoint's model as ONNX with a dynamic batch axis (input 'input', output 'logits')."""
    import warnings

    from pipeline.checkpoint import load_model

    model = load_model(checkpoint).model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(path), input_names=["input"],
                          output_names=["logits"], dynamo=False,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def with_card(path: Path, model: str = "m") -> Path:
    """Give a test file a model card, as the export stages do (beside it; ONNX files also embed
    it)."""
    import onnx

    from pipeline.artifacts import precision_of
    from pipeline.export.cards import CARD_FORMAT, embed_card, write_card
    from pipeline.export.onnx_export import save_onnx

    card = {"format": CARD_FORMAT, "model": model, "precision": precision_of(path)}
    if path.suffix != ".onnx":  # an OpenVINO IR or an ExecuTorch program
        write_card(path, card)
        return path
    proto = onnx.load(path)
    embed_card(proto, card)
    save_onnx(proto, path)
    write_card(path, card)
    return path


def tamper(path: Path) -> Path:
    """Change one byte of a file's last metadata string (still parses, no longer its card's)."""
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    return path


@dataclass(frozen=True)
class Sshd:
    host: str  # user@127.0.0.1
    port: int
    key_file: Path
    known_hosts: Path
    folder: Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def _write_config(folder: Path, port: int) -> Path:
    config = folder / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {folder / 'host_key'}",
        f"PidFile {folder / 'sshd.pid'}", f"AuthorizedKeysFile {folder / 'authorized_keys'}",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
        "PermitRootLogin prohibit-password", "StrictModes no", "LogLevel ERROR",
        "Subsystem sftp internal-sftp", ""]))  # scp copies over SFTP
    return config


def _wait_until_listening(port: int, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited: {process.stderr.read().decode().strip()}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on port {port} within {seconds} s")


def start_sshd(folder: Path) -> tuple[Sshd, subprocess.Popen]:
    """Start sshd for the current user; skip (or fail, see REQUIRE_SSHD) when it cannot run."""
    sshd = next((p for p in SSHD_CANDIDATES if Path(p).is_file()), shutil.which("sshd"))
    if sshd is None or shutil.which("ssh-keygen") is None or shutil.which("ssh") is None:
        _cannot_run("OpenSSH server/client not installed (apt-get install openssh-server "
                    "openssh-client)")
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        try:  # sshd running as root insists on its privilege-separation folder
            Path("/run/sshd").mkdir(mode=0o755, parents=True)
        except OSError as err:
            _cannot_run(f"sshd needs /run/sshd and it cannot be made: {err}")
    folder.mkdir(parents=True, exist_ok=True)
    _keygen(folder / "host_key")
    _keygen(folder / "user_key")
    shutil.copy(folder / "user_key.pub", folder / "authorized_keys")
    port = free_port()
    config = _write_config(folder, port)
    host_public = (folder / "host_key.pub").read_text().split()[:2]
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join(host_public)}\n")
    process = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)
    try:
        _wait_until_listening(port, process, seconds=10)
    except RuntimeError as err:
        stop_sshd(process)
        _cannot_run(f"sshd could not start: {err}")
    server = Sshd(f"{getpass.getuser()}@127.0.0.1", port, folder / "user_key",
                  folder / "known_hosts", folder)
    return server, process


def stop_sshd(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def settings_for(server: Sshd, **overrides):
    """SshSettings for the test server, with this venv's Python as the device's Python."""
    from targets.ssh import SshSettings

    values = dict(host=server.host, port=server.port, key_file=str(server.key_file),
                  known_hosts=str(server.known_hosts), ssh_config="none",
                  remote_python=(sys.executable,), remote_tmp=str(server.folder),
                  providers=("CPUExecutionProvider",), trtexec="trtexec",
                  connect_timeout_s=5.0, command_timeout_s=60.0, threads=1)
    return SshSettings(**(values | overrides))


def unconfigured_ssh(**overrides):
    """SshSettings with no device configured (empty host), for tests of everything else."""
    from targets.ssh import SshSettings

    values = dict(host="", port=22, key_file="", known_hosts="", ssh_config="none",
                  remote_python=("python3",), remote_tmp="/tmp",
                  providers=("CPUExecutionProvider",), trtexec="trtexec", threads=1,
                  connect_timeout_s=3.0, command_timeout_s=30.0)
    return SshSettings(**(values | overrides))


TRTEXEC_STANDIN = Path(__file__).with_name("trtexec_standin.sh")  # test scaffolding, not TensorRT


def install_trtexec_standin(folder: Path, version_code: str = "100300") -> Path:
    """The trtexec stand-in (tests/trtexec_standin.sh) in the loopback device's folder, claiming
    TensorRT `version_code` (100300 = 10.3.0); it logs its arguments to trtexec_args.txt."""
    standin = folder / TRTEXEC_STANDIN.name
    shutil.copy(TRTEXEC_STANDIN, standin)
    standin.chmod(0o755)
    (folder / "trtexec_standin.version").write_text(version_code + "\n")
    (folder / "trtexec_args.txt").unlink(missing_ok=True)
    return standin


def serve_sshd(tmp_path_factory):
    """Body of a module-scoped `sshd_server` fixture: a running server, stopped afterwards."""
    server, process = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    stop_sshd(process)
