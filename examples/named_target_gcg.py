"""Freeze research code that is not a library, with no edit to it: a GCG gradient step (examples/gcg_utils.py,
llm-attacks style, ``loss.backward()``) on a small random Llama, run as

    SBPATCH_TARGETS=gcg_utils:token_gradients python examples/named_target_gcg.py
    sbpatch run --target gcg_utils:token_gradients examples/named_target_gcg.py      # the same

It computes the token gradient as shipped (``sbpatch.paused()``) and through sbpatch, and prints whether they are
bit-identical, how many weights each left a ``.grad`` on, and whether the flags were restored. Offline: the model is
random-initialised from a config, the token ids are random.
"""

from __future__ import annotations

import torch
from gcg_utils import token_gradients  # bound after sbpatch wrapped it (the start-up hook watches gcg_utils)
from transformers import LlamaConfig, LlamaForCausalLM

import sbpatch

torch.set_num_threads(1)
torch.manual_seed(0)
config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64)
model = LlamaForCausalLM(config).eval()
input_ids = torch.randint(0, config.vocab_size, (24,))
control, target = slice(4, 14), slice(14, 20)  # the adversarial suffix, then the target string
loss_slice = slice(target.start - 1, target.stop - 1)
flags = [p.requires_grad for p in model.parameters()]


def step() -> tuple[torch.Tensor, int]:
    model.zero_grad(set_to_none=True)
    grad = token_gradients(model, input_ids, control, target, loss_slice)
    return grad, sum(p.grad is not None for p in model.parameters())


with sbpatch.paused():
    shipped, shipped_grads = step()
patched, patched_grads = step()
print(f"identical: {torch.equal(shipped, patched)}")
print(f"weights with .grad: as shipped {shipped_grads}, with sbpatch {patched_grads}")
print(f"flags restored: {[p.requires_grad for p in model.parameters()] == flags}")
print(f"frozen calls: {sbpatch.status()['targets'].calls}")
