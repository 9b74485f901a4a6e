"""CIFAR ResNets of He et al. 2016 (sec. 4.2): 6n+2 layers, widths 16/32/64, option-A shortcuts.

Option A: the shortcut of a down-sampling block takes every second pixel and zero-pads the
channel axis. It is written here as an explicit module (`ZeroPadShortcut`) that carries its
channel mapping, because generic dependency graphs mistake a channel-axis pad for an
element-wise op (see docs/methods.md, "Option-A shortcuts and the dependency graph").
"""

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.registry import register


class ZeroPadShortcut(nn.Module):
    """Strided subsample + placement of the input channels into a wider, zero-filled output.

    `source_index[j]` is the input channel copied to output channel j, or `in_channels` for a
    zero channel. A fresh block places input channel i at output i + pad (option A). After
    channel slimming the mapping is whatever the kept channels of both sides imply, so the
    module stays exact for any pruning of its input and output groups.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"out_channels {out_channels} < in_channels {in_channels}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        pad = (out_channels - in_channels) // 2
        index = torch.full((out_channels,), in_channels, dtype=torch.long)
        index[pad : pad + in_channels] = torch.arange(in_channels)
        # persistent=False: the mapping is derived from the spec (and pruning history), not learned.
        self.register_buffer("source_index", index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # Append one zero channel, then gather: exact, and exports as Pad + Gather.
        x = F.pad(x, (0, 0, 0, 0, 0, 1))
        return torch.index_select(x, 1, self.source_index)

    def extra_repr(self) -> str:
        return f"{self.in_channels}->{self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        needs_shortcut = stride != 1 or in_channels != out_channels
        self.shortcut = (
            ZeroPadShortcut(in_channels, out_channels, stride) if needs_shortcut else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem conv(3->w) then three stages of n blocks at widths (w, 2w, 4w), global pool, linear."""

    def __init__(self, depth: int, num_classes: int = 10, base_width: int = 16):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        widths = (base_width, 2 * base_width, 4 * base_width)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_channels = [], widths[0]
        for stage, width in enumerate(widths):
            blocks = []
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(in_channels, width, width, stride))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(in_channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def _resnet(depth: int):
    def build(num_classes: int = 10, base_width: int = 16) -> CifarResNet:
        return CifarResNet(depth, num_classes, base_width)

    build.__doc__ = f"CIFAR ResNet-{depth} (option-A shortcuts)."
    return build


for _depth in (20, 32, 44, 56, 110):
    register(f"resnet{_depth}")(_resnet(_depth))
