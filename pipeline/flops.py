"""Count parameters and multiply-accumulates (MACs) of a model on one example input.

MACs are counted for convolutions and linear layers (the work that dominates a CNN), by
forward hooks on the real modules, so the count follows whatever widths a pruned model has.
BatchNorm, activations, pooling and adds are not counted, as in the papers we compare with.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelCost:
    params: int  # trainable + frozen parameters (buffers excluded)
    macs: int  # multiply-accumulates for one input sample


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv_macs(module: nn.Conv2d, output: torch.Tensor) -> int:
    kernel = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
    return int(output[0].numel() * kernel)


def _linear_macs(module: nn.Linear, output: torch.Tensor) -> int:
    return int(output[0].numel() * module.in_features)


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32)) -> int:
    """MACs for a single sample of `input_shape` (C, H, W)."""
    total = 0

    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += _conv_macs(module, output)
        elif isinstance(module, nn.Linear):
            total += _linear_macs(module, output)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.Conv2d | nn.Linear)]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total


def model_cost(model: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32)) -> ModelCost:
    return ModelCost(params=count_params(model), macs=count_macs(model, input_shape))
