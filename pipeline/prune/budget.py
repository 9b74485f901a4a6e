"""Keep decisions from per-channel scores, and the search that meets a kept-MACs target.

Every structured method scores the channels of each group (`Scores`: group key -> one float per
channel, indexed like the group's gate vector) and turns the scores into a keep decision
(`Masks`: group key -> bool per channel, True = keep), which `GatedModel.set_keep` writes into
the gates. Two ways to decide:

- a rule of the method's own (a threshold, a ratio): `masks_at_threshold`, `masks_at_ratio`;
- a kept-MACs target shared by every method (`prune.budget: {macs: f}`): `select_at_target`
  finds the largest network whose MACs are at most the target, by binary search over one global
  threshold, then re-opens blocks of channels greedily while they still fit.

Widths are rounded up to multiples of `round_to` *inside* the decision, and the extra channels
are kept open: the network that is priced is the network that ships (the slim stage then adds
nothing), and channels that cost MACs anyway do useful work. A group always keeps at least one
block. A global threshold needs scores comparable across groups; `normalize` divides each
group by its own mean when they are not comparable by construction (e.g. filter L1 norms,
whose scale depends on each layer's fan-in and initialisation).
"""

import math
from dataclasses import dataclass

import torch

from pipeline.errors import PruneError
from pipeline.prune.gates import GatedModel

Scores = dict[str, torch.Tensor]
Masks = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Decision:
    """A keep decision and how it was reached."""

    masks: Masks
    macs_fraction: float  # kept MACs / MACs of the unpruned network
    threshold: float  # the global score threshold (inf: every free group at its minimum)
    top_up_blocks: int = 0  # blocks of round_to channels re-opened after the threshold

    def kept(self) -> dict[str, int]:
        return {key: int(mask.sum()) for key, mask in self.masks.items()}


def normalize(scores: Scores, how: str) -> Scores:
    """'mean': each group divided by its mean score, so one threshold compares like with like;
    'none': the scores as they are (comparable by construction, e.g. BN scales under one L1)."""
    if how == "none":
        return {key: s.detach().float().cpu() for key, s in scores.items()}
    if how == "mean":
        return {key: (s.detach().float().cpu() / s.detach().float().abs().mean().clamp_min(1e-12)
                      .cpu()) for key, s in scores.items()}
    raise PruneError(f"unknown score normalisation {how!r}; expected 'none' or 'mean'")


def rounded_width(kept: int, width: int, round_to: int) -> int:
    """At least one channel, rounded up to a multiple of round_to, at most the width."""
    return min(width, math.ceil(max(kept, 1) / round_to) * round_to)


def top_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep the `count` highest-scoring channels (ties: the lower index)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[torch.argsort(scores, descending=True, stable=True)[:count]] = True
    return mask


def masks_at_threshold(scores: Scores, threshold: float, round_to: int,
                       fixed: frozenset[str] = frozenset()) -> Masks:
    """Keep the channels scoring >= threshold (rounded up); groups in `fixed` keep everything."""
    masks = {}
    for key, s in scores.items():
        if key in fixed:
            masks[key] = torch.ones(s.numel(), dtype=torch.bool)
            continue
        masks[key] = top_mask(s, rounded_width(int((s >= threshold).sum()), s.numel(), round_to))
    return masks


def masks_at_ratio(scores: Scores, ratio: float, round_to: int,
                   fixed: frozenset[str] = frozenset()) -> Masks:
    """Remove the same share `ratio` of every group's channels (lowest scores first)."""
    if not 0.0 <= ratio < 1.0:
        raise PruneError(f"prune ratio must be in [0, 1), got {ratio}")
    masks = {}
    for key, s in scores.items():
        keep = s.numel() if key in fixed else math.ceil((1 - ratio) * s.numel() - 1e-9)
        masks[key] = top_mask(s, rounded_width(keep, s.numel(), round_to))
    return masks


def macs_fraction(gated: GatedModel, masks: Masks) -> float:
    """MACs of the network `masks` describe, as a fraction of the unpruned network's."""
    with torch.no_grad():
        return float(gated.expected_macs(masks)) / gated.full_macs


def select_at_target(gated: GatedModel, scores: Scores, target: float, round_to: int,
                     fixed: frozenset[str] = frozenset()) -> Decision:
    """The largest network with kept MACs <= target (a fraction of the unpruned MACs).

    MACs fall monotonically as the global threshold rises (each group keeps its top-k, and k
    only shrinks), so a binary search over the distinct scores finds the lowest threshold that
    fits; the greedy top-up then spends what rounding left of the budget.
    """
    if not 0.0 < target <= 1.0:
        raise PruneError(f"MACs target must be in (0, 1], got {target}")
    free = [s for key, s in scores.items() if key not in fixed]
    candidates = torch.unique(torch.cat(free)) if free else torch.zeros(0)
    smallest = masks_at_threshold(scores, math.inf, round_to, fixed)
    if macs_fraction(gated, smallest) > target + 1e-12:
        raise PruneError(f"MACs target {target} is below the smallest network this method may "
                         f"build ({macs_fraction(gated, smallest):.4f} of the MACs, with "
                         f"round_to={round_to} and groups {sorted(fixed)} kept whole)")
    low, high = 0, len(candidates)  # the answer is in [low, high]; high = "above every score"
    while low < high:
        middle = (low + high) // 2
        trial = masks_at_threshold(scores, float(candidates[middle]), round_to, fixed)
        if macs_fraction(gated, trial) <= target:
            high = middle
        else:
            low = middle + 1
    threshold = float(candidates[low]) if low < len(candidates) else math.inf
    masks = masks_at_threshold(scores, threshold, round_to, fixed)
    masks, blocks = _top_up(gated, scores, masks, target, round_to)
    return Decision(masks, macs_fraction(gated, masks), threshold, blocks)


def _top_up(gated: GatedModel, scores: Scores, masks: Masks, target: float,
            round_to: int) -> tuple[Masks, int]:
    """Re-open the best block of round_to closed channels that still fits, until none does."""
    masks = {key: mask.clone() for key, mask in masks.items()}
    blocks = 0
    while True:
        best = None
        for key, mask in masks.items():
            closed = (~mask).nonzero().flatten()
            if not len(closed):
                continue
            block = closed[torch.argsort(scores[key][closed], descending=True, stable=True)]
            trial = mask.clone()
            trial[block[:round_to]] = True
            value = float(scores[key][block[:round_to]].mean())
            if (best is None or value > best[0]) and \
                    macs_fraction(gated, {**masks, key: trial}) <= target:
                best = (value, key, trial)
        if best is None:
            return masks, blocks
        masks[best[1]] = best[2]
        blocks += 1
