"""The paper's models, built for any input shape and class count.

Every model takes ``in_shape = (C, H, W)`` (the shape of one sample, as :mod:`itop.app.data`
returns it; MNIST-1D is ``(1, 1, 40)``) and ``num_classes``, and returns logits.

- ``mlp``: LeNet-300-100 (two hidden layers of 300 and 100 units) on the flattened input.
- ``lenet5``: the Caffe LeNet-5 of the ITOP/SNIP code (conv 20, conv 50, 5×5 kernels without
  padding, max-pools, fc 500).
- ``cnn1d``: a 1-D CNN for MNIST-1D (three strided convolutions of 64/128/128 channels with
  batch norm, an fc hidden layer of 256), written with ``nn.Conv2d`` over ``(1, L)`` so that it
  sparsifies into :class:`itop.SparseConv2d`. Image inputs are read as ``(C, 1, H·W)``.
- ``vgg-c`` / ``vgg-d`` / ``vgg-like``: the VGG-16 variants of the SNIP/ITOP code (batch
  norm; VGG-C has 1×1 convolutions as the third layer of the last three stages; C and D have a
  512-512 classifier with batch norm, ``vgg-like`` one hidden layer of 512).
- ``resnet-18`` / ``resnet-34``: CIFAR-style ResNets (3×3 stem, no initial pooling).
- ``wrn-16-8`` / ``wrn-28-2``: Wide ResNets (pre-activation blocks, dropout 0.3 as in ITOP).

Small inputs: a spatial dimension of size 1 gets kernel size 1 and is never pooled or strided
(so 2-D models run on MNIST-1D's ``(1, 1, 40)``), and a dimension is only halved while it is at
least 2. Classifier widths are computed from a dry run of the feature extractor.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["MODELS", "build_model", "MLP", "LeNet5", "CNN1D", "VGG", "ResNet", "WideResNet"]

Shape = Tuple[int, int, int]


def _check_shape(in_shape: Sequence[int], num_classes: int) -> Shape:
    shape = tuple(int(s) for s in in_shape)
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise ValueError(f"in_shape must be (channels, height, width) of positive ints, "
                         f"got {tuple(in_shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return shape  # type: ignore[return-value]


def _kernel(k: int, hw: Tuple[int, int]) -> Tuple[int, int]:
    """Kernel size ``k`` along every spatial dimension larger than 1, 1 along the others."""
    return tuple(k if s > 1 else 1 for s in hw)  # type: ignore[return-value]


def _stride(hw: Tuple[int, int]) -> Tuple[int, int]:
    """Stride 2 along dimensions of size >= 2, 1 along the others."""
    return tuple(2 if s >= 2 else 1 for s in hw)  # type: ignore[return-value]


def _halve(hw: Tuple[int, int]) -> Tuple[int, int]:
    return tuple(s // 2 if s >= 2 else s for s in hw)  # type: ignore[return-value]


def _same_conv(cin: int, cout: int, k: int, hw: Tuple[int, int], stride: bool = False,
               bias: bool = False) -> nn.Conv2d:
    """A ``k × k`` convolution with "same" padding (stride 2 on dimensions >= 2 if asked)."""
    ks = _kernel(k, hw)
    st = _stride(hw) if stride else (1, 1)
    return nn.Conv2d(cin, cout, ks, stride=st, padding=tuple(x // 2 for x in ks), bias=bias)


def _flat_features(features: nn.Module, in_shape: Shape) -> int:
    """Number of features ``features`` produces for one sample of ``in_shape``."""
    was = features.training
    features.eval()
    with torch.no_grad():
        n = features(torch.zeros(1, *in_shape)).numel()
    features.train(was)
    return n


class MLP(nn.Module):
    """LeNet-300-100: ``flatten -> fc 300 -> ReLU -> fc 100 -> ReLU -> fc num_classes``.

    Args:
        in_shape: ``(C, H, W)`` of one sample.
        num_classes: number of classes.
        hidden: hidden widths (default ``(300, 100)``).
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int,
                 hidden: Sequence[int] = (300, 100)):
        super().__init__()
        shape = _check_shape(in_shape, num_classes)
        layers: List[nn.Module] = [nn.Flatten()]
        prev = math.prod(shape)
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU(inplace=True)]
            prev = h
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, num_classes]`` logits."""
        return self.net(x)


class LeNet5(nn.Module):
    """Caffe LeNet-5: conv 20 (5×5, no padding), max-pool, conv 50, max-pool, fc 500, fc out."""

    def __init__(self, in_shape: Sequence[int], num_classes: int):
        super().__init__()
        c, h, w = _check_shape(in_shape, num_classes)
        layers: List[nn.Module] = []
        hw = (h, w)
        cin = c
        for cout in (20, 50):
            ks = tuple(5 if s >= 5 else 1 for s in hw)
            layers += [nn.Conv2d(cin, cout, ks), nn.ReLU(inplace=True)]
            hw = tuple(s - k + 1 for s, k in zip(hw, ks))  # type: ignore[assignment]
            pool = tuple(2 if s >= 2 else 1 for s in hw)
            layers.append(nn.MaxPool2d(pool))
            hw = tuple(s // p for s, p in zip(hw, pool))  # type: ignore[assignment]
            cin = cout
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        n = _flat_features(self.features, (c, h, w))
        self.classifier = nn.Sequential(nn.Linear(n, 500), nn.ReLU(inplace=True),
                                        nn.Linear(500, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, num_classes]`` logits."""
        return self.classifier(self.features(x))


class CNN1D(nn.Module):
    """A 1-D CNN (MNIST-1D): three convolutions along the sequence, batch norm, fc 256, fc out.

    The input ``[B, C, H, W]`` is read as ``C`` channels over a sequence of length ``H·W``.
    Convolutions are ``nn.Conv2d`` with ``(1, k)`` kernels, so :func:`itop.sparsify` turns them
    into :class:`itop.SparseConv2d`.

    Args:
        in_shape, num_classes: as the other models.
        channels: output channels of the three convolutions (default ``(64, 128, 128)``;
            multiples of 16 so that block size 16 divides every conv but the first, with
            enough blocks per layer for block-16 DST at 90 % sparsity).
        hidden: width of the fc hidden layer.
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int,
                 channels: Sequence[int] = (64, 128, 128), hidden: int = 256):
        super().__init__()
        c, h, w = _check_shape(in_shape, num_classes)
        self.in_channels, self.length = c, h * w
        layers: List[nn.Module] = []
        cin, length = c, h * w
        for i, cout in enumerate(channels):
            k = 5 if i == 0 else 3
            k = min(k, length) | 1
            stride = 2 if length >= 2 else 1
            layers += [nn.Conv2d(cin, cout, (1, k), stride=(1, stride), padding=(0, k // 2),
                                 bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            length = (length + 2 * (k // 2) - k) // stride + 1
            cin = cout
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        n = cin * length
        self.classifier = nn.Sequential(nn.Linear(n, hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, num_classes]`` logits."""
        x = x.reshape(x.shape[0], self.in_channels, 1, self.length)
        return self.classifier(self.features(x))


_VGG_STAGES: Dict[str, List[Union[int, str, Tuple[int, int]]]] = {
    # (kernel, channels) tuples are the 1×1 convolutions of VGG-C
    "like": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
             512, 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
          512, 512, 512, "M"],
    "C": [64, 64, "M", 128, 128, "M", 256, 256, (1, 256), "M", 512, 512, (1, 512), "M",
          512, 512, (1, 512), "M"],
}


class VGG(nn.Module):
    """The VGG-16 variants of the SNIP/ITOP code: ``config`` is ``"C"``, ``"D"`` or ``"like"``.

    Convolutions (3×3, or 1×1 for the tuples of VGG-C) with batch norm and ReLU, max-pools
    (on dimensions >= 2), a global average pool, then the classifier: for C and D
    ``fc 512 -> ReLU -> BN -> fc 512 -> ReLU -> BN -> fc out``; for ``like``
    ``fc 512 -> ReLU -> BN -> fc out``.
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int, config: str = "D"):
        super().__init__()
        if config not in _VGG_STAGES:
            raise ValueError(f"config must be one of {sorted(_VGG_STAGES)}, got {config!r}")
        c, h, w = _check_shape(in_shape, num_classes)
        layers: List[nn.Module] = []
        hw, cin = (h, w), c
        for item in _VGG_STAGES[config]:
            if item == "M":
                layers.append(nn.MaxPool2d(tuple(2 if s >= 2 else 1 for s in hw)))
                hw = _halve(hw)
                continue
            k, cout = item if isinstance(item, tuple) else (3, item)
            layers += [_same_conv(cin, cout, k, hw), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        head: List[nn.Module] = [nn.Linear(cin, 512), nn.ReLU(inplace=True), nn.BatchNorm1d(512)]
        if config in ("C", "D"):
            head += [nn.Linear(512, 512), nn.ReLU(inplace=True), nn.BatchNorm1d(512)]
        head.append(nn.Linear(512, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, num_classes]`` logits."""
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convolutions with batch norm and a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, hw: Tuple[int, int], stride: bool):
        super().__init__()
        self.conv1 = _same_conv(cin, cout, 3, hw, stride=stride)
        self.bn1 = nn.BatchNorm2d(cout)
        hw2 = _halve(hw) if stride else hw
        self.conv2 = _same_conv(cout, cout, 3, hw2)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=_stride(hw) if stride else 1, bias=False),
                nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet with basic blocks: 3×3 stem of 64 channels (no pooling), four stages
    of 64/128/256/512 channels (``blocks`` per stage; stride 2 from the second stage on), global
    average pool, fc. ``blocks=(2, 2, 2, 2)`` is ResNet-18, ``(3, 4, 6, 3)`` ResNet-34."""

    def __init__(self, in_shape: Sequence[int], num_classes: int,
                 blocks: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        c, h, w = _check_shape(in_shape, num_classes)
        hw = (h, w)
        self.stem = nn.Sequential(_same_conv(c, 64, 3, hw), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True))
        stages: List[nn.Module] = []
        cin = 64
        for i, (n, cout) in enumerate(zip(blocks, (64, 128, 256, 512))):
            for j in range(n):
                stride = i > 0 and j == 0
                stages.append(_BasicBlock(cin, cout, hw, stride))
                if stride:
                    hw = _halve(hw)
                cin = cout
        self.layers = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, num_classes]`` logits."""
        return self.fc(self.pool(self.layers(self.stem(x))))


class _WideBlock(nn.Module):
    """Pre-activation wide basic block: BN-ReLU-conv3×3, dropout, BN-ReLU-conv3×3, shortcut."""

    def __init__(self, cin: int, cout: int, hw: Tuple[int, int], stride: bool, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _same_conv(cin, cout, 3, hw, stride=stride)
        hw2 = _halve(hw) if stride else hw
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _same_conv(cout, cout, 3, hw2)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=_stride(hw) if stride else 1,
                                      bias=False)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        o = self.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.dropout(self.relu(self.bn2(y))))
        return y + (x if isinstance(self.shortcut, nn.Identity) else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-width (Zagoruyko & Komodakis): ``(depth-4)/6`` pre-activation blocks per
    stage, widths ``16, 16·k, 32·k, 64·k``, dropout ``dropout`` (0.3 in ITOP)."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, depth: int = 16,
                 widen: int = 8, dropout: float = 0.3):
        super().__init__()
        c, h, w = _check_shape(in_shape, num_classes)
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        hw = (h, w)
        self.stem = _same_conv(c, 16, 3, hw)
        blocks: List[nn.Module] = []
        cin = 16
        for i, cout in enumerate((16 * widen, 32 * widen, 64 * widen)):
            for j in range(n):
                stride = i > 0 and j == 0
                blocks.append(_WideBlock(cin, cout, hw, stride, dropout))
                if stride:
                    hw = _halve(hw)
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, num_classes]`` logits."""
        return self.fc(self.head(self.blocks(self.stem(x))))


MODELS: Dict[str, Callable[[Shape, int], nn.Module]] = {
    "mlp": lambda s, n: MLP(s, n),
    "lenet5": lambda s, n: LeNet5(s, n),
    "cnn1d": lambda s, n: CNN1D(s, n),
    "vgg-c": lambda s, n: VGG(s, n, "C"),
    "vgg-d": lambda s, n: VGG(s, n, "D"),
    "vgg-like": lambda s, n: VGG(s, n, "like"),
    "resnet-18": lambda s, n: ResNet(s, n, (2, 2, 2, 2)),
    "resnet-34": lambda s, n: ResNet(s, n, (3, 4, 6, 3)),
    "wrn-16-8": lambda s, n: WideResNet(s, n, 16, 8),
    "wrn-28-2": lambda s, n: WideResNet(s, n, 28, 2),
}


def build_model(name: str, in_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build model ``name`` (a key of :data:`MODELS`) for samples of ``in_shape = (C, H, W)``.

    Raises:
        ValueError: on an unknown name or a bad shape/class count.
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](_check_shape(in_shape, num_classes), num_classes)
