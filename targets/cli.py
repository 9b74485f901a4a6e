"""`prune-deploy`: the targets and the benchmark methodology without DVC.

    prune-deploy targets                      # every target, available or not and why
    prune-deploy bench m.onnx --target onnxruntime-cpu --batch 1 64
    prune-deploy bench models/m.pt --target torch-cpu --threads 2 --json out.json
    prune-deploy bench m.onnx --target ssh-onnxruntime --host pi@10.0.0.2 --known-hosts kh

`bench` feeds random inputs of the model's own input shape (latency does not depend on the
values); for accuracy, use the DVC benchmark stage, which runs the test set. Exit status: 0 when
every row is ok, 1 when a row was skipped or failed, 2 on bad arguments or settings.
"""

import argparse
import logging
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import provenance
from pipeline.config import OnnxRuntimeCpuConfig
from pipeline.errors import ConfigError, PipelineError, TargetUnavailable
from pipeline.io import write_json
from pipeline.timing import TimingPlan
from targets import TARGETS
from targets.base import Target, TensorSpec
from targets.ssh import SshSettings, SshTarget, precision_of

log = logging.getLogger("prune-deploy")


def make_target(name: str, args: argparse.Namespace) -> Target:
    """Target `name` built from the command-line settings."""
    if name not in TARGETS:
        raise ConfigError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    target_class = TARGETS[name]
    if issubclass(target_class, SshTarget):
        return target_class(SshSettings(
            host=args.host, port=args.port, key_file=args.key, known_hosts=args.known_hosts,
            ssh_config=args.ssh_config, remote_python=tuple(shlex.split(args.remote_python)),
            providers=tuple(args.providers), trtexec=args.trtexec, threads=args.threads,
            connect_timeout_s=args.connect_timeout, command_timeout_s=args.command_timeout))
    if name == "onnxruntime-cpu":
        return target_class(OnnxRuntimeCpuConfig(
            graph_optimization=args.graph_optimization, intra_op_threads=args.threads,
            inter_op_threads=1, providers=tuple(args.providers)))
    return target_class(threads=args.threads)


def list_targets(args: argparse.Namespace) -> int:
    print(f"{'target':<20} {'available':<10} {'precisions':<16} {'dynamic batch':<14} reason")
    for name in TARGETS:
        target = make_target(name, args)
        ok, reason = target.available()
        print(f"{name:<20} {'yes' if ok else 'no':<10} {','.join(target.precisions):<16} "
              f"{'yes' if target.dynamic_batch else 'no':<14} {reason}")
    return 0


def random_feeds(spec: TensorSpec, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random inputs of the spec's dtype, batch axis set to `batch`."""
    shape = (batch, *spec.shape[1:])
    if any(not isinstance(d, int) for d in shape):
        raise ConfigError(f"input {spec.name!r} has dynamic axes besides the batch {spec.shape}; "
                          "export it with a fixed image size")
    if spec.dtype == np.uint8:
        return {spec.name: rng.integers(0, 256, shape, dtype=np.uint8)}
    return {spec.name: rng.standard_normal(shape).astype(spec.dtype)}


def measure(target: Target, model: Path, batches: list[int], plan: TimingPlan) -> list[dict]:
    """One row per batch size: ok with latency, or skipped/failed with the reason."""
    rows: list[dict[str, Any]] = []
    ok, reason = target.available()
    try:
        if not ok:
            raise TargetUnavailable(f"target {target.name!r} is not available: {reason}")
        with tempfile.TemporaryDirectory() as build_dir:
            built = target.build(model, Path(build_dir))
            with target.load(built) as runner:
                rng = np.random.default_rng(0)
                for batch in batches:
                    stats = runner.benchmark(random_feeds(runner.inputs[0], batch, rng), plan)
                    rows.append({"batch_size": batch, "status": "ok", "reason": "",
                                 **stats.as_dict(), "device": runner.device_info})
    except TargetUnavailable as err:
        rows += [{"batch_size": b, "status": "skipped", "reason": str(err)} for b in
                 batches[len(rows):]]
    except Exception as err:  # noqa: BLE001 - reported as failed rows, the traceback logged
        log.debug("benchmark failed", exc_info=True)
        rows += [{"batch_size": b, "status": "failed", "reason": f"{type(err).__name__}: {err}"}
                 for b in batches[len(rows):]]
    return rows


def bench(args: argparse.Namespace) -> int:
    target = make_target(args.target, args)
    plan = TimingPlan(args.warmup_iters, args.warmup_seconds, args.min_iters, args.min_seconds)
    run = provenance.collect(args.threads, runtime=target.name)
    precision = "fp32" if args.model.suffix == ".pt" else precision_of(args.model)
    rows = [{"model": str(args.model), "target": target.name, "precision": precision, **row,
             "provenance": run} for row in measure(target, args.model, args.batch, plan)]
    for row in rows:
        if row["status"] == "ok":
            print(f"{target.name} {precision} batch {row['batch_size']:>4}: p50 "
                  f"{row['p50_ms']:.3f} ms  p90 {row['p90_ms']:.3f}  p99 {row['p99_ms']:.3f}  "
                  f"{row['throughput']:,.0f} images/s  (n={row['n']}, {row['clock']})")
        else:
            print(f"{target.name} {precision} batch {row['batch_size']:>4}: {row['status']}: "
                  f"{row['reason']}")
    if args.json:
        write_json(args.json, rows)
    return 0 if all(row["status"] == "ok" for row in rows) else 1


def target_options() -> argparse.ArgumentParser:
    """Settings shared by both commands (they decide availability, e.g. of the SSH targets)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("target settings")
    group.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = default)")
    group.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"],
                       help="ONNX Runtime execution providers, in order")
    group.add_argument("--graph-optimization", default="all",
                       choices=["disable", "basic", "extended", "all"])
    group.add_argument("--host", default="", help="edge device as user@host (ssh-* targets)")
    group.add_argument("--port", type=int, default=22)
    group.add_argument("--key", default="", help="ssh private key file")
    group.add_argument("--known-hosts", default="", help="known_hosts file with the device key")
    group.add_argument("--ssh-config", default="none", help="ssh -F value ('none' = ignore)")
    group.add_argument("--remote-python", default="python3", help="device Python command")
    group.add_argument("--trtexec", default="trtexec", help="trtexec command on the device")
    group.add_argument("--connect-timeout", type=float, default=10.0, help="seconds")
    group.add_argument("--command-timeout", type=float, default=600.0, help="seconds")
    return parent


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="prune-deploy", description=__doc__.splitlines()[0])
    commands = root.add_subparsers(dest="command", required=True)
    commands.add_parser("targets", parents=[target_options()], help="list targets")
    run = commands.add_parser("bench", parents=[target_options()],
                              help="benchmark one model file on one target")
    run.add_argument("model", type=Path, help=".onnx file (or .pt for torch-* targets)")
    run.add_argument("--target", required=True, help="target name (see `prune-deploy targets`)")
    run.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="batch sizes")
    run.add_argument("--warmup-iters", type=int, default=10)
    run.add_argument("--warmup-seconds", type=float, default=0.5)
    run.add_argument("--min-iters", type=int, default=50)
    run.add_argument("--min-seconds", type=float, default=2.0)
    run.add_argument("--json", type=Path, help="also write the rows (with provenance) here")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        return list_targets(args) if args.command == "targets" else bench(args)
    except PipelineError as err:
        print(f"prune-deploy: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
