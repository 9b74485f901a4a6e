"""MACs are counted in one place (pipeline.flops) and agree with PyTorch's own FLOP counter."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.flops import count_macs, layer_costs
from pipeline.models import build_model, known_architectures
from pipeline.prune.gates import attach_gates


def torch_flops(model: nn.Module, shape=(3, 32, 32)) -> int:
    """FLOPs by torch.utils.flop_counter: 2 per multiply-accumulate of conv/linear (no biases)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    return counter.get_total_flops()


@pytest.mark.parametrize("arch", known_architectures())
def test_every_zoo_model_matches_torchs_flop_counter(arch):
    model = build_model({"arch": arch})
    assert 2 * count_macs(model) == torch_flops(model)


def test_grouped_depthwise_and_repeated_layers_match_too():
    shared = nn.Conv2d(8, 8, 3, padding=1, groups=2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), shared, shared,
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Flatten(),
                          nn.Linear(8 * 32 * 32, 10))
    assert 2 * count_macs(model) == torch_flops(model)
    costs = {cost.name: cost for cost in layer_costs(model, torch.zeros(1, 3, 32, 32))}
    assert costs["3"].depthwise and not costs["1"].depthwise
    assert costs["1"].macs == 2 * 32 * 32 * 9 * 4 * 8  # called twice, 4 inputs per group


def test_gated_full_macs_are_the_same_count():
    model = build_model({"arch": "resnet20"})
    gated = attach_gates(model, torch.zeros(1, 3, 32, 32))
    assert gated.full_macs == count_macs(build_model({"arch": "resnet20"}))
