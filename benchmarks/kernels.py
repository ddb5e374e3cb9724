"""Where does ``requires_grad`` change PyTorch's kernel? Measured frozen vs live, case by case (docs/kernels.md).

For every case (a small module plus an input) and two passes:

* ``grad``:  the input requires grad, forward then ``(out * r).sum().backward()``; compares the output and x.grad;
* ``query``: grad mode on, no input needs grad (a black-box query); compares the output;

three parameter states are run from the same seeds:

* ``live``:    every parameter requires grad (the model as shipped);
* ``frozen``:  every parameter frozen (the paper's one-liner);
* ``sbpatch``: every parameter live, and the pass runs inside ``sbpatch.frozen(model)`` -- the real implementation
  (sbpatch/freeze.py) with its run-time kernel-preserving rules (``sbpatch.freeze.builtin_rules()``); what it kept
  live is recorded. Its learned rules persist across calls, as in a real attack.

Per case and pass it records: bit-identity of each state with live (``torch.equal`` on every output), the
forward's ATen ops that differ from live (a ``torch.profiler`` trace: which kernel ran), and the CPU time of one
pass per state (medians of interleaved repeats, ``time.process_time``). A separate sweep counts the ``nn.Linear``
shapes on a transposed input whose output differs frozen vs live.

Run: OMP_NUM_THREADS=1 python benchmarks/kernels.py [--threads 1] [--repeats 15] [--only SUBSTR] [--compile]
Writes benchmarks/results/kernels.json. About a minute on one core; ``--compile`` adds two torch.compile cases
(inductor, needs a C++ compiler; a few minutes more).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # measure this checkout's sbpatch, not an installed copy
    sys.path.insert(0, REPO)

import sbpatch  # noqa: E402

STATES = ("live", "frozen", "sbpatch")

# ---------------------------------------------------------------------------------------------------------------
# parameter states


@contextlib.contextmanager
def state(model: nn.Module, name: str, keep: tuple[str, ...] = ()) -> Iterator[list[str]]:
    """Put every parameter of ``model`` in state ``name`` for the block, then restore.

    live: all require grad; frozen: none; sbpatch: all live, then the block runs inside
    ``sbpatch.frozen(model, keep=keep)`` (the real implementation, with its run-time rules). Yields a list that, on
    leaving an ``sbpatch`` block, holds the names of the parameters live at the end of the call (what sbpatch kept).
    """
    params = list(model.parameters())
    before = [p.requires_grad for p in params]
    kept: list[str] = []
    try:
        for p in params:
            p.requires_grad_(name != "frozen")
        if name == "sbpatch":
            with sbpatch.frozen(model, keep=keep):
                yield kept
                kept.extend(n for n, p in model.named_parameters() if p.requires_grad)
        else:
            yield kept
    finally:
        for p, rg in zip(params, before):
            p.requires_grad_(rg)


# ---------------------------------------------------------------------------------------------------------------
# cases


@dataclass
class Case:
    id: str
    entry: str  # the docs/kernels.md entry it belongs to
    what: str
    build: Callable[[], tuple[nn.Module, Tensor]]  # seeded inside: (model, input)
    passes: tuple[str, ...] = ("grad", "query")
    train: bool = False
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    heavy: bool = False  # a whole model: a third of the timed rounds
    order: tuple[str, ...] = STATES  # the order of the first (compared) passes; matters only under torch.compile
    keep: tuple[str, ...] = ()  # passed as sbpatch.frozen(model, keep=...): a user's remedy for an uncovered case
    results: dict[str, Any] = field(default_factory=dict)


class Lambda(nn.Module):
    """A module whose forward is ``fn(self, x)``; parameters are given as keyword tensors."""

    def __init__(self, fn: Callable[..., Tensor], modules: dict[str, nn.Module] | None = None, **params: Tensor):
        super().__init__()
        self.fn = fn
        for k, m in (modules or {}).items():
            self.add_module(k, m)
        for k, v in params.items():
            self.register_parameter(k, nn.Parameter(v))

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self, x)


class TokenMix(nn.Module):
    """A custom layer multiplying a raw parameter with its input (``self.w @ x``), with a keep rule for ``w``."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: Tensor) -> Tensor:
        return self.w @ x


sbpatch.add_keep_rule(TokenMix, "w")


def seeded(fn: Callable[[], tuple[nn.Module, Tensor]]) -> Callable[[], tuple[nn.Module, Tensor]]:
    def build() -> tuple[nn.Module, Tensor]:
        torch.manual_seed(0)
        return fn()

    return build


def first(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def cases(include_compile: bool) -> list[Case]:
    B, C, N, Dout = 4, 256, 49, 10  # a shape where the Linear fold shows (see the sweep)
    out: list[Case] = []

    def add(id_: str, entry: str, what: str, fn: Callable[[], tuple[nn.Module, Tensor]], **kw: Any) -> None:
        out.append(Case(id_, entry, what, seeded(fn), **kw))

    # -- matmul / linear folding ----------------------------------------------------------------------------------
    add(
        "linear_transposed_3d",
        "matmul-fold",
        f"nn.Linear({C},{Dout}) on randn({B},{C},{N}).transpose(1,2)",
        lambda: (nn.Linear(C, Dout), torch.randn(B, C, N).transpose(1, 2)),
    )
    add(
        "linear_contiguous_3d",
        "matmul-fold",
        f"nn.Linear({C},{Dout}) on contiguous randn({B},{N},{C}) (control)",
        lambda: (nn.Linear(C, Dout), torch.randn(B, N, C)),
    )
    add(
        "linear_nobias_transposed_3d",
        "matmul-fold",
        f"nn.Linear({C},{Dout},bias=False) on a transposed input",
        lambda: (nn.Linear(C, Dout, bias=False), torch.randn(B, C, N).transpose(1, 2)),
    )
    add(
        "linear_sliced_3d",
        "matmul-fold",
        "nn.Linear on x[..., :C]: non-contiguous but foldable (control)",
        lambda: (nn.Linear(C, Dout), torch.randn(B, N, C + 8)[..., :C]),
    )
    add(
        "linear_permuted_4d",
        "matmul-fold",
        "nn.Linear(64,64) on randn(2,64,7,3).permute(0,2,3,1)",
        lambda: (nn.Linear(64, 64), torch.randn(2, 64, 7, 3).permute(0, 2, 3, 1)),
    )
    add(
        "linear_contiguous_4d",
        "matmul-fold",
        "nn.Linear(64,64) on contiguous randn(2,7,3,64) (control)",
        lambda: (nn.Linear(64, 64), torch.randn(2, 7, 3, 64)),
    )
    add(
        "linear_2d",
        "matmul-fold",
        f"nn.Linear({C},{Dout}) on a 2-D transposed input (addmm; control)",
        lambda: (nn.Linear(C, Dout), torch.randn(C, B * N).t()),
    )
    add(
        "linear_kwarg_input",
        "matmul-fold",
        "nn.Linear called as lin(input=x.transpose(1,2)) (keyword input)",
        lambda: (
            Lambda(lambda m, x: m.lin(input=x.transpose(1, 2)), modules={"lin": nn.Linear(C, Dout)}),
            torch.randn(B, C, N),
        ),
    )
    add(
        "functional_linear_raw_param",
        "matmul-fold",
        "custom module: F.linear(x.transpose(1,2), self.w, self.b), w (10,64), x (2,64,16)",
        lambda: (
            Lambda(lambda m, x: F.linear(x.transpose(1, 2), m.w, m.b), w=torch.randn(10, 64) / 8, b=torch.zeros(10)),
            torch.randn(2, 64, 16),
        ),
    )
    add(
        "matmul_raw_param_right",
        "matmul-fold",
        "custom module: x.transpose(1,2) @ self.w, w (16,1), x (2,16,16)",
        lambda: (Lambda(lambda m, x: x.transpose(1, 2) @ m.w, w=torch.randn(16, 1)), torch.randn(2, 16, 16)),
    )
    add(
        "matmul_raw_param_left",
        "matmul-fold",
        "custom module: self.w @ x, w (10,64), x contiguous (2,64,16)",
        lambda: (Lambda(lambda m, x: m.w @ x, w=torch.randn(10, 64) / 8), torch.randn(2, 64, 16)),
    )
    add(
        "matmul_raw_param_left_keep_rule",
        "matmul-fold",
        "same as a class TokenMix, with sbpatch.add_keep_rule(TokenMix, 'w') (the user's remedy)",
        lambda: (TokenMix(torch.randn(10, 64) / 8), torch.randn(2, 64, 16)),
    )
    add(
        "matmul_broadcast_batch1_param",
        "matmul-fold",
        "custom module: x @ self.w, w (1,16,1), x contiguous (2,16,16)",
        lambda: (Lambda(lambda m, x: x @ m.w, w=torch.randn(1, 16, 1)), torch.randn(2, 16, 16)),
    )
    add(
        "matmul_param_derived_2d",
        "matmul-fold",
        "custom module: softmax(self.mix) @ x, mix (16,16), x (2,16,3)",
        lambda: (Lambda(lambda m, x: m.mix.softmax(-1) @ x, mix=torch.randn(16, 16)), torch.randn(2, 16, 3)),
    )

    def act2d(m: nn.Module, x: Tensor) -> Tensor:  # (B,N,C) non-foldable @ (C,K), a 2-D activation of x and weights
        return x.transpose(1, 2) @ m.key(x.mean(0))

    add(
        "matmul_activation_2d",
        "matmul-fold",
        "x.transpose(1,2) @ self.key(x.mean(0)), key=nn.Linear(16,1), x (2,16,16): 2-D operand live only via weights",
        lambda: (Lambda(act2d, modules={"key": nn.Linear(16, 1)}), torch.randn(2, 16, 16)),
    )
    add(
        "matmul_activation_2d_keep",
        "matmul-fold",
        "same, sbpatch.frozen(model, keep='key') (the user's remedy)",
        lambda: (Lambda(act2d, modules={"key": nn.Linear(16, 1)}), torch.randn(2, 16, 16)),
        keep=("key",),
    )
    add(
        "einsum_param",
        "einsum-bmm",
        "custom module: einsum('bnc,oc->bno', x.transpose(1,2), self.w)",
        lambda: (
            Lambda(lambda m, x: torch.einsum("bnc,oc->bno", x.transpose(1, 2), m.w), w=torch.randn(Dout, C) / C**0.5),
            torch.randn(B, C, N),
        ),
    )
    add(
        "bmm_baddbmm_param",
        "einsum-bmm",
        "custom module: baddbmm(b, x.transpose(1,2), w.expand(B,C,Dout))",
        lambda: (
            Lambda(
                lambda m, x: torch.baddbmm(m.b, x.transpose(1, 2), m.w.expand(x.shape[0], C, Dout)),
                w=torch.randn(C, Dout) / C**0.5,
                b=torch.zeros(Dout),
            ),
            torch.randn(B, C, N),
        ),
    )
    add(
        "tensordot_param",
        "einsum-bmm",
        "custom module: tensordot(x.transpose(1,2), self.w, dims=([2],[1]))",
        lambda: (
            Lambda(
                lambda m, x: torch.tensordot(x.transpose(1, 2), m.w, dims=([2], [1])), w=torch.randn(Dout, C) / C**0.5
            ),
            torch.randn(B, C, N),
        ),
    )

    def wn_param() -> tuple[nn.Module, Tensor]:
        return nn.utils.parametrizations.weight_norm(nn.Linear(C, Dout)), torch.randn(B, C, N).transpose(1, 2)

    def wn_legacy() -> tuple[nn.Module, Tensor]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return nn.utils.weight_norm(nn.Linear(C, Dout)), torch.randn(B, C, N).transpose(1, 2)

    add(
        "linear_parametrized_weight_norm",
        "matmul-fold",
        "parametrizations.weight_norm(nn.Linear) on a transposed input",
        wn_param,
    )
    add(
        "linear_parametrized_spectral_norm",
        "matmul-fold",
        "parametrizations.spectral_norm(nn.Linear), eval, on a transposed input",
        lambda: (
            nn.utils.parametrizations.spectral_norm(nn.Linear(C, Dout)).eval(),
            torch.randn(B, C, N).transpose(1, 2),
        ),
    )
    add(
        "linear_legacy_weight_norm",
        "matmul-fold",
        "nn.utils.weight_norm(nn.Linear) (hook) on a transposed input",
        wn_legacy,
    )

    def ckpt_fn(m: nn.Module, x: Tensor) -> Tensor:
        return torch.utils.checkpoint.checkpoint(m.lin, x.transpose(1, 2), use_reentrant=True)

    add(
        "checkpoint_reentrant_linear",
        "matmul-fold",
        "checkpoint(nn.Linear, x.transpose(1,2), use_reentrant=True)",
        lambda: (Lambda(ckpt_fn, modules={"lin": nn.Linear(C, Dout)}), torch.randn(B, C, N)),
        passes=("grad",),
    )

    # -- MultiheadAttention / Transformer --------------------------------------------------------------------------
    Bm, E, H, L = 2, 32, 2, 17  # shapes where the in-projection fold shows

    class MHA(nn.Module):
        def __init__(self, **kw: Any) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H, **kw)

        def forward(self, x: Tensor) -> Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    class CrossMHA(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H, kdim=24, vdim=24, batch_first=True)
            self.mem = nn.Linear(E, 24)

        def forward(self, x: Tensor) -> Tensor:
            m = self.mem(x)
            return self.attn(x, m, m, need_weights=False)[0]

    add(
        "mha_batch_first",
        "mha",
        f"nn.MultiheadAttention({E},{H},batch_first=True) self-attention, eval",
        lambda: (MHA(batch_first=True).eval(), torch.randn(Bm, L, E)),
    )
    add(
        "mha_batch_first_train",
        "mha",
        "same, train mode (dropout 0): no fast path",
        lambda: (MHA(batch_first=True), torch.randn(Bm, L, E)),
        train=True,
    )
    add(
        "mha_seq_first",
        "mha",
        "nn.MultiheadAttention(batch_first=False) on (L,B,E), eval",
        lambda: (MHA().eval(), torch.randn(L, Bm, E)),
    )
    add(
        "mha_seq_first_transposed",
        "mha",
        "nn.MultiheadAttention(batch_first=False) on randn(B,L,E).transpose(0,1) (non-foldable), eval",
        lambda: (MHA().eval(), torch.randn(Bm, L, E).transpose(0, 1)),
    )
    add(
        "mha_kdim_vdim_cross",
        "mha",
        "nn.MultiheadAttention(kdim=vdim=24, batch_first=True), cross-attention, eval",
        lambda: (CrossMHA().eval(), torch.randn(Bm, L, E)),
    )

    def encoder(batch_first: bool, mask: bool) -> Callable[[], tuple[nn.Module, Tensor]]:
        def build() -> tuple[nn.Module, Tensor]:
            layer = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=batch_first)
            enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
            pad = torch.zeros(Bm, L, dtype=torch.bool)
            pad[0, -5:] = True

            def fwd(m: nn.Module, x: Tensor) -> Tensor:
                y = m.enc(x, src_key_padding_mask=pad if mask else None)
                return y.to_padded_tensor(0.0) if y.is_nested else y

            x = torch.randn(Bm, L, E) if batch_first else torch.randn(L, Bm, E)
            return Lambda(fwd, modules={"enc": enc}).eval(), x

        return build

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        add(
            "encoder_batch_first",
            "transformer",
            "nn.TransformerEncoder(2 layers, batch_first=True), eval",
            encoder(True, False),
        )
        add(
            "encoder_batch_first_padmask",
            "transformer",
            "same with src_key_padding_mask (nested-tensor fast path), eval",
            encoder(True, True),
        )
        add(
            "encoder_seq_first",
            "transformer",
            "nn.TransformerEncoder(2 layers, batch_first=False), eval",
            encoder(False, False),
        )

    def decoder() -> tuple[nn.Module, Tensor]:
        dec = nn.TransformerDecoderLayer(E, H, 64, dropout=0.0, batch_first=True)
        mem = torch.randn(Bm, 9, E)
        return Lambda(lambda m, x: m.dec(x, mem), modules={"dec": dec}).eval(), torch.randn(Bm, L, E)

    add("decoder_layer_batch_first", "transformer", "nn.TransformerDecoderLayer(batch_first=True), eval", decoder)

    # -- RNN / LSTM / GRU -----------------------------------------------------------------------------------------
    Br, Din, Hd, T = 2, 16, 32, 20  # shapes where the input-projection fold shows

    def rnn(kind: type[nn.RNNBase], **kw: Any) -> Callable[[], tuple[nn.Module, Tensor]]:
        def build() -> tuple[nn.Module, Tensor]:
            bf = kw.get("batch_first", False)
            return (
                Lambda(lambda m, x: first(m.rnn(x)), modules={"rnn": kind(Din, Hd, **kw)}).eval(),
                torch.randn(Br, T, Din) if bf else torch.randn(T, Br, Din),
            )

        return build

    add(
        "lstm_batch_first",
        "rnn",
        "nn.LSTM(batch_first=True) (CPU float32: oneDNN path)",
        rnn(nn.LSTM, batch_first=True),
    )
    add("lstm_seq_first", "rnn", "nn.LSTM(batch_first=False)", rnn(nn.LSTM))
    add(
        "lstm_batch_first_train",
        "rnn",
        "nn.LSTM(batch_first=True), train mode",
        rnn(nn.LSTM, batch_first=True),
        train=True,
    )
    add(
        "lstm_2layer_bidir_batch_first",
        "rnn",
        "nn.LSTM(num_layers=2, bidirectional=True, batch_first=True)",
        rnn(nn.LSTM, num_layers=2, bidirectional=True, batch_first=True),
    )
    add(
        "lstm_proj_batch_first",
        "rnn",
        "nn.LSTM(proj_size=16, batch_first=True) (native path)",
        rnn(nn.LSTM, proj_size=16, batch_first=True),
    )
    add(
        "lstm_batch_first_no_mkldnn",
        "rnn",
        "nn.LSTM(batch_first=True) with torch.backends.mkldnn disabled",
        rnn(nn.LSTM, batch_first=True),
        context=lambda: torch.backends.mkldnn.flags(enabled=False),
    )
    add("gru_batch_first", "rnn", "nn.GRU(batch_first=True)", rnn(nn.GRU, batch_first=True))
    add("gru_seq_first", "rnn", "nn.GRU(batch_first=False)", rnn(nn.GRU))
    add(
        "gru_2layer_bidir_batch_first",
        "rnn",
        "nn.GRU(num_layers=2, bidirectional=True, batch_first=True)",
        rnn(nn.GRU, num_layers=2, bidirectional=True, batch_first=True),
    )
    add("rnn_tanh_batch_first", "rnn", "nn.RNN(batch_first=True)", rnn(nn.RNN, batch_first=True))

    # -- scaled_dot_product_attention -----------------------------------------------------------------------------
    hd = E // H

    def heads(t: Tensor) -> Tensor:
        return t.unflatten(-1, (H, hd)).transpose(1, 2)

    def sdpa_fn(use_mask: bool) -> Callable[[nn.Module, Tensor], Tensor]:
        def fwd(m: nn.Module, x: Tensor) -> Tensor:
            q, k, v = m.qkv(x).chunk(3, dim=-1)
            mask = m.bias if use_mask else None
            y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
            return y.transpose(1, 2).flatten(2)

        return fwd

    add(
        "sdpa_qkv_from_linear",
        "sdpa",
        "F.scaled_dot_product_attention(q,k,v) on nn.Linear projections",
        lambda: (Lambda(sdpa_fn(False), modules={"qkv": nn.Linear(E, 3 * E)}), torch.randn(B, L, E)),
    )
    add(
        "sdpa_learned_bias_mask",
        "sdpa",
        "same with attn_mask = a (1,H,L,L) Parameter (a learned position bias)",
        lambda: (
            Lambda(sdpa_fn(True), modules={"qkv": nn.Linear(E, 3 * E)}, bias=torch.randn(1, H, L, L) * 0.1),
            torch.randn(B, L, E),
        ),
    )

    add(
        "sdpa_learned_bias_mask_keep",
        "sdpa",
        "same, sbpatch.frozen(model, keep='bias') (the user's remedy)",
        lambda: (
            Lambda(sdpa_fn(True), modules={"qkv": nn.Linear(E, 3 * E)}, bias=torch.randn(1, H, L, L) * 0.1),
            torch.randn(B, L, E),
        ),
        keep=("bias",),
    )

    def beit() -> tuple[nn.Module, Tensor]:
        from timm.models.beit import Beit

        m = Beit(
            img_size=32,
            patch_size=4,
            embed_dim=64,
            depth=2,
            num_heads=4,
            num_classes=10,
            use_rel_pos_bias=True,
            use_abs_pos_emb=False,
        )
        return m.eval(), torch.rand(B, 3, 32, 32)

    add("timm_beit_relpos", "sdpa", "timm Beit(img 32, patch 4, dim 64, depth 2, rel-pos bias), eval", beit, heavy=True)

    def timm_model(name: str, size: int) -> Callable[[], tuple[nn.Module, Tensor]]:
        def build() -> tuple[nn.Module, Tensor]:
            import timm

            return timm.create_model(name, pretrained=False, num_classes=10, img_size=size).eval(), torch.rand(
                2, 3, size, size
            )

        return build

    add(
        "timm_coatnet_nano_rw",
        "sdpa",
        "timm coatnet_nano_rw_224 at 64 px, B=2, eval",
        timm_model("coatnet_nano_rw_224", 64),
        heavy=True,
    )
    add(
        "timm_vit_relpos_small",
        "sdpa",
        "timm vit_relpos_small_patch16_224 at 64 px, B=2, eval",
        timm_model("vit_relpos_small_patch16_224", 64),
        heavy=True,
    )

    # -- autocast ------------------------------------------------------------------------------------------------
    def loop(m: nn.Module, x: Tensor) -> Tensor:
        for _ in range(32):
            x = torch.tanh(m.lin(x))
        return x.float()

    def loop_in_autocast(m: nn.Module, x: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loop(m, x)

    add(
        "autocast_per_forward",
        "autocast",
        "nn.Linear(256,256) applied 32x in one forward that enters torch.autocast('cpu', bf16) itself",
        lambda: (Lambda(loop_in_autocast, modules={"lin": nn.Linear(256, 256)}), torch.randn(64, 256)),
    )
    add(
        "autocast_whole_run",
        "autocast",
        "same loop, the whole run (all passes) inside one torch.autocast('cpu', bf16) region",
        lambda: (Lambda(loop, modules={"lin": nn.Linear(256, 256)}), torch.randn(64, 256)),
        context=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    )

    # -- convolution ---------------------------------------------------------------------------------------------
    add(
        "conv2d_3x3_b16",
        "conv",
        "nn.Conv2d(16,32,3,padding=1), batch 16 (NNPACK-eligible size)",
        lambda: (nn.Conv2d(16, 32, 3, padding=1), torch.randn(16, 16, 16, 16)),
    )
    add(
        "conv2d_1x1_b2",
        "conv",
        "nn.Conv2d(16,32,1), batch 2 (1x1: slow path vs oneDNN by thread count)",
        lambda: (nn.Conv2d(16, 32, 1), torch.randn(2, 16, 16, 16)),
    )
    add(
        "conv2d_depthwise_3x3",
        "conv",
        "nn.Conv2d(32,32,3,groups=32) (depthwise; winograd only on ARM)",
        lambda: (nn.Conv2d(32, 32, 3, padding=1, groups=32), torch.randn(B, 32, 16, 16)),
    )
    add("conv1d", "conv", "nn.Conv1d(16,32,5)", lambda: (nn.Conv1d(16, 32, 5), torch.randn(B, 16, 64)))
    add(
        "conv_transpose2d",
        "conv",
        "nn.ConvTranspose2d(16,8,4,stride=2)",
        lambda: (nn.ConvTranspose2d(16, 8, 4, stride=2), torch.randn(B, 16, 8, 8)),
    )
    add("conv3d", "conv", "nn.Conv3d(4,8,3)", lambda: (nn.Conv3d(4, 8, 3), torch.randn(2, 4, 8, 8, 8)))

    # -- normalization -------------------------------------------------------------------------------------------
    def norm(mod: Callable[[], nn.Module], shape: tuple[int, ...]) -> Callable[[], tuple[nn.Module, Tensor]]:
        def build() -> tuple[nn.Module, Tensor]:
            m = (
                nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), mod())
                if len(shape) == 4
                else nn.Sequential(nn.Linear(shape[-1], shape[-1]), mod())
            )
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
            return m, torch.randn(*shape)

        return build

    add("batchnorm2d_eval", "norm", "Conv2d then nn.BatchNorm2d, eval", norm(lambda: nn.BatchNorm2d(8), (B, 8, 8, 8)))
    add(
        "batchnorm2d_train",
        "norm",
        "Conv2d then nn.BatchNorm2d, train",
        norm(lambda: nn.BatchNorm2d(8), (B, 8, 8, 8)),
        train=True,
    )
    add("groupnorm", "norm", "Conv2d then nn.GroupNorm(2,8)", norm(lambda: nn.GroupNorm(2, 8), (B, 8, 8, 8)))
    add("layernorm", "norm", "Linear then nn.LayerNorm", norm(lambda: nn.LayerNorm(64), (B, L, 64)))
    add("rmsnorm", "norm", "Linear then nn.RMSNorm", norm(lambda: nn.RMSNorm(64), (B, L, 64)))

    # -- embedding -----------------------------------------------------------------------------------------------
    def emb(kind: str) -> Callable[[], tuple[nn.Module, Tensor]]:
        def build() -> tuple[nn.Module, Tensor]:
            idx = torch.randint(0, 1000, (B, 50))
            table = nn.Embedding(1000, 64) if kind == "emb" else nn.EmbeddingBag(1000, 64, mode=kind)

            def fwd(m: nn.Module, x: Tensor) -> Tensor:  # x: a float input so the grad pass has an input grad
                e = m.table(idx)
                return e * x if kind == "emb" else e * x[:, 0]

            return Lambda(fwd, modules={"table": table}), torch.randn(B, 50, 64) if kind == "emb" else torch.randn(
                B, 64, 64
            )

        return build

    add("embedding", "embedding", "nn.Embedding(1000,64) lookup (times the input)", emb("emb"))
    for mode in ("sum", "mean", "max"):
        add(f"embedding_bag_{mode}", "embedding", f"nn.EmbeddingBag(1000,64,mode='{mode}')", emb(mode))

    # -- pooling -------------------------------------------------------------------------------------------------
    add(
        "maxpool1d_after_conv",
        "pool",
        "nn.Conv1d then F.max_pool1d(3) (activation requires grad only when live)",
        lambda: (nn.Sequential(nn.Conv1d(16, 32, 3), nn.MaxPool1d(3)), torch.randn(B, 16, 256)),
    )

    def pool_bf16() -> tuple[nn.Module, Tensor]:
        return nn.Sequential(nn.Conv2d(16, 32, 3), nn.MaxPool2d(2)).to(torch.bfloat16), torch.randn(
            B, 16, 32, 32, dtype=torch.bfloat16
        )

    add(
        "maxpool2d_after_conv_bf16",
        "pool",
        "bfloat16 Conv2d then nn.MaxPool2d(2) (oneDNN pooling when no grad)",
        pool_bf16,
    )

    # -- dropout -------------------------------------------------------------------------------------------------
    add(
        "dropout_train",
        "dropout",
        "nn.Linear then nn.Dropout(0.3), train mode",
        lambda: (nn.Sequential(nn.Linear(64, 64), nn.Dropout(0.3)), torch.randn(B, L, 64)),
        train=True,
    )

    if include_compile:

        def compiled() -> tuple[nn.Module, Tensor]:
            torch._dynamo.reset()  # no graph from an earlier case (dynamo does not guard on hooks)
            inner = nn.Sequential(nn.Linear(C, Dout), nn.GELU())
            return Lambda(lambda m, x: m.f(x.transpose(1, 2)), modules={"f": torch.compile(inner)}), torch.randn(
                B, C, N
            )

        what = f"torch.compile(Sequential(nn.Linear({C},{Dout}), GELU)) on a transposed input (inductor)"
        add(
            "torch_compile_frozen_first",
            "compile",
            what + "; first frozen call by the one-liner, then sbpatch",
            compiled,
            heavy=True,
            order=("live", "frozen", "sbpatch"),
        )
        add(
            "torch_compile_sbpatch_first",
            "compile",
            what + "; first frozen call by sbpatch",
            compiled,
            heavy=True,
            order=("live", "sbpatch", "frozen"),
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# running


# fmt: off
SKIP_OPS = frozenset({  # views, allocation and bookkeeping: not the kernels that differ
    "detach", "alias", "view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze",
    "as_strided", "slice", "select", "split", "split_with_sizes", "unbind", "chunk", "empty", "empty_like",
    "empty_strided", "lift_fresh", "clone", "copy_", "ones_like", "zeros_like", "unflatten", "flatten", "reshape",
    "_reshape_alias", "contiguous", "is_same_size", "fill_", "_local_scalar_dense", "zero_", "numpy_T", "new_empty",
    "new_zeros", "new_ones", "resolve_conj", "resolve_neg", "result_type", "item", "size", "stride", "dim",
    "is_nonzero", "_has_compatible_shallow_copy_type", "requires_grad_", "set_", "narrow", "diagonal",
})
# fmt: on


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The profiler's C++ start/stop lines go to fd 2; keep the run's output readable."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def forward_ops(model: nn.Module, x0: Tensor, kind: str) -> Counter[str]:
    """The ATen ops of one forward (torch.profiler; a TorchDispatchMode would itself change some paths, since
    ``isTensorSubclassLike`` is true while a dispatch mode is active)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(1)
    x = x0.detach().clone().requires_grad_(kind == "grad")
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        first(model(x))
    ops: Counter[str] = Counter()
    for e in prof.events():
        name = e.name.removeprefix("aten::")
        if e.name.startswith("aten::") and name not in SKIP_OPS:
            ops[name] += 1
    return ops


def one_pass(model: nn.Module, x0: Tensor, kind: str, r: list[Tensor | None]) -> list[Tensor]:
    """One pass; returns the tensors compared for identity. ``r`` caches the fixed random loss weights."""
    torch.manual_seed(1)
    if kind == "query":
        return [first(model(x0)).detach()]
    x = x0.detach().clone().requires_grad_(True)
    y = first(model(x))
    if r[0] is None or r[0].shape != y.shape:
        g = torch.Generator().manual_seed(2)
        r[0] = torch.randn(y.shape, generator=g, dtype=torch.float32).to(y.dtype)
    (y.float() * r[0].float()).sum().backward()
    for p in model.parameters():
        p.grad = None
    assert x.grad is not None
    return [y.detach(), x.grad]


def equal(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.equal(s, t) for s, t in zip(a, b))


def max_abs_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((s.double() - t.double()).abs().max()) for s, t in zip(a, b))


def op_diff(live: Counter[str], frozen: Counter[str]) -> dict[str, dict[str, int]]:
    return {
        "live_only": dict(sorted((live - frozen).items())),
        "frozen_only": dict(sorted((frozen - live).items())),
    }


def run_case(case: Case, repeats: int) -> None:
    """Run ``case`` in every state; a state whose pass raises is recorded (``error_<state>``), not timed."""
    model, x0 = case.build()
    model.train(case.train)
    with case.context():
        for kind in case.passes:
            r: list[Tensor | None] = [None]
            res: dict[str, Any] = {}
            outs: dict[str, list[Tensor] | None] = {}
            traces: dict[str, Counter[str]] = {}
            for s in case.order:
                kept: list[str] = []
                try:
                    with state(model, s, case.keep) as kept:
                        outs[s] = one_pass(model, x0, kind, r)
                    with state(model, s, case.keep):
                        traces[s] = forward_ops(model, x0, kind)
                except Exception as e:  # a state that breaks the call is a result
                    outs[s] = None
                    res[f"error_{s}"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if s == "sbpatch":
                    res["sbpatch_kept_live"] = kept
            live = outs["live"]
            assert live is not None, res.get("error_live")
            for s in STATES[1:]:
                got = outs[s]
                res[f"identical_{s}"] = got is not None and equal(live, got)
                if got is not None and not res[f"identical_{s}"]:
                    res[f"max_abs_diff_{s}"] = max_abs_diff(live, got)
                if s in traces:
                    res[f"forward_ops_live_vs_{s}"] = op_diff(traces["live"], traces[s])
            timed = tuple(s for s in STATES if outs[s] is not None)
            res["cpu_ms"] = time_states(
                model, x0, kind, max(3, repeats // 3) if case.heavy else repeats, case.keep, timed
            )
            case.results[kind] = res


def time_states(
    model: nn.Module,
    x0: Tensor,
    kind: str,
    repeats: int,
    keep: tuple[str, ...] = (),
    states: tuple[str, ...] = STATES,
) -> dict[str, Any]:
    """CPU time of one pass per state (ms): medians and interquartile ranges of interleaved rounds."""
    r: list[Tensor | None] = [None]
    times: dict[str, list[float]] = {s: [] for s in states}
    for rep in range(repeats + 1):
        k = rep % len(states)
        for s in states[k:] + states[:k]:
            with state(model, s, keep):
                t0 = time.process_time()
                one_pass(model, x0, kind, r)
                dt = time.process_time() - t0
            if rep:  # the first round is a warm-up
                times[s].append(dt * 1e3)
    med = {s: statistics.median(v) for s, v in times.items()}
    spread = {s: (statistics.quantiles(v, n=4)[2] - statistics.quantiles(v, n=4)[0]) for s, v in times.items()}
    return {
        "median": {s: round(v, 4) for s, v in med.items()},
        "iqr": {s: round(v, 4) for s, v in spread.items()},
        "speedup_over_live": {s: round(med["live"] / med[s], 3) for s in states if s != "live"},
    }


def linear_sweep() -> dict[str, Any]:
    """nn.Linear(C, O) on randn(B, C, N).transpose(1, 2): shapes whose output differs frozen vs live."""
    grid = {"B": (1, 2, 8), "C": (16, 64, 256), "N": (16, 49, 128), "O": (10, 64, 256, 1000)}
    rows = []
    for b in grid["B"]:
        for c in grid["C"]:
            for n in grid["N"]:
                for o in grid["O"]:
                    torch.manual_seed(0)
                    lin = nn.Linear(c, o)
                    x = torch.randn(b, c, n).transpose(1, 2)
                    got = {}
                    for s in STATES:
                        with state(lin, s):
                            got[s] = lin(x).detach()
                    rows.append(
                        {
                            "B": b,
                            "C": c,
                            "N": n,
                            "O": o,
                            "identical_frozen": torch.equal(got["live"], got["frozen"]),
                            "identical_sbpatch": torch.equal(got["live"], got["sbpatch"]),
                        }
                    )
    differ = [r for r in rows if not r["identical_frozen"]]
    return {
        "grid": grid,
        "shapes": len(rows),
        "differ_frozen": len(differ),
        "differ_sbpatch": sum(not r["identical_sbpatch"] for r in rows),
        "differing_shapes": [(r["B"], r["C"], r["N"], r["O"]) for r in differ],
    }


def machine(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "nnpack": torch._nnpack_available(),
        "threads": threads,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "sbpatch": sbpatch.__version__,
        "sbpatch_file": sbpatch.__file__,
        "sbpatch_commit": _git("rev-parse", "--short", "HEAD"),
        "freeze_py_commit": _git("log", "-1", "--format=%h", "--", "sbpatch/freeze.py"),
        "freeze_py_modified": bool(_git("status", "--porcelain", "--", "sbpatch/freeze.py")),
    }


def _git(*args: str) -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per case and pass (default 15)")
    p.add_argument("--only", default=None, help="run only the cases whose id contains this")
    p.add_argument("--compile", action="store_true", help="add the torch.compile (inductor) cases")
    p.add_argument("--no-sweep", action="store_true", help="skip the nn.Linear shape sweep")
    p.add_argument("--out", default=os.path.join(RESULTS, "kernels.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*nested tensors.*")
    warnings.filterwarnings("ignore", message=".*enable_nested_tensor.*")
    started = time.time()
    data: dict[str, Any] = {"machine": machine(torch.get_num_threads()), "repeats": args.repeats}
    results = []
    for case in cases(args.compile):
        if args.only and args.only not in case.id:
            continue
        run_case(case, args.repeats)
        line = []
        for kind, res in case.results.items():
            t = res["cpu_ms"]
            eq = " ".join(
                f"{s[0].upper()}{'!' if f'error_{s}' in res else '=' if res[f'identical_{s}'] else 'X'}"
                for s in STATES[1:]
            )
            sp = t["speedup_over_live"]
            speed = " ".join(f"live/{s} {sp[s]:.2f}x" if s in sp else f"{s} raised" for s in STATES[1:])
            line.append(f"{kind}: {eq} {speed}")
        kept = next(iter(case.results.values())).get("sbpatch_kept_live", [])
        print(f"{case.id:38s} " + " | ".join(line) + (f"  kept: {', '.join(kept)}" if kept else ""), flush=True)
        results.append({"id": case.id, "entry": case.entry, "what": case.what, "train": case.train, **case.results})
    data["cases"] = results
    if not args.no_sweep and not args.only:
        data["linear_sweep"] = linear_sweep()
        sw = data["linear_sweep"]
        print(
            f"linear sweep: {sw['differ_frozen']} of {sw['shapes']} shapes differ frozen vs live, "
            f"{sw['differ_sbpatch']} with sbpatch"
        )
    data["seconds"] = round(time.time() - started, 1)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out} ({data['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
