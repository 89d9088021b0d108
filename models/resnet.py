"""CIFAR-style ResNets (3x3 stem, no max-pool) with an optional attention module in every block (or
in the blocks of some stages only: `att_stages`, a placement ablation; all four in the paper).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016; the CIFAR variant follows the
classic CIFAR-100 training repos. The attention module sits on the block's output width, after the
residual branch's last BN, before the shortcut add and the final ReLU (docs/reference.md, 1.2 Where
the attention module sits). `attention` is a constructor from models.attention.ATTENTIONS (called
with each block's output width), or None for the baseline.
"""
from typing import NamedTuple, Optional

import torch
from torch import nn

from models.attention import AttentionConstructor


class ResidualBlock(nn.Module):
    """relu(attention(residual(x)) + shortcut(x)): the attention sits on the residual branch's
    output."""

    def __init__(self, residual: nn.Module, in_planes: int, out_planes: int, stride: int,
                 attention: Optional[AttentionConstructor]):
        super().__init__()
        self.residual = residual
        self.attention = attention(out_planes) if attention else nn.Identity()
        self.shortcut = _shortcut(in_planes, out_planes, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.attention(self.residual(x)) + self.shortcut(x))


class BasicBlock(ResidualBlock):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int,
                 attention: Optional[AttentionConstructor]):
        out = planes * self.expansion
        super().__init__(nn.Sequential(
            nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, out, 3, padding=1, bias=False),
            nn.BatchNorm2d(out),
        ), in_planes, out, stride, attention)


class Bottleneck(ResidualBlock):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int,
                 attention: Optional[AttentionConstructor]):
        out = planes * self.expansion
        super().__init__(nn.Sequential(
            nn.Conv2d(in_planes, planes, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, out, 1, bias=False),
            nn.BatchNorm2d(out),
        ), in_planes, out, stride, attention)


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_planes))


# the four stages' planes in every network of the paper; the stem has the first
WIDTHS = (64, 128, 256, 512)


class ResNet(nn.Module):
    """`att_stages`: the stages (1-4) whose blocks get the attention module; all four in the paper.
    `widths`: the stages' planes (the stem has the first); 64 to 512 in every network of the paper,
    narrower for a small ResNet that checks a setup quickly (the test suite trains one)."""

    def __init__(self, block, num_blocks, num_classes: int = 100,
                 attention: Optional[AttentionConstructor] = None, att_stages=(1, 2, 3, 4),
                 widths=WIDTHS):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        in_planes = widths[0]
        stages = []
        for stage, (planes, blocks, stride) in enumerate(zip(widths, num_blocks, (1, 2, 2, 2)), 1):
            layers = []
            for i in range(blocks):
                module = attention if stage in att_stages else None
                layers.append(block(in_planes, planes, stride if i == 0 else 1, module))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.pool(x).flatten(1))


class ResNetSpec(NamedTuple):
    block: type
    blocks: tuple[int, int, int, int]  # per stage
    widths: tuple[int, int, int, int] = WIDTHS


# name (the `-net` choice) -> its blocks
RESNETS = {
    "resnet18": ResNetSpec(BasicBlock, (2, 2, 2, 2)),
    "resnet34": ResNetSpec(BasicBlock, (3, 4, 6, 3)),
    "resnet50": ResNetSpec(Bottleneck, (3, 4, 6, 3)),
    "resnet101": ResNetSpec(Bottleneck, (3, 4, 23, 3)),
    "resnet152": ResNetSpec(Bottleneck, (3, 8, 36, 3)),
}


def resnet(name: str, num_classes: int = 100, attention: Optional[AttentionConstructor] = None,
           stages=(1, 2, 3, 4)) -> ResNet:
    spec = RESNETS[name]
    return ResNet(spec.block, spec.blocks, num_classes, attention, stages, spec.widths)
