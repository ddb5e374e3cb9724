"""The victim models, the data, and the hand-written "limit" attack (imports torch; loaded only when benchmarking)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import sbpatch
from sbpatch.bench.workloads import MODELS, NUM_CLASSES


class SmallCNN(nn.Module):
    """Two conv + batch-norm blocks and a linear head: a fast model for smoke runs and tests."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(32 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def build_model(name: str, image_size: int, num_classes: int = NUM_CLASSES, seed: int = 0) -> nn.Module:
    """A random-initialised victim model in eval mode (no weights are downloaded)."""
    torch.manual_seed(seed)
    if name == "cnn":
        model: nn.Module = SmallCNN(num_classes)
    elif name == "vit_b_16":
        if image_size % 16:
            raise ValueError(f"vit_b_16 needs an image size divisible by 16, got {image_size}")
        model = torchvision.models.vit_b_16(weights=None, image_size=image_size, num_classes=num_classes)
        with torch.no_grad():  # torchvision zero-initialises the head: every logit and gradient would be 0
            model.heads.head.weight.normal_(0, 0.02)
    elif name in MODELS:
        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    else:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    return model.eval()


def make_data(
    batch_size: int, image_size: int, device: str = "cpu", seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images in [0, 1] (3 channels) and labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, 3, image_size, image_size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
    return x.to(device), y.to(device)


def limit_attack(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, eps: float = 8 / 255, alpha: float = 2 / 255
) -> Callable[[], Any]:
    """The lower bound: a hand-written L-inf PGD with frozen parameters and ``torch.autograd.grad`` (same steps).

    Freezing uses :func:`sbpatch.frozen` (kernel-preserving rules included), so on a ViT it is the fastest variant.
    """

    def run() -> torch.Tensor:
        with sbpatch.frozen(model):
            x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
            for _ in range(steps):
                x_adv.requires_grad_(True)
                loss = F.cross_entropy(model(x_adv), y)
                (grad,) = torch.autograd.grad(loss, x_adv)
                x_adv = x_adv.detach() + alpha * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
            return x_adv

    return run
