"""Per-channel scores of a gated network, indexed like each group's gate vector.

A group's channels are produced by several modules (a ResNet stream: the stem and every block's
last conv and BatchNorm) and read by several others; each score is first scattered onto the
group's gate indices (`plan.out_spans` / `plan.in_spans`) and then averaged over the modules
that carry it.

- `bn_scale_scores`: |gamma| of the producing BatchNorms (network slimming);
- `filter_l1_scores`: mean |w| of each producing conv filter (L1 norm over its fan-in; Li et al.);
- `ActivationMeter`: mean |x| per channel where the consumers read it (KDDP's activations),
  with the differentiable L1 term of the live batch for training.
"""

from collections.abc import Callable

import torch
from torch import nn

from pipeline.distributed import sum_over_processes
from pipeline.prune.budget import Scores
from pipeline.prune.gates import GatedModel, module_in_width

_BATCHNORM = nn.modules.batchnorm._BatchNorm
_CONV = nn.modules.conv._ConvNd


def _producer_rows(gated: GatedModel, kinds: tuple[type, ...],
                   value: Callable[[nn.Module], torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Per group: one width-long row per producing module of `kinds` (NaN where it has none)."""
    rows: dict[str, list[torch.Tensor]] = {group.key: [] for group in gated.plan.groups}
    widths = gated.group_widths()
    for group in gated.plan.groups:
        for name in group.producers:
            module = gated.model.get_submodule(name)
            if not isinstance(module, kinds):
                continue
            per_channel = value(module).detach().float().cpu()
            for span in gated.plan.out_spans[name]:
                if span.group == group.key:
                    row = torch.full((widths[group.key],), float("nan"))
                    row[list(span.gate_index)] = per_channel[list(span.channels)]
                    rows[group.key].append(row)
    return rows


def _mean_rows(rows: dict[str, list[torch.Tensor]], what: str) -> Scores:
    scores = {}
    for key, group_rows in rows.items():
        if not group_rows:
            raise ValueError(f"group {key!r} has no {what} to score its channels by")
        scores[key] = torch.nan_to_num(torch.stack(group_rows).nanmean(0), nan=0.0)
    return scores


def bn_scale_scores(gated: GatedModel) -> Scores:
    """|gamma| of every BatchNorm producing the group's channels, averaged over them."""
    return _mean_rows(_producer_rows(gated, (_BATCHNORM,), lambda bn: bn.weight.abs()),
                      "BatchNorm")


def filter_l1_scores(gated: GatedModel) -> Scores:
    """Mean |w| of each producing conv filter (its L1 norm / fan-in), averaged over the convs."""
    return _mean_rows(_producer_rows(gated, (_CONV,),
                                     lambda conv: conv.weight.flatten(1).abs().mean(1)), "conv")


class ActivationMeter:
    """Mean |x| per input channel of every gate site (the layers that read a group), recorded by
    forward pre-hooks that run before the gates, so a closed channel is still measured.

    While training (`module.training` and autograd on) it keeps the batch's differentiable sum
    over sites and channels of mean |x| for `penalty()`, and accumulates the detached
    per-channel means for `scores()`. Eval-mode passes are ignored unless `scoring` is set (a
    deliberate scoring pass over training images), so the per-epoch test evaluation never feeds
    a keep decision. Remove the meter (`remove()`) before copying or slimming the model.
    """

    def __init__(self, gated: GatedModel) -> None:
        self.gated = gated
        self.scoring = False
        self._live: list[torch.Tensor] = []
        self._sums: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._handles = []
        for site in gated.gate_sites:
            module = gated.model.get_submodule(site)
            channel_dim = -1 if isinstance(module, nn.Linear) else 1
            self._handles.append(module.register_forward_pre_hook(
                self._recorder(site, channel_dim), prepend=True))

    def _recorder(self, site: str, channel_dim: int):
        def record(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
            if not (module.training or self.scoring):
                return  # e.g. the test-set evaluation after each epoch: never a decision input
            per_channel = x.abs().float().mean(dim=dims)
            if module.training and torch.is_grad_enabled():
                self._live.append(per_channel.sum())
            self._sums[site] = self._sums.get(site, 0) + per_channel.detach()
            self._calls[site] = self._calls.get(site, 0) + 1
        return record

    def penalty(self) -> torch.Tensor:
        """Sum of mean |x| over every site and channel in the last forward pass (then cleared)."""
        live, self._live = self._live, []
        if not live:
            return torch.zeros(())
        return torch.stack(live).sum()

    def reset(self) -> None:
        """Forget the accumulated statistics (e.g. at the start of an epoch)."""
        self._sums, self._calls, self._live = {}, {}, []

    def scores(self) -> Scores:
        """Mean |x| per channel since the last reset, averaged over each group's consumers."""
        widths = self.gated.group_widths()
        rows: dict[str, list[torch.Tensor]] = {key: [] for key in widths}
        for site, total in self._sums.items():
            # Summed over the training processes: each saw its own shard, and every process must
            # take the same keep decision (one process: the numbers as they are).
            calls = sum_over_processes(torch.tensor(float(self._calls[site])))
            mean = (sum_over_processes(total) / calls).float().cpu()
            assert mean.numel() == module_in_width(self.gated.model.get_submodule(site))
            for span in self.gated.plan.in_spans[site]:
                row = torch.full((widths[span.group],), float("nan"))
                row[list(span.gate_index)] = mean[list(span.channels)]
                rows[span.group].append(row)
        return _mean_rows(rows, "recorded activation")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
