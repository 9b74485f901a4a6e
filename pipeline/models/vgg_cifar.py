"""CIFAR VGG with BatchNorm (the layout used by the network-slimming and PDD papers).

Configurations A/B/D/E of Simonyan & Zisserman with 3x3 conv-BN-ReLU, max-pool between stages,
and a single linear classifier on the 512-d pooled feature (the usual CIFAR simplification).
"""

import torch
from torch import nn

from pipeline.models.registry import register

POOL = "M"
VGG_LAYOUTS: dict[int, list[int | str]] = {
    11: [64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL],
    13: [64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL],
    16: [64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL,
         512, 512, 512, POOL],
    19: [64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL,
         512, 512, 512, 512, POOL],
}


class CifarVGG(nn.Module):
    """VGG-BN feature extractor, global average pool, linear classifier."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if depth not in VGG_LAYOUTS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_LAYOUTS)}, got {depth}")
        layers: list[nn.Module] = []
        in_channels = 3
        for item in VGG_LAYOUTS[depth]:
            if item == POOL:
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(in_channels, item, 3, padding=1, bias=False),
                       nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
            in_channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


def _vgg(depth: int):
    def build(num_classes: int = 10) -> CifarVGG:
        return CifarVGG(depth, num_classes)

    build.__doc__ = f"CIFAR VGG-{depth} with BatchNorm."
    return build


for _depth in VGG_LAYOUTS:
    register(f"vgg{_depth}")(_vgg(_depth))
