"""Edge devices over SSH: the model and targets/remote_runner.py are copied to a temp folder on
the device, run there, and the numbers come back as JSON; the folder is removed afterwards.

Two targets share one device configuration (`SshSettings`, params `runtimes.ssh`):
- `ssh-onnxruntime`: ONNX Runtime on the device (any execution provider it has, checked - a
  session that fell back to another provider is an error, not a result).
- `ssh-tensorrt`: TensorRT's `trtexec` on the device; latency only, with h2d/compute/d2h phases.

Security: the system OpenSSH clients run with BatchMode (no prompts) and
StrictHostKeyChecking=yes against the configured known_hosts file only, so an unknown or changed
host key is a failure, never accepted. Commands are argument lists; the one string the remote
shell parses is built from `shlex.quote`d words.
"""

import json
import logging
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import Field
from pydantic.dataclasses import dataclass

from pipeline.artifacts import precision_of
from pipeline.config import STRICT, NonNegativeInt, PositiveFloat, as_dict
from pipeline.errors import BuildError, PipelineError, TargetUnavailable
from pipeline.timing import LatencyStats, TimingPlan, summarize
from targets import remote_runner, trtexec
from targets.base import Runner, Target, TensorSpec, UnsupportedOperation, check_feeds

log = logging.getLogger(__name__)
RUNNER_FILE = Path(remote_runner.__file__)
SAFE_REMOTE_PATH = re.compile(r"^/[A-Za-z0-9_./-]+$")


class SshError(PipelineError):
    """The device could not be reached, a command timed out, or it failed on the device."""


@dataclass(frozen=True, config=STRICT)
class SshSettings:
    """The edge device of the ssh-* targets (`runtimes.ssh`); host "" = none: rows are skipped."""

    host: str  # user@host of the device; "" = no device configured
    port: Annotated[int, Field(ge=1, le=65535)]  # sshd port on the device
    key_file: str  # private key file; "" = ssh's default identities
    known_hosts: str  # known_hosts file holding the device's host key (verified, never skipped)
    ssh_config: str  # passed as `ssh -F`: a config file, or "none" to ignore ~/.ssh/config
    remote_python: Annotated[tuple[str, ...], Field(min_length=1)]  # device Python + numpy + ORT
    remote_tmp: str  # device folder under which a temp folder is made and removed again
    providers: Annotated[tuple[str, ...], Field(min_length=1)]  # ORT providers on the device
    trtexec: str  # trtexec command on the device (ssh-tensorrt)
    threads: NonNegativeInt  # ORT intra-op threads on the device; 0 = ORT's default
    connect_timeout_s: PositiveFloat  # seconds allowed to connect
    command_timeout_s: PositiveFloat  # seconds allowed for any one remote command or copy

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


class SshClient:
    """Runs commands on and copies files to/from one device with the system ssh/scp."""

    def __init__(self, settings: SshSettings) -> None:
        self.settings = settings

    def _options(self) -> list[str]:
        s = self.settings
        options = ["-F", s.ssh_config, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                   "-o", f"UserKnownHostsFile={s.known_hosts}",
                   "-o", "GlobalKnownHostsFile=/dev/null",
                   "-o", f"ConnectTimeout={max(1, round(s.connect_timeout_s))}"]
        if s.key_file:
            options += ["-o", "IdentitiesOnly=yes", "-i", s.key_file]
        return options

    def _call(self, command: list[str], what: str, timeout: float | None) -> str:
        limit = timeout or self.settings.command_timeout_s
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=limit,
                                  check=False)
        except subprocess.TimeoutExpired as err:
            raise SshError(f"{what} on {self.settings.where} timed out after {limit:g} s") from err
        detail = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        if command[0] == "scp" and done.returncode != 0:
            raise SshError(f"{what} ({self.settings.where}) failed: {detail[-1]}")
        if done.returncode == 255:  # ssh's own failures: refused, unknown host key, auth, DNS
            raise SshError(f"{what}: cannot reach {self.settings.where} over ssh: {detail[-1]}")
        return done.stdout if done.returncode == 0 else self._remote_failure(done, what)

    def _remote_failure(self, done: subprocess.CompletedProcess, what: str) -> str:
        result = _tagged_result(done.stdout)
        if result is not None and "error" in result:
            if result.get("missing"):
                raise TargetUnavailable(f"{self.settings.where}: {result['error']}")
            raise SshError(f"{what} failed on {self.settings.where}: {result['error']}")
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise SshError(f"{what} failed on {self.settings.where} (exit status "
                       f"{done.returncode}): {' | '.join(tail)}")

    def run(self, argv: list[str], what: str, timeout: float | None = None) -> str:
        """stdout of `argv` run on the device (each word shell-quoted for the remote shell)."""
        remote = " ".join(shlex.quote(word) for word in argv)
        return self._call(["ssh", *self._options(), "-p", str(self.settings.port), "--",
                           self.settings.host, remote], what, timeout)

    def put(self, local: list[Path], remote_dir: str) -> None:
        target = f"{self.settings.host}:{remote_dir}/"
        self._call(["scp", "-q", *self._options(), "-P", str(self.settings.port), "--",
                    *map(str, local), target], f"copying {len(local)} file(s) to the device", None)

    def get(self, remote_path: str, local: Path) -> None:
        source = f"{self.settings.host}:{remote_path}"
        self._call(["scp", "-q", *self._options(), "-P", str(self.settings.port), "--", source,
                    str(local)], "copying a result back", None)


def _tagged_result(stdout: str) -> dict[str, Any] | None:
    lines = [ln for ln in stdout.splitlines() if ln.startswith(remote_runner.RESULT_TAG)]
    return json.loads(lines[-1][len(remote_runner.RESULT_TAG):]) if lines else None


def onnx_inputs(path: Path) -> tuple[TensorSpec, ...]:
    """The graph inputs of an ONNX file (initializers excluded), read without its weights."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    return tuple(
        TensorSpec(i.name, np.dtype(tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)),
                   tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                         for d in i.type.tensor_type.shape.dim))
        for i in graph.input if i.name not in weights)


def model_files(onnx_path: Path) -> list[Path]:
    """The ONNX file plus the external-data files its initializers point to."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    files = [Path(onnx_path)]
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            location = next(e.value for e in init.external_data if e.key == "location")
            if (Path(onnx_path).parent / location) not in files:
                files.append(Path(onnx_path).parent / location)
    return files


class RemoteFolder:
    """A fresh temp folder on the device, filled with `files`; `close` removes it."""

    def __init__(self, client: SshClient, files: list[Path]) -> None:
        self.client = client
        template = f"{client.settings.remote_tmp.rstrip('/')}/prune-deploy.XXXXXXXX"
        self.path = client.run(["mktemp", "-d", template], "making a temp folder").strip()
        if not SAFE_REMOTE_PATH.fullmatch(self.path):
            raise SshError(f"{client.settings.where}: mktemp returned {self.path!r}, expected an "
                           "absolute path of plain characters")
        try:
            client.put(files, self.path)
        except PipelineError:
            self.close()
            raise

    def file(self, name: str) -> str:
        return f"{self.path}/{name}"

    def close(self) -> None:
        try:
            self.client.run(["rm", "-rf", "--", self.path], "removing the temp folder",
                            timeout=self.client.settings.connect_timeout_s + 60)
        except PipelineError as err:  # cleanup must not hide the error that brought us here
            log.warning("could not remove %s on %s: %s", self.path, self.client.settings.where,
                        err)


class _SshRunner(Runner):
    """Shared by both SSH runners: the copied model and its input specs."""

    def __init__(self, settings: SshSettings, artifact: Path, extra: tuple[Path, ...]) -> None:
        self.settings, self.client = settings, SshClient(settings)
        self._specs = onnx_inputs(artifact)
        self._model = artifact.name
        self.folder = RemoteFolder(self.client, [*extra, *model_files(artifact)])
        self.device_info: dict[str, Any] = {"ssh_host": settings.where}

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._specs

    def close(self) -> None:
        self.folder.close()

    def _check(self, feeds: dict[str, np.ndarray]) -> None:
        check_feeds(self._specs, feeds)


class SshOnnxRuntimeRunner(_SshRunner):
    """ONNX Runtime on the device, driven through remote_runner.py."""

    def __init__(self, settings: SshSettings, artifact: Path) -> None:
        super().__init__(settings, artifact, (RUNNER_FILE,))
        try:
            self.device_info.update(self._remote(["probe"], "probing the device"))
        except PipelineError:
            self.close()
            raise

    def _remote(self, args: list[str], what: str) -> dict[str, Any]:
        s = self.settings
        argv = [*s.remote_python, self.folder.file(RUNNER_FILE.name), *args,
                "--threads", str(s.threads), "--providers", *s.providers]
        result = _tagged_result(self.client.run(argv, what))
        if result is None:
            raise SshError(f"{what} on {s.where}: the runner printed no result line")
        return result

    def _upload(self, name: str, arrays: dict[str, np.ndarray]) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / name
            np.savez(local, **arrays)
            self.client.put([local], self.folder.path)
        return self.folder.file(name)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check(feeds)
        remote_in, remote_out = self._upload("feeds.npz", feeds), self.folder.file("out.npz")
        self._remote(["infer", "--model", self.folder.file(self._model), "--feeds", remote_in,
                      "--out", remote_out], "inference")
        with tempfile.TemporaryDirectory() as tmp:
            self.client.get(remote_out, Path(tmp) / "out.npz")
            with np.load(Path(tmp) / "out.npz", allow_pickle=False) as npz:
                return {key: npz[key] for key in npz.files}

    def benchmark(self, feeds: dict[str, np.ndarray], plan: TimingPlan) -> LatencyStats:
        self._check(feeds)
        remote_in = self._upload("feeds.npz", feeds)
        plan_json = json.dumps(as_dict(plan))
        result = self._remote(["bench", "--model", self.folder.file(self._model), "--feeds",
                               remote_in, "--plan", plan_json], "benchmark")
        return summarize(result["samples_s"], next(iter(feeds.values())).shape[0])

    def predict_classes(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        """Arg-max class of every image, computed on the device in one round trip."""
        remote_in = self._upload("images.npz", {"images": images})
        result = self._remote(["predict", "--model", self.folder.file(self._model), "--images",
                               remote_in, "--batch", str(batch_size)], "classifying the images")
        return np.asarray(result["labels"], dtype=np.int64)


class SshTrtexecRunner(_SshRunner):
    """TensorRT's trtexec on the device: builds an engine and times it (no outputs returned)."""

    def __init__(self, settings: SshSettings, artifact: Path, precision: str) -> None:
        super().__init__(settings, artifact, ())
        self.precision = precision
        found = self.client.run(["sh", "-c", 'command -v "$1" || echo MISSING', "sh",
                                 settings.trtexec], "looking for trtexec").strip()
        if found.endswith("MISSING"):
            self.close()
            raise TargetUnavailable(f"{settings.where}: {settings.trtexec!r} not found on the "
                                    "device (TensorRT's trtexec)")
        self.device_info["trtexec"] = found

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise UnsupportedOperation("ssh-tensorrt times engines with trtexec and returns no "
                                   "outputs; for outputs on the device use ssh-onnxruntime "
                                   "(e.g. providers [TensorrtExecutionProvider])")

    def benchmark(self, feeds: dict[str, np.ndarray], plan: TimingPlan) -> LatencyStats:
        self._check(feeds)
        (spec,), (array,) = self._specs, feeds.values()
        dynamic = any(not isinstance(d, int) for d in spec.shape)
        batch = array.shape[0]
        times = self.folder.file(f"times_b{batch}.json")
        argv = trtexec.benchmark_command(
            self.settings.trtexec, self.folder.file(self._model), spec.name,
            array.shape if dynamic else None, self.precision, plan, times)
        log_text = self.client.run(argv, f"trtexec (batch {batch})")
        self.device_info.update(trtexec.parse_log(log_text))
        with tempfile.TemporaryDirectory() as tmp:
            self.client.get(times, Path(tmp) / "times.json")
            text = (Path(tmp) / "times.json").read_text()
        return trtexec.times_stats(text, batch, warmup_ms=1e3 * plan.warmup_seconds)


class SshTarget(Target):
    """A device reached over SSH; subclasses choose the runtime that runs there."""

    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8")
    dynamic_batch: ClassVar[bool] = True
    settings_key: ClassVar[str] = "ssh"
    Settings: ClassVar[type] = SshSettings

    def available(self) -> tuple[bool, str]:
        """Local prerequisites only; whether the device answers is learnt when loading."""
        s = self.settings
        if not s.host:
            return False, ("no edge device configured (empty ssh host: benchmark.ssh.host in "
                           "params.yaml, --host on the command line)")
        missing = [tool for tool in ("ssh", "scp") if shutil.which(tool) is None]
        if missing:
            return False, f"OpenSSH client not installed ({', '.join(missing)} not on PATH)"
        if not s.known_hosts or not Path(s.known_hosts).is_file():
            return False, (f"known_hosts file {s.known_hosts!r} not found: the device's host "
                           "key must be listed there (ssh-keyscan it once and check the "
                           "fingerprint); host keys are never accepted unverified")
        if s.key_file and not Path(s.key_file).is_file():
            return False, f"ssh key file {s.key_file!r} not found"
        return True, ""

    def build(self, onnx_path: Path, out_dir: Path) -> Path:
        if Path(onnx_path).suffix != ".onnx" or not Path(onnx_path).is_file():
            raise BuildError(f"{onnx_path}: expected an existing .onnx file")
        return Path(onnx_path)


class SshOnnxRuntimeTarget(SshTarget):
    """ONNX Runtime on an edge device over SSH."""

    name: ClassVar[str] = "ssh-onnxruntime"

    def load(self, artifact: Path, precision: str | None = None) -> SshOnnxRuntimeRunner:
        self.require_available()
        return SshOnnxRuntimeRunner(self.settings, Path(artifact))


class SshTensorRtTarget(SshTarget):
    """TensorRT (trtexec) on an edge device over SSH; latency only."""

    name: ClassVar[str] = "ssh-tensorrt"

    def load(self, artifact: Path, precision: str | None = None) -> SshTrtexecRunner:
        """trtexec builds the engine on the device at `precision` (default: the file's)."""
        self.require_available()
        return SshTrtexecRunner(self.settings, Path(artifact),
                                precision or precision_of(Path(artifact)))
