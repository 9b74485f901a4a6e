"""export stage: one trained model -> verified ONNX files (FP32, FP16, INT8) with cards.

For model <m> (DVC runs it once per model) it exports the model, simplifies the graph and
writes artifacts/<m>.fp32.onnx (the simplified export), <m>.fp16.onnx, <m>.int8.onnx (ONNX
Runtime's fast CPU form) and <m>.int8.trt.onnx (the symmetric INT8 form TensorRT's parser
takes; names: pipeline.artifacts), a <file>.card.json beside each, and
metrics/export_<m>.json: per
file - the unsimplified export included, which is kept only while the stage runs - its parity
with PyTorch at batch 1 and at the parity batch, batch-1 vs large-batch consistency, node
counts, size and ONNX Runtime top-1 on the test set. Parity runs in ONNX Runtime with the
onnxruntime-cpu target's settings; the TensorRT INT8 file runs as written, graph optimisation
off (the QDQ arithmetic TensorRT implements, not this CPU's int8 kernels, which saturate on
CPUs without VNNI: targets.onnxruntime_cpu.qdq_reference). Any failed gate stops the stage
before a card is written, so `load_verified_onnx` refuses what a failed run left behind.
"""

import argparse
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from pipeline.artifacts import TENSORRT_FLAVOR, artifact_path, card_path
from pipeline.checkpoint import LoadedModel
from pipeline.config import ExportConfig, RunConfig, as_dict
from pipeline.export.cards import (
    describe_source,
    embed_card,
    make_card,
    provenance,
    write_card,
)
from pipeline.export.images import Images, model_and_images
from pipeline.export.onnx_export import export_onnx, node_counts, save_onnx
from pipeline.export.quantize import (
    TENSORRT_INT8_OPTIONS,
    convert_fp16,
    quantize_int8_with_tensorrt,
)
from pipeline.export.simplify import SimplifyReport, simplify
from pipeline.io import file_sha256, set_threads, write_json
from pipeline.parity import (
    FP32_TOLERANCE,
    batched_logits,
    check_int8_drop,
    consistency_gate,
    reference_gates,
    runner_predictor,
    tolerance_for,
    top1_accuracy,
    torch_predictor,
)
from stages._cli import RESOLVED, load_settings, run_main
from targets.onnxruntime_cpu import OnnxRuntimeCpuSettings, OnnxRuntimeCpuTarget, qdq_reference

log = logging.getLogger("stages.export")

# variant -> precision; the keys are also the keys of metrics["files"]. "exported" is the
# exporter's own graph, checked and then dropped; the others are shipped under their precision.
# The TensorRT INT8 file is made here, not by the engine stages: it shares the INT8 calibration
# pass (the expensive part) with the CPU file, it is checked by the same parity gates, and every
# engine stage - one per TensorRT target and precision, most of them skipped on a machine
# without TensorRT - then depends only on shipped files, not on the data, the model and the
# quantisation code.
VARIANTS = {"exported": "fp32", "fp32": "fp32", "fp16": "fp16", "int8": "int8",
            "int8_trt": "int8"}
SHIPPED = ("fp32", "fp16", "int8", "int8_trt")
FLAVORS = {"int8_trt": TENSORRT_FLAVOR}  # variant -> flavor in its file name


@dataclass(frozen=True)
class Settings:
    common: RunConfig
    export: ExportConfig
    onnxruntime: OnnxRuntimeCpuSettings = field(metadata={"resolved": "targets/onnxruntime-cpu"})


def build_variants(loaded: LoadedModel, cfg: ExportConfig, images: Images,
                   input_shape: tuple[int, ...]) -> tuple[dict[str, onnx.ModelProto],
                                                          SimplifyReport]:
    log.info("exporting (opset %d)", cfg.opset)
    exported = export_onnx(loaded.model, input_shape, cfg.opset)
    log.info("simplifying with %s", cfg.simplifier)
    simplified, report = simplify(exported, cfg.simplifier)
    log.info("converting to FP16; quantising to INT8 (%s calibration, %d images)",
             cfg.quantize.calibration_method, cfg.quantize.calibration_images)
    int8, int8_trt = quantize_int8_with_tensorrt(simplified, images.calibration, cfg.quantize)
    variants = {"exported": exported, "fp32": simplified, "fp16": convert_fp16(simplified),
                "int8": int8, "int8_trt": int8_trt}
    return variants, report


def export_details(variant: str, cfg: ExportConfig, name: str) -> dict[str, Any]:
    """What made this file, for its card."""
    details: dict[str, Any] = {"exporter": f"torch.onnx dynamo (torch {torch.__version__})",
                               "simplifier": cfg.simplifier}
    if variant != "fp32":
        details["derived_from"] = artifact_path(".", name, "fp32").name
    if variant == "fp16":
        details["conversion"] = "onnxruntime.transformers.float16, keep_io_types=True"
    if variant == "int8":
        details["quantization"] = {"format": "QDQ", "weights": "int8 per-channel",
                                   **as_dict(cfg.quantize)}
    if variant == "int8_trt":
        details["quantization"] = {
            "format": "QDQ", "for": "TensorRT (strongly typed explicit quantization)",
            "weights": "int8 per-channel, symmetric", "activations": "int8, symmetric",
            "reduce_range": False, "extra_options": dict(TENSORRT_INT8_OPTIONS),
            "calibration_method": cfg.quantize.calibration_method,
            "calibration_images": cfg.quantize.calibration_images}
    return details


def evaluate(path: Path, target: OnnxRuntimeCpuTarget, images: Images, batches: tuple[int, ...],
             eval_batch: int) -> tuple[dict[int, np.ndarray], float]:
    """Parity logits at each batch size and test-set top-1, through ONNX Runtime."""
    with target.load(path) as runner:
        predict = runner_predictor(runner)
        logits = {b: batched_logits(predict, images.parity, b) for b in batches}
        top1 = top1_accuracy(batched_logits(predict, images.test, eval_batch), images.labels)
    return logits, top1


def file_entry(path: Path, proto: onnx.ModelProto, precision: str, top1: float,
               parity: dict[str, Any]) -> dict[str, Any]:
    counts = node_counts(proto)
    return {"path": str(path), "precision": precision, "size_bytes": path.stat().st_size,
            "sha256": file_sha256(path), "nodes": counts["total"], "ops": counts["by_op"],
            "top1": top1, "parity": parity}


def save_variants(variants: dict[str, onnx.ModelProto], cards: dict[str, dict[str, Any]],
                  out_dir: Path, work_dir: Path, name: str) -> dict[str, Path]:
    """Shipped variants with their card embedded in out_dir (no card file yet); the exporter's
    own graph in work_dir."""
    paths = {"exported": save_onnx(variants["exported"], work_dir / f"{name}.exported.onnx")}
    for variant in SHIPPED:
        embed_card(variants[variant], cards[variant])
        paths[variant] = artifact_path(out_dir, name, VARIANTS[variant],
                                       flavor=FLAVORS.get(variant))
        card_path(paths[variant]).unlink(missing_ok=True)  # a stale card must not vouch for it
        save_onnx(variants[variant], paths[variant])
    return paths


def verifying_target(variant: str, runtime: OnnxRuntimeCpuSettings) -> OnnxRuntimeCpuTarget:
    """ONNX Runtime as the variant is checked: the TensorRT INT8 file as written (its QDQ
    arithmetic, not this CPU's int8 kernels: targets.onnxruntime_cpu.qdq_reference)."""
    return OnnxRuntimeCpuTarget(qdq_reference(runtime) if variant == "int8_trt" else runtime)


def verify_variants(paths: dict[str, Path], variants: dict[str, onnx.ModelProto],
                    loaded: LoadedModel, images: Images, cfg: ExportConfig,
                    runtime: OnnxRuntimeCpuSettings) -> dict[str, Any]:
    """Parity gates and top-1 of every file through ONNX Runtime; raises on a failed gate."""
    batches = (1, cfg.parity_batch)
    predict = torch_predictor(loaded.model)
    reference = {b: batched_logits(predict, images.parity, b) for b in batches}
    files: dict[str, Any] = {}
    logits: dict[str, dict[int, np.ndarray]] = {}
    for variant, path in paths.items():
        log.info("verifying %s in ONNX Runtime", path.name)
        logits[variant], top1 = evaluate(path, verifying_target(variant, runtime), images,
                                         batches, cfg.eval_batch)
        tolerance = tolerance_for(VARIANTS[variant], cfg)
        parity = {**reference_gates(path.name, logits[variant], reference, "torch", tolerance),
                  **consistency_gate(path.name, logits[variant], tolerance)}
        if variant == "fp32":  # the simplifier must not change the exported function
            parity.update(reference_gates(path.name, logits["fp32"], logits["exported"],
                                          "exported", FP32_TOLERANCE))
        files[variant] = file_entry(path, variants[variant], VARIANTS[variant], top1, parity)
    return files


def run(cfg: ExportConfig, runtime: OnnxRuntimeCpuSettings, model_path: Path,
        dataset_path: Path, out_dir: Path, name: str | None = None) -> dict[str, Any]:
    """Export, verify and card every variant of one model; returns the metrics dict."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    name = name or model_path.stem
    loaded, images = model_and_images(model_path, dataset_path, cfg)
    source = describe_source(loaded, model_path, name)
    input_shape = tuple(int(v) for v in loaded.meta["input_shape"])
    variants, simplify_report = build_variants(loaded, cfg, images, input_shape)
    record = provenance()
    cards = {variant: make_card(source, VARIANTS[variant], cfg.opset,
                                export_details(variant, cfg, name), record)
             for variant in SHIPPED}
    with tempfile.TemporaryDirectory(prefix="export-") as work_dir:
        paths = save_variants(variants, cards, out_dir, Path(work_dir), name)
        files = verify_variants(paths, variants, loaded, images, cfg, runtime)
    files["exported"]["path"] = None  # checked, not shipped
    drop = check_int8_drop(files["fp32"]["top1"], files["int8"]["top1"],
                           cfg.quantize.max_top1_drop)
    drop_trt = check_int8_drop(files["fp32"]["top1"], files["int8_trt"]["top1"],
                               cfg.quantize.max_top1_drop)
    torch_top1 = top1_accuracy(batched_logits(torch_predictor(loaded.model), images.test,
                                              cfg.eval_batch), images.labels)
    for variant in SHIPPED:  # every gate passed: now the files may be vouched for
        write_card(paths[variant], cards[variant], {"onnxruntime_top1": files[variant]["top1"],
                                                    "test_images": len(images.labels)})
    return {"model": name, "source_model": str(model_path), "opset": cfg.opset,
            "test_images": len(images.labels), "parity_images": len(images.parity),
            "parity_batches": [1, cfg.parity_batch], "checkpoint_top1": loaded.meta["top1"],
            "torch_top1": torch_top1, "int8_top1_drop_points": drop,
            "int8_trt_top1_drop_points": drop_trt,
            "simplify": simplify_report.as_dict(), "files": files,
            "quantize": as_dict(cfg.quantize), "runtime": as_dict(runtime)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolved", type=Path, default=RESOLVED)
    parser.add_argument("--name", required=True, help="model name, e.g. teacher")
    parser.add_argument("--model", type=Path, help="model file (default models/<name>.pt)")
    parser.add_argument("--data", type=Path, default=Path("data/prepared.npz"))
    parser.add_argument("--out-dir", type=Path, default=Path("artifacts"))
    parser.add_argument("--metrics", type=Path, help="default metrics/export_<name>.json")
    args = parser.parse_args()
    model = args.model or Path("models") / f"{args.name}.pt"
    metrics = args.metrics or Path("metrics") / f"export_{args.name}.json"

    def body() -> None:
        for chatty in ("onnxscript", "onnx_ir"):  # the exporter's passes log every rewrite at INFO
            logging.getLogger(chatty).setLevel(logging.WARNING)
        settings = load_settings(Settings, args.resolved)
        set_threads(settings.common.threads)
        write_json(metrics, run(settings.export, settings.onnxruntime, model, args.data,
                                args.out_dir, args.name))

    run_main(body)


if __name__ == "__main__":
    main()
