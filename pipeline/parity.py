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
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import ParityTolerance
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


def torch_predictor(model: nn.Module) -> Predict:
    """Inference-mode forward passes of a PyTorch model, on whatever device it lives on."""
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
