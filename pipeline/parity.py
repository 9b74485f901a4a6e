"""Parity gates: do two representations of one model compute the same function?

Both run on the same real (normalised) test images at a given batch size and are compared by
the max abs difference of their logits, the relative difference max|a - b| / max|a| (a: the
reference) and top-1 agreement. FP32 representations must agree within 1e-4 relative with every
top-1 class equal (the exactness rule of docs/methods.md); FP16/INT8 files get the looser
tolerances of params.yaml (export.fp16, export.int8). A violation is a ParityError that prints
the measured and the allowed numbers.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

from pipeline.config import ExportConfig, ParityTolerance
from pipeline.errors import ParityError

FP32_TOLERANCE = ParityTolerance(max_rel_diff=1e-4, min_top1_agreement=1.0)

Predict = Callable[[np.ndarray], np.ndarray]  # float32 images (N, C, H, W) -> logits (N, K)


@dataclass(frozen=True)
class ParityResult:
    reference: str  # what the candidate is compared against, e.g. "torch"
    candidate: str  # e.g. "teacher.fp32.onnx"
    batch_size: int  # images per forward pass (both sides)
    images: int  # images compared
    max_abs_diff: float
    rel_diff: float  # max|a - b| / max|a|
    top1_agreement: float  # share of images whose top-1 classes agree, in [0, 1]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.candidate} vs {self.reference} at batch {self.batch_size} on "
                f"{self.images} images")


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float, float]:
    """(max abs diff, relative diff, top-1 agreement) of two logit arrays of shape (N, K)."""
    if reference.shape != candidate.shape or reference.ndim != 2 or not len(reference):
        raise ParityError(f"logit shapes differ or are empty: reference {reference.shape}, "
                          f"candidate {candidate.shape}; expected equal (N, classes), N > 0")
    reference = reference.astype(np.float64)
    candidate = candidate.astype(np.float64)
    max_abs = float(np.max(np.abs(reference - candidate)))
    scale = float(np.max(np.abs(reference)))
    # An all-zero reference: only an all-zero candidate matches it.
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    agreement = float(np.mean(reference.argmax(1) == candidate.argmax(1)))
    return max_abs, rel, agreement


def batched_logits(predict: Predict, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits of all `images`, `batch_size` at a time (the last batch may be smaller)."""
    if batch_size < 1:
        raise ParityError(f"batch size must be >= 1, got {batch_size}")
    parts = [np.asarray(predict(images[start:start + batch_size]))
             for start in range(0, len(images), batch_size)]
    return np.concatenate(parts)


def measure_parity(reference: np.ndarray, candidate: np.ndarray, reference_name: str,
                   candidate_name: str, batch_size: int) -> ParityResult:
    """Compare logits already computed at `batch_size` (see batched_logits)."""
    max_abs, rel, agreement = compare_logits(reference, candidate)
    return ParityResult(reference_name, candidate_name, batch_size, len(reference), max_abs, rel,
                        agreement)


def check_parity(result: ParityResult, tolerance: ParityTolerance) -> ParityResult:
    """Return `result` if within `tolerance`, else raise ParityError with both numbers."""
    problems = []
    # Written as "not <=" so that a NaN difference fails the gate instead of passing it.
    if not result.rel_diff <= tolerance.max_rel_diff:
        problems.append(f"relative diff {result.rel_diff:.3e} exceeds the allowed "
                        f"{tolerance.max_rel_diff:.3e} (max abs diff {result.max_abs_diff:.3e})")
    if not result.top1_agreement >= tolerance.min_top1_agreement:
        problems.append(f"top-1 agreement {100 * result.top1_agreement:.2f}% is below the "
                        f"required {100 * tolerance.min_top1_agreement:.2f}%")
    if problems:
        raise ParityError(f"{result.describe()}: " + "; ".join(problems))
    return result


def torch_predictor(model: "torch.nn.Module") -> Predict:
    """Inference-mode forward passes of a PyTorch model, on whatever device it lives on
    (torch is imported here: the gates themselves are numpy, and a stage that skips its
    target must not pay for torch, pipeline.io says why)."""
    import torch

    if model.training:  # BatchNorm/dropout in training mode would make every gate meaningless
        raise ParityError(f"{type(model).__name__} is in training mode; call .eval() first")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")

    def predict(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(images).to(device)).float().cpu().numpy()

    return predict


def runner_predictor(runner: Any, input_name: str = "input",
                     output_name: str = "logits") -> Predict:
    """Forward passes through a targets.base.Runner (or anything with `infer(feeds)`)."""

    def predict(images: np.ndarray) -> np.ndarray:
        return runner.infer({input_name: np.ascontiguousarray(images)})[output_name]

    return predict


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of images whose highest logit is the label, in [0, 1]."""
    if len(logits) != len(labels) or not len(labels):
        raise ParityError(f"{len(logits)} logit rows for {len(labels)} labels; expected equal, > 0")
    return float(np.mean(logits.argmax(1) == labels))


def fixed_batch_predictor(predict: Predict, batch_size: int) -> Predict:
    """`predict` for a runtime whose batch is fixed: a short chunk (the tail) is padded with
    copies of its first image and the padding's logits are dropped."""

    def padded(images: np.ndarray) -> np.ndarray:
        short = batch_size - len(images)
        if short <= 0:
            return predict(images)
        filled = np.concatenate([images, np.repeat(images[:1], short, axis=0)])
        return predict(filled)[:len(images)]

    return padded


def tolerance_for(precision: str, export: ExportConfig) -> ParityTolerance:
    """The gate a file of `precision` must pass: FP32's exactness rule, or params' looser one
    (export.fp16, export.int8)."""
    return {"fp16": export.fp16, "int8": export.int8}.get(precision, FP32_TOLERANCE)


def reference_gates(name: str, logits: dict[int, np.ndarray], reference: dict[int, np.ndarray],
                    reference_name: str, tolerance: ParityTolerance) -> dict[str, Any]:
    """A file's logits against a reference's, batch size by batch size (keys vs_<ref>_b<n>);
    raises ParityError on the first violation."""
    return {f"vs_{reference_name}_b{b}": check_parity(
        measure_parity(reference[b], logits[b], reference_name, name, b), tolerance).as_dict()
        for b in logits}


def consistency_gate(name: str, logits: dict[int, np.ndarray],
                     tolerance: ParityTolerance) -> dict[str, Any]:
    """The smallest batch against the largest: per-sample results must not depend on it."""
    small, large = min(logits), max(logits)
    result = measure_parity(logits[large], logits[small], f"{name}@batch{large}", name, small)
    return {"batch_consistency": check_parity(result, tolerance).as_dict()}


def check_int8_drop(fp32_top1: float, int8_top1: float, max_drop_points: float) -> float:
    """Top-1 points (percent) INT8 loses against FP32; ParityError beyond `max_drop_points`."""
    drop = 100 * (fp32_top1 - int8_top1)
    if not drop <= max_drop_points:
        raise ParityError(f"INT8 top-1 {100 * int8_top1:.2f}% is {drop:.2f} points below FP32 "
                          f"{100 * fp32_top1:.2f}%; allowed drop is {max_drop_points:.2f} points "
                          "(export.quantize.max_top1_drop)")
    return drop
