"""Unstructured magnitude pruning: zeros inside dense weight tensors, and keeping them zero.

    masks = magnitude_masks(model, sparsity=0.8)   # the 80 % smallest |w| over all conv/linear
    apply_masks(model, masks)                      # those weights become exactly 0.0
    keeper = ZeroKeeper(model)                     # later training leaves every zero at 0.0
    ... fit(model, ...) ...; keeper.check(); keeper.remove()

Shapes do not change, so the model exports like any dense one (plain weight tensors that hold
zeros, no mask op) and dense runtimes execute every MAC: the saving is in parameters that a
sparse format or compression could drop (pipeline.flops.sparse_cost), not in latency.

`ZeroKeeper` derives the masks from the zeros themselves (w == 0), so a later stage needs nothing
but the model file. It multiplies each weight's gradient by its mask; with SGD, momentum and
weight decay (coupled) the update of a zero weight is then lr * (0 + wd * 0 + momentum * 0) = 0,
so it stays exactly zero. `check()` fails loudly if any zero moved anyway.
"""

import torch
from torch import nn

from pipeline.errors import PruneError
from pipeline.flops import weight_tensors


def magnitude_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Keep masks (True = keep) removing exactly round(sparsity * N) of the N conv/linear
    weights with the smallest |w|, ranked globally across layers."""
    if not 0.0 <= sparsity < 1.0:
        raise PruneError(f"sparsity must be in [0, 1), got {sparsity}")
    weights = weight_tensors(model)
    flat = torch.cat([w.detach().abs().flatten().float().cpu() for w in weights.values()])
    removed = round(sparsity * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:removed]] = False
    masks, start = {}, 0
    for name, weight in weights.items():
        masks[name] = keep[start:start + weight.numel()].view(weight.shape)
        start += weight.numel()
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the weights the masks remove (in place)."""
    for name, weight in weight_tensors(model).items():
        weight.mul_(masks[name].to(weight.device, weight.dtype))


class ZeroKeeper:
    """Keeps every currently-zero conv/linear weight of `model` at exactly zero during training."""

    def __init__(self, model: nn.Module) -> None:
        self.weights = weight_tensors(model)
        self.masks = {name: (w.detach() != 0) for name, w in self.weights.items()}
        self.zeros = self.count_zeros()
        self._handles = [w.register_hook(self._mask_gradient(self.masks[name]))
                         for name, w in self.weights.items()]

    @staticmethod
    def _mask_gradient(mask: torch.Tensor):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad * mask.to(grad.dtype)
        return hook

    def count_zeros(self) -> int:
        return sum(w.numel() - int(w.count_nonzero()) for w in self.weights.values())

    def check(self, where: str = "training") -> None:
        """Every weight that was zero is still zero (no new zeros are counted against it)."""
        moved = sum(int((w.detach()[~mask] != 0).sum()) for w, mask in
                    ((self.weights[name], self.masks[name]) for name in self.weights))
        if moved:
            raise PruneError(f"{where}: {moved} pruned weights are no longer zero; the sparse "
                             "model would silently become dense")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
