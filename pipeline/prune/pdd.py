"""pdd (seed 000, "PDD: Pruning Neural Networks During Knowledge Distillation"): a 0/1 gate per
channel (ApproxSign, pipeline.prune.gates) trained jointly with the weights under KD; a channel
whose gate ends at 0 is removed.

Its own size is wherever the gates settle (optionally pushed by the `pdd.flops_*` budget
penalty). With a common MACs target the trained gates are then trimmed or re-opened to the
target, ranked by their logits: that step changes the network the gates trained, and the metrics
report top-1 before and after it. Without a target the computation is exactly the original PDD
stage's: same initialisation, same optimizer groups, same loss, logits saved as trained.
"""

from typing import ClassVar

import torch

from pipeline.config import PddConfig
from pipeline.prune.gates import GatedModel, count_flips, macs_penalty
from pipeline.prune.latency import LatencyCost, latency_penalty
from pipeline.prune.method import PruneJob, PruneOutcome, decide


class GateMonitor:
    """Per-epoch gate statistics: flips since the epoch began, kept channels, kept MACs."""

    def __init__(self, gated: GatedModel):
        self.gated, self.snapshot = gated, gated.gate_states()

    def epoch_start(self, _epoch: int, _model) -> None:
        self.snapshot = self.gated.gate_states()  # after a resume restored the gates

    def epoch_end(self, _epoch: int, _model) -> dict:
        with torch.no_grad():
            kept_macs = self.gated.expected_macs().item() / self.gated.full_macs
        return {"gate_flips": count_flips(self.gated, self.snapshot),
                "kept_channels": sum(self.gated.kept_channels().values()),
                "kept_macs_fraction": round(kept_macs, 6)}


class Method:
    name: ClassVar[str] = "pdd"
    structured: ClassVar[bool] = True

    def __init__(self, settings: PddConfig) -> None:
        self.settings = settings

    def budget_penalty(self, gated: GatedModel, job: PruneJob):
        """flops_weight x relu(kept MACs fraction - flops_target); with a latency budget,
        flops_weight x relu(the table's expected ms / the budget - 1) instead."""
        cfg = self.settings
        if cfg.flops_weight == 0:
            return None
        if job.latency is not None:
            cost = LatencyCost(gated, job.latency.table, job.latency.batch)
            return lambda: cfg.flops_weight * latency_penalty(cost, job.latency.budget_ms)
        return lambda: cfg.flops_weight * macs_penalty(gated, cfg.flops_target)

    def prune(self, job: PruneJob) -> PruneOutcome:
        gated = job.gate(job.student)
        monitor = GateMonitor(gated)
        result = job.fit(gated, job.kd_loss(self.budget_penalty(gated, job)), param_groups=[
            {"params": list(gated.model.parameters())},
            {"params": gated.gate_parameters(), "lr": self.settings.gate_lr,
             "weight_decay": 0.0}],
            on_epoch_start=monitor.epoch_start, on_epoch_end=monitor.epoch_end)
        gated.freeze_gates()
        flips = {"gate_flips_per_epoch": [row["gate_flips"] for row in result.history]}
        with torch.no_grad():
            own = {key: vector.bool().cpu() for key, vector in gated.gate_vectors().items()}
            logits = {key: gated.gate(key).logits.detach().cpu() for key in gated.group_keys}
        if not job.has_budget:  # keep the trained logits exactly as they are
            return PruneOutcome(gated, result, {
                "mode": "own size", "macs_fraction": gated.summary()["macs_fraction"],
                "kept": gated.kept_channels(), **flips})
        decision, alternatives = decide(gated, logits, job, own, score="gate logits", **flips)
        return PruneOutcome(gated, result, decision, alternatives)
