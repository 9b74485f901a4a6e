"""Parameters and multiply-accumulates (MACs): the one place the project counts them.

MACs are counted for convolutions and linear layers (the work that dominates a CNN) by forward
hooks on the real modules, so the count follows whatever widths a pruned model has and a module
called twice counts twice. BatchNorm, activations, pooling and adds are not counted, as in the
papers we compare with. `layer_costs` keeps each layer's cost as a function of its channel
counts, which the PDD gates use to differentiate the MACs of the network they describe.
"""

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

COUNTED = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass(frozen=True)
class ModelCost:
    params: int  # trainable + frozen parameters (buffers excluded)
    macs: int  # multiply-accumulates for one input sample


@dataclass(frozen=True)
class LayerCost:
    """MACs of one conv/linear layer per sample, as a function of its kept channels."""

    name: str
    macs_per_pair: int  # output positions x kernel size: MACs per (in, out) channel pair
    in_channels: int
    out_channels: int
    groups: int  # convolution groups (1 for linear)
    depthwise: bool  # groups == in == out: MACs scale with kept channels, not their square

    @property
    def macs(self) -> int:
        return self.macs_per_pair * self.in_channels * self.out_channels // self.groups


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _layer_cost(name: str, module: nn.Module, output: torch.Tensor) -> LayerCost:
    if isinstance(module, nn.Linear):
        in_channels, out_channels, groups, kernel = module.in_features, module.out_features, 1, 1
    else:
        in_channels, out_channels, groups = module.in_channels, module.out_channels, module.groups
        kernel = math.prod(module.weight.shape[2:])
    per_pair = output[0].numel() // out_channels * kernel  # output positions x kernel size
    depthwise = groups > 1 and groups == in_channels == out_channels
    return LayerCost(name, per_pair, in_channels, out_channels, groups, depthwise)


@torch.no_grad()
def layer_costs(model: nn.Module, example_input: torch.Tensor) -> tuple[LayerCost, ...]:
    """Every conv/linear that runs on `example_input` (one sample), in one eval-mode forward."""
    costs: dict[str, LayerCost] = {}

    def record(name: str):
        def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
            cost = _layer_cost(name, module, output)
            if name in costs:  # a module called twice costs twice
                cost = replace(cost, macs_per_pair=cost.macs_per_pair + costs[name].macs_per_pair)
            costs[name] = cost
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules()
               if isinstance(m, COUNTED)]
    was_training = model.training
    try:
        model.eval()(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return tuple(costs.values())


def count_macs(model: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32)) -> int:
    """MACs for a single sample of `input_shape` (C, H, W)."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    example = torch.zeros(1, *input_shape, device=device)
    return sum(cost.macs for cost in layer_costs(model, example))


def model_cost(model: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32)) -> ModelCost:
    return ModelCost(params=count_params(model), macs=count_macs(model, input_shape))


@dataclass(frozen=True)
class SparseCost:
    """What unstructured zeros save in principle; dense runtimes execute `ModelCost` anyway."""

    params_nonzero: int  # parameters minus the zero conv/linear weights (BN, biases: all kept)
    macs_nonzero: int  # per sample: every conv/linear weight that is zero skips its MACs
    sparsity: float  # zero share of the conv/linear weights (0 for a dense network)


def weight_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every conv/linear weight by module name: what unstructured pruning sparsifies."""
    return {name: module.weight for name, module in model.named_modules()
            if isinstance(module, COUNTED)}


@torch.no_grad()
def sparse_cost(model: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32)) -> SparseCost:
    """Non-zero parameters, non-zero MACs and weight sparsity of `model` for one sample."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    weights = weight_tensors(model)
    macs = 0
    for layer in layer_costs(model, torch.zeros(1, *input_shape, device=device)):
        weight = weights[layer.name]
        positions = layer.macs_per_pair // math.prod(weight.shape[2:])  # output positions
        macs += positions * int(weight.count_nonzero())
    total = sum(w.numel() for w in weights.values())
    zeros = sum(w.numel() - int(w.count_nonzero()) for w in weights.values())
    return SparseCost(params_nonzero=count_params(model) - zeros, macs_nonzero=macs,
                      sparsity=zeros / total if total else 0.0)
