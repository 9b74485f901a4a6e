"""Where a number came from: machine, runtime versions, code revision and time, saved with every
benchmark row so that results from different machines or commits are never mixed up unknowingly.

Everything here only reads the machine (files, package metadata, `git`, `nvidia-smi`); a missing
piece is recorded as unknown with the reason, never guessed.
"""

import importlib.metadata
import os
import platform
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import cpu

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Packages whose versions change benchmark numbers; absent ones are recorded as None.
DEFAULT_PACKAGES = ("numpy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt",
                    "openvino", "executorch", "torchao")


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else what `platform` knows."""
    return (cpu.cpuinfo_field("model name", "hardware", "cpu model") or platform.processor()
            or platform.machine() or "unknown")


def usable_cores() -> int:
    """CPU cores this process may run on (affinity/cgroup pinning), not the host's total."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 0


def package_versions(names: tuple[str, ...] = DEFAULT_PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _run(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=20,
                          check=False)


def git_revision(repo: Path = PROJECT_ROOT) -> str:
    """`<sha>` or `<sha>-dirty` (tracked files changed); `unknown (<why>)` outside a usable repo."""
    if shutil.which("git") is None:
        return "unknown (git not installed)"
    head = _run(["git", "rev-parse", "HEAD"], cwd=repo)
    if head.returncode != 0:
        why = head.stderr.strip().splitlines() or ["git rev-parse HEAD failed"]
        return f"unknown ({why[-1]})"
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo)
    dirty = "-dirty" if status.returncode == 0 and status.stdout.strip() else ""
    return head.stdout.strip() + dirty


def nvidia_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    result = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    lines = result.stdout.strip().splitlines() if result.returncode == 0 else []
    return lines[0].strip() if lines else None


def gpu_info() -> dict[str, Any] | None:
    """The CUDA device torch sees (name, compute capability, driver), or None without one."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}",
            "driver": nvidia_driver(), "cuda_runtime": torch.version.cuda, "count":
            torch.cuda.device_count()}


def collect(threads: int, runtime: str, packages: tuple[str, ...] = DEFAULT_PACKAGES,
            repo: Path = PROJECT_ROOT) -> dict[str, Any]:
    """The provenance record of one benchmark run on this machine.

    threads: intra-op threads the runtime was given (0 = the runtime's own default).
    runtime: the runtime and version that produced the numbers, e.g. "onnxruntime 1.31.1".
    """
    return {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_revision": git_revision(repo),
        "host": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_cores": usable_cores(),
        "cpu_isa": cpu.describe(),
        "threads": threads,
        "gpu": gpu_info(),
        "runtime": runtime,
        "packages": package_versions(packages),
    }


def flat(provenance: dict[str, Any]) -> dict[str, Any]:
    """One level of `prov_*` columns for CSV files (nested values joined into strings)."""
    row: dict[str, Any] = {}
    for key, value in provenance.items():
        if isinstance(value, dict):
            value = ";".join(f"{k}={v}" for k, v in value.items() if v is not None)
        row[f"prov_{key}"] = value if value is not None else ""
    return row
