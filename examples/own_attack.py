"""Your own attack code: sbpatch.frozen() freezes the model for a block or a function, and restores it exactly.

Run: python examples/own_attack.py
"""

import torch
import torch.nn.functional as F
import torchvision

import sbpatch

torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10).eval()
model.fc.bias.requires_grad_(False)  # frozen by the user: stays frozen
x, y = torch.rand(2, 3, 32, 32), torch.randint(0, 10, (2,))


@sbpatch.frozen(model)
def pgd(x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 5):
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        loss.backward()  # only x_adv.grad is computed: every weight is frozen
        x_adv = (x_adv.detach() + alpha * x_adv.grad.sign()).clamp(x - eps, x + eps).clamp(0, 1)
    return x_adv


x_adv = pgd(x, y)
print("max perturbation:", round(float((x_adv - x).abs().max()), 4))
print("weight gradients computed:", sum(p.grad is not None for p in model.parameters()))
print("fc.bias still frozen:", not model.fc.bias.requires_grad, end=" | ")
print("conv1 trainable again:", model.conv1.weight.requires_grad)
