"""Quick start: enable sbpatch, run a torchattacks attack, check it is identical to the unpatched one and faster.

Run: python examples/quickstart.py
"""

import time

import torch
import torchattacks
import torchvision

import sbpatch

sbpatch.enable()  # every supported library that is installed, now or when imported

torch.set_num_threads(1)  # the CPU-time ratio below is measured on one thread, as the README's figures are
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10).eval()
images, labels = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
attack = torchattacks.CW(model, steps=5)  # CW calls loss.backward(): freezing saves the weight gradients


def timed(fn):
    torch.manual_seed(0)
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


with sbpatch.paused():  # exactly what the library does as shipped
    attack(images, labels)  # warm-up
    shipped, t_shipped = timed(lambda: attack(images, labels))
leaked = sum(p.grad is not None for p in model.parameters())
model.zero_grad(set_to_none=True)

patched, t_patched = timed(lambda: attack(images, labels))
print("identical:", torch.equal(shipped, patched))
print(f"parameters with .grad left by the attack: as shipped {leaked}, with sbpatch "
      f"{sum(p.grad is not None for p in model.parameters())}")
print(f"CPU time: as shipped {t_shipped:.2f} s, with sbpatch {t_patched:.2f} s ({t_shipped / t_patched:.2f}x)")
print(sbpatch.status())
