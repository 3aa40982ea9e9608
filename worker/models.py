"""Small models written here (torchvision is not available beside the CPU torch): logistic regression, MLP,
small CNN, ResNet-20 and ResNet-18 for 32×32 inputs. ResNets use GroupNorm by default: IVON does poorly with
BatchNorm's batch statistics."""

from __future__ import annotations

from torch import Tensor, nn


def logistic_regression(in_features: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


def mlp(in_features: int, num_classes: int, hidden: tuple[int, ...] = (128,), activation: str = "relu") -> nn.Module:
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
    if activation not in acts:
        raise ValueError(f"Invalid activation: {activation!r} (must be one of {sorted(acts)})")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), acts[activation]()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def small_cnn(in_channels: int, num_classes: int, side: int, width: int = 16) -> nn.Module:
    """Two conv-pool stages and a linear head; ``side`` is the input's height (= width)."""
    final = side // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * final * final, num_classes),
    )


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"Invalid norm: {kind!r} (must be 'group', 'batch' or 'none')")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = _norm(norm, cout)
        self.short = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(norm, cout))
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.n1(self.conv1(x)))
        return self.act(self.n2(self.conv2(out)) + self.short(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3×3 stem, stages of BasicBlocks, global average pool, linear head."""

    def __init__(self, blocks: tuple[int, ...], widths: tuple[int, ...], num_classes: int = 10,
                 in_channels: int = 3, norm: str = "group"):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), _norm(norm, widths[0]),
                                  nn.ReLU())
        layers, cin = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1, norm))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


def resnet20(num_classes: int = 10, in_channels: int = 3, norm: str = "group") -> ResNet:
    return ResNet((3, 3, 3), (16, 32, 64), num_classes, in_channels, norm)


def resnet18(num_classes: int = 10, in_channels: int = 3, norm: str = "group") -> ResNet:
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels, norm)
