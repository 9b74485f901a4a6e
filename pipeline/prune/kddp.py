"""kddp (seed 001, "Improved Knowledge Distillation with Dynamic Network Pruning", Şener and
Akbaş, GUJS Part C 10(3), 2022): train the student under the teacher's guidance with an L1
penalty on neuron activations, prune the neurons that stay inactive; the final size follows.

The paper applies the penalty to the neurons of a fully-connected layer; our students have only
the classifier, whose inputs are the last stage's pooled channels, so the penalty is applied to
every channel group where its consumers read it (the classifier's input neurons included):
loss = KD + l1 * sum over consumers and channels of mean |x|. A channel is inactive when its mean
activation is below `tau` times its group's mean. With `dynamic`, inactive channels are closed at
the end of every epoch and may reopen when their activation recovers (the activation is measured
before the gate). The final scores come from one pass over `score_images` training images, never
the test split. Own size: the `tau` rule; common MACs target: one global threshold on the
activations normalised per group (activations at different depths have different scales).
"""

from typing import ClassVar

import torch

from pipeline.config import KddpConfig
from pipeline.prune.budget import Masks, Scores, masks_at_threshold, normalize
from pipeline.prune.gates import GatedModel
from pipeline.prune.method import PruneJob, PruneOutcome, decide, model_parameters
from pipeline.prune.saliency import ActivationMeter


def relative(scores: Scores) -> Scores:
    """Each channel's activation as a share of its group's mean activation."""
    return {key: s / s.mean().clamp_min(1e-12) for key, s in scores.items()}


def active_masks(scores: Scores, tau: float) -> Masks:
    """Channels whose activation is at least tau x the group mean (one kept at least)."""
    return masks_at_threshold(relative(scores), tau, round_to=1)


@torch.no_grad()
def score_pass(gated: GatedModel, meter: ActivationMeter, loader) -> Scores:
    """Mean activation per channel over `loader`, in eval mode, before the gates."""
    was_training = gated.training
    gated.eval()
    meter.reset()
    meter.scoring = True
    try:
        for images, _ in loader:
            gated(images)
    finally:
        meter.scoring = False
        gated.train(was_training)
    return meter.scores()


class Method:
    name: ClassVar[str] = "kddp"
    structured: ClassVar[bool] = True

    def __init__(self, settings: KddpConfig) -> None:
        self.settings = settings

    def prune(self, job: PruneJob) -> PruneOutcome:
        cfg = self.settings
        gated = job.gate(job.student).open_all()
        params = model_parameters(gated)
        meter = ActivationMeter(gated)

        def epoch_end(_epoch: int, _model) -> dict:
            if cfg.dynamic:
                gated.set_keep(active_masks(meter.scores(), cfg.tau))
            return {"kept_channels": sum(gated.kept_channels().values())}

        result = job.fit(gated, job.kd_loss(lambda: cfg.l1 * meter.penalty()), params,
                         on_epoch_end=epoch_end, on_epoch_start=lambda *_: meter.reset())
        activations = score_pass(gated, meter, job.train_loader.plain_subset(cfg.score_images))
        meter.remove()
        own = masks_at_threshold(relative(activations), cfg.tau, job.round_to)
        decision, alternatives = decide(
            gated, normalize(activations, cfg.normalize), job, own, score="mean |activation|",
            closed_during_training=sum(w - k for w, k in zip(
                gated.group_widths().values(), gated.kept_channels().values(), strict=True)))
        return PruneOutcome(gated, result, decision, alternatives)
