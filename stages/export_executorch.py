"""export_executorch stage: one trained model -> ExecuTorch programs for XNNPACK (the mobile
path), one per precision and benchmark batch size, with cards, behind parity gates.

For model <m> (DVC runs it once per model) it lowers models/<m>.pt with
pipeline/export/executorch.py: fp32, and int8 through PT2E calibrated on the same training images
as the ONNX INT8 file (export.quantize), at every size of benchmark.batch_sizes (a program's batch
is fixed). Each program is run by the executorch-xnnpack target and gated against PyTorch at its
own batch on the parity images (fp32: 1e-4 relative and 100 % top-1; int8: export.int8); the
smallest-batch program against the largest; INT8 may lose at most export.quantize.max_top1_drop
top-1 points on the test set (both through the largest-batch program). Programs and cards reach
artifacts/executorch/<m>/ only after every gate passed; metrics/export_executorch_<m>.json holds
the numbers. Without executorch (extra `executorch`) the folder is left empty and the metrics say
why; the benchmark then reports skipped rows with that reason.
"""

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.artifacts import artifact_path, model_folder
from pipeline.config import ExportConfig, ProgramBatches, RunConfig, as_dict
from pipeline.export.cards import describe_source, make_card, provenance, write_card
from pipeline.io import atomic_write_bytes, file_sha256, set_threads, staged_folder, write_json
from pipeline.parity import (
    batched_logits,
    check_int8_drop,
    consistency_gate,
    fixed_batch_predictor,
    reference_gates,
    runner_predictor,
    tolerance_for,
    top1_accuracy,
    torch_predictor,
)
from stages._cli import RESOLVED, load_settings, run_main
from targets.base import Target
from targets.executorch_xnnpack import ExecuTorchSettings
from targets.registry import make_target

if TYPE_CHECKING:  # all import torch, which a skipped stage never needs
    from pipeline.checkpoint import LoadedModel
    from pipeline.export.executorch import LoweredProgram
    from pipeline.export.images import Images

log = logging.getLogger("stages.export_executorch")
PRECISIONS = ("fp32", "int8")
TOOLS = ("torch", "executorch", "torchao")


@dataclass(frozen=True)
class Settings:
    common: RunConfig
    export: ExportConfig  # calibration images, parity images and tolerances, INT8 top-1 drop
    batches: ProgramBatches = field(metadata={"resolved": "program_batches"})  # one program
    # per size (benchmark.batch_sizes, nothing else of the benchmark's settings)
    executorch: ExecuTorchSettings = field(metadata={"resolved": "targets/executorch-xnnpack"})


@dataclass(frozen=True)
class Paths:
    model: Path  # models/<m>.pt
    dataset: Path = Path("data/prepared.npz")
    artifacts: Path = Path("artifacts")  # writes executorch/<m>/

    @classmethod
    def for_model(cls, name: str) -> "Paths":
        return cls(Path("models") / f"{name}.pt")


def check_programs(paths: dict[int, Path], precision: str, target: Target,
                   reference: dict[int, np.ndarray], images: "Images",
                   cfg: ExportConfig) -> dict[int, dict[str, Any]]:
    """Gates (against PyTorch's `reference` logits per batch size) and test-set top-1 of one
    precision's programs (batch -> results); raises ParityError on a failed gate."""
    tolerance = tolerance_for(precision, cfg)
    checked, logits = {}, {}
    for batch, path in paths.items():
        with target.load(path) as runner:
            predict = fixed_batch_predictor(runner_predictor(runner), batch)
            logits[batch] = batched_logits(predict, images.parity, batch)
            top1 = top1_accuracy(batched_logits(predict, images.test, batch), images.labels)
        checked[batch] = {"top1": top1, "parity": reference_gates(
            path.name, {batch: logits[batch]}, reference, "torch", tolerance)}
    if len(paths) > 1:  # the smallest batch's program against the largest's
        largest = max(paths)
        checked[largest]["parity"] |= consistency_gate(paths[largest].name, logits, tolerance)
    return checked


def card_for(source: dict, precision: str, program: "LoweredProgram", cfg: ExportConfig,
             record: dict) -> dict:
    card = make_card(source, precision, None, {
        "exporter": "torch.export + executorch.exir.to_edge_transform_and_lower",
        "backend": "XNNPACK", "batch_size": program.batch_size,
        "delegated_nodes": program.delegated_nodes, "portable_nodes": program.portable_nodes,
        **({"quantization": {"flow": "PT2E (torchao prepare_pt2e/convert_pt2e)",
                             "quantizer": "XNNPACKQuantizer: int8 symmetric per-channel weights, "
                                          "int8 per-tensor activations",
                             "calibration_images": cfg.quantize.calibration_images}}
           if precision == "int8" else {})}, record)
    for key in ("input", "output"):  # the batch is fixed in the program
        card[key] = {**card[key], "shape": [program.batch_size, *card[key]["shape"][1:]]}
    return card


def build_and_check(loaded: "LoadedModel", name: str, images: "Images", settings: Settings,
                    paths: Paths, staging: Path) -> dict[str, Any]:
    """Every program written to `staging`, gated, then carded; returns the metrics' files."""
    from pipeline.export.executorch import export_programs  # torch: see run()

    cfg, batches = settings.export, settings.batches.batch_sizes
    target = make_target("executorch-xnnpack", settings.executorch)
    shape = tuple(int(v) for v in loaded.meta["input_shape"])
    predict = torch_predictor(loaded.model)
    reference = {b: batched_logits(predict, images.parity, b) for b in batches}
    checked, lowered, files = {}, {}, {}
    for precision in PRECISIONS:
        lowered[precision] = export_programs(loaded.model, precision, batches, shape,
                                             images.calibration, cfg.quantize.calibration_batch)
        files[precision] = {b: staging / artifact_path(".", name, precision, fmt="executorch",
                                                       batch=b).name for b in batches}
        for batch, program in lowered[precision].items():
            atomic_write_bytes(files[precision][batch], program.buffer)
        log.info("checking the %s programs in ExecuTorch", precision)
        checked[precision] = check_programs(files[precision], precision, target, reference,
                                            images, cfg)
    drop = check_int8_drop(checked["fp32"][batches[-1]]["top1"],
                           checked["int8"][batches[-1]]["top1"], cfg.quantize.max_top1_drop)
    source, record = describe_source(loaded, paths.model, name), provenance(TOOLS)
    for precision in PRECISIONS:  # every gate passed: now the programs may be vouched for
        for batch, path in files[precision].items():
            card = card_for(source, precision, lowered[precision][batch], cfg, record)
            write_card(path, card, {"executorch_top1": checked[precision][batch]["top1"],
                                    "test_images": len(images.labels)})
    return {"checked": checked, "lowered": lowered, "int8_top1_drop_points": drop}


def file_entries(built: dict[str, Any], name: str, artifacts: Path) -> dict[str, Any]:
    """metrics["files"]: one entry per shipped program."""
    entries = {}
    for precision, programs in built["lowered"].items():
        for batch, program in programs.items():
            path = artifact_path(artifacts, name, precision, fmt="executorch", batch=batch)
            entries[f"{precision}.b{batch}"] = {
                "path": str(path), "precision": precision, "batch_size": batch,
                "size_bytes": path.stat().st_size, "sha256": file_sha256(path),
                "delegated_nodes": program.delegated_nodes,
                "portable_nodes": program.portable_nodes,
                **built["checked"][precision][batch]}
    return entries


def run(settings: Settings, paths: Paths, name: str) -> dict[str, Any]:
    """Lower, gate and card the programs of one model; returns the metrics dict."""
    folder = model_folder(paths.artifacts, name, "executorch")
    target = make_target("executorch-xnnpack", settings.executorch)
    ok, reason = target.available()
    if not ok:
        log.warning("executorch-xnnpack is not available, no program written: %s", reason)
        with staged_folder(folder):
            pass  # the folder (this stage's output) is left empty
        return {"model": name, "status": "skipped", "reason": reason, "files": {}}
    # torch (the model, the images) is imported only now that the target is here: a
    # machine without it skips this stage without importing torch (pipeline.io)
    from pipeline.export.images import model_and_images

    set_threads(settings.common.threads)
    loaded, images = model_and_images(paths.model, paths.dataset, settings.export)
    with staged_folder(folder) as staging:
        built = build_and_check(loaded, name, images, settings, paths, staging)
    return {"model": name, "status": "ok", "reason": "", "runtime": target.runtime(),
            "batch_sizes": list(settings.batches.batch_sizes),
            "test_images": len(images.labels), "parity_images": len(images.parity),
            "int8_top1_drop_points": built["int8_top1_drop_points"],
            "quantize": as_dict(settings.export.quantize),
            "files": file_entries(built, name, paths.artifacts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolved", type=Path, default=RESOLVED)
    parser.add_argument("--name", required=True, help="model name, e.g. teacher")
    args = parser.parse_args()

    def body() -> None:
        settings = load_settings(Settings, args.resolved)
        write_json(Path("metrics") / f"export_executorch_{args.name}.json",
                   run(settings, Paths.for_model(args.name), args.name))

    run_main(body)


if __name__ == "__main__":
    main()
