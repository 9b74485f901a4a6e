"""benchmark stage: latency and accuracy of every model x precision x batch size on ONE target.

DVC runs it once per target listed in params (foreach). For each model and precision it loads
the artifact on the target (models/<m>.pt for PyTorch targets, artifacts/<m>.<sim|fp16|int8>.onnx
for the others), measures top-1 on the prepared test images through that runtime and its top-1
agreement with the PyTorch model, then the latency distribution per batch size. Every row has a
status - ok, skipped (target or batch size not available here, with the reason) or failed (with
the error) - and the provenance of the machine that produced it. Writes
metrics/bench_<target>.json and plots/bench_<target>.csv.
"""

import argparse
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import provenance
from pipeline.checkpoint import LoadedModel, load_model
from pipeline.config import BenchmarkConfig, as_dict, load_params
from pipeline.data import Dataset, balanced_subset, load_prepared
from pipeline.errors import CheckpointError, TargetUnavailable
from pipeline.flops import model_cost
from pipeline.io import write_csv, write_json
from pipeline.timing import TimingPlan
from stages._cli import run_main
from targets import TARGETS
from targets.base import Runner, Target, TensorSpec
from targets.ssh import SshSettings, SshTarget, UnsupportedOperation

log = logging.getLogger("benchmark")
ONNX_SUFFIX = {"fp32": "sim", "fp16": "fp16", "int8": "int8"}  # artifacts/<m>.<suffix>.onnx


@dataclass(frozen=True)
class BenchPaths:
    metrics: Path  # metrics/bench_<target>.json
    plots: Path  # plots/bench_<target>.csv
    dataset: Path = Path("data/prepared.npz")
    models_dir: Path = Path("models")
    artifacts_dir: Path = Path("artifacts")

    @classmethod
    def for_target(cls, target_name: str) -> "BenchPaths":
        return cls(Path(f"metrics/bench_{target_name}.json"),
                   Path(f"plots/bench_{target_name}.csv"))

    def artifact(self, target: Target, model: str, precision: str) -> Path:
        if target.source == "checkpoint":  # PyTorch targets run model files
            return self.models_dir / f"{model}.pt"
        return self.artifacts_dir / f"{model}.{ONNX_SUFFIX[precision]}.onnx"


@dataclass(frozen=True)
class EvalSet:
    images_u8: np.ndarray  # (N, C, H, W) uint8 test images
    labels: np.ndarray  # (N,) int64
    mean: np.ndarray  # per channel, shape (1, C, 1, 1)
    std: np.ndarray

    def inputs_for(self, spec: TensorSpec, count: int | None = None) -> np.ndarray:
        """The first `count` images as the runtime's input: raw uint8 if it takes uint8 (the
        model normalises), else normalised and cast to its dtype (float16 for fp16 files)."""
        images = self.images_u8[:count]
        if spec.dtype == np.uint8:
            return images
        return ((images.astype(np.float32) / 255 - self.mean) / self.std).astype(spec.dtype)


@dataclass(frozen=True)
class Reference:
    """The PyTorch model a runtime's results are compared with."""

    predictions: np.ndarray  # its top-1 class for every eval image
    macs: int
    params: int


def make_target(name: str, cfg: BenchmarkConfig) -> Target:
    """The registered target `name`, constructed with its section of the benchmark config."""
    target_class = TARGETS[name]
    if issubclass(target_class, SshTarget):
        return target_class(SshSettings(**as_dict(cfg.ssh) | {
            "remote_python": tuple(cfg.ssh.remote_python), "providers": tuple(cfg.ssh.providers)}))
    if name == "onnxruntime-cpu":
        return target_class(cfg.onnxruntime)
    return target_class(threads=cfg.torch_threads)


def threads_of(target: Target, cfg: BenchmarkConfig) -> int:
    """Intra-op threads the target was given (0 = its runtime's default), for provenance."""
    if isinstance(target, SshTarget):
        return cfg.ssh.threads
    if target.name == "onnxruntime-cpu":
        return cfg.onnxruntime.intra_op_threads
    return cfg.torch_threads


def eval_set(dataset: Dataset, limit: int, loaded: LoadedModel) -> EvalSet:
    split = balanced_subset(dataset.test, limit)
    if "mean" not in loaded.meta or "std" not in loaded.meta:
        raise CheckpointError("model file has no mean/std in its meta; cannot normalise inputs")
    shape = (1, -1, 1, 1)
    return EvalSet(split.images.numpy(), split.labels.numpy(),
                   np.asarray(loaded.meta["mean"], np.float32).reshape(shape),
                   np.asarray(loaded.meta["std"], np.float32).reshape(shape))


@torch.inference_mode()
def reference_for(loaded: LoadedModel, evalset: EvalSet, batch: int = 256) -> Reference:
    inputs = torch.from_numpy(evalset.inputs_for(TensorSpec("input", np.dtype(np.float32), ())))
    predictions = [loaded.model(inputs[i:i + batch]).argmax(1).numpy()
                   for i in range(0, len(inputs), batch)]
    cost = model_cost(loaded.model, tuple(evalset.images_u8.shape[1:]))
    return Reference(np.concatenate(predictions), cost.macs, cost.params)


def fixed_batch(spec: TensorSpec) -> int | None:
    return spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) else None


def predict_classes(runner: Runner, inputs: np.ndarray, batch: int) -> np.ndarray:
    """Top-1 class of every input through the runner, `batch` at a time (tail padded when the
    artifact's batch is fixed). Remote runners classify on the device in one round trip."""
    if hasattr(runner, "predict_classes"):
        return runner.predict_classes(inputs, batch)
    spec = runner.inputs[0]
    labels = []
    for start in range(0, len(inputs), batch):
        chunk = inputs[start:start + batch]
        padded = np.concatenate([chunk, np.repeat(chunk[:1], batch - len(chunk), 0)]) \
            if fixed_batch(spec) and len(chunk) < batch else chunk
        logits = next(iter(runner.infer({spec.name: padded}).values()))
        labels.append(np.asarray(logits)[:len(chunk)].argmax(1))
    return np.concatenate(labels)


def accuracy(runner: Runner, evalset: EvalSet, reference: Reference, batch: int) -> dict:
    """top-1 on the eval images and top-1 agreement with PyTorch, through this runtime."""
    spec = runner.inputs[0]
    try:
        predicted = predict_classes(runner, evalset.inputs_for(spec), fixed_batch(spec) or batch)
    except UnsupportedOperation as err:
        return {"top1": None, "agreement": None, "eval_images": 0, "accuracy_note": str(err)}
    return {"top1": float(np.mean(predicted == evalset.labels)),
            "agreement": float(np.mean(predicted == reference.predictions)),
            "eval_images": len(evalset.labels), "accuracy_note": ""}


def timing_plan(cfg: BenchmarkConfig) -> TimingPlan:
    t = cfg.timing
    return TimingPlan(t.warmup_iters, t.warmup_seconds, t.min_iters, t.min_seconds)


def latency_fields(stats) -> dict[str, Any]:
    phases = {f"{phase}_p50_ms": value for phase, value in stats.phase_p50_ms.items()}
    return {"p50_ms": stats.p50_ms, "p90_ms": stats.p90_ms, "p99_ms": stats.p99_ms,
            "mean_ms": stats.mean_ms, "std_ms": stats.std_ms, "n": stats.n,
            "images_per_s": stats.throughput, "clock": stats.clock, **phases}


def benchmark_batch(runner: Runner, evalset: EvalSet, batch: int, plan: TimingPlan) -> dict:
    """One batch size's latency row fields; a failure here spares the other batch sizes."""
    spec = runner.inputs[0]
    if fixed_batch(spec) not in (None, batch):
        return {"status": "skipped", "reason": f"the artifact's batch size is fixed at "
                f"{fixed_batch(spec)}"}
    inputs = evalset.inputs_for(spec)
    feeds = {spec.name: inputs[np.arange(batch) % len(inputs)]}  # real images, repeated if few
    try:
        stats = runner.benchmark(feeds, plan)
    except Exception as err:  # noqa: BLE001 - e.g. out of memory at a large batch: a failed row
        log.exception("batch %d failed", batch)
        return {"status": "failed", "reason": f"{type(err).__name__}: {err}"}
    return {"status": "ok", "reason": "", **latency_fields(stats)}


def measure_artifact(target: Target, artifact: Path, evalset: EvalSet, reference: Reference,
                     cfg: BenchmarkConfig) -> list[dict]:
    """Accuracy once, then latency per batch size, of one artifact on the target."""
    with tempfile.TemporaryDirectory() as build_dir:
        built = target.build(artifact, Path(build_dir))  # runtime-side files live only here
        with target.load(built) as runner:
            if len(runner.inputs) != 1:
                raise TargetUnavailable(f"{artifact}: expected one image input, found "
                                        f"{[spec.name for spec in runner.inputs]}")
            measured = accuracy(runner, evalset, reference, max(cfg.batch_sizes))
            rows = []
            for batch in cfg.batch_sizes:
                fields = benchmark_batch(runner, evalset, batch, timing_plan(cfg))
                device = dict(runner.device_info) if runner.device_info else None  # a copy
                rows.append({"batch_size": batch, **measured, **fields, "device": device})
                log.info("%s %s b%d: %s %s", artifact.name, target.name, batch, fields["status"],
                         f"p50 {fields['p50_ms']:.3f} ms" if "p50_ms" in fields else
                         fields["reason"])
    return rows


def artifact_rows(target: Target, availability: tuple[bool, str], artifact: Path,
                  evalset: EvalSet, reference: Reference, cfg: BenchmarkConfig) -> list[dict]:
    """Rows for every batch size of one artifact: measured, skipped or failed, never missing."""
    ok, reason = availability

    def every_batch(status: str, why: str) -> list[dict]:
        return [{"batch_size": b, "status": status, "reason": why} for b in cfg.batch_sizes]

    if not ok:
        return every_batch("skipped", reason)
    if not artifact.is_file():
        return every_batch("failed", f"artifact {artifact} not found (run the export stage)")
    try:
        return measure_artifact(target, artifact, evalset, reference, cfg)
    except TargetUnavailable as err:  # e.g. the edge device lacks the runtime
        return every_batch("skipped", str(err))
    except Exception as err:  # noqa: BLE001 - a runtime's failure is a result row, not a crash
        log.exception("%s on %s failed", artifact, target.name)
        return every_batch("failed", f"{type(err).__name__}: {err}")


COLUMNS = ("model", "target", "precision", "batch_size", "status", "reason", "top1", "agreement",
           "eval_images", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "n", "images_per_s",
           "clock", "h2d_p50_ms", "compute_p50_ms", "d2h_p50_ms", "size_mb", "macs", "params",
           "artifact", "accuracy_note")


def complete_row(partial: dict, identity: dict, run_provenance: dict) -> dict:
    """A row with every column (None where not measured) and its provenance."""
    row = {column: None for column in COLUMNS} | identity | {
        k: v for k, v in partial.items() if k != "device"}
    row["provenance"] = run_provenance | {"device": partial.get("device")}
    return row


def run(cfg: BenchmarkConfig, target_name: str, models: tuple[str, ...],
        out_paths: BenchPaths) -> list[dict]:
    target = make_target(target_name, cfg)
    availability = target.available()
    if not availability[0]:
        log.warning("target %s is not available here: %s", target_name, availability[1])
    dataset = load_prepared(out_paths.dataset)
    run_provenance = provenance.collect(threads_of(target, cfg), runtime=target_name)
    rows = []
    for model in models:
        loaded = load_model(out_paths.models_dir / f"{model}.pt")
        evalset = eval_set(dataset, cfg.eval_images, loaded)
        reference = reference_for(loaded, evalset)
        for precision in cfg.targets[target_name]:
            artifact = out_paths.artifact(target, model, precision)
            identity = {"model": model, "target": target_name, "precision": precision,
                        "artifact": str(artifact), "macs": reference.macs,
                        "params": reference.params, "size_mb": size_mb(artifact)}
            for partial in artifact_rows(target, availability, artifact, evalset, reference, cfg):
                rows.append(complete_row(partial, identity, run_provenance))
    write_results(rows, target_name, availability, out_paths)
    return rows


def size_mb(artifact: Path) -> float | None:
    """Size of the artifact (with an ONNX file's external-data sidecar) in MB (10^6 bytes)."""
    if not artifact.is_file():
        return None
    sidecar = artifact.with_name(artifact.name + ".data")
    return (artifact.stat().st_size + (sidecar.stat().st_size if sidecar.is_file() else 0)) / 1e6


def csv_row(row: dict) -> dict:
    flat = {k: v for k, v in row.items() if k != "provenance"}
    prov = dict(row["provenance"])
    device = prov.pop("device") or {}
    return flat | provenance.flat(prov) | {f"device_{k}": v for k, v in device.items()}


def write_results(rows: list[dict], target_name: str, availability: tuple[bool, str],
                  out_paths: BenchPaths) -> None:
    results = {f"{r['model']}/{r['precision']}/b{r['batch_size']}": r for r in rows}
    write_json(out_paths.metrics, {"target": target_name, "available": availability[0],
                                   "reason": availability[1], "results": results})
    write_csv(out_paths.plots, [csv_row(row) for row in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--target", required=True, help="a key of benchmark.targets in params")
    args = parser.parse_args(argv)

    def body() -> None:
        from pipeline.errors import ConfigError

        cfg = load_params(args.params).benchmark
        if args.target not in cfg.targets:
            raise ConfigError(f"{args.params}: --target {args.target!r} is not listed in "
                              f"benchmark.targets ({', '.join(cfg.targets)})")
        run(cfg, args.target, cfg.models, BenchPaths.for_target(args.target))

    run_main(body)


if __name__ == "__main__":
    main()
