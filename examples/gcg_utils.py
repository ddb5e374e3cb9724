"""An llm-attacks-style GCG helper, as research code has it (llm_attacks/minimal_gcg/opt_utils.py, MIT licence):
the gradient of the target loss with respect to a one-hot token matrix, through ``loss.backward()`` with every
weight of the model live. Nothing here knows sbpatch: ``SBPATCH_TARGETS=gcg_utils:token_gradients`` freezes it.
"""

from __future__ import annotations

import torch
from torch import nn


def token_gradients(model: nn.Module, input_ids: torch.Tensor, input_slice: slice, target_slice: slice,
                    loss_slice: slice) -> torch.Tensor:
    """Gradients of the loss on ``target_slice`` with respect to the one-hot tokens of ``input_slice``."""
    embed_weights = model.get_input_embeddings().weight
    one_hot = torch.zeros(input_ids[input_slice].shape[0], embed_weights.shape[0], device=model.device,
                          dtype=embed_weights.dtype)
    one_hot.scatter_(1, input_ids[input_slice].unsqueeze(1),
                     torch.ones(one_hot.shape[0], 1, device=model.device, dtype=embed_weights.dtype))
    one_hot.requires_grad_()
    input_embeds = (one_hot @ embed_weights).unsqueeze(0)
    embeds = model.get_input_embeddings()(input_ids.unsqueeze(0)).detach()
    full_embeds = torch.cat([embeds[:, : input_slice.start, :], input_embeds, embeds[:, input_slice.stop :, :]], dim=1)
    logits = model(inputs_embeds=full_embeds).logits
    targets = input_ids[target_slice]
    loss = nn.CrossEntropyLoss()(logits[0, loss_slice, :], targets)
    loss.backward()
    grad = one_hot.grad.clone()
    return grad / grad.norm(dim=-1, keepdim=True)
