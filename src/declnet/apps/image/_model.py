"""ResNet-18 with an optional Lp projection before the classifier (paper §7, Table 6).

The backbone uses torchvision's module names (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0``, ``fc``, ...), so a torchvision ResNet-18 state dict loads into
:func:`resnet18` with ``projection="none"`` as it is, and into the projected variants with
``strict=False`` (only the feature normalisation's running statistics are then missing).
torchvision itself is never imported.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = [
    "PROJECTIONS",
    "BasicBlock",
    "ResNet",
    "default_radius",
    "make_projection",
    "parse_projection",
    "resnet18",
]

#: The projection choices of Table 6, as accepted by ``--projection``.
PROJECTIONS: tuple[str, ...] = (
    "none",
    "l1_sphere",
    "l1_ball",
    "l2_sphere",
    "l2_ball",
    "linf_sphere",
    "linf_ball",
)

_P_BY_NAME = {"l1": 1.0, "l2": 2.0, "linf": math.inf}

# The paper's radii ("pre-scaling" factors) at feature width 512, for p = 1, 2, inf.
_PAPER_WIDTH = 512
_PAPER_RADIUS = {1.0: 250.0, 2.0: 15.0, math.inf: 3.0}


def parse_projection(name: str) -> Optional[tuple[float, str]]:
    """Split a projection name into its norm and set.

    Args:
        name: One of :data:`PROJECTIONS`, e.g. ``"l2_ball"``.

    Returns:
        ``None`` for ``"none"``, otherwise ``(p, kind)`` with ``p`` in ``{1.0, 2.0, inf}`` and
        ``kind`` in ``{"sphere", "ball"}``.

    Raises:
        ValueError: If ``name`` is not one of :data:`PROJECTIONS`.

    Example:
        >>> parse_projection("linf_sphere")
        (inf, 'sphere')
    """
    if name not in PROJECTIONS:
        raise ValueError(
            f"unknown projection {name!r}; expected one of {', '.join(PROJECTIONS)}"
        )
    if name == "none":
        return None
    norm, kind = name.split("_")
    return _P_BY_NAME[norm], kind


def default_radius(projection: str, feature_dim: int) -> Optional[float]:
    """The paper's radius for a projection, rescaled to another feature width.

    The paper projects batch-normalised 512-d features onto radius 250 (L1), 15 (L2) and
    3 (L∞), about two thirds of the median feature norm. For roughly standardised features
    the L1 norm grows like ``d``, the L2 norm like ``sqrt(d)`` and the L∞ norm like
    ``sqrt(log d)``, so the radii are scaled by those factors:
    ``250 d/512``, ``15 sqrt(d/512)`` and ``3 sqrt(log d / log 512)``.

    Args:
        projection: One of :data:`PROJECTIONS`.
        feature_dim: Width ``d`` of the features being projected (``8 * width`` for ResNet-18).

    Returns:
        The radius, or ``None`` for ``"none"``.

    Raises:
        ValueError: For an unknown projection or a ``feature_dim`` below 2.

    Example:
        >>> default_radius("l2_ball", 512)
        15.0
    """
    parsed = parse_projection(projection)
    if parsed is None:
        return None
    if feature_dim < 2:
        raise ValueError(f"feature_dim must be at least 2, got {feature_dim}")
    p, _ = parsed
    ratio = feature_dim / _PAPER_WIDTH
    if p == 1.0:
        scale = ratio
    elif p == 2.0:
        scale = math.sqrt(ratio)
    else:
        scale = math.sqrt(math.log(feature_dim) / math.log(_PAPER_WIDTH))
    return _PAPER_RADIUS[p] * scale


def make_projection(
    projection: str, feature_dim: int, radius: Optional[float] = None, masked: bool = False
) -> nn.Module:
    """The projection module for a projection name.

    Args:
        projection: One of :data:`PROJECTIONS`.
        feature_dim: Width of the features, used for the default radius.
        radius: Radius of the sphere or ball; ``None`` for :func:`default_radius`.
        masked: Use the plateau-free (masked) gradient of Table 2 for p = 1 and ∞.

    Returns:
        ``nn.Identity()`` for ``"none"``, else a ``declnet.layers.LpProjection`` mapping
        ``(B, feature_dim)`` to ``(B, feature_dim)``.

    Raises:
        ValueError: For an unknown projection or a radius that is not positive.
        ImportError: If ``declnet.layers.LpProjection`` is not available.
    """
    parsed = parse_projection(projection)
    if parsed is None:
        return nn.Identity()
    if radius is None:
        radius = default_radius(projection, feature_dim)
    if not radius > 0:
        raise ValueError(f"radius must be positive, got {radius}")
    try:
        from declnet.layers import LpProjection
    except ImportError as error:  # pragma: no cover - depends on the installed version
        raise ImportError(
            f"--projection {projection} needs declnet.layers.LpProjection, which this "
            "installation of declnet lacks; use --projection none or update declnet"
        ) from error
    p, kind = parsed
    return LpProjection(p, kind=kind, radius=float(radius), masked=masked)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """ResNet's two-convolution residual block (He et al., 2016), torchvision's layout.

    Args:
        in_channels: Channels of the input ``(B, in_channels, H, W)``.
        channels: Channels of the output ``(B, channels, H / stride, W / stride)``.
        stride: Stride of the first convolution; with a change of shape the shortcut is a
            strided 1×1 convolution and a BatchNorm (``downsample``).
    """

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block: ``(B, C_in, H, W) -> (B, C_out, H', W')``."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    """A ResNet with BasicBlocks and an optional projection head.

    The head is ``fc(projection(feature_norm(avgpool(features))))``. Without a projection,
    ``feature_norm`` and ``projection`` are identities and the network is torchvision's
    ResNet. With one, ``feature_norm`` is ``BatchNorm1d(d, affine=False)`` (standardised
    features, no learnable parameters) and ``projection`` is ``LpProjection``, so the variants
    have the same parameters as the baseline (paper §7).

    Args:
        layers: Blocks per stage, ``[2, 2, 2, 2]`` for ResNet-18.
        num_classes: Number of classes ``K``.
        width: Channels of the first stage; stages have ``width * (1, 2, 4, 8)`` channels and
            the features have ``d = 8 * width`` entries (torchvision: 64).
        in_channels: Channels of the input images (3 for RGB, 1 for grey).
        small_input: Use a 3×3 stride-1 stem without max-pooling, for images of 8–32 pixels,
            instead of the 7×7 stride-2 convolution and max-pool for 224×224 images.
        projection: One of :data:`PROJECTIONS`.
        radius: Radius of the projection; ``None`` for :func:`default_radius`.
        masked: Plateau-free gradient for the L1 and L∞ projections.

    Shapes:
        input ``(B, in_channels, H, W)`` → logits ``(B, K)``;
        :meth:`features` gives ``(B, d)`` before the head.

    Example:
        >>> model = ResNet([2, 2, 2, 2], num_classes=10, width=8, in_channels=1,
        ...                small_input=True)
        >>> model(torch.randn(4, 1, 28, 28)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        layers: list[int],
        num_classes: int = 1000,
        width: int = 64,
        in_channels: int = 3,
        small_input: bool = False,
        projection: str = "none",
        radius: Optional[float] = None,
        masked: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if width < 1:
            raise ValueError(f"width must be a positive integer, got {width}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels}")
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, got {layers}")
        self.feature_dim = 8 * width
        self.projection_name = projection
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        channels = width
        stages = []
        for stage, blocks in enumerate(layers):
            out_channels = width * 2**stage
            stride = 1 if stage == 0 else 2
            stage_blocks = [BasicBlock(channels, out_channels, stride)]
            stage_blocks += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage_blocks))
            channels = out_channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        if projection == "none":
            self.feature_norm: nn.Module = nn.Identity()
        else:
            parse_projection(projection)  # validate before building anything else
            self.feature_norm = nn.BatchNorm1d(self.feature_dim, affine=False)
        self.projection = make_projection(projection, self.feature_dim, radius, masked)
        self.fc = nn.Linear(self.feature_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He initialisation for convolutions, unit BatchNorms, as torchvision does.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features: ``(B, C, H, W) -> (B, d)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Normalise, project and classify: ``(B, d) -> (B, K)``."""
        return self.fc(self.projection(self.feature_norm(features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores (logits) ``(B, K)`` for images ``(B, in_channels, H, W)``."""
        if x.dim() != 4:
            raise ValueError(
                f"expected images of shape (B, C, H, W), got shape {tuple(x.shape)}"
            )
        return self.head(self.features(x))


def resnet18(
    num_classes: int = 1000,
    *,
    width: int = 64,
    in_channels: int = 3,
    small_input: bool = False,
    projection: str = "none",
    radius: Optional[float] = None,
    masked: bool = False,
) -> ResNet:
    """ResNet-18 (BasicBlock, ``[2, 2, 2, 2]``) with an optional Lp projection head.

    At ``width=64`` and 1000 classes it has torchvision's 11,689,512 parameters, whatever the
    projection (the projection and its BatchNorm add none).

    Args:
        num_classes: Number of classes ``K``.
        width: Channels of the first stage; features have ``8 * width`` entries.
        in_channels: Image channels.
        small_input: 3×3 stride-1 stem without max-pool, for small images (e.g. 28×28).
        projection: One of :data:`PROJECTIONS`.
        radius: Radius of the projection; ``None`` for :func:`default_radius`.
        masked: Plateau-free gradient for the L1 and L∞ projections.

    Returns:
        A :class:`ResNet` mapping ``(B, in_channels, H, W)`` to logits ``(B, K)``.

    Example:
        >>> sum(p.numel() for p in resnet18().parameters())
        11689512
    """
    return ResNet(
        [2, 2, 2, 2],
        num_classes=num_classes,
        width=width,
        in_channels=in_channels,
        small_input=small_input,
        projection=projection,
        radius=radius,
        masked=masked,
    )
