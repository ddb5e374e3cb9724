"""A toy attack library, standing for yours: an FGSM that calls ``loss.backward()`` with the model's weights live."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fgsm(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    F.cross_entropy(model(x), y).backward()
    return (x + eps * x.grad.sign()).clamp(0, 1).detach()


class PGD:
    def __init__(self, model: torch.nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 3) -> None:
        self.model, self.eps, self.alpha, self.steps = model, eps, alpha, steps

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = x.clone()
        for _ in range(self.steps):
            x_adv = fgsm(self.model, x_adv, y, self.alpha)
            x_adv = torch.min(torch.max(x_adv, x - self.eps), x + self.eps)
        return x_adv
