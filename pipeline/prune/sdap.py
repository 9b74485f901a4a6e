"""sdap (seed 003, "Self-distillation enhanced adaptive pruning of convolutional neural
networks", Diao et al., Pattern Recognition 2024): a trainable parameter per channel controls
pruning inside training; one overall pruning rate is given and each layer's share follows; the
pretrained network guides its own pruning (self-distillation).

The paper's exact parametrisation is not public (abstract only), so this is the project's
reading, in one training run over the prune phase's epochs:
1. `pretrain_epochs` of dense KD from the teacher (the "pretrained CNN");
2. a frozen copy of that network becomes the teacher (self-distillation); every channel gets a
   scale s (initialised at 1) where its conv/linear consumers read it, trained with the weights
   under KD from the copy plus `l1 * sum |s|`;
3. at every epoch end the channels with the smallest |s| are closed (the gates carry it), one
   global threshold for all groups, with a kept-MACs budget that falls linearly from 1 to its
   final value over the first half of the self-distillation epochs (at least one) and then
   stays: the per-layer shares follow from the scales.
The final budget is the common target, else `1 - rate` (the rate counts MACs removed). Before
saving, the scales are folded into the consumers' input weights (exact: conv(x * s) = conv'(x)
with w'[:, c] = w[:, c] * s[c]), so the model file is an ordinary gated student.
"""

import math
from typing import ClassVar

import torch
from torch import nn

from pipeline.config import SdapConfig
from pipeline.distill import FrozenTeacher
from pipeline.errors import PruneError
from pipeline.prune.budget import normalize, select_at_target
from pipeline.prune.gates import GatedModel, module_in_width
from pipeline.prune.method import PruneJob, PruneOutcome, decide


class _ScaleHook:
    """Forward pre-hook: multiplies a consumer's input channels by their groups' scales."""

    def __init__(self, parts: list[tuple[nn.Parameter, tuple[int, ...], tuple[int, ...]]],
                 width: int, channel_dim: int) -> None:
        self.parts, self.width, self.channel_dim = parts, width, channel_dim

    def multiplier(self) -> torch.Tensor:
        first = self.parts[0][0]
        mult = torch.ones(self.width, device=first.device, dtype=first.dtype)
        for scale, channels, gate_index in self.parts:
            index = torch.as_tensor(gate_index, device=scale.device)
            mult = mult.index_put((torch.as_tensor(channels, device=scale.device),),
                                  scale[index])
        return mult

    def __call__(self, _module: nn.Module, inputs: tuple) -> tuple:
        x = inputs[0]
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return (x * self.multiplier().to(x.dtype).view(shape), *inputs[1:])


class ChannelScales(nn.Module):
    """One trainable scale per channel of every group, applied where conv/linear layers read
    the group (option-A shortcuts read unscaled: an index map cannot absorb a factor)."""

    def __init__(self, gated: GatedModel) -> None:
        super().__init__()
        self.keys = {key: key.replace(".", "-") for key in gated.group_keys}
        self.scales = nn.ParameterDict({
            name: nn.Parameter(torch.ones(gated.group_widths()[key],
                                          device=gated.gate(key).logits.device))
            for key, name in self.keys.items()})
        self._sites: dict[str, _ScaleHook] = {}
        self._handles = []
        for site in gated.gate_sites:
            module = gated.model.get_submodule(site)
            if not isinstance(module, nn.Conv2d | nn.Linear):
                continue
            parts = [(self.scales[self.keys[span.group]], span.channels, span.gate_index)
                     for span in gated.plan.in_spans[site]]
            hook = _ScaleHook(parts, module_in_width(module),
                              -1 if isinstance(module, nn.Linear) else 1)
            self._sites[site] = hook
            self._handles.append(module.register_forward_pre_hook(hook))
        self._model = [gated.model]  # in a list: not a submodule, so not in this state_dict

    def of(self, key: str) -> nn.Parameter:
        return self.scales[self.keys[key]]

    def l1(self) -> torch.Tensor:
        return torch.stack([s.abs().sum() for s in self.scales.values()]).sum()

    @torch.no_grad()
    def fold_and_remove(self) -> None:
        """Multiply the scales into the consumers' input weights, then drop the hooks."""
        for site, hook in self._sites.items():
            module = self._model[0].get_submodule(site)
            assert getattr(module, "groups", 1) == 1, site  # consumers are never grouped
            factor = hook.multiplier().detach()
            module.weight.mul_(factor.view(1, -1, *[1] * (module.weight.dim() - 2)))
        for handle in self._handles:
            handle.remove()
        self._handles, self._sites = [], {}


class SdapStudent(nn.Module):
    """What trains: the gated student, its channel scales and the frozen self-teacher (a
    submodule, so a resumed run restores the snapshot with the rest of the state)."""

    def __init__(self, gated: GatedModel) -> None:
        super().__init__()
        self.gated = gated
        self.self_teacher = FrozenTeacher(gated.plain_copy())  # before the scale hooks exist
        self.scales = ChannelScales(gated)
        self.self_distilling = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.gated(images)

    @torch.no_grad()
    def snapshot_teacher(self) -> None:
        """The network as trained so far (gates open, scales 1) becomes the teacher."""
        self.self_teacher.teacher.load_state_dict(self.gated.model.state_dict())


def budget_at(done: int, epochs: int, final: float) -> float:
    """Kept-MACs budget after `done` of `epochs` self-distillation epochs."""
    ramp = max(1, math.ceil(epochs / 2))
    return 1.0 - (1.0 - final) * min(1.0, done / ramp)


class Method:
    name: ClassVar[str] = "sdap"
    structured: ClassVar[bool] = True

    def __init__(self, settings: SdapConfig) -> None:
        self.settings = settings

    def prune(self, job: PruneJob) -> PruneOutcome:
        cfg = self.settings
        if cfg.pretrain_epochs >= job.train.epochs:
            raise PruneError(f"sdap.pretrain_epochs ({cfg.pretrain_epochs}) leaves no "
                             f"self-distillation epoch of the {job.train.epochs} prune epochs")
        final = job.target_macs if job.target_macs is not None else 1.0 - cfg.rate
        gated = job.gate(job.student).open_all().freeze_gates()
        student = SdapStudent(gated)
        scales = student.scales
        distilling_epochs = job.train.epochs - cfg.pretrain_epochs
        pretrain_loss = job.kd_loss()
        self_loss = job.kd_loss(lambda: cfg.l1 * scales.l1(), teacher=student.self_teacher)

        def loss_fn(model, images, labels):
            return (self_loss if student.self_distilling else pretrain_loss)(model, images,
                                                                             labels)

        def epoch_start(epoch: int, _model) -> None:
            student.self_distilling = epoch > cfg.pretrain_epochs
            for scale in scales.scales.values():
                scale.requires_grad_(student.self_distilling)
            if epoch == cfg.pretrain_epochs + 1:
                student.snapshot_teacher()

        def epoch_end(epoch: int, _model) -> dict:
            done = epoch - cfg.pretrain_epochs
            if done <= 0:
                return {"kept_macs_fraction": 1.0}
            budget = budget_at(done, distilling_epochs, final)
            scores = self._scores(gated, scales)
            gated.set_keep(select_at_target(gated, scores, budget, job.round_to).masks, scores)
            return {"kept_macs_fraction": round(gated.summary()["macs_fraction"], 6)}

        result = job.fit(student, loss_fn, [
            {"params": list(gated.model.parameters())},
            {"params": list(scales.scales.values()), "lr": cfg.scale_lr, "weight_decay": 0.0}],
            on_epoch_end=epoch_end, on_epoch_start=epoch_start)
        scores = self._scores(gated, scales)
        scales.fold_and_remove()
        own = select_at_target(gated, scores, 1.0 - cfg.rate, job.round_to).masks
        decision, alternatives = decide(gated, scores, job, own, score="|channel scale|",
                                        final_budget=final)
        return PruneOutcome(gated, result, decision, alternatives)

    def _scores(self, gated: GatedModel, scales: ChannelScales):
        return normalize({key: scales.of(key).detach().abs() for key in gated.group_keys},
                         self.settings.normalize)
