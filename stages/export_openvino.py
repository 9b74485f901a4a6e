"""export_openvino stage: one model's verified ONNX files -> OpenVINO IR with cards, behind
parity gates.

For model <m> (DVC runs it once per model) the openvino-cpu target's build converts
artifacts/<m>.fp32.onnx and <m>.int8.onnx (the export stage's files; their cards are checked
first) into artifacts/openvino/<m>/<m>.<precision>.xml + .bin (FP32 weights kept). Each IR is
run in OpenVINO with the target's settings (inference precision pinned to f32) and gated
against PyTorch and against ONNX Runtime running the same ONNX file, at batch 1 and
export.parity_batch (fp32: 1e-4 relative and 100 % top-1; int8: export.int8), and batch 1 against
the large batch; INT8 may lose at most export.quantize.max_top1_drop top-1 points on the test set.
Files and cards reach the folder only after every gate passed. metrics/export_openvino_<m>.json
holds the numbers. Without openvino (extra `openvino`) the folder is left empty and the metrics
say why; the benchmark then reports skipped rows with that reason.
"""

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.artifacts import artifact_path, model_folder
from pipeline.config import ExportConfig, RunConfig
from pipeline.export.cards import (
    TOOL_PACKAGES,
    describe_source,
    load_verified_onnx,
    make_card,
    provenance,
    write_card,
)
from pipeline.io import file_sha256, set_threads, staged_folder, write_json
from pipeline.parity import (
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
from targets.base import Target
from targets.onnxruntime_cpu import OnnxRuntimeCpuSettings
from targets.openvino_cpu import OpenVinoSettings
from targets.registry import make_target

if TYPE_CHECKING:  # both import torch, which a skipped stage never needs
    from pipeline.checkpoint import LoadedModel
    from pipeline.export.images import Images

log = logging.getLogger("stages.export_openvino")
PRECISIONS = ("fp32", "int8")  # the IR files; bf16 is compiled from the fp32 IR when loaded


@dataclass(frozen=True)
class Settings:
    common: RunConfig
    export: ExportConfig  # parity images, batch and tolerances; INT8 top-1 drop
    onnxruntime: OnnxRuntimeCpuSettings = field(metadata={"resolved": "targets/onnxruntime-cpu"})
    openvino: OpenVinoSettings = field(metadata={"resolved": "targets/openvino-cpu"})


@dataclass(frozen=True)
class Paths:
    model: Path  # models/<m>.pt: the PyTorch reference and the card's source
    dataset: Path = Path("data/prepared.npz")
    artifacts: Path = Path("artifacts")  # reads <m>.<p>.onnx, writes openvino/<m>/

    @classmethod
    def for_model(cls, name: str) -> "Paths":
        return cls(Path("models") / f"{name}.pt")


def logits_at(runner: Any, images: np.ndarray, batches: tuple[int, ...]) -> dict[int, np.ndarray]:
    predict = runner_predictor(runner)
    return {batch: batched_logits(predict, images, batch) for batch in batches}


def check_ir(ir: Path, onnx_path: Path, precision: str, targets: dict[str, Target],
             reference: dict[int, np.ndarray], images: "Images", cfg: ExportConfig) -> dict:
    """Gates and test-set top-1 of one IR; raises ParityError on a failed gate."""
    batches = (1, cfg.parity_batch)
    with targets["openvino"].load(ir, precision) as runner:
        logits = logits_at(runner, images.parity, batches)
        top1 = top1_accuracy(batched_logits(runner_predictor(runner), images.test,
                                            cfg.eval_batch), images.labels)
        runtime_info = runner.runtime_info
    with targets["onnxruntime"].load(onnx_path) as runner:
        same_onnx = logits_at(runner, images.parity, batches)
    tolerance = tolerance_for(precision, cfg)
    parity = {**reference_gates(ir.name, logits, reference, "torch", tolerance),
              **reference_gates(ir.name, logits, same_onnx, "onnxruntime", tolerance),
              **consistency_gate(ir.name, logits, tolerance)}
    return {"precision": precision, "top1": top1, "parity": parity, "runtime_info": runtime_info}


def card_for(source: dict, precision: str, onnx_card: dict, record: dict) -> dict:
    details = {"converter": "openvino read_model + save_model(compress_to_fp16=False)",
               "derived_from": onnx_card["file"], "derived_from_sha256": onnx_card["sha256"],
               "inference_precision": "f32 (INFERENCE_PRECISION_HINT, set when compiling); "
                                      "bf16 on request where the CPU has it"}
    if "quantization" in onnx_card["export"]:
        details["quantization"] = onnx_card["export"]["quantization"]
    return make_card(source, precision, onnx_card["opset"], details, record)


def build_and_check(loaded: "LoadedModel", name: str, images: "Images", settings: Settings,
                    paths: Paths, staging: Path) -> dict[str, dict]:
    """Every IR built into `staging` and gated, with its card; returns the file entries."""
    cfg = settings.export
    targets = {"openvino": make_target("openvino-cpu", settings.openvino),
               "onnxruntime": make_target("onnxruntime-cpu", settings.onnxruntime)}
    predict = torch_predictor(loaded.model)
    reference = {b: batched_logits(predict, images.parity, b) for b in (1, cfg.parity_batch)}
    source = describe_source(loaded, paths.model, name)
    record = provenance((*TOOL_PACKAGES, "openvino"))
    files, cards, irs = {}, {}, {}
    for precision in PRECISIONS:
        onnx_path = artifact_path(paths.artifacts, name, precision)
        onnx_card = load_verified_onnx(onnx_path).card  # the export stage's file, unchanged
        log.info("converting %s to OpenVINO IR and checking it", onnx_path.name)
        irs[precision] = targets["openvino"].build(onnx_path, staging)
        assert irs[precision].name == artifact_path(".", name, precision, fmt="openvino").name
        files[precision] = check_ir(irs[precision], onnx_path, precision, targets, reference,
                                    images, cfg)
        cards[precision] = card_for(source, precision, onnx_card, record)
    files["int8"]["top1_drop_points"] = check_int8_drop(
        files["fp32"]["top1"], files["int8"]["top1"], cfg.quantize.max_top1_drop)
    for precision, ir in irs.items():  # every gate passed: now the files may be vouched for
        write_card(ir, cards[precision], {"openvino_top1": files[precision]["top1"],
                                          "test_images": len(images.labels)})
    return files


def run(settings: Settings, paths: Paths, name: str) -> dict[str, Any]:
    """Convert, gate and card the IR of one model; returns the metrics dict."""
    folder = model_folder(paths.artifacts, name, "openvino")
    target = make_target("openvino-cpu", settings.openvino)
    ok, reason = target.available()
    if not ok:
        log.warning("openvino-cpu is not available, no IR written: %s", reason)
        with staged_folder(folder):
            pass  # the folder (this stage's output) is left empty
        return {"model": name, "status": "skipped", "reason": reason, "files": {}}
    # torch (the model, the images) is imported only now that the target is here: a
    # machine without it skips this stage without importing torch (pipeline.io)
    from pipeline.export.images import model_and_images

    set_threads(settings.common.threads)
    loaded, images = model_and_images(paths.model, paths.dataset, settings.export)
    with staged_folder(folder) as staging:
        files = build_and_check(loaded, name, images, settings, paths, staging)
    for precision, entry in files.items():
        ir = artifact_path(paths.artifacts, name, precision, fmt="openvino")
        entry |= {"path": str(ir), "size_bytes": ir.stat().st_size + ir.with_suffix(
            ".bin").stat().st_size, "sha256": file_sha256(ir)}
    return {"model": name, "status": "ok", "reason": "", "runtime": target.runtime(),
            "test_images": len(images.labels), "parity_images": len(images.parity),
            "parity_batches": [1, settings.export.parity_batch], "files": files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolved", type=Path, default=RESOLVED)
    parser.add_argument("--name", required=True, help="model name, e.g. teacher")
    args = parser.parse_args()

    def body() -> None:
        settings = load_settings(Settings, args.resolved)
        write_json(Path("metrics") / f"export_openvino_{args.name}.json",
                   run(settings, Paths.for_model(args.name), args.name))

    run_main(body)


if __name__ == "__main__":
    main()
