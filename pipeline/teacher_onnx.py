"""The frozen teacher's forward pass through ONNX Runtime, for KD training on a CPU.

In KD training the teacher only runs forward, and ONNX Runtime runs our ResNets' forward pass
faster than PyTorch eager on a CPU (ResNet56 at batch 128 on a 2-core EPYC: 149 ms vs 234 ms;
benchmarks/train_paths.py records the whole training step). The teacher is exported in memory
when the stage starts (a few seconds), and the first batch it sees is also run through PyTorch:
the two must agree within the fp32 exactness rule, or training stops with a ParityError.
"""

import logging

import numpy as np
import onnxruntime
import torch
from torch import nn

from pipeline.distill import FrozenTeacher
from pipeline.export.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx
from pipeline.parity import FP32_TOLERANCE, check_parity, measure_parity

log = logging.getLogger(__name__)

OPSET = 18  # the export stage's opset (docs/export.md); the graph never leaves this process


def inference_session(model_bytes: bytes, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle ORT threads would otherwise spin for a while after each call, on the cores the
    # student's PyTorch step needs next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(model_bytes, options,
                                        providers=["CPUExecutionProvider"])


class OnnxRuntimeTeacher(FrozenTeacher):
    """A FrozenTeacher whose forward runs in ONNX Runtime (CPU); the PyTorch model is kept for
    the parity check and for anything that reads `.teacher`."""

    runtime = "onnxruntime"

    def __init__(self, teacher: nn.Module, input_shape: tuple[int, ...], threads: int) -> None:
        super().__init__(teacher)
        proto = export_onnx(self.teacher, input_shape, OPSET)
        self.session = inference_session(proto.SerializeToString(), threads)
        self.checked = False

    def _run(self, images: torch.Tensor) -> np.ndarray:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0]

    def _check_against_torch(self, images: torch.Tensor, logits: np.ndarray) -> None:
        with torch.autocast(images.device.type, enabled=False):  # the fp32 reference
            reference = super().forward(images).float().cpu().numpy()
        result = check_parity(measure_parity(reference, logits, "torch", "teacher in onnxruntime",
                                             len(images)), FP32_TOLERANCE)
        log.info("teacher runs in ONNX Runtime: %s, relative diff %.2e", result.describe(),
                 result.rel_diff)
        self.checked = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self._run(images)
        if not self.checked:
            self._check_against_torch(images, logits)
        return torch.from_numpy(logits).to(images.device)
