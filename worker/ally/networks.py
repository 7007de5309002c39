"""Networks split as in the paper: a backbone f_phi (the embedding) and a prediction head f_psi."""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock


class Network(nn.Module):
    """`forward(x) = head(embed(x))`; the embedding feeds the dual head and the strategies."""

    embedding_dim: int
    head: nn.Linear

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class MLP(Network):
    """The paper's MLP for MNIST and PTD: two hidden ReLU layers of 256; embedding = last hidden."""

    def __init__(self, in_features: int, num_outputs: int, hidden: int = 256, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.backbone = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, num_outputs)
        self.embedding_dim = hidden

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


class CifarResNet18(Network):
    """ResNet-18 for 32×32 images: 3×3 stem, no max-pool, stage widths w, 2w, 4w, 8w.

    The default w = 16 gives the 128-d embedding the paper and its authors' code use
    (about 0.7M parameters, which keeps CPU training practical).
    """

    def __init__(self, num_outputs: int, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages, planes = [], width
        for index in range(4):
            out = width * 2**index
            stride = 1 if index == 0 else 2
            stages.append(_stage(planes, out, stride))
            planes = out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(planes, num_outputs)
        self.embedding_dim = planes

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x)))


def _stage(in_planes: int, planes: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or in_planes != planes:
        downsample = nn.Sequential(
            nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
        )
    return nn.Sequential(
        BasicBlock(in_planes, planes, stride, downsample), BasicBlock(planes, planes)
    )


NETWORKS = ("mlp", "resnet18")


def make_network(spec: str, input_shape: tuple[int, ...], num_outputs: int) -> Network:
    """Build `spec` ("mlp", "resnet18" or "auto": ResNet-18 for colour images, else the MLP)."""
    if spec == "auto":
        spec = "resnet18" if len(input_shape) == 3 and input_shape[0] == 3 else "mlp"
    if spec == "mlp":
        return MLP(math.prod(input_shape), num_outputs)
    if spec == "resnet18":
        if len(input_shape) != 3:
            raise ValueError(f"resnet18 needs [C, H, W] images, got input shape {input_shape}")
        return CifarResNet18(num_outputs, in_channels=input_shape[0])
    raise ValueError(f"unknown network {spec!r}; choose one of: auto, {', '.join(NETWORKS)}")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def infer(
    model: Network, x: torch.Tensor, batch_size: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings [N, d] and outputs [N, C] of `x` in eval mode, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    embeddings, outputs = [], []
    for chunk in x.split(batch_size):
        h = model.embed(chunk.to(device, non_blocking=True))
        embeddings.append(h)
        outputs.append(model.head(h))
    return torch.cat(embeddings), torch.cat(outputs)
