"""engine stage: TensorRT engines of every model at one precision, built for one target.

DVC runs it once per TensorRT target and precision (engine@<target>-<precision>). For each
reference model of params `engine.models` and each pruning method's student (student_final_<m>
for every method in prune.methods) it builds the exported ONNX file
(artifacts/<m>.<precision>.onnx; for INT8 the symmetric <m>.int8.trt.onnx) into
engines/<target>/<precision>/<m>.<precision>.<target>.engine with its card, reusing
the TensorRT timing cache kept in that folder. Engines that run on this machine are then
checked against ONNX Runtime CPU running the same ONNX file on real test images (fp32: relative
difference; fp16/int8: top-1 agreement and top-1 drop; limits in params `engine`). Writes
metrics/engine_<target>-<precision>.json.

A target not available here (no TensorRT, no GPU, no device configured, no trtexec on the
device) gives `skipped` rows with the reason, and the stage succeeds with an empty engine
folder: the pipeline goes on. A
failed build or parity gate stops the stage; the engine it refused is removed with its card.
"""

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import PRECISIONS, TIMING_CACHE, card_path, engine_folder, final_model
from pipeline.config import EngineConfig, PruneConfig, load_section
from pipeline.errors import ConfigError, ParityError, PipelineError, TargetUnavailable
from pipeline.export.cards import load_verified_engine, read_card
from pipeline.io import write_json
from pipeline.parity import batched_logits, measure_parity, runner_predictor, top1_accuracy
from stages._cli import RESOLVED, load_settings, run_main
from targets.base import EngineBuilder, Runner, Target
from targets.engines import TensorRtSettings
from targets.onnxruntime_cpu import OnnxRuntimeCpuSettings, qdq_reference
from targets.registry import make_target, target_class

log = logging.getLogger("engine")


@dataclass(frozen=True)
class Settings:
    engine: EngineConfig
    prune: PruneConfig  # the methods whose pruned students get engines
    tensorrt: TensorRtSettings = field(metadata={"resolved": "targets/tensorrt"})
    onnxruntime: OnnxRuntimeCpuSettings = field(metadata={"resolved": "targets/onnxruntime-cpu"})

    def models(self) -> tuple[str, ...]:
        return (*self.engine.models, *map(final_model, self.prune.methods))


@dataclass(frozen=True)
class EnginePaths:
    metrics: Path  # metrics/engine_<target>-<precision>.json
    artifacts: Path = Path("artifacts")
    dataset: Path = Path("data/prepared.npz")
    root: Path = Path(".")  # engines/<target>/<precision> lie under it (pipeline.artifacts)

    @classmethod
    def for_item(cls, target: str, precision: str) -> "EnginePaths":
        return cls(Path(f"metrics/engine_{target}-{precision}.json"))


def prepare_folder(folder: Path) -> None:
    """The target x precision folder, emptied of everything but the timing cache (DVC keeps
    the folder between runs, `persist`, for that cache; stale engines must not stay)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        if path.name != TIMING_CACHE and path.is_file():
            path.unlink()


def parity_images(paths: EnginePaths, card: dict[str, Any], count: int) -> tuple[np.ndarray,
                                                                                  np.ndarray]:
    """The first `count` test images, normalised as the ONNX card says, and their labels."""
    from pipeline.data import load_prepared  # torch: only where an engine runs here

    test = load_prepared(paths.dataset).test
    mean = np.asarray(card["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(card["std"], np.float32).reshape(1, -1, 1, 1)
    images = test.images[:count].numpy().astype(np.float32) / 255
    return (images - mean) / std, test.labels[:count].numpy()


def engine_logits(runner: Runner, images: np.ndarray, build: TensorRtSettings) -> np.ndarray:
    """Logits of every image, max_batch at a time; a tail under min_batch is padded."""
    spec, logits = runner.inputs[0], []
    for start in range(0, len(images), build.max_batch):
        chunk = images[start:start + build.max_batch]
        padded = np.concatenate([chunk, np.repeat(chunk[:1], build.min_batch - len(chunk), 0)]) \
            if len(chunk) < build.min_batch else chunk
        out = next(iter(runner.infer({spec.name: padded.astype(spec.dtype)}).values()))
        logits.append(np.asarray(out, np.float32)[:len(chunk)])
    return np.concatenate(logits)


def parity_gate(result: dict[str, Any], precision: str, cfg: EngineConfig) -> None:
    """ParityError with the measured and the allowed numbers, unless within the limits."""
    problems = []
    if precision == "fp32" and not result["rel_diff"] <= cfg.fp32_max_rel_diff:
        problems.append(f"relative diff {result['rel_diff']:.3e} exceeds the allowed "
                        f"{cfg.fp32_max_rel_diff:.3e} (engine.fp32_max_rel_diff)")
    limits = {"fp16": cfg.fp16, "int8": cfg.int8}.get(precision)
    if limits and not result["top1_agreement"] >= limits.min_top1_agreement:
        problems.append(f"top-1 agreement {100 * result['top1_agreement']:.2f}% is below the "
                        f"required {100 * limits.min_top1_agreement:.2f}% (engine.{precision})")
    if limits and not result["top1_drop_points"] <= limits.max_top1_drop:
        problems.append(f"top-1 {result['top1_drop_points']:.2f} points below ONNX Runtime's, "
                        f"allowed {limits.max_top1_drop:.2f} (engine.{precision})")
    if problems:
        raise ParityError(f"{result['engine']} vs onnxruntime-cpu on {result['images']} test "
                          "images: " + "; ".join(problems))


def check_parity_here(target: Target, engine: Path, onnx: Path, precision: str,
                      settings: Settings, paths: EnginePaths) -> dict[str, Any]:
    """The engine against ONNX Runtime CPU on the same ONNX file and real test images."""
    images, labels = parity_images(paths, read_card(card_path(onnx)),
                                   settings.engine.parity_images)
    reference_settings = (qdq_reference(settings.onnxruntime) if precision == "int8"
                          else settings.onnxruntime)  # INT8: the .int8.trt.onnx as written
    reference_target = make_target("onnxruntime-cpu", reference_settings)
    with reference_target.load(onnx) as reference:
        expected = batched_logits(runner_predictor(reference, reference.inputs[0].name,
                                                   "logits"), images, 256)
    with target.load(engine) as runner:
        got = engine_logits(runner, images, settings.tensorrt)
    parity = measure_parity(expected, got, "onnxruntime-cpu", engine.name,
                            settings.tensorrt.max_batch).as_dict()
    parity["engine"] = engine.name
    parity["top1_drop_points"] = 100 * (top1_accuracy(expected, labels)
                                        - top1_accuracy(got, labels))
    parity_gate(parity, precision, settings.engine)
    return {"status": "ok", **parity}


def build_model(target: Target, model: str, precision: str, settings: Settings,
                paths: EnginePaths) -> dict[str, Any]:
    """One model's engine, card and (where it runs here) parity; its row for the metrics."""
    onnx = target.onnx_source(paths.artifacts, model, precision)
    folder = engine_folder(paths.root, target.name, precision)
    engine = target.build_engine(onnx, folder, settings.tensorrt)
    try:
        parity = check_parity_here(target, engine, onnx, precision, settings, paths) \
            if target.engines_run_here else {
                "status": "not checked", "reason": f"{target.name} engines run on the device; "
                f"there, `dvc repro engine@tensorrt-{precision}` builds and checks them"}
    except PipelineError:
        card_path(engine).unlink(missing_ok=True)  # refused: neither engine nor card remains
        engine.unlink(missing_ok=True)
        raise
    _, card = load_verified_engine(engine)
    return {"status": "ok", "reason": "", "onnx": str(onnx), "engine": str(engine),
            **{key: card[key] for key in ("engine_sha256", "size_bytes", "tensorrt", "gpu",
                                          "compute_capability", "build_seconds")},
            "timing_cache": card.get("timing_cache"), "parity": parity}


def run(settings: Settings, target: Target, precision: str, paths: EnginePaths) -> dict[str, Any]:
    if not isinstance(target, EngineBuilder):
        raise ConfigError(f"target {target.name!r} builds no engines; engine stages are for "
                          "TensorRT targets (tensorrt, ssh-tensorrt)")
    if precision not in target.precisions:
        raise ConfigError(f"precision {precision!r}: target {target.name!r} supports "
                          f"{list(target.precisions)}")
    available, reason = target.available()
    prepare_folder(engine_folder(paths.root, target.name, precision))
    result = {"target": target.name, "precision": precision, "available": available,
              "reason": reason, "models": {}}
    for model in settings.models():
        if not available:
            log.warning("%s: skipped: %s", model, reason)
            result["models"][model] = {"status": "skipped", "reason": f"target {target.name!r} "
                                       f"is not available: {reason}"}
            continue
        try:
            result["models"][model] = build_model(target, model, precision, settings, paths)
        except TargetUnavailable as err:  # learnt only on the device (e.g. no trtexec there)
            log.warning("%s: skipped: %s", model, err)
            result["models"][model] = {"status": "skipped", "reason": str(err)}
            continue
        except PipelineError as err:  # every row so far is written, then the stage stops
            result["models"][model] = {"status": "failed", "reason": f"{type(err).__name__}: "
                                       f"{err}"}
            write_json(paths.metrics, result)
            raise
        log.info("%s: %s", model, result["models"][model]["engine"])
    write_json(paths.metrics, result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolved", type=Path, default=RESOLVED)
    parser.add_argument("--target", required=True, help="a TensorRT target, e.g. tensorrt")
    parser.add_argument("--precision", required=True, choices=PRECISIONS)
    args = parser.parse_args(argv)

    def body() -> None:
        settings = load_settings(Settings, args.resolved)
        target_settings = load_section(target_class(args.target).Settings,
                                       args.resolved / "targets" / f"{args.target}.json")
        run(settings, make_target(args.target, target_settings), args.precision,
            EnginePaths.for_item(args.target, args.precision))

    run_main(body)


if __name__ == "__main__":
    main()
