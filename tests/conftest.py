"""Shared test setup: the test machines have 2 CPU cores shared between several processes."""

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(min(2, previous))
    yield
    torch.set_num_threads(previous)


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, so BN is far from the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) - 0.5)
    return model


@pytest.fixture
def randomize_bn():
    """`randomize_bn(model, seed=0) -> model`: non-trivial BatchNorm for parity tests."""
    return _randomize_bn
