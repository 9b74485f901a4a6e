"""Edge devices over SSH: the model and targets/remote_runner.py are copied to a temp folder on
the device, run there, and the numbers come back as JSON; the folder is removed afterwards.

Two targets share one device configuration (`SshSettings`, params `runtimes.ssh`):
- `ssh-onnxruntime`: ONNX Runtime on the device (any execution provider it has, checked - a
  session that fell back to another provider is an error, not a result).
- `ssh-tensorrt`: TensorRT's `trtexec` on the device; latency only, with h2d/compute/d2h phases.
  Its build mode (`build_engine`, used by the engine stage) builds an engine on the device with
  `trtexec --saveEngine --timingCacheFile` (profile and workspace from `runtimes.tensorrt`),
  fetches the engine and the timing cache back, checks the engine's sha256 on both ends, and
  writes an engine card from what the device's trtexec printed (TensorRT version, GPU, compute
  capability, build time) - a Jetson user gets the engine that runs there from a laptop.

Security: the system OpenSSH clients run with BatchMode (no prompts) and
StrictHostKeyChecking=yes against the configured known_hosts file only, so an unknown or changed
host key is a failure, never accepted. Commands are argument lists; the one string the remote
shell parses is built from `shlex.quote`d words. Only the model, the external-data files it
names - each a regular file in its own folder, checked before anything is copied - and the
runner are sent; the remote temp folder is removed when the run ends, fails or is interrupted.
"""

import hashlib
import json
import logging
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, ClassVar, NamedTuple

import numpy as np
from pydantic import Field
from pydantic.dataclasses import dataclass

from pipeline.artifacts import (
    TENSORRT_FLAVOR,
    TIMING_CACHE,
    card_path,
    precision_of,
    timing_cache_path,
)
from pipeline.config import STRICT, NonNegativeInt, PositiveFloat, as_dict
from pipeline.errors import ArtifactIntegrityError, BuildError, PipelineError, TargetUnavailable
from pipeline.export.cards import write_engine_card
from pipeline.io import atomic_write_bytes
from pipeline.timing import LatencyStats, TimingPlan, summarize
from targets import remote_runner, trtexec
from targets.base import (
    EngineBuilder,
    Runner,
    Target,
    TensorSpec,
    UnsupportedOperation,
    check_feeds,
    onnx_inputs,
)
from targets.engines import (
    MIB,
    EngineSource,
    ShapeProfile,
    TensorRtSettings,
    batch_profile,
    engine_card,
    engine_source,
    plan_header_version,
)

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


def model_files(onnx_path: Path) -> list[Path]:
    """The ONNX file plus the external-data files its tensors name, each checked to be a regular
    file in the model's own folder (pipeline.export.onnx_export.external_data_files) before
    anything is copied: a model cannot make the benchmark upload a file from elsewhere."""
    from pipeline.export.onnx_export import external_data_files

    return [Path(onnx_path), *external_data_files(onnx_path)]


def distinct_names(files: list[Path]) -> list[Path]:
    """`files`, refused if two share a name: they land in one remote folder, where a model's
    data file named like the runner would replace the code that runs on the device."""
    seen: dict[str, Path] = {}
    for file in files:
        if file.name in seen:
            raise SshError(f"{file} and {seen[file.name]} would both be copied to the device as "
                           f"{file.name!r}; every file sent must have a name of its own")
        seen[file.name] = file
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
        except BaseException:  # failed or interrupted (Ctrl-C): the folder must not stay
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
        files = distinct_names([*extra, *model_files(artifact)])  # refused before any upload
        self.folder = RemoteFolder(self.client, files)
        self.device_info: dict[str, Any] = {"ssh_host": settings.where}
        try:
            self._start()
        except BaseException:  # failed or interrupted: remove the folder, then report why
            self.close()
            raise

    def _start(self) -> None:
        """Runs once the files are on the device (probes); the folder goes if it raises."""

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

    def _start(self) -> None:
        self.device_info.update(self._remote(["probe"], "probing the device"))

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


def find_trtexec(client: SshClient) -> tuple[str, tuple[int, int, int]]:
    """The device's trtexec (its path) and its TensorRT version, which decides its flags."""
    settings = client.settings
    found = client.run(["sh", "-c", 'command -v "$1" || echo MISSING', "sh", settings.trtexec],
                       "looking for trtexec").strip()
    if found.endswith("MISSING"):
        raise TargetUnavailable(f"{settings.where}: {settings.trtexec!r} not found on the "
                                "device (TensorRT's trtexec)")
    probe = client.run(trtexec.version_probe(settings.trtexec), "asking trtexec its version")
    return found, trtexec.probed_version(probe, settings.trtexec)


class SshTrtexecRunner(_SshRunner):
    """TensorRT's trtexec on the device: builds an engine and times it (no outputs returned)."""

    def __init__(self, settings: SshSettings, artifact: Path, precision: str) -> None:
        self.precision = precision
        super().__init__(settings, artifact, ())

    def _start(self) -> None:
        found, self.version = find_trtexec(self.client)
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
            array.shape if dynamic else None, self.precision, plan, times, self.version)
        log_text = self.client.run(argv, f"trtexec (batch {batch})")
        self.device_info.update(trtexec.parse_log(log_text))
        with tempfile.TemporaryDirectory() as tmp:
            self.client.get(times, Path(tmp) / "times.json")
            text = (Path(tmp) / "times.json").read_text()
        return trtexec.times_stats(text, batch, warmup_ms=1e3 * plan.warmup_seconds)


class DeviceBuild(NamedTuple):
    """What one `trtexec --saveEngine` on the device gave back."""

    engine: bytes
    timing_cache: bytes
    log: dict[str, Any]  # trtexec.parse_log of its console output
    version: tuple[int, int, int]  # the device trtexec's TensorRT version
    platform: str  # the device's `uname -s -m`, as targets.engines.host_platform writes it
    wall_seconds: float  # the trtexec command over ssh


def _device_sha256(client: SshClient, path: str) -> str:
    digest = client.run(["sha256sum", "--", path], "hashing the engine on the device").split()
    if not digest or not re.fullmatch(r"[0-9a-f]{64}", digest[0]):
        raise SshError(f"{client.settings.where}: sha256sum printed {digest[:1]}, not a hash")
    return digest[0]


def _fetch(client: SshClient, remote: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "fetched"
        client.get(remote, local)
        return local.read_bytes()


def build_on_device(client: SshClient, source: EngineSource, profile: ShapeProfile,
                    build: TensorRtSettings, cache: Path) -> DeviceBuild:
    """Build `source` with the device's trtexec in a temp folder there (the local timing cache
    sent along and fetched back); the engine is checked against its sha256 on the device."""
    folder = RemoteFolder(client, [*model_files(source.path), *([cache] if cache.is_file()
                                                                 else [])])
    try:
        _, version = find_trtexec(client)
        engine = folder.file("model.engine")
        argv = trtexec.build_command(client.settings.trtexec, folder.file(source.path.name),
                                     engine, folder.file(TIMING_CACHE), profile,
                                     source.precision, build.workspace_mib, version, build.tf32)
        started = time.monotonic()
        log_text = client.run(argv, f"building {source.path.name} with trtexec")
        wall = time.monotonic() - started
        remote_sha = _device_sha256(client, engine)
        data = _fetch(client, engine)
        platform = "-".join(client.run(["uname", "-s", "-m"], "asking the platform").split())
        result = DeviceBuild(data, _fetch(client, folder.file(TIMING_CACHE)),
                             trtexec.parse_log(log_text), version, platform, wall)
    finally:
        folder.close()
    if hashlib.sha256(result.engine).hexdigest() != remote_sha:
        raise ArtifactIntegrityError(f"the engine fetched from {client.settings.where} does not "
                                     f"hash to its sha256 there ({remote_sha}): the copy broke")
    return result


def device_build_facts(result: DeviceBuild, profile: ShapeProfile, build: TensorRtSettings,
                       where: str, cache_state: str) -> dict[str, Any]:
    """Engine card facts of a device build, from what the device's trtexec printed."""
    missing = [key for key in ("tensorrt", "gpu", "compute_capability") if not result.log[key]]
    if missing:
        raise BuildError(f"trtexec on {where} built an engine but its log names no {missing} "
                         "('TensorRT version:', 'Selected Device:', 'Compute Capability:' "
                         "lines); an engine card needs them")
    logged = result.log["build_seconds"]
    return {"tensorrt": result.log["tensorrt"], "plan_version": plan_header_version(result.engine),
            "gpu": result.log["gpu"], "compute_capability": result.log["compute_capability"],
            "platform": result.platform, "profile": profile.as_dict(),
            "workspace_bytes": build.workspace_mib * MIB, "tf32": build.tf32,
            "strongly_typed": result.version[0] >= 10,
            "build_seconds": logged if logged is not None else round(result.wall_seconds, 3),
            "build_seconds_from": "trtexec log ('Engine built in')" if logged is not None
            else "wall time of the trtexec command over ssh",
            "built_with": f"trtexec (TensorRT {'.'.join(map(str, result.version))}) on {where}",
            "timing_cache": {"file": TIMING_CACHE, "state": cache_state}}


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


class SshTensorRtTarget(SshTarget, EngineBuilder):
    """TensorRT (trtexec) on an edge device over SSH: latency only; and engines built there."""

    name: ClassVar[str] = "ssh-tensorrt"
    onnx_flavors: ClassVar[dict[str, str]] = {"int8": TENSORRT_FLAVOR}
    engines_run_here: ClassVar[bool] = False  # they run on the device

    def load(self, artifact: Path, precision: str | None = None) -> SshTrtexecRunner:
        """trtexec builds the engine on the device at `precision` (default: the file's)."""
        self.require_available()
        return SshTrtexecRunner(self.settings, Path(artifact),
                                precision or precision_of(Path(artifact)))

    def build_engine(self, onnx_path: Path, out_dir: Path, build: TensorRtSettings) -> Path:
        """Build on the device; write out_dir/<model>.<precision>.ssh-tensorrt.engine, its card
        and the updated timing cache."""
        self.require_available()
        source = engine_source(onnx_path)
        profile = batch_profile(source.input, build)
        cache = timing_cache_path(out_dir)
        cache_state = "reused" if cache.is_file() else "new"
        result = build_on_device(SshClient(self.settings), source, profile, build, cache)
        facts = device_build_facts(result, profile, build, self.settings.where, cache_state)
        engine = source.engine_path(Path(out_dir), self.name)
        card_path(engine).unlink(missing_ok=True)  # a stale card must not vouch for a new engine
        atomic_write_bytes(engine, result.engine)
        atomic_write_bytes(cache, result.timing_cache)
        write_engine_card(engine, engine_card(source, self.name, facts))
        return engine
