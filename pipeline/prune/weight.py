"""weight (seed 004, "Matching the Ideal Pruning Method with Knowledge Distillation for Optimal
Compression", Malihi and Heidemann, Appl. Syst. Innov. 7(4):56, 2024): unstructured magnitude
pruning combined with KD.

Prune phase: dense KD from the teacher for the phase's epochs, then one-shot global magnitude
pruning: the `sparsity` share of all conv/linear weights with the smallest |w| (one ranking
across layers) becomes exactly zero. The fine-tuning stage trains with KD while every zero stays
zero (pipeline.prune.sparse.ZeroKeeper). Shapes stay dense: nothing to slim, and the exported
ONNX holds plain weight tensors with zeros. Dense runtimes execute every MAC, so the method's
saving is in non-zero parameters (and in MACs only for a sparse kernel), never in the measured
latency of a dense runtime; the report says so. The sparsity is this method's size whether or
not a common MACs target is set (the target prices executed MACs, which zeros do not change).
"""

from typing import ClassVar

from pipeline.config import WeightConfig
from pipeline.flops import sparse_cost
from pipeline.prune.method import PruneJob, PruneOutcome
from pipeline.prune.sparse import apply_masks, magnitude_masks


class Method:
    name: ClassVar[str] = "weight"
    structured: ClassVar[bool] = False

    def __init__(self, settings: WeightConfig) -> None:
        self.settings = settings

    def prune(self, job: PruneJob) -> PruneOutcome:
        model = job.student
        result = job.fit(model, job.kd_loss(), [{"params": list(model.parameters())}])
        apply_masks(model, magnitude_masks(model, self.settings.sparsity))
        cost = sparse_cost(model, tuple(job.example_input.shape[1:]))
        return PruneOutcome(model, result, {
            "mode": "sparsity", "sparsity": cost.sparsity,
            "requested_sparsity": self.settings.sparsity, "scope": "global, conv + linear",
            "params_nonzero": cost.params_nonzero, "macs_nonzero": cost.macs_nonzero})
