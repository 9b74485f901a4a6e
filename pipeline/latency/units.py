"""Latency units: one convolution with what the exporter fuses into it, read off a real model.

A unit is a conv with its BatchNorm folded and the ReLU after it (`epilogue` "relu"), or, for the
conv that ends a residual block, with the residual add before that ReLU ("add_relu"). That is the
graph ONNX Runtime sees after export and simplification: Conv(W, b) -> Relu, or
Conv(W, b) -> Add -> Relu. `named_units` runs one eval forward with hooks, so a slimmed model's
units carry its slimmed widths. The pooling, the classifier, option-A shortcuts and the cost of
one call are not units: the latency model's fitted constant absorbs them.
"""

from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeline.models.resnet_cifar import BasicBlock


@dataclass(frozen=True, order=True)
class Unit:
    h: int  # input height = width (square feature maps)
    cin: int
    cout: int
    stride: int = 1
    k: int = 3
    groups: int = 1
    epilogue: str = "relu"  # relu | add_relu

    def conv_key(self) -> str:
        """The table row of the conv (+ bias + ReLU) itself."""
        return conv_key(self.family(), self.cin, self.cout)

    def add_key(self) -> str | None:
        """The table row of the residual add + ReLU this unit ends with, if any."""
        return add_key(self.h_out, self.cout) if self.epilogue == "add_relu" else None

    def family(self) -> tuple[int, int, int, int]:
        """Everything but the widths and the epilogue: rows of one conv shape, which
        interpolate with each other in (cin, cout)."""
        return (self.h, self.stride, self.k, self.groups)

    @property
    def h_out(self) -> int:
        return -(-self.h // self.stride)

    def as_dict(self) -> dict:
        return asdict(self)


def conv_key(family: tuple[int, int, int, int], cin: int, cout: int) -> str:
    h, stride, k, groups = family
    return f"conv/h{h}/s{stride}/k{k}/g{groups}/c{cin}-{cout}"


def add_key(h: int, channels: int) -> str:
    return f"add_relu/h{h}/c{channels}"


@torch.no_grad()
def named_units(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, Unit]]:
    """(module name, unit) for every Conv2d of `model` that runs, in module order."""
    heights: dict[str, int] = {}

    def record(name: str):
        def hook(_module, inputs, _output) -> None:  # None: the output stays as it is
            heights.setdefault(name, int(inputs[0].shape[-1]))
        return hook

    hooks = [module.register_forward_hook(record(name))
             for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    block_ends = {f"{name}.conv2" for name, module in model.named_modules()
                  if isinstance(module, BasicBlock)}
    return [(name, Unit(heights[name], module.in_channels, module.out_channels,
                        module.stride[0], module.kernel_size[0], module.groups,
                        "add_relu" if name in block_ends else "relu"))
            for name, module in model.named_modules()
            if isinstance(module, nn.Conv2d) and name in heights]
