"""Adversarial training with an unchanged library attack: the attack runs frozen, the training step does not.

As shipped, torchattacks' CW (like ART, foolbox, advertorch, cleverhans, deeprobust attacks) leaves weight gradients
in param.grad; a loop that zeroes gradients before the attack would add them to its update. With sbpatch the attack
leaves none, so the update is the one the loop meant. Run: python examples/adversarial_training.py
"""

import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

import sbpatch

sbpatch.enable("torchattacks")
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
attack = torchattacks.CW(model, steps=3)
x, y = torch.rand(16, 3, 16, 16), torch.randint(0, 10, (16,))

for step in range(3):
    model.train()
    optimizer.zero_grad()
    x_adv = attack(x, y)  # frozen: computes no weight gradient, leaves param.grad as it was (None)
    assert all(p.grad is None for p in model.parameters())
    loss = F.cross_entropy(model(x_adv), y)
    loss.backward()  # not frozen: the training step gets its gradients
    optimizer.step()
    print(f"step {step}: adversarial loss {loss.item():.4f}")
print("frozen attack calls:", sbpatch.status()["torchattacks"].calls)
