"""MobileNetV2 with an optional attention module in its inverted-residual blocks.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018. Layers as in
torchvision's `mobilenet_v2` (width 1.0: 3,504,872 parameters with 1000 classes).

Attention placement: in each inverted-residual block, on the expanded width, after the depthwise
conv + BN + ReLU6 and before the linear 1x1 projection. EMA, as in its authors' MobileNetV2, only
where the expanded width is above 144 channels (EMA_MIN_WIDTH): the 17 blocks have expanded widths
32, 96, 144, 144, 192, 192, 192, 384, ..., 960, so the first four have none and the other 13 have
one; the other modules go in every block (docs/reference.md, 1.3 MobileNetV2).

Two shapes: `cifar=True` (stride 1 in the stem and in the first stride-2 stage, so 32x32 inputs end
at 4x4; what train_cifar100.py trains) and `cifar=False` (the ImageNet network, 224x224 inputs, for
the parameter/FLOPs report beside the paper's ImageNet rows).
"""
from typing import Optional

import torch
from torch import nn

from models.attention import EMA, AttentionConstructor

EMA_MIN_WIDTH = 145  # EMA only on expanded widths above 144 (the authors' placement)

# (expansion t, output channels c, blocks n, stride of the first block s), as in the paper's Table
# 2.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
          (6, 320, 1, 1))


def conv_bn_relu6(in_channels, out_channels, kernel_size, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2,
                  groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int,
                 attention: Optional[nn.Module]):
        super().__init__()
        hidden = in_channels * expansion
        layers = [conv_bn_relu6(in_channels, hidden, 1)] if expansion != 1 else []
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),  # depthwise
            attention or nn.Identity(),
            nn.Conv2d(hidden, out_channels, 1, bias=False),  # linear projection
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 100, attention: Optional[AttentionConstructor] = None,
                 cifar: bool = True):
        """`attention`: a constructor from models.attention.ATTENTIONS (called with each block's
        expanded width), or None for the baseline."""
        super().__init__()
        min_width = EMA_MIN_WIDTH if attention is EMA else 0
        in_channels = 32
        features = [conv_bn_relu6(3, in_channels, 3, stride=1 if cifar else 2)]
        self.stage_ends = {}  # stage name -> index in `features` of its last block
        for index, (t, c, n, s) in enumerate(STAGES):
            if cifar and index == 1:
                s = 1  # the first stride-2 stage keeps 32x32 inputs at 32x32: 4x4 at the end
            for i in range(n):
                hidden = in_channels * t
                module = attention(hidden) if attention and hidden >= min_width else None
                features.append(InvertedResidual(in_channels, c, s if i == 0 else 1, t, module))
                in_channels = c
            self.stage_ends[f"stage{index + 1}"] = len(features) - 1
        features.append(conv_bn_relu6(in_channels, 1280, 1))
        self.stage_ends["head"] = len(features) - 1
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))
