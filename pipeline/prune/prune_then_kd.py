"""prune_then_kd (seed 002, "Knowledge Distillation Based on Pruned Model", Liu, Zhang, Chen,
BlockSys 2019): prune a trained network, then recover it by distillation instead of plain
fine-tuning. The pruning criterion is the L1 norm of each filter ("Pruning Filters for
Efficient ConvNets", Li et al., ICLR 2017): the filters with the smallest sum |w| go, with the
next layer's matching input channels.

Prune phase: the student is trained densely with the common KD recipe for the phase's epochs
(the "trained dense student"; trained here rather than taken from the student_dense stage, so
that its total budget, prune phase + fine-tuning, equals every other method's), then pruned at
once. Own size: Li et al.'s rule, one `ratio` for every block-internal group with the residual
streams untouched (`keep_streams`). Common MACs target: one global threshold on the filter norms
normalised per group (raw norms are not comparable across layers: their scale follows each
layer's fan-in and initialisation). Recovery (student_final): KD from the unpruned student
itself (`recovery_teacher: unpruned`, the gated model with its gates open) or from the teacher.
"""

from typing import ClassVar

from pipeline.config import PruneThenKdConfig
from pipeline.prune.budget import masks_at_ratio, normalize
from pipeline.prune.method import PruneJob, PruneOutcome, decide, streams
from pipeline.prune.saliency import filter_l1_scores


class Method:
    name: ClassVar[str] = "prune_then_kd"
    structured: ClassVar[bool] = True

    def __init__(self, settings: PruneThenKdConfig) -> None:
        self.settings = settings

    def prune(self, job: PruneJob) -> PruneOutcome:
        cfg = self.settings
        model = job.student
        result = job.fit(model, job.kd_loss(), [{"params": list(model.parameters())}])
        gated = job.gate(model).open_all().freeze_gates()
        fixed = streams(gated) if cfg.keep_streams else frozenset()
        scores = normalize(filter_l1_scores(gated), cfg.normalize)
        own = masks_at_ratio(scores, cfg.ratio, job.round_to, fixed)
        decision, alternatives = decide(gated, scores, job, own, fixed,
                                        score="filter L1 norm", kept_whole=sorted(fixed))
        return PruneOutcome(gated, result, decision, alternatives,
                            recovery_teacher=cfg.recovery_teacher)
