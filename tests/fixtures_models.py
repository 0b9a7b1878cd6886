"""Users' own classifiers, as a build config names them (``[base] model =
"tests.fixtures_models:resnet"``): nothing in them knows about this project.

`resnet` is ResNet-style (He et al. 2016, the CIFAR layout shrunk): a stem, three stages of basic
blocks with identity and 1×1-projection skip connections, global average pooling and a linear
classifier. Its blocks call their layers as attributes (``self.bn1(self.conv1(x))``), not through
a Sequential, and it declares the classifier before the stem, so nothing may lean on module order.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the input (projected by a strided 1×1 conv when the shape
    changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """[N, C, H, W] pixels in [0, 1] → logits [N, num_classes]."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 8,
                 blocks: tuple[int, int, int] = (1, 1, 1)) -> None:
        super().__init__()
        self.fc = nn.Linear(4 * width, num_classes)  # declared first on purpose
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        layers, c = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2 ** i
            stage = [BasicBlock(c, c_out, stride=1 if i == 0 else 2)]
            stage += [BasicBlock(c_out, c_out) for _ in range(n - 1)]
            layers.append(nn.Sequential(*stage))
            c = c_out
        self.layer1, self.layer2, self.layer3 = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) / 0.25  # its own preprocessing: the family's clients send [0, 1] pixels
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet(num_classes: int = 10, in_channels: int = 3, width: int = 8) -> ResNet:
    """The factory a config names."""
    return ResNet(num_classes=num_classes, in_channels=in_channels, width=width)


class Untraceable(nn.Module):
    """A classifier torch.fx cannot trace: its forward branches on a tensor's value."""

    def __init__(self, num_classes: int = 3, in_channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 2:  # never true for pixels in [0, 1]: data-dependent control flow
            x = x / 2
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)))


def untraceable(num_classes: int = 3, in_channels: int = 3) -> Untraceable:
    return Untraceable(num_classes=num_classes, in_channels=in_channels)
