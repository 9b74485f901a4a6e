"""benchmark stage: latency and accuracy of every model x precision x batch size on ONE target.

DVC runs it once per target listed in params (foreach). The models are the references
(benchmark.models: teacher, student_dense) and every method's pruned student
(student_final_<method> for each method in prune.methods), all measured in one run so that their
latencies are comparable. For each model and precision it loads the file the target runs (its
`source`: models/<m>.pt for PyTorch targets, artifacts/<m>.<precision>.onnx, the OpenVINO IR
or, one per batch size, the ExecuTorch programs; names from pipeline.artifacts), measures top-1
on the prepared test images through that runtime and its top-1 agreement with the PyTorch model,
then the latency distribution per batch size, through the one measuring path (targets.measure).
Every row has a status - ok, skipped (target, precision or batch size not available here, with
the reason) or failed (with the error) - and the provenance of the machine that produced it.
Writes metrics/benchmark_<target>.json and
plots/benchmark_<target>.csv.

Before anything is loaded or sent to a device, every ONNX file the target will run is checked
against its model card (sha256, embedded card, no external data); a mismatch stops the stage
with the file named and the command that rebuilds it. Model files (models/<m>.pt) hold no code:
they load with `torch.load(weights_only=True)`.
"""

import argparse
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import provenance
from pipeline.artifacts import FORMATS, artifact_path, final_model, sidecar_files
from pipeline.checkpoint import LoadedModel, load_model
from pipeline.config import BenchmarkConfig, PruneConfig
from pipeline.data import Dataset, balanced_subset, load_prepared
from pipeline.errors import ArtifactIntegrityError, CheckpointError, ConfigError
from pipeline.export.cards import load_verified_onnx, verified_card
from pipeline.flops import model_cost, sparse_cost
from pipeline.io import file_sha256, write_csv, write_json
from stages._cli import RESOLVED, load_settings, run_main
from stages._targets import load_target
from targets.base import Runner, Target, TensorSpec, UnsupportedOperation
from targets.measure import measure

log = logging.getLogger("benchmark")


@dataclass(frozen=True)
class Settings:
    benchmark: BenchmarkConfig  # the target's own settings: resolved/targets/<target>.json
    prune: PruneConfig  # the methods whose pruned students are measured

    def models(self) -> tuple[str, ...]:
        return (*self.benchmark.models, *map(final_model, self.prune.methods))


@dataclass(frozen=True)
class BenchPaths:
    metrics: Path  # metrics/benchmark_<target>.json
    plots: Path  # plots/benchmark_<target>.csv
    dataset: Path = Path("data/prepared.npz")
    models_dir: Path = Path("models")
    artifacts_dir: Path = Path("artifacts")

    @classmethod
    def for_target(cls, target_name: str) -> "BenchPaths":
        return cls(Path(f"metrics/benchmark_{target_name}.json"),
                   Path(f"plots/benchmark_{target_name}.csv"))

    def artifacts(self, target: Target, model: str, precision: str,
                  batch_sizes: tuple[int, ...]) -> list[tuple[Path, tuple[int, ...]]]:
        """The files a target runs for one model and precision, each with the batch sizes it
        serves: one file for all, or one per batch size where the format fixes the batch."""
        if target.source == "checkpoint":  # PyTorch targets run model files
            return [(self.models_dir / f"{model}.pt", batch_sizes)]
        precision = target.source_precision(precision)  # e.g. OpenVINO's bf16: the fp32 IR
        if target.source == "onnx":  # a runtime may read its own flavor (TensorRT's INT8)
            return [(target.onnx_source(self.artifacts_dir, model, precision), batch_sizes)]
        if FORMATS[target.source].per_batch:
            return [(artifact_path(self.artifacts_dir, model, precision, fmt=target.source,
                                   batch=batch), (batch,)) for batch in batch_sizes]
        return [(artifact_path(self.artifacts_dir, model, precision, fmt=target.source),
                 batch_sizes)]


# the stage that writes each kind of file a target runs: for the "not found" reason and the
# command that rebuilds a file that does not match its card
MADE_BY = {"checkpoint": "the training stages", "onnx": "the export stage",
           "openvino": "the export_openvino stage", "executorch": "the export_executorch stage"}
REBUILT_BY = {"onnx": "export", "openvino": "export_openvino", "executorch": "export_executorch"}


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

    def feeds(self, spec: TensorSpec, batch: int) -> dict[str, np.ndarray]:
        """One call's inputs: real images, repeated when there are fewer than `batch`."""
        inputs = self.inputs_for(spec)
        return {spec.name: inputs[np.arange(batch) % len(inputs)]}


@dataclass(frozen=True)
class Reference:
    """The PyTorch model a runtime's results are compared with."""

    predict: Callable[[], np.ndarray]  # its top-1 class for every eval image (computed once,
    # when a runtime's accuracy needs it: a target that is not available here never does)
    macs: int  # what a dense runtime executes per sample
    params: int
    params_nonzero: int  # params minus zero conv/linear weights (unstructured pruning)
    macs_nonzero: int  # MACs a sparse kernel could skip to
    sparsity: float  # zero share of the conv/linear weights


def eval_set(dataset: Dataset, limit: int, loaded: LoadedModel) -> EvalSet:
    split = balanced_subset(dataset.test, limit)
    if "mean" not in loaded.meta or "std" not in loaded.meta:
        raise CheckpointError("model file has no mean/std in its meta; cannot normalise inputs")
    shape = (1, -1, 1, 1)
    return EvalSet(split.images.numpy(), split.labels.numpy(),
                   np.asarray(loaded.meta["mean"], np.float32).reshape(shape),
                   np.asarray(loaded.meta["std"], np.float32).reshape(shape))


@torch.inference_mode()
def torch_predictions(loaded: LoadedModel, evalset: EvalSet, batch: int = 256) -> np.ndarray:
    inputs = torch.from_numpy(evalset.inputs_for(TensorSpec("input", np.dtype(np.float32), ())))
    return np.concatenate([loaded.model(inputs[i:i + batch]).argmax(1).numpy()
                           for i in range(0, len(inputs), batch)])


def reference_for(loaded: LoadedModel, evalset: EvalSet) -> Reference:
    shape = tuple(evalset.images_u8.shape[1:])
    cost, sparse = model_cost(loaded.model, shape), sparse_cost(loaded.model, shape)
    predict = functools.cache(lambda: torch_predictions(loaded, evalset))
    return Reference(predict, cost.macs, cost.params, sparse.params_nonzero, sparse.macs_nonzero,
                     sparse.sparsity)


def accuracy_through(evalset: EvalSet, reference: Reference, batch: int):
    """accuracy(runner): top-1 on the eval images and top-1 agreement with PyTorch."""

    def accuracy(runner: Runner) -> dict[str, Any]:
        spec = runner.inputs[0]
        try:
            predicted = runner.predict_classes(evalset.inputs_for(spec), batch)
        except UnsupportedOperation as err:
            return {"top1": None, "agreement": None, "eval_images": 0, "accuracy_note": str(err)}
        return {"top1": float(np.mean(predicted == evalset.labels)),
                "agreement": float(np.mean(predicted == reference.predict())),
                "eval_images": len(evalset.labels), "accuracy_note": ""}

    return accuracy


COLUMNS = ("model", "target", "precision", "batch_size", "status", "reason", "top1", "agreement",
           "eval_images", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "n", "images_per_s",
           "clock", "h2d_p50_ms", "compute_p50_ms", "d2h_p50_ms", "size_mb", "macs", "params",
           "params_nonzero", "macs_nonzero", "sparsity", "checkpoint_top1", "num_classes",
           "method", "structured", "artifact", "artifact_sha256", "accuracy_note")


def complete_row(partial: dict, identity: dict, run_provenance: dict) -> dict:
    """A row with every column (None where not measured) and its provenance."""
    row = {column: None for column in COLUMNS} | identity | {
        k: v for k, v in partial.items() if k not in ("device", "runtime_info")}
    row["provenance"] = run_provenance | {"device": partial.get("device"),
                                          "runtime_info": partial.get("runtime_info")}
    return row


def model_facts(model: str, loaded: LoadedModel, reference: Reference) -> dict[str, Any]:
    """What every row of one model says about it: cost, sparsity, pruning method, top-1 in
    PyTorch on the whole test split (the training stage's number)."""
    pruning = loaded.meta.get("pruning") or {}
    return {"model": model, "macs": reference.macs, "params": reference.params,
            "params_nonzero": reference.params_nonzero, "macs_nonzero": reference.macs_nonzero,
            "sparsity": reference.sparsity, "checkpoint_top1": loaded.meta.get("top1"),
            "num_classes": len(loaded.meta.get("classes", ())),
            "method": pruning.get("method"), "structured": pruning.get("structured")}


def verified_artifacts(target: Target, cfg: BenchmarkConfig, out_paths: BenchPaths,
                       models: tuple[str, ...]) -> dict[Path, str]:
    """sha256 of every artifact the target will run that exists, each shipped file checked
    against its card first (ONNX files also against the card they embed); ArtifactIntegrityError
    (with the rebuild command) on any mismatch. A missing file is left to its row (failed: run
    the stage that makes it)."""
    hashes = {}
    for model in models:
        for precision in cfg.targets[target.name]:
            for artifact, _ in out_paths.artifacts(target, model, precision, cfg.batch_sizes):
                if artifact.is_file():
                    hashes[artifact] = _verified_sha256(target, model, artifact)
    return hashes


def _verified_sha256(target: Target, model: str, artifact: Path) -> str:
    if target.source == "checkpoint":  # a weights-only model file, no card
        return file_sha256(artifact)
    try:
        if target.source == "onnx":
            return load_verified_onnx(artifact).card["sha256"]
        return verified_card(artifact)["sha256"]
    except ArtifactIntegrityError as err:
        raise ArtifactIntegrityError(f"{err}; rebuild it with "
                                     f"`{rebuild_command(target.source, model)}`") from None


def rebuild_command(source: str, model: str) -> str:
    """The `dvc repro` that remakes a shipped file: a method's student has its own stages."""
    stage = REBUILT_BY[source]
    method = model.removeprefix(final_model(""))
    if method != model:
        return f"dvc repro {stage}_student_final@{method}"
    return f"dvc repro {stage}@{model}"


def model_rows(target: Target, model: str, dataset: Dataset, cfg: BenchmarkConfig,
               out_paths: BenchPaths, hashes: dict[Path, str]) -> list[dict]:
    """Every precision x batch size row of one model on the target (provenance added later)."""
    loaded = load_model(out_paths.models_dir / f"{model}.pt")
    evalset = eval_set(dataset, cfg.eval_images, loaded)
    reference = reference_for(loaded, evalset)
    facts = model_facts(model, loaded, reference)
    rows = []
    for precision in cfg.targets[target.name]:
        for artifact, batches in out_paths.artifacts(target, model, precision, cfg.batch_sizes):
            identity = {**facts, "target": target.name, "precision": precision,
                        "artifact": str(artifact), "artifact_sha256": hashes.get(artifact),
                        "size_mb": size_mb(artifact)}
            partials = measure(target, artifact, batches, cfg.timing, evalset.feeds,
                               accuracy_through(evalset, reference, max(batches)),
                               missing_hint=f" (run {MADE_BY[target.source]})",
                               precision=precision)
            rows += [(partial, identity) for partial in partials]
    return rows


def run(cfg: BenchmarkConfig, target: Target, out_paths: BenchPaths,
        models: tuple[str, ...] | None = None) -> list[dict]:
    """Measure `models` (default: benchmark.models) on the target and write the results."""
    models = models or cfg.models
    hashes = verified_artifacts(target, cfg, out_paths, models)  # before anything is loaded
    availability = target.available()
    if not availability[0]:
        log.warning("target %s is not available here: %s", target.name, availability[1])
    dataset = load_prepared(out_paths.dataset)
    run_provenance = provenance.collect(target.threads, runtime=target.runtime())
    rows = [complete_row(partial, identity, run_provenance) for model in models
            for partial, identity in model_rows(target, model, dataset, cfg, out_paths, hashes)]
    write_results(rows, target.name, availability, out_paths)
    return rows


def size_mb(artifact: Path) -> float | None:
    """Size of the artifact with the files that belong to it (ONNX external data, an IR's
    weights) in MB (10^6 bytes)."""
    if not artifact.is_file():
        return None
    return sum(path.stat().st_size for path in [artifact, *sidecar_files(artifact)]) / 1e6


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
    parser.add_argument("--resolved", type=Path, default=RESOLVED)
    parser.add_argument("--target", required=True, help="a key of benchmark.targets in params")
    args = parser.parse_args(argv)

    def body() -> None:
        settings = load_settings(Settings, args.resolved)
        cfg = settings.benchmark
        if args.target not in cfg.targets:
            raise ConfigError(f"--target {args.target!r} is not listed in benchmark.targets "
                              f"({', '.join(cfg.targets)})")
        run(cfg, load_target(args.target, args.resolved), BenchPaths.for_target(args.target),
            settings.models())

    run_main(body)


if __name__ == "__main__":
    main()
