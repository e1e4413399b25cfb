"""Plain ``nn.Module`` networks whose sparsifiable layers have channel counts divisible by 16.

Every constructor takes plain ints/floats/lists, so Hydra (``_target_``) and LightningCLI (``class_path``)
can build them. Input stems with 1 or 3 input channels cannot be N:M (too few input channels); SR-STE
reports them as skipped and keeps them dense, as is usual.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["CNN1D", "CifarResNet", "TransformerClassifier", "cnn1d", "resnet20", "resnet18", "transformer"]


def _positive_int(owner: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner} {name} must be an int >= 1, got {value!r}")
    return value


def _dropout(owner: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{owner} dropout must be a float in [0, 1), got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------- 1-D CNN
class CNN1D(nn.Module):
    """1-D CNN for signals ``[B, in_channels, length]`` (MNIST-1D: ``[B, 1, 40]``).

    ``conv(k) -> BN -> ReLU`` blocks; every block after the first has stride 2 when ``downsample`` is
    set, then the feature map is flattened into a hidden Linear layer and a Linear head.

    Args:
        in_channels: input channels.
        num_classes: output classes.
        length: input length (to size the flattened features).
        channels: output channels of the conv blocks (multiples of 16 keep every N:M with m <= 16 possible).
        kernel_size: odd conv kernel size.
        hidden: width of the hidden Linear layer (0: no hidden layer).
        dropout: dropout before the head.
        downsample: stride 2 in every block after the first.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        length: int = 40,
        channels: Sequence[int] = (32, 64, 128),
        kernel_size: int = 5,
        hidden: int = 128,
        dropout: float = 0.1,
        downsample: bool = True,
    ) -> None:
        super().__init__()
        owner = "CNN1D"
        in_channels = _positive_int(owner, "in_channels", in_channels)
        num_classes = _positive_int(owner, "num_classes", num_classes)
        length = _positive_int(owner, "length", length)
        kernel_size = _positive_int(owner, "kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"CNN1D kernel_size must be odd, got {kernel_size}")
        channels = [_positive_int(owner, "channels[]", c) for c in channels]
        if not channels:
            raise ValueError("CNN1D channels must list at least one conv block, got []")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
            raise ValueError(f"CNN1D hidden must be an int >= 0, got {hidden!r}")
        layers: list[nn.Module] = []
        c_in, size = in_channels, length
        for i, c in enumerate(channels):
            stride = 2 if downsample and i > 0 else 1
            layers += [nn.Conv1d(c_in, c, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
                       nn.BatchNorm1d(c), nn.ReLU(inplace=True)]
            c_in = c
            size = (size + 2 * (kernel_size // 2) - kernel_size) // stride + 1
        if size < 1:
            raise ValueError(f"CNN1D: length={length} is too short for {len(channels)} stride-2 blocks")
        self.features = nn.Sequential(*layers)
        flat = c_in * size
        head: list[nn.Module] = [nn.Flatten()]
        if hidden:
            head += [nn.Linear(flat, hidden), nn.ReLU(inplace=True)]
            flat = hidden
        head += [nn.Dropout(_dropout(owner, dropout)), nn.Linear(flat, num_classes)]
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.classifier(self.features(x))


# builders named like their config entries (``_target_: nm_lightning.models.cnn1d``); same signatures
cnn1d = CNN1D


# ---------------------------------------------------------------------------------------------- ResNets
class BasicBlock(nn.Module):
    """Two 3x3 convs with BN and an identity or 1x1-conv shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet for ``[B, in_channels, 32, 32]``: 3x3 stem (no max-pool), stages of BasicBlocks.

    Args:
        blocks: BasicBlocks per stage, e.g. ``[3, 3, 3]`` (ResNet-20) or ``[2, 2, 2, 2]`` (ResNet-18).
        widths: channels per stage (the stem has ``widths[0]``); the first stage has stride 1, the others 2.
        num_classes: output classes.
        in_channels: input channels.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (3, 3, 3),
        widths: Sequence[int] = (16, 32, 64),
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        owner = "CifarResNet"
        blocks = [_positive_int(owner, "blocks[]", b) for b in blocks]
        widths = [_positive_int(owner, "widths[]", w) for w in widths]
        if not blocks or len(blocks) != len(widths):
            raise ValueError(f"CifarResNet needs one width per stage, got blocks={blocks} and widths={widths}")
        _positive_int(owner, "num_classes", num_classes)
        _positive_int(owner, "in_channels", in_channels)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, c_in = [], widths[0]
        for i, (n_blocks, width) in enumerate(zip(blocks, widths, strict=True)):
            layers = []
            for j in range(n_blocks):
                layers.append(BasicBlock(c_in, width, stride=2 if (i > 0 and j == 0) else 1))
                c_in = width
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.layers(x)).flatten(1)
        return self.fc(x)


def resnet20(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    """ResNet-20 (He et al. 2016, CIFAR variant): 3 stages x 3 blocks, ``width``/2x/4x channels."""
    return CifarResNet([3, 3, 3], [width, 2 * width, 4 * width], num_classes, in_channels)


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> CifarResNet:
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool): 4 stages x 2 blocks, ``width`` to 8x channels."""
    return CifarResNet([2, 2, 2, 2], [width, 2 * width, 4 * width, 8 * width], num_classes, in_channels)


# ---------------------------------------------------------------------------------------------- transformer
class TransformerClassifier(nn.Module):
    """Transformer encoder classifier over patches of a signal or over token ids.

    Signals ``[B, in_channels, length]`` are cut into ``length / patch_size`` patches of
    ``in_channels * patch_size`` values, each embedded by a Linear layer (MNIST-1D: 10 patches of 4).
    With ``vocab_size`` set, inputs are token ids ``[B, length]`` embedded by ``nn.Embedding``. A learned
    position embedding is added, ``depth`` ``nn.TransformerEncoderLayer`` blocks (pre-norm, GELU) follow,
    and the mean over positions goes to a Linear head. Attention projections and the MLP Linears are the
    N:M-able layers (``dim`` and ``dim * mlp_ratio`` multiples of 16).

    Args:
        num_classes: output classes.
        length: sequence length (signal samples, or tokens).
        in_channels: signal channels (ignored with ``vocab_size``).
        patch_size: samples per patch (must divide ``length``; ignored with ``vocab_size``).
        dim: model width.
        depth: encoder layers.
        heads: attention heads (must divide ``dim``).
        mlp_ratio: MLP width as a multiple of ``dim``.
        dropout: dropout in the encoder layers.
        vocab_size: token vocabulary size for integer inputs (``None``: float signals).
    """

    def __init__(
        self,
        num_classes: int = 10,
        length: int = 40,
        in_channels: int = 1,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 2,
        dropout: float = 0.1,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        owner = "TransformerClassifier"
        for name, value in (("num_classes", num_classes), ("length", length), ("in_channels", in_channels),
                            ("patch_size", patch_size), ("dim", dim), ("depth", depth), ("heads", heads),
                            ("mlp_ratio", mlp_ratio)):
            _positive_int(owner, name, value)
        if dim % heads:
            raise ValueError(f"TransformerClassifier heads={heads} must divide dim={dim}")
        self.vocab_size = vocab_size
        self.patch_size = patch_size
        if vocab_size is not None:
            _positive_int(owner, "vocab_size", vocab_size)
            self.embed: nn.Module = nn.Embedding(vocab_size, dim)
            tokens = length
        else:
            if length % patch_size:
                raise ValueError(f"TransformerClassifier patch_size={patch_size} must divide length={length}")
            self.embed = nn.Linear(in_channels * patch_size, dim)
            tokens = length // patch_size
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * mlp_ratio, _dropout(owner, dropout), activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.vocab_size is not None:
            h = self.embed(x.long())
        else:
            if x.dim() == 2:
                x = x.unsqueeze(1)
            b, c, length = x.shape
            # [B, C, L] -> [B, L/p, C*p]
            x = x.reshape(b, c, length // self.patch_size, self.patch_size).permute(0, 2, 1, 3)
            h = self.embed(x.reshape(b, length // self.patch_size, c * self.patch_size))
        h = self.encoder(h + self.pos[:, : h.shape[1]])
        return self.head(self.norm(h).mean(dim=1))


transformer = TransformerClassifier
