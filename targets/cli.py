"""`prune-deploy`: the targets and the benchmark methodology without DVC.

    prune-deploy targets                      # every target, available or not and why
    prune-deploy bench m.onnx --target onnxruntime-cpu --batch 1 64
    prune-deploy bench models/m.pt --target torch-cpu --threads 2 --json out.json
    prune-deploy bench m.fp32.onnx --target openvino-cpu --precision bf16
    prune-deploy bench m.fp32.b1.pte --target executorch-xnnpack --batch 1
    prune-deploy bench m.onnx --target ssh-onnxruntime --host pi@10.0.0.2 --known-hosts kh

`bench` feeds random inputs of the model's own input shape (latency does not depend on the
values); for accuracy, use the DVC benchmark stage, which runs the test set. Targets are built
by the same factory and measured by the same path (targets.measure) as the benchmark stage.
Exit status: 0 when every row is ok, 1 when a row was skipped or failed or the run failed,
2 on bad arguments or settings. Errors are one line; `--debug` shows the traceback.
"""

import argparse
import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import provenance
from pipeline.artifacts import PRECISIONS, precision_of
from pipeline.config import TimingPlan
from pipeline.errors import ConfigError, PipelineError
from pipeline.io import write_json
from targets.base import Target, TensorSpec
from targets.measure import measure
from targets.registry import make_target, target_class, target_names

log = logging.getLogger("prune-deploy")

# settings key of a target (its `runtimes` section) -> its settings from the command line
SETTINGS_FROM_ARGS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "torch": lambda a: {"threads": a.threads},
    "onnxruntime": lambda a: {"graph_optimization": a.graph_optimization,
                              "intra_op_threads": a.threads, "inter_op_threads": 1,
                              "providers": a.providers},
    "openvino": lambda a: {"threads": a.threads},
    "executorch": lambda a: {"threads": a.threads},
    "ssh": lambda a: {"host": a.host, "port": a.port, "key_file": a.key,
                      "known_hosts": a.known_hosts, "ssh_config": a.ssh_config,
                      "remote_python": shlex.split(a.remote_python), "remote_tmp": a.remote_tmp,
                      "providers": a.providers, "trtexec": a.trtexec, "threads": a.threads,
                      "connect_timeout_s": a.connect_timeout,
                      "command_timeout_s": a.command_timeout},
}


def target_from_args(name: str, args: argparse.Namespace) -> Target:
    """Target `name` with its settings taken from the command line."""
    key = target_class(name).settings_key
    if key not in SETTINGS_FROM_ARGS:
        raise ConfigError(f"target {name!r} has no command-line settings (runtimes.{key})")
    return make_target(name, SETTINGS_FROM_ARGS[key](args))


def list_targets(args: argparse.Namespace) -> int:
    print(f"{'target':<20} {'available':<10} {'precisions':<16} {'dynamic batch':<14} reason")
    for name in target_names():
        target = target_from_args(name, args)
        ok, reason = target.available()
        print(f"{name:<20} {'yes' if ok else 'no':<10} {','.join(target.precisions):<16} "
              f"{'yes' if target.dynamic_batch else 'no':<14} {reason}")
    return 0


def random_feeds(rng: np.random.Generator):
    """feeds(spec, batch): random inputs of the spec's dtype, batch axis set to `batch`."""

    def feeds(spec: TensorSpec, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, *spec.shape[1:])
        if any(not isinstance(d, int) for d in shape):
            raise ConfigError(f"input {spec.name!r} has dynamic axes besides the batch "
                              f"{spec.shape}; export it with a fixed image size")
        if spec.dtype == np.uint8:
            return {spec.name: rng.integers(0, 256, shape, dtype=np.uint8)}
        return {spec.name: rng.standard_normal(shape).astype(spec.dtype)}

    return feeds


def bench(args: argparse.Namespace) -> int:
    target = target_from_args(args.target, args)
    plan = TimingPlan(args.warmup_iters, args.warmup_seconds, args.min_iters, args.min_seconds)
    run = provenance.collect(target.threads, runtime=target.runtime())
    precision = args.precision or ("fp32" if args.model.suffix == ".pt"
                                   else precision_of(args.model))
    measured = measure(target, args.model, args.batch, plan,
                       random_feeds(np.random.default_rng(0)), precision=precision)
    rows = [{"model": str(args.model), "target": target.name, "precision": precision, **row,
             "provenance": run} for row in measured]
    for row in rows:
        where = f"{target.name} {precision} batch {row['batch_size']:>4}"
        if row["status"] == "ok":
            print(f"{where}: p50 {row['p50_ms']:.3f} ms  p90 {row['p90_ms']:.3f}  p99 "
                  f"{row['p99_ms']:.3f}  {row['images_per_s']:,.0f} images/s  (n={row['n']}, "
                  f"{row['clock']})")
        else:
            print(f"{where}: {row['status']}: {row['reason']}")
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
    group.add_argument("--remote-tmp", default="/tmp", help="device folder for the temp folder")
    group.add_argument("--trtexec", default="trtexec", help="trtexec command on the device")
    group.add_argument("--connect-timeout", type=float, default=10.0, help="seconds")
    group.add_argument("--command-timeout", type=float, default=600.0, help="seconds")
    group.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    return parent


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="prune-deploy", description=__doc__.splitlines()[0])
    commands = root.add_subparsers(dest="command", required=True)
    commands.add_parser("targets", parents=[target_options()], help="list targets")
    run = commands.add_parser("bench", parents=[target_options()],
                              help="benchmark one model file on one target")
    run.add_argument("model", type=Path, help=".onnx file (or .pt for torch-* targets, .xml IR "
                                              "for openvino-cpu, .pte for executorch-xnnpack)")
    run.add_argument("--target", required=True, help="target name (see `prune-deploy targets`)")
    run.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="batch sizes")
    run.add_argument("--precision", choices=PRECISIONS,
                     help="precision to run at (default: the one in the file name, else fp32); "
                          "e.g. bf16 on openvino-cpu runs an fp32 file in bf16")
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
    except ConfigError as err:
        print(f"prune-deploy: {err}", file=sys.stderr)
        return 2
    except PipelineError as err:
        if args.debug:
            raise
        print(f"prune-deploy: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
