"""netslim ("Learning Efficient Convolutional Networks through Network Slimming", Liu et al.,
ICCV 2017): train with an L1 penalty on every BatchNorm scale (gamma), so unimportant channels
drift towards zero scale, then remove the channels below one global threshold on |gamma|.

Here the training is KD from the teacher (the project's common recipe) plus `l1 * sum |gamma|`;
autograd's subgradient sign(gamma) is exactly the official code's `updateBN` step, and weight
decay stays on gamma as there. A channel's score is the mean |gamma| over the BatchNorms that
produce it (a residual stream is normalised by several). Own size: the global `percent`
quantile of the scores (the official ResNet setting prunes 40 %); with a common MACs target
the threshold is searched instead. Training runs on the plain student; the gates are attached
afterwards, only to carry the decision.
"""

from typing import ClassVar

import torch
from torch import nn

from pipeline.config import NetslimConfig
from pipeline.prune.budget import masks_at_threshold, normalize
from pipeline.prune.method import PruneJob, PruneOutcome, decide
from pipeline.prune.saliency import bn_scale_scores


def batchnorm_l1(model: nn.Module):
    """sum |gamma| over every BatchNorm of `model` (a zero-argument penalty callable)."""
    scales = [m.weight for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    return lambda: torch.stack([w.abs().sum() for w in scales]).sum()


class Method:
    name: ClassVar[str] = "netslim"
    structured: ClassVar[bool] = True

    def __init__(self, settings: NetslimConfig) -> None:
        self.settings = settings

    def prune(self, job: PruneJob) -> PruneOutcome:
        cfg = self.settings
        model = job.student
        l1 = batchnorm_l1(model)
        result = job.fit(model, job.kd_loss(lambda: cfg.l1 * l1()),
                         [{"params": list(model.parameters())}])
        gated = job.gate(model).open_all().freeze_gates()
        scores = normalize(bn_scale_scores(gated), cfg.normalize)
        threshold = float(torch.quantile(torch.cat(list(scores.values())), cfg.percent))
        own = masks_at_threshold(scores, threshold, job.round_to)
        decision, alternatives = decide(gated, scores, job, own, score="|gamma| (BatchNorm)",
                                        own_threshold=threshold)
        return PruneOutcome(gated, result, decision, alternatives)
