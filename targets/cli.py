"""`prune-deploy`: the targets and the benchmark methodology without DVC.

    prune-deploy targets                      # every target, available or not and why
    prune-deploy bench m.onnx --target onnxruntime-cpu --batch 1 64
    prune-deploy bench models/m.pt --target torch-cpu --threads 2 --json out.json
    prune-deploy bench m.fp32.onnx --target openvino-cpu --precision bf16
    prune-deploy bench m.fp32.b1.pte --target executorch-xnnpack --batch 1
    prune-deploy bench m.onnx --target ssh-onnxruntime --host pi@10.0.0.2 --known-hosts kh
    prune-deploy build m.fp16.onnx --target tensorrt --out-dir engines/   # engine + its card
    prune-deploy build m.fp16.onnx --target ssh-tensorrt --host pi@jetson --known-hosts kh
    prune-deploy bench own.onnx --target onnxruntime-cpu --no-card   # a file without a card

`bench` feeds random inputs of the model's own input shape (latency does not depend on the
values); for accuracy, use the DVC benchmark stage, which runs the test set. Targets are built
by the same factory and measured by the same path (targets.measure) as the benchmark stage.
Before an ONNX file is loaded or sent to a device it is checked: its external-data files must
lie in its own folder, and it must match its model card (`<file>.card.json`, written by the
export stage) - a file without a card is refused unless `--no-card` says to trust it, which the
rows record. Model files (.pt) load with `torch.load(weights_only=True)`: no code runs.
Exit status: 0 when every row is ok, 1 when a row was skipped or failed or the run failed,
2 on bad arguments or settings, 130 when interrupted. Errors are one line; `--debug` shows the
traceback.
"""

import argparse
import logging
import math
import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import provenance
from pipeline.artifacts import PRECISIONS, card_path, precision_of
from pipeline.config import SectionError, TimingPlan, validate
from pipeline.errors import ConfigError, PipelineError
from pipeline.io import file_sha256, write_json
from targets.base import EngineBuilder, Target, TensorSpec
from targets.measure import measure
from targets.registry import make_target, target_class, target_names, target_settings

log = logging.getLogger("prune-deploy")

# Peak memory of one forward pass over the size of its input, as a rough upper bound for CNNs:
# a few activations are alive at once, each up to ~20x the input (64 channels at full
# resolution from 3-channel images). Used to refuse batch sizes that cannot fit in memory; it
# does not promise that smaller ones do.
MEMORY_FACTOR = 32


class UsageError(PipelineError):
    """The command line asks for something impossible or unsafe: exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def number(kind: type, low: float, high: float = math.inf,
           low_open: bool = False) -> Callable[[str], Any]:
    """An argparse type: a finite `kind` in [low, high] (or (low, high] with low_open)."""
    bound = f"> {low:g}" if low_open else f">= {low:g}"
    wanted = f"{'a whole number' if kind is int else 'a number'} {bound}" + (
        f" and <= {high:g}" if high < math.inf else "")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    parse.__name__ = wanted  # argparse names the type in some messages
    return parse


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing file")
    return path


def command_words(text: str) -> list[str]:
    try:
        words = shlex.split(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"cannot split {text!r} into words ({err})") from None
    if not words:
        raise argparse.ArgumentTypeError("expected a command, e.g. 'python3'")
    return words


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
                      "remote_python": a.remote_python, "remote_tmp": a.remote_tmp,
                      "providers": a.providers, "trtexec": a.trtexec, "threads": a.threads,
                      "connect_timeout_s": a.connect_timeout,
                      "command_timeout_s": a.command_timeout},
    "tensorrt": lambda a: {"device": a.device, "min_batch": a.min_batch,
                           "opt_batch": a.opt_batch or a.max_batch, "max_batch": a.max_batch,
                           "workspace_mib": a.workspace_mib, "tf32": a.tf32},
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


def verify_model(path: Path, trust_without_card: bool) -> dict[str, Any]:
    """What was checked about `path` before it is loaded or sent anywhere (for the rows)."""
    from pipeline.export.cards import load_verified_onnx, verified_card
    from pipeline.export.onnx_export import external_data_files

    if path.suffix == ".pt":
        return {"sha256": file_sha256(path), "verified_by": "weights-only load (no code runs)"}
    if path.suffix == ".onnx":
        external_data_files(path)  # refuses data files outside the model's folder, card or not
    card = card_path(path)
    if card.exists():
        sha256 = (load_verified_onnx(path).card if path.suffix == ".onnx"
                  else verified_card(path))["sha256"]
        return {"sha256": sha256, "verified_by": f"model card {card.name}"}
    if not trust_without_card:
        raise UsageError(f"{path}: no model card ({card.name}) beside it; shipped files are "
                         "checked against their card's sha256 before they are loaded or sent to "
                         "a device. To benchmark a file of your own that has no card, pass "
                         "--no-card (the rows record it)")
    return {"sha256": file_sha256(path), "verified_by": "nothing (--no-card)"}


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation without swapping, if the system says."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def image_input(path: Path) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape of one input image and its dtype, when the file fixes them."""
    if path.suffix == ".pt":
        from pipeline.checkpoint import read_checkpoint

        shape = read_checkpoint(path).get("meta", {}).get("input_shape")
        return (tuple(int(v) for v in shape), np.dtype(np.float32)) if shape else None
    if path.suffix != ".onnx":
        return None  # IR and ExecuTorch programs: their runtime checks the batch it is given
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    from pipeline.export.onnx_export import tensor_dims

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in weights]
    if len(inputs) != 1 or not all(isinstance(d, int) for d in tensor_dims(inputs[0])[1:]):
        return None  # measure() names what is wrong with such inputs
    dtype = np.dtype(tensor_dtype_to_np_dtype(inputs[0].type.tensor_type.elem_type))
    return tuple(tensor_dims(inputs[0])[1:]), dtype


def check_batches_fit(batches: list[int], path: Path) -> None:
    """UsageError for a batch size whose inputs and activations cannot fit in memory."""
    image = image_input(path)
    available = available_memory()
    if image is None or available is None:
        return
    shape, dtype = image
    per_image = int(np.prod(shape)) * dtype.itemsize
    largest = available // (per_image * MEMORY_FACTOR)
    too_big = [batch for batch in batches if batch > largest]
    if too_big:
        inputs = too_big[0] * per_image
        raise UsageError(
            f"--batch {too_big[0]}: its {dtype.name}{list(shape)} inputs take {inputs / 1e9:.2f} "
            f"GB and a forward pass about {MEMORY_FACTOR}x that ({MEMORY_FACTOR * inputs / 1e9:.1f}"
            f" GB); this machine has {available / 1e9:.1f} GB available, enough for batch sizes "
            f"up to {largest}")


def timing_plan(args: argparse.Namespace) -> TimingPlan:
    values = {"warmup_iters": args.warmup_iters, "warmup_seconds": args.warmup_seconds,
              "min_iters": args.min_iters, "min_seconds": args.min_seconds}
    try:
        return validate(TimingPlan, values, "timing")
    except SectionError as err:
        raise UsageError(f"timing options: {err}") from None


def bench(args: argparse.Namespace) -> int:
    target = target_from_args(args.target, args)
    plan = timing_plan(args)
    checked = verify_model(args.model, args.no_card)  # before anything loads or uploads it
    check_batches_fit(args.batch, args.model)
    run = provenance.collect(target.threads, runtime=target.runtime())
    precision = args.precision or ("fp32" if args.model.suffix == ".pt"
                                   else precision_of(args.model))
    measured = measure(target, args.model, args.batch, plan,
                       random_feeds(np.random.default_rng(0)), precision=precision)
    rows = [{"model": str(args.model), "target": target.name, "precision": precision, **checked,
             **row, "provenance": run} for row in measured]
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


def build(args: argparse.Namespace) -> int:
    """Build one engine (and its card) with a TensorRT target, here or on the device."""
    target = target_from_args(args.target, args)
    if not isinstance(target, EngineBuilder):
        raise ConfigError(f"target {args.target!r} builds no engines; use tensorrt or "
                          "ssh-tensorrt")
    # A bad build profile is a usage error (exit 2) whether or not the target can run here, so
    # it is validated before availability (which needs ssh/scp for ssh-tensorrt).
    settings = target_settings("tensorrt", SETTINGS_FROM_ARGS["tensorrt"](args))
    ok, reason = target.available()
    if not ok:
        print(f"{target.name}: skipped: {reason}")
        return 1
    verify_model(args.model, args.no_card)  # before a build is spent on it or it is uploaded
    engine = target.build_engine(args.model, args.out_dir, settings)
    print(f"{engine}\n{card_path(engine)}")
    return 0


def target_options() -> argparse.ArgumentParser:
    """Settings shared by both commands (they decide availability, e.g. of the SSH targets)."""
    parent = Parser(add_help=False)
    group = parent.add_argument_group("target settings")
    group.add_argument("--threads", type=number(int, 0), default=0,
                       help="intra-op threads (0 = the runtime's default)")
    group.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"],
                       help="ONNX Runtime execution providers, in order")
    group.add_argument("--graph-optimization", default="all",
                       choices=["disable", "basic", "extended", "all"])
    group.add_argument("--host", default="", help="edge device as user@host (ssh-* targets)")
    group.add_argument("--port", type=number(int, 1, 65535), default=22)
    group.add_argument("--key", default="", help="ssh private key file")
    group.add_argument("--known-hosts", default="", help="known_hosts file with the device key")
    group.add_argument("--ssh-config", default="none", help="ssh -F value ('none' = ignore)")
    group.add_argument("--remote-python", type=command_words, default=["python3"],
                       help="device Python command")
    group.add_argument("--remote-tmp", default="/tmp", help="device folder for the temp folder")
    group.add_argument("--trtexec", default="trtexec", help="trtexec command on the device")
    group.add_argument("--connect-timeout", type=number(float, 0, low_open=True), default=10.0,
                       help="seconds")
    group.add_argument("--command-timeout", type=number(float, 0, low_open=True), default=600.0,
                       help="seconds")
    group.add_argument("--device", type=number(int, 0), default=0, help="CUDA device (tensorrt)")
    group.add_argument("--min-batch", type=number(int, 1), default=1,
                       help="engine profile: smallest batch")
    group.add_argument("--opt-batch", type=number(int, 0), default=0,
                       help="batch TensorRT tunes for (default: --max-batch)")
    group.add_argument("--max-batch", type=number(int, 1), default=64,
                       help="engine profile: largest batch")
    group.add_argument("--workspace-mib", type=number(int, 1), default=1024,
                       help="builder workspace, MiB")
    group.add_argument("--tf32", action="store_true", help="allow TF32 in fp32 engine layers")
    group.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    return parent


def parser() -> argparse.ArgumentParser:
    root = Parser(prog="prune-deploy", description=__doc__.splitlines()[0])
    commands = root.add_subparsers(dest="command", required=True)
    commands.add_parser("targets", parents=[target_options()], help="list targets")
    run = commands.add_parser("bench", parents=[target_options()],
                              help="benchmark one model file on one target")
    run.add_argument("model", type=existing_file,
                     help=".onnx file (or .pt for torch-* targets, .xml IR for openvino-cpu, "
                          ".pte for executorch-xnnpack)")
    run.add_argument("--target", required=True, help="target name (see `prune-deploy targets`)")
    run.add_argument("--batch", type=number(int, 1), nargs="+", default=[1, 64],
                     help="batch sizes (bounded by the memory available)")
    run.add_argument("--precision", choices=PRECISIONS,
                     help="precision to run at (default: the one in the file name, else fp32); "
                          "e.g. bf16 on openvino-cpu runs an fp32 file in bf16")
    run.add_argument("--warmup-iters", type=number(int, 0), default=10)
    run.add_argument("--warmup-seconds", type=number(float, 0), default=0.5)
    run.add_argument("--min-iters", type=number(int, 1), default=50)
    run.add_argument("--min-seconds", type=number(float, 0), default=2.0)
    run.add_argument("--json", type=Path, help="also write the rows (with provenance) here")
    run.add_argument("--no-card", action="store_true",
                     help="benchmark an ONNX file that has no model card (a file you trust)")
    make = commands.add_parser("build", parents=[target_options()],
                               help="build a TensorRT engine and its card (tensorrt, ssh-tensorrt)")
    make.add_argument("model", type=existing_file,
                      help=".onnx file (INT8: the .int8.trt.onnx file)")
    make.add_argument("--target", required=True, choices=["tensorrt", "ssh-tensorrt"])
    make.add_argument("--out-dir", type=Path, default=Path("."), help="folder for the engine")
    make.add_argument("--no-card", action="store_true",
                      help="build from an ONNX file that has no model card (a file you trust)")
    return root


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # a terminated run cleans up (temp folders on a device) as Ctrl-C


def run_command(args: argparse.Namespace) -> int:
    return {"targets": list_targets, "bench": bench, "build": build}[args.command](args)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)  # a bad argument: one line, exit status 2
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run_command(args)
    except KeyboardInterrupt:
        print("prune-deploy: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ConfigError) as err:
        if args.debug:
            raise
        print(f"prune-deploy: {err}", file=sys.stderr)
        return 2
    except PipelineError as err:
        if args.debug:
            raise
        print(f"prune-deploy: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - a bug or a library's failure: still one line
        if args.debug:
            raise
        print(f"prune-deploy: unexpected {type(err).__name__}: {err} (rerun with --debug for "
              "the traceback)", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
